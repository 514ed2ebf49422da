//! Native file I/O against the real kernel (run inside the test guest), on a disk made slow on purpose
//! (dm-delay): a driver that resets — a VM rebooting — or unmaps memory while a native read is in its
//! system call gets its answer only once that read can no longer reach the driver's memory, within the
//! kernel's budget, also when the map is gigabytes of touched pages and the janitor is busy unmapping
//! another such region; and a write the driver issues after a reset lands after the fenced one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vduse_backends::file_io::{IoPool, Op, OP_FLUSH, OP_READ, OP_WRITE};
use vduse_core::model::{Completer, DeviceModel};
use vduse_core::queue::RequestBatch;
use vduse_core::ram_blk::{
    RamBlk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vduse_core::{DeviceOptions, Serving, VduseDevice};
use vhost::vdpa::VhostVdpa;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

#[path = "../../vduse-core/tests/common/mod.rs"]
mod common;
use common::vdpa::{attach_vhost, batched, memfd, Setup, VdpaDriver, BASE};
use common::{init_log, sh};
use vduse_core::rig::desc;

const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;
/// Sectors at and past this one are on the slow disk (`SLOW_DELAY_MS` per I/O); below, a fast one.
const SLOW_SECTOR: u64 = 1 << 20;
const SLOW_DELAY_MS: u64 = 1500;
const DISK: u64 = 64 << 20;

/// virtio-blk on two files: a fast one (sectors below `SLOW_SECTOR`) and a slow one; every transfer is
/// native (the pool), as the TypeScript model does it for a file backend.
struct TwoDisks {
    fast: File,
    slow: File,
    pool: OnceLock<IoPool>,
}

impl DeviceModel for TwoDisks {
    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        let mut ops = Vec::new();
        for req in batch.iter() {
            let Some(h) = req.header.get(..16) else {
                completer.complete(req.ticket, 1, Some(VIRTIO_BLK_S_IOERR));
                continue;
            };
            let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
            let sector = u64::from_le_bytes(h[8..16].try_into().unwrap());
            let (fd, position) = if sector >= SLOW_SECTOR {
                (self.slow.as_raw_fd(), (sector - SLOW_SECTOR) * 512)
            } else {
                (self.fast.as_raw_fd(), sector * 512)
            };
            let (kind, skip) = match kind {
                VIRTIO_BLK_T_IN => (OP_READ, 0),
                VIRTIO_BLK_T_OUT => (OP_WRITE, 16),
                VIRTIO_BLK_T_FLUSH => (OP_FLUSH, 0),
                _ => {
                    completer.complete(req.ticket, 1, Some(VIRTIO_BLK_S_IOERR));
                    continue;
                }
            };
            ops.push(Op {
                ticket: req.ticket,
                fd,
                kind,
                position,
                skip,
            });
        }
        completer.flush();
        self.pool.get().expect("the pool").submit(ops);
    }
}

/// A 64 MiB image of `fill` behind dm-delay (`SLOW_DELAY_MS` on every read and write), and a fast one.
struct Disks {
    name: String,
    lo: String,
}

impl Disks {
    fn create(name: &str, fill: u8) -> Self {
        let root = std::env::var("VDUSE_VM_MODROOT").expect("VDUSE_VM_MODROOT (run in the guest)");
        let img = format!("/tmp/{name}.img");
        std::fs::write(&img, vec![fill; DISK as usize]).unwrap();
        let lo = sh(&format!(
            "modprobe -d {root} dm_delay; modprobe -d {root} loop; losetup -f --show {img}"
        ))
        .trim()
        .to_string();
        let sectors = DISK / 512;
        let d = SLOW_DELAY_MS;
        // No udev in the guest: dmsetup makes the /dev/mapper node itself.
        sh(&format!(
            "dmsetup create --noudevsync {name} --table '0 {sectors} delay {lo} 0 {d} {lo} 0 {d}'
             dmsetup mknodes {name}"
        ));
        Self {
            name: name.into(),
            lo,
        }
    }

    fn open(&self, flags: i32) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(format!("/dev/mapper/{}", self.name))
            .unwrap()
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dmsetup remove --noudevsync {n}; losetup -d {lo}; rm -f /tmp/{n}.img",
                n = self.name,
                lo = self.lo
            ))
            .status();
    }
}

fn fast_image(name: &str, fill: u8) -> File {
    let path = format!("/tmp/{name}-fast.img");
    std::fs::write(&path, vec![fill; DISK as usize]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

fn device(name: &str, slow: File, fast: File, drain: Duration) -> (VduseDevice, Arc<TwoDisks>) {
    let model = Arc::new(TwoDisks {
        fast,
        slow,
        pool: OnceLock::new(),
    });
    let mut opts = DeviceOptions::new(name);
    opts.replace_stale = true;
    opts.drain_timeout = drain;
    opts.state_dir = None;
    let spec = RamBlk::new(4096, 1, 256, name).spec();
    let mut spec = spec;
    // Capacity: the fast disk, then the slow one past SLOW_SECTOR.
    spec.config[0..8].copy_from_slice(&(SLOW_SECTOR + DISK / 512).to_le_bytes());
    let device = VduseDevice::create(opts, spec, Serving::Workers(model.clone()), None).expect("create");
    let _ = model.pool.set(IoPool::new(2, device.queues().to_vec()).unwrap());
    (device, model)
}

fn driver(node: &str) -> VdpaDriver {
    VdpaDriver::open(
        node,
        Setup {
            qsize: 256,
            event_idx: true,
            enable_late: false,
        },
    )
}

/// A read of `len` bytes at `sector` into `data`, as head `h` (descriptors 3h..3h+2).
fn read(d: &VdpaDriver, h: u16, data: u64, len: u32, sector: u64) -> Vec<(u16, RawDescriptor)> {
    request(d, h, VIRTIO_BLK_T_IN, data, len, sector)
}

/// A write of `len` bytes at `data` to `sector`, as head `h`.
fn write(d: &VdpaDriver, h: u16, data: u64, len: u32, sector: u64) -> Vec<(u16, RawDescriptor)> {
    request(d, h, VIRTIO_BLK_T_OUT, data, len, sector)
}

fn request(d: &VdpaDriver, h: u16, kind: u32, data: u64, len: u32, sector: u64) -> Vec<(u16, RawDescriptor)> {
    let b = BASE + 0x20_0000 + 0x100 * u64::from(h);
    d.header(b, kind, sector);
    let data_flags = if kind == VIRTIO_BLK_T_IN { W | N } else { N };
    let i = 3 * h;
    vec![
        (i, desc(b, 16, N, i + 1)),
        (i + 1, desc(data, len, data_flags, i + 2)),
        (i + 2, desc(b + 0x80, 1, W, 0)),
    ]
}

fn started(model: &TwoDisks, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while model
        .pool
        .get()
        .unwrap()
        .stats()
        .ops
        .load(std::sync::atomic::Ordering::Relaxed)
        < n
    {
        assert!(Instant::now() < deadline, "the pool started the request");
        std::thread::sleep(Duration::from_millis(5));
    }
    // In its system call now (the disk takes SLOW_DELAY_MS).
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_a_reset_is_answered_only_once_a_slow_native_read_cannot_reach_the_driver() {
    init_log();
    const NAME: &str = "vduse-slow-reset";
    let disks = Disks::create(NAME, 0x5a);
    let (device, model) = device(
        NAME,
        disks.open(0),
        fast_image(NAME, 0),
        Duration::from_millis(300),
    );
    let node = attach_vhost(NAME);
    let mut d = driver(&node);
    let data = BASE + 0x30_0000;
    d.mem.write_slice(&[0xee; 4096], GuestAddress(data)).unwrap();
    // A read from the slow disk, straight into the driver's buffer (zero-copy, pinned)…
    d.offer(&read(&d, 0, data, 4096, SLOW_SECTOR + 8), 0);
    started(&model, 1);
    // …when the driver resets (a VM reboot) and reuses its memory at once.
    let t = Instant::now();
    d.vdpa.set_status(0).unwrap();
    let took = t.elapsed();
    d.mem.write_slice(&[0x77; 4096], GuestAddress(data)).unwrap();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(20),
        "the read got its drain time, the kernel its answer well inside 30 s: {took:?}"
    );
    assert_eq!(device.stats().fenced, 1);
    // The read completes late: it lands in memory the device owns, not in the driver's.
    std::thread::sleep(Duration::from_millis(SLOW_DELAY_MS + 500));
    let mut back = [0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(data)).unwrap();
    assert!(
        back.iter().all(|&b| b == 0x77),
        "the driver's memory kept what it wrote after the reset ({:#x} found)",
        back.iter().find(|&&b| b != 0x77).copied().unwrap_or(0)
    );
    // The next session reads the disk (slowly) and writes it: served, in order.
    drop(d);
    let mut d = driver(&node);
    assert_eq!(d.submit(&read(&d, 0, data, 4096, SLOW_SECTOR + 8), 0).1, 4097);
    let mut back = [0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(data)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    d.finish(NAME, device);
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_a_write_fenced_on_a_slow_disk_lands_before_the_next_sessions_write() {
    init_log();
    const NAME: &str = "vduse-slow-ghost";
    let disks = Disks::create(NAME, 0x11);
    let (device, model) = device(
        NAME,
        disks.open(libc::O_DIRECT),
        fast_image(NAME, 0),
        Duration::from_millis(300),
    );
    let node = attach_vhost(NAME);
    let mut d = driver(&node);
    let data = BASE + 0x30_0000;
    d.mem.write_slice(&[0xaa; 65536], GuestAddress(data)).unwrap();
    d.offer(&write(&d, 0, data, 65536, SLOW_SECTOR), 0);
    started(&model, 1);
    d.vdpa.set_status(0).unwrap();
    assert_eq!(device.stats().fenced, 1, "the write is a ghost now");
    drop(d);
    // The next session writes the same bytes; the ghost is still in its system call.
    let mut d = driver(&node);
    d.mem.write_slice(&[0xbb; 65536], GuestAddress(data)).unwrap();
    assert_eq!(d.submit(&write(&d, 0, data, 65536, SLOW_SECTOR), 0).1, 1);
    let stats = model.pool.get().unwrap().stats();
    assert_eq!(
        stats.ordered.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "it waited for the ghost on its bytes"
    );
    let mut back = vec![0u8; 65536];
    disks.open(0).read_exact_at(&mut back, 0).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xbb),
        "the acknowledged write is what the disk holds"
    );
    d.finish(NAME, device);
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_gigabytes_of_touched_map_and_a_busy_janitor_still_answer_in_time() {
    init_log();
    const NAME: &str = "vduse-big-map";
    // Each region: several hundred MiB to a few GiB of pages the device has touched (its own mapping).
    let region: usize = std::env::var("VDUSE_TEST_BIG_MIB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1024)
        << 20;
    let disks = Disks::create(NAME, 0x5a);
    let (mut device, model) = device(
        NAME,
        disks.open(0),
        fast_image(NAME, 0x33),
        Duration::from_millis(300),
    );
    let node = attach_vhost(NAME);
    let mut d = driver(&node);
    const A: u64 = 0x4000_0000;
    let b_at = A + region as u64;
    let (fa, fb) = (memfd(region), memfd(region));
    let view = |f: &File| {
        // SAFETY: a fresh shared mapping of the memfd: the driver's own view of that memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                region,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast::<u8>()
    };
    let (va, vb) = (view(&fa), view(&fb));
    batched(&d.vdpa, || {
        d.vdpa.dma_map(A, region as u64, va.cast(), false).unwrap();
        d.vdpa.dma_map(b_at, region as u64, vb.cast(), false).unwrap();
    });
    // The device touches every page of both regions: 16 MiB reads from the fast disk, all over them.
    const CHUNK: u32 = 16 << 20;
    for base in [A, b_at] {
        for k in 0..(region as u64 / u64::from(CHUNK)) {
            let (_, len) = d.submit(&read(&d, 1, base + k * u64::from(CHUNK), CHUNK, 0), 3);
            assert_eq!(len, CHUNK + 1);
        }
    }
    // A slow read into B is in its system call…
    let slow = b_at + 0x1000;
    d.offer(&read(&d, 2, slow, 4096, SLOW_SECTOR), 6);
    let before = model
        .pool
        .get()
        .unwrap()
        .stats()
        .ops
        .load(std::sync::atomic::Ordering::Relaxed);
    started(&model, before);
    // …when the driver unmaps A (nothing uses it: answered at once, the janitor unmaps it meanwhile)
    // and right after B, whose pinned memory must be revoked before the answer.
    let t = Instant::now();
    batched(&d.vdpa, || d.vdpa.dma_unmap(A, region as u64)).unwrap();
    let a_took = t.elapsed();
    let t = Instant::now();
    batched(&d.vdpa, || d.vdpa.dma_unmap(b_at, region as u64)).unwrap();
    let b_took = t.elapsed();
    eprintln!(
        "unmapping {} MiB unused: {a_took:?}; {} MiB under a pinned read: {b_took:?}",
        region >> 20,
        region >> 20
    );
    assert!(
        b_took >= Duration::from_millis(300) && b_took < Duration::from_secs(20),
        "{b_took:?}"
    );
    // The driver reuses B at once; the late read must not reach it.
    // SAFETY: inside the driver's own mapping of B.
    unsafe { std::ptr::write_bytes(vb.add(0x1000), 0x77, 4096) };
    std::thread::sleep(Duration::from_millis(SLOW_DELAY_MS + 500));
    // SAFETY: as above.
    let back = unsafe { std::slice::from_raw_parts(vb.add(0x1000), 4096) };
    assert!(back.iter().all(|&b| b == 0x77), "the late read stayed out");
    assert!(device.stats().fenced >= 1);
    // Still serving (the fenced read never gets a used entry: the driver took its memory away).
    let data = BASE + 0x30_0000;
    let done = d.used_idx();
    d.offer(&read(&d, 1, data, 4096, 0), 3);
    assert!(d.wait_used(done.wrapping_add(1), Duration::from_secs(20)));
    assert_eq!(d.used_elem(done), (3, 4097));
    d.vdpa.set_status(0).unwrap();
    drop(d);
    // SAFETY: the driver's mappings from above.
    unsafe {
        libc::munmap(va.cast(), region);
        libc::munmap(vb.cast(), region);
    }
    drop((fa, fb));
    sh(&format!("vdpa dev del {NAME}"));
    device.close().expect("destroy");
}
