//! The request lifecycle against the real kernel (run inside the test guest): events a VM or a crash
//! brings — a reset with requests stuck in the model, the driver changing its memory map mid-I/O (1000
//! times), memory unmapped under a stuck request, a ring enabled after DRIVER_OK, a server killed with I/O
//! pending. After each: answered in bounded time, every request completed once or fenced, and a fenced
//! request's late result never reaches the driver's memory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vduse_core::memory::Pins;
use vduse_core::queue::{Owner, Part};
use vduse_core::ram_blk::{RamBlk, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vduse_core::{
    Completer, Completion, DeviceModel, DeviceOptions, Reclaim, RequestBatch, Serving, Ticket, VduseDevice,
};
use vhost::vdpa::VhostVdpa;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::vdpa::{attach_vhost, batched, memfd, ram_device, Setup, VdpaDriver, BASE};
use common::{init_log, sh};
use vduse_core::rig::desc;

const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;

/// A request the model holds: its ticket, completer, and pinned raw pointers to its writable buffers
/// (what a zero-copy backend — a native read — would be writing into).
struct Held {
    ticket: Ticket,
    completer: Completer,
    pins: Pins,
    ptrs: Vec<(*mut u8, usize)>,
}
// SAFETY: the pointers are only written by the test, into mappings the pins keep alive.
unsafe impl Send for Held {}

/// RAM virtio-blk that holds (never completes on its own) reads of one sector.
struct StallAt {
    inner: RamBlk,
    sector: u64,
    held: Mutex<Vec<Held>>,
}

impl StallAt {
    fn new(name: &str, sector: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: RamBlk::new(8 << 20, 1, 256, name),
            sector,
            held: Mutex::new(Vec::new()),
        })
    }

    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// The late backend: reads 0x5a into every held buffer through its old pointers (a native read that
    /// outlived its request: its system call fails on revoked memory), then unpins and completes.
    fn release_late(&self) -> Vec<Completion> {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        held.into_iter()
            .map(|mut h| {
                for &(p, n) in &h.ptrs {
                    let _ = vduse_core::rig::late_read(p, n, 0x5a);
                }
                h.pins.release();
                let c = h.completer.complete(h.ticket, 4097, Some(VIRTIO_BLK_S_OK));
                h.completer.flush();
                c
            })
            .collect()
    }
}

impl DeviceModel for StallAt {
    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        let queue = completer.queue();
        for req in batch.iter() {
            let mut hdr = [0u8; 16];
            let sector = match req.header.get(..16) {
                Some(h) => {
                    hdr.copy_from_slice(h);
                    u64::from_le_bytes(hdr[8..16].try_into().unwrap())
                }
                None => u64::MAX,
            };
            let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            if kind == VIRTIO_BLK_T_IN && sector == self.sector {
                let mut pins = Pins::new();
                let data = u64::from(req.shape.writable_bytes) - 1;
                assert_eq!(
                    queue.pin(req.ticket, Owner::Model, Part::Writable, 0, data, &mut pins),
                    Ok(true)
                );
                let ptrs = pins.ranges().to_vec();
                self.held.lock().unwrap().push(Held {
                    ticket: req.ticket,
                    completer: completer.clone(),
                    pins,
                    ptrs,
                });
                continue;
            }
            let (status, written) = self.inner.execute(queue, &req);
            completer.complete(req.ticket, written + 1, Some(status));
        }
    }
}

fn stall_device(name: &str, model: &Arc<StallAt>, tweak: impl FnOnce(&mut DeviceOptions)) -> VduseDevice {
    let mut opts = DeviceOptions::new(name);
    opts.replace_stale = true;
    opts.drain_timeout = Duration::from_secs(1);
    tweak(&mut opts);
    let mut spec = model.inner.spec();
    spec.kind = "blk".into();
    VduseDevice::create(opts, spec, Serving::Workers(model.clone()), None).expect("create")
}

/// A read of `sector` into `data` (4 KiB), header and status in BASE memory.
fn read_request(d: &VdpaDriver, data: u64, sector: u64) -> Vec<(u16, virtio_queue::desc::RawDescriptor)> {
    let b = BASE + 0x20_0000;
    d.header(b, VIRTIO_BLK_T_IN, sector);
    vec![
        (0, desc(b, 16, N, 1)),
        (1, desc(data, 4096, W | N, 2)),
        (2, desc(b + 0x100, 1, W, 0)),
    ]
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_reset_with_a_request_stuck_in_the_model_is_bounded_and_fenced() {
    init_log();
    const NAME: &str = "vduse-stuck-reset";
    let model = StallAt::new(NAME, 64);
    let device = stall_device(NAME, &model, |_| {});
    let node = attach_vhost(NAME);
    let mut d = VdpaDriver::open(
        &node,
        Setup {
            qsize: 256,
            event_idx: true,
            enable_late: false,
        },
    );
    let data = BASE + 0x30_0000;
    d.mem.write_slice(&[0xee; 4096], GuestAddress(data)).unwrap();
    d.offer(&read_request(&d, data, 64), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.held() == 0 {
        assert!(Instant::now() < deadline, "the model got the request");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The driver resets (a VM reboot): answered within the drain bound, not after the request.
    let t = Instant::now();
    d.vdpa.set_status(0).unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "reset answered in {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the request got its drain time: {took:?}"
    );
    let stats = device.stats();
    assert_eq!(stats.fenced, 1, "{stats:?}");
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    // The backend finishes late: its result must not land in the driver's buffer.
    assert_eq!(model.release_late(), vec![Completion::Stale]);
    let mut back = [0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(data)).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xee),
        "the late write never reached the old buffer"
    );
    assert_eq!(d.used_idx(), 0, "nothing was published for the fenced request");
    assert_eq!(device.stats().stale_completions, 1);
    // A new session is served at once.
    drop(d);
    let mut d = VdpaDriver::open(
        &node,
        Setup {
            qsize: 256,
            event_idx: true,
            enable_late: false,
        },
    );
    let b = BASE + 0x20_0000;
    d.header(b, VIRTIO_BLK_T_GET_ID, 0);
    let t = Instant::now();
    let (_, len) = d.submit(
        &[
            (0, desc(b, 16, N, 1)),
            (1, desc(b + 0x100, 20, W | N, 2)),
            (2, desc(b + 0x200, 1, W, 0)),
        ],
        0,
    );
    assert_eq!(len, 21);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the next session is served promptly"
    );
    d.finish(NAME, device);
}

fn mapping_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_iotlb_churn_with_requests_in_flight() {
    init_log();
    const NAME: &str = "vduse-churn";
    let mut device = ram_device(NAME, 8 << 20, 1, 256, |o| {
        o.drain_timeout = Duration::from_secs(1)
    });
    let node = attach_vhost(NAME);
    let d = VdpaDriver::open(
        &node,
        Setup {
            qsize: 256,
            event_idx: true,
            enable_late: false,
        },
    );
    let d = Arc::new(Mutex::new(d));
    let extra = memfd(1 << 20);
    // SAFETY: a fresh shared mapping of the memfd, unmapped at the end of the test.
    let extra_ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&extra),
            0,
        )
    };
    assert_ne!(extra_ptr, libc::MAP_FAILED);
    const EXTRA: u64 = 0x800_0000;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // I/O on the main region the whole time: write a pattern, read it back, compare.
    let io = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut d = d.lock().unwrap();
                let b = BASE + 0x30_0000;
                let pattern = (rounds % 251) as u8;
                d.mem
                    .write_slice(&[pattern; 4096], GuestAddress(b + 0x1000))
                    .unwrap();
                d.header(b, VIRTIO_BLK_T_OUT, 8 * u64::from(rounds % 64));
                let out = [
                    (0, desc(b, 16, N, 1)),
                    (1, desc(b + 0x1000, 4096, N, 2)),
                    (2, desc(b + 0x3000, 1, W, 0)),
                ];
                assert_eq!(d.submit(&out, 0).1, 1);
                d.header(b + 0x4000, VIRTIO_BLK_T_IN, 8 * u64::from(rounds % 64));
                let inn = [
                    (0, desc(b + 0x4000, 16, N, 1)),
                    (1, desc(b + 0x5000, 4096, W | N, 2)),
                    (2, desc(b + 0x7000, 1, W, 0)),
                ];
                assert_eq!(d.submit(&inn, 0).1, 4097);
                let mut back = vec![0u8; 4096];
                d.mem.read_slice(&mut back, GuestAddress(b + 0x5000)).unwrap();
                assert!(
                    back.iter().all(|&x| x == pattern),
                    "round {rounds}: read back what was written"
                );
                drop(d);
                rounds += 1;
            }
            rounds
        })
    };
    // The memory map changes from this thread while the I/O thread has requests in flight.
    let vdpa = d.lock().unwrap().vdpa.clone();
    let mut baseline = 0;
    for i in 0..1000 {
        batched(&vdpa, || vdpa.dma_map(EXTRA, 1 << 20, extra_ptr.cast(), false)).unwrap();
        batched(&vdpa, || vdpa.dma_unmap(EXTRA, 1 << 20)).unwrap();
        if i == 10 {
            // Measured in the state of the end: the extra region unmapped, and the device's map reloaded
            // since (the I/O thread keeps popping).
            std::thread::sleep(Duration::from_millis(200));
            baseline = mapping_count();
        }
    }
    // Counted in the state of the baseline: I/O still running, the device's map reloaded since.
    std::thread::sleep(Duration::from_millis(200));
    let after = mapping_count();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = io.join().expect("the I/O thread verified every round");
    assert!(rounds > 10, "I/O ran during the churn ({rounds} rounds)");
    assert_eq!(after, baseline, "no mapping leaked across 1000 IOTLB updates");
    let stats = device.stats();
    assert_eq!(stats.fenced, 0, "unchanged memory keeps its requests: {stats:?}");
    assert_eq!(stats.requests, stats.completions, "{stats:?}");
    assert_eq!(
        stats.drains, 0,
        "no request waited for an update it did not touch: {stats:?}"
    );
    d.lock().unwrap().vdpa.set_status(0).unwrap();
    // Every handle on the vhost-vdpa fd must go, or `vdpa dev del` waits for it.
    drop((d, vdpa));
    // SAFETY: the mapping from above.
    unsafe { libc::munmap(extra_ptr, 1 << 20) };
    sh(&format!("vdpa dev del {NAME}"));
    device.close().expect("destroy");
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_memory_unmapped_under_a_stuck_request_is_fenced_and_revoked() {
    init_log();
    const NAME: &str = "vduse-unmap-stuck";
    let model = StallAt::new(NAME, 64);
    let mut device = stall_device(NAME, &model, |_| {});
    let node = attach_vhost(NAME);
    let mut d = VdpaDriver::open(
        &node,
        Setup {
            qsize: 256,
            event_idx: true,
            enable_late: false,
        },
    );
    let extra = memfd(1 << 20);
    // SAFETY: a fresh shared mapping of the memfd; the driver's own view of it.
    let view = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&extra),
            0,
        )
    };
    assert_ne!(view, libc::MAP_FAILED);
    // SAFETY: the mapping above.
    unsafe { std::ptr::write_bytes(view.cast::<u8>(), 0xee, 4096) };
    const EXTRA: u64 = 0x800_0000;
    batched(&d.vdpa, || d.vdpa.dma_map(EXTRA, 1 << 20, view.cast(), false)).unwrap();
    d.offer(&read_request(&d, EXTRA, 64), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.held() == 0 {
        assert!(Instant::now() < deadline, "the model got the request");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    batched(&d.vdpa, || d.vdpa.dma_unmap(EXTRA, 1 << 20)).unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5) && took >= Duration::from_millis(900),
        "bounded drain: {took:?}"
    );
    assert_eq!(device.stats().fenced, 1);
    assert_eq!(model.release_late(), vec![Completion::Stale]);
    // SAFETY: the driver's mapping from above.
    let page = unsafe { std::slice::from_raw_parts(view.cast::<u8>(), 4096) };
    assert!(
        page.iter().all(|&b| b == 0xee),
        "the late write never reached the unmapped memory"
    );
    // Requests elsewhere are served as before. (The fenced one never gets a used entry: the driver took
    // its memory away under it.)
    let b = BASE + 0x20_0000;
    d.header(b, VIRTIO_BLK_T_GET_ID, 0);
    d.offer(
        &[
            (3, desc(b, 16, N, 4)),
            (4, desc(b + 0x100, 20, W | N, 5)),
            (5, desc(b + 0x200, 1, W, 0)),
        ],
        3,
    );
    assert!(
        d.wait_used(1, Duration::from_secs(10)),
        "the next request was served"
    );
    assert_eq!(d.used_elem(0), (3, 21));
    d.vdpa.set_status(0).unwrap();
    drop(d);
    // SAFETY: the mapping from above.
    unsafe { libc::munmap(view, 1 << 20) };
    sh(&format!("vdpa dev del {NAME}"));
    device.close().expect("destroy");
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_a_ring_enabled_after_driver_ok_is_served() {
    init_log();
    const NAME: &str = "vduse-late-ring";
    let device = ram_device(NAME, 1 << 20, 1, 256, |_| {});
    let node = attach_vhost(NAME);
    let mut d = VdpaDriver::open(
        &node,
        Setup {
            qsize: 256,
            event_idx: false,
            enable_late: true,
        },
    );
    let b = BASE + 0x20_0000;
    d.header(b, VIRTIO_BLK_T_GET_ID, 0);
    let (_, len) = d.submit(
        &[
            (0, desc(b, 16, N, 1)),
            (1, desc(b + 0x100, 20, W | N, 2)),
            (2, desc(b + 0x200, 1, W, 0)),
        ],
        0,
    );
    assert_eq!(len, 21);
    d.finish(NAME, device);
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_reclaim_fails_the_requests_of_a_killed_server_and_detaches_promptly() {
    init_log();
    const NAME: &str = "vduse-reclaim";
    if std::env::var_os("VDUSE_TEST_CHILD").is_some() {
        // Child: serve a disk whose sector 2048 never answers, attach it, say where, wait to be killed.
        let model = StallAt::new(NAME, 2048);
        let device = stall_device(NAME, &model, |_| {});
        sh(&format!("vdpa dev add name {NAME} mgmtdev vduse"));
        let dev = sh(&format!("ls /sys/bus/vdpa/devices/{NAME}/virtio*/block"))
            .trim()
            .to_string();
        println!("ready /dev/{dev}");
        std::thread::sleep(Duration::from_secs(600));
        drop(device);
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "guest_reclaim_fails_the_requests_of_a_killed_server_and_detaches_promptly",
            "--nocapture",
        ])
        .env("VDUSE_TEST_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let dev = loop {
        let line = lines.next().expect("child output").unwrap();
        if let Some(rest) = line.strip_prefix("ready ") {
            break rest.to_string();
        }
    };
    // A read that the server holds; then the server dies with it in flight.
    let mut dd = Command::new("dd")
        .args([
            &format!("if={dev}"),
            "of=/dev/null",
            "bs=512",
            "count=1",
            "skip=2048",
            "iflag=direct",
            "status=none",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        dd.try_wait().unwrap().is_none(),
        "the read is stuck in the server"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    let reclaim = Reclaim::open(NAME, Some("/run/vduse".into())).expect("reclaim");
    assert!(
        reclaim.took_over(),
        "the state file let the reclaimer take the queues over"
    );
    let status = dd.wait().unwrap();
    assert!(!status.success(), "the stuck read failed instead of hanging");
    sh(&format!("vdpa dev del {NAME}"));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "detached in {:?}",
        t.elapsed()
    );
    reclaim.destroy().expect("destroy");
    assert!(!vduse_core::list_devices().contains(&NAME.to_string()));
    assert!(
        !std::path::Path::new("/run/vduse").join(NAME).exists(),
        "the state file is gone"
    );
}
