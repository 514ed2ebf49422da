//! A driver of our own over `/dev/vhost-vdpa-N` (the vhost crate's vDPA frontend), for in-guest tests:
//! memory from memfds, one split ring laid out explicitly, requests written by hand — so tests can do what
//! a well-behaved VM never does (malformed chains, memory unmapped under requests, resets mid-I/O).
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vduse_core::ram_blk::RamBlk;
use vduse_core::{DeviceOptions, Serving, VduseDevice};
use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::sh;

pub fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vduse-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh, valid descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// A RAM virtio-blk served by worker threads, with `opts` tuned by the caller.
pub fn ram_device(
    name: &str,
    size: u64,
    queues: u16,
    qsize: u16,
    tweak: impl FnOnce(&mut DeviceOptions),
) -> VduseDevice {
    let model = Arc::new(RamBlk::new(size, queues, qsize, name));
    let mut opts = DeviceOptions::new(name);
    opts.replace_stale = true;
    tweak(&mut opts);
    VduseDevice::create(opts, model.spec(), Serving::Workers(model), None).expect("create device")
}

/// Binds VDUSE device `name` to vhost_vdpa without letting virtio_vdpa grab it first; returns the node.
pub fn attach_vhost(name: &str) -> String {
    sh(&format!(
        "echo 0 > /sys/bus/vdpa/drivers_autoprobe
         vdpa dev add name {name} mgmtdev vduse || {{ echo 1 > /sys/bus/vdpa/drivers_autoprobe; exit 1; }}
         echo 1 > /sys/bus/vdpa/drivers_autoprobe
         echo vhost_vdpa > /sys/bus/vdpa/devices/{name}/driver_override
         echo {name} > /sys/bus/vdpa/drivers/vhost_vdpa/bind"
    ));
    let dir = Path::new("/sys/bus/vdpa/devices").join(name);
    let node = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vhost-vdpa-"))
        .expect("a vhost-vdpa node");
    format!("/dev/{node}")
}

/// Runs `f` (IOTLB updates) inside a `VHOST_IOTLB_BATCH_BEGIN`/`END` pair, as QEMU does. Without a batch,
/// vhost-vdpa sends each update to the device while holding the *driver* process's mmap lock; when the
/// driver lives in the device's own process (these tests), any mmap or heap growth in the device would
/// then wait for the lock while the kernel waits for the device — until the message times out.
pub fn batched<R>(vdpa: &VhostKernVdpa<Arc<GuestMemoryMmap>>, f: impl FnOnce() -> R) -> R {
    use std::os::fd::AsRawFd;
    use vhost::vhost_kern::vhost_binding::{
        vhost_msg_v2, VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END, VHOST_IOTLB_MSG_V2,
    };
    let send = |kind: u8| {
        let mut m = vhost_msg_v2 {
            type_: VHOST_IOTLB_MSG_V2,
            ..Default::default()
        };
        m.__bindgen_anon_1.iotlb.type_ = kind;
        // SAFETY: writes one vhost_msg_v2 from a live value to the vhost-vdpa fd.
        let n = unsafe {
            libc::write(
                vdpa.as_raw_fd(),
                (&m as *const vhost_msg_v2).cast(),
                std::mem::size_of::<vhost_msg_v2>(),
            )
        };
        assert_eq!(
            n as usize,
            std::mem::size_of::<vhost_msg_v2>(),
            "IOTLB batch message"
        );
    };
    send(VHOST_IOTLB_BATCH_BEGIN);
    let r = f();
    send(VHOST_IOTLB_BATCH_END);
    r
}

/// How the driver brings the device up.
#[derive(Clone, Copy)]
pub struct Setup {
    pub qsize: u16,
    /// Accept EVENT_IDX (if offered).
    pub event_idx: bool,
    /// Enable the ring only after DRIVER_OK (what older QEMU vhost-vdpa-device does).
    pub enable_late: bool,
}

pub struct VdpaDriver {
    pub mem: Arc<GuestMemoryMmap>,
    pub vdpa: Arc<VhostKernVdpa<Arc<GuestMemoryMmap>>>,
    pub kick: EventFd,
    pub call: EventFd,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub submitted: u16,
}

/// Driver memory: read-write at BASE (rings at its start), a read-only window at RO_BASE.
pub const BASE: u64 = 0x10_0000;
pub const SIZE: usize = 4 << 20;
pub const RO_BASE: u64 = 0x100_0000;
pub const RO_SIZE: usize = 1 << 20;

impl VdpaDriver {
    /// Resets the device, lets go of it, detaches it from vdpa as `name` and destroys it.
    pub fn finish(self, name: &str, mut device: VduseDevice) {
        self.vdpa.set_status(0).unwrap();
        drop(self);
        sh(&format!("vdpa dev del {name}"));
        device.close().expect("destroy");
    }
}

impl VdpaDriver {
    pub fn open(node: &str, setup: Setup) -> Self {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges_with_files([
                (GuestAddress(BASE), SIZE, Some(FileOffset::new(memfd(SIZE), 0))),
                (
                    GuestAddress(RO_BASE),
                    RO_SIZE,
                    Some(FileOffset::new(memfd(RO_SIZE), 0)),
                ),
            ])
            .unwrap(),
        );
        let mut vdpa = VhostKernVdpa::new(node, mem.clone()).expect("open vhost-vdpa");
        vdpa.set_owner().unwrap();
        let backend = vdpa.get_backend_features().unwrap();
        vdpa.set_backend_features(backend).unwrap();
        let vdpa = Arc::new(vdpa);
        let n = u64::from(setup.qsize);
        let (desc_at, avail, used) = (BASE, BASE + 16 * n, BASE + 16 * n + 0x1000);
        let d = Self {
            mem,
            vdpa,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
            desc: desc_at,
            avail,
            used,
            size: setup.qsize,
            submitted: 0,
        };
        assert_eq!(d.vdpa.get_device_id().unwrap(), 2);
        d.vdpa.set_status(1 | 2).unwrap();
        let offered = d.vdpa.get_features().unwrap();
        assert_ne!(offered & (1 << 33), 0, "ACCESS_PLATFORM is offered");
        let mut accept = (1 << 32) | (1 << 33);
        if setup.event_idx {
            accept |= offered & (1 << 29);
        }
        d.vdpa.set_features(offered & accept).unwrap();
        d.vdpa.set_status(1 | 2 | 8).unwrap();
        batched(&d.vdpa, || {
            for (iova, size, ro) in [(BASE, SIZE, false), (RO_BASE, RO_SIZE, true)] {
                let host = d.mem.get_host_address(GuestAddress(iova)).unwrap();
                d.vdpa.dma_map(iova, size as u64, host, ro).unwrap();
            }
        });
        let cfg = VringConfigData {
            queue_max_size: setup.qsize,
            queue_size: setup.qsize,
            flags: 0,
            desc_table_addr: d.desc,
            used_ring_addr: d.used,
            avail_ring_addr: d.avail,
            log_addr: None,
        };
        d.vdpa.set_vring_num(0, setup.qsize).unwrap();
        VhostKernVdpa::set_vring_addr(&*d.vdpa, 0, &cfg).unwrap();
        d.vdpa.set_vring_base(0, 0).unwrap();
        d.vdpa.set_vring_call(0, &d.call).unwrap();
        d.vdpa.set_vring_kick(0, &d.kick).unwrap();
        if !setup.enable_late {
            d.vdpa.set_vring_enable(0, true).unwrap();
        }
        d.vdpa.set_status(1 | 2 | 8 | 4).unwrap();
        if setup.enable_late {
            std::thread::sleep(Duration::from_millis(200));
            d.vdpa.set_vring_enable(0, true).unwrap();
        }
        d
    }

    pub fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    pub fn used_elem(&self, k: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(k % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Writes `table`, offers `head` and kicks, without waiting.
    pub fn offer(&mut self, table: &[(u16, RawDescriptor)], head: u16) -> u16 {
        for &(i, d) in table {
            self.mem
                .write_obj(d, GuestAddress(self.desc + 16 * u64::from(i)))
                .unwrap();
        }
        let slot = u64::from(self.submitted % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        let k = self.submitted;
        self.submitted = self.submitted.wrapping_add(1);
        self.mem
            .store(
                self.submitted.to_le(),
                GuestAddress(self.avail + 2),
                std::sync::atomic::Ordering::Release,
            )
            .unwrap();
        self.kick.write(1).unwrap();
        k
    }

    /// Waits until the used index reaches `idx`; false on timeout.
    pub fn wait_used(&self, idx: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.used_idx() != idx {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Offers `head` and waits for its completion; returns its used element.
    pub fn submit(&mut self, table: &[(u16, RawDescriptor)], head: u16) -> (u32, u32) {
        let k = self.offer(table, head);
        assert!(
            self.wait_used(self.submitted, Duration::from_secs(10)),
            "request {head} was never completed: the device stopped serving"
        );
        self.used_elem(k)
    }
}
