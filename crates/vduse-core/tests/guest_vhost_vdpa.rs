//! A malicious driver, for real (needs VDUSE: run inside the test guest). The RAM virtio-blk device is
//! bound to `vhost_vdpa`, and this test drives `/dev/vhost-vdpa-N` itself with the vhost crate's vDPA
//! frontend — memory from a shared memfd — submitting malformed chains between valid requests. The
//! device must answer the valid ones correctly, refuse every bad one, and keep serving.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vduse_core::ram_blk::{RamBlk, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vduse_core::{DeviceOptions, VduseDevice};
use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{init_log, sh};

const NAME: &str = "vduse-hostile";
const QSIZE: u16 = 64;
/// Driver memory (read-write) and a read-only window, as IOVAs.
const BASE: u64 = 0x10_0000;
const SIZE: usize = 4 << 20;
const RO_BASE: u64 = 0x100_0000;
const RO_SIZE: usize = 1 << 20;

const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vduse-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh, valid descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// Binds the VDUSE device to vhost_vdpa without letting virtio_vdpa grab it first.
fn attach_vhost() -> String {
    sh(&format!(
        "echo 0 > /sys/bus/vdpa/drivers_autoprobe
         vdpa dev add name {NAME} mgmtdev vduse || {{ echo 1 > /sys/bus/vdpa/drivers_autoprobe; exit 1; }}
         echo 1 > /sys/bus/vdpa/drivers_autoprobe
         echo vhost_vdpa > /sys/bus/vdpa/devices/{NAME}/driver_override
         echo {NAME} > /sys/bus/vdpa/drivers/vhost_vdpa/bind"
    ));
    let dir = Path::new("/sys/bus/vdpa/devices").join(NAME);
    let node = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vhost-vdpa-"))
        .expect("a vhost-vdpa node");
    format!("/dev/{node}")
}

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    queue: MockSplitQueue<'a, GuestMemoryMmap>,
    kick: EventFd,
    submitted: u16,
}

impl Driver<'_> {
    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Writes `table` into the descriptor table, offers `head`, kicks, and waits for its completion.
    fn submit(&mut self, table: &[(u16, RawDescriptor)], head: u16) -> (u32, u32) {
        for &(i, d) in table {
            self.queue.desc_table().store(i, d).unwrap();
        }
        let slot = usize::from(self.submitted % QSIZE);
        self.queue
            .avail()
            .ring()
            .ref_at(slot)
            .unwrap()
            .store(u16::to_le(head));
        self.submitted = self.submitted.wrapping_add(1);
        self.queue.avail().idx().store(u16::to_le(self.submitted));
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while u16::from_le(self.queue.used().idx().load()) != self.submitted {
            assert!(
                Instant::now() < deadline,
                "request {head} was never completed: the device stopped serving"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = self.queue.used().ring().ref_at(slot).unwrap().load();
        (e.id(), e.len())
    }

    /// A valid GET_ID request; returns the used length.
    fn get_id(&mut self) -> u32 {
        let b = BASE + 0x20_0000;
        self.header(b, VIRTIO_BLK_T_GET_ID, 0);
        self.mem.write_slice(&[0u8; 20], GuestAddress(b + 0x100)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(b + 0x200)).unwrap();
        let (id, len) = self.submit(
            &[
                (0, desc(b, 16, N, 1)),
                (1, desc(b + 0x100, 20, W | N, 2)),
                (2, desc(b + 0x200, 1, W, 0)),
            ],
            0,
        );
        assert_eq!(id, 0);
        assert_eq!(
            self.mem.read_obj::<u8>(GuestAddress(b + 0x200)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        let mut serial = [0u8; 7];
        self.mem.read_slice(&mut serial, GuestAddress(b + 0x100)).unwrap();
        assert_eq!(&serial, b"hostile");
        len
    }
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_hostile_driver_over_vhost_vdpa() {
    init_log();
    let model = Arc::new(RamBlk::new(1 << 20, 1, QSIZE, "hostile"));
    let mut opts = DeviceOptions::new(NAME);
    opts.replace_stale = true;
    let device = VduseDevice::create(opts, model).expect("create");
    let node = attach_vhost();

    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
        (GuestAddress(BASE), SIZE, Some(FileOffset::new(memfd(SIZE), 0))),
        (
            GuestAddress(RO_BASE),
            RO_SIZE,
            Some(FileOffset::new(memfd(RO_SIZE), 0)),
        ),
    ])
    .unwrap();
    let mut vdpa = VhostKernVdpa::new(&node, &mem).expect("open vhost-vdpa");
    vdpa.set_owner().unwrap();
    assert_eq!(vdpa.get_device_id().unwrap(), 2);
    let backend = vdpa.get_backend_features().unwrap();
    vdpa.set_backend_features(backend).unwrap();
    vdpa.set_status(1 | 2).unwrap();
    let offered = vdpa.get_features().unwrap();
    assert_ne!(offered & (1 << 33), 0, "ACCESS_PLATFORM is offered");
    // No EVENT_IDX: every batch interrupts, which keeps this driver simple.
    vdpa.set_features(offered & ((1 << 32) | (1 << 33))).unwrap();
    vdpa.set_status(1 | 2 | 8).unwrap();
    for (iova, size, ro) in [(BASE, SIZE, false), (RO_BASE, RO_SIZE, true)] {
        let host = mem.get_host_address(GuestAddress(iova)).unwrap();
        vdpa.dma_map(iova, size as u64, host, ro).unwrap();
    }

    let queue = MockSplitQueue::create(&mem, GuestAddress(BASE), QSIZE);
    let cfg = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: queue.desc_table_addr().0,
        used_ring_addr: queue.used_addr().0,
        avail_ring_addr: queue.avail_addr().0,
        log_addr: None,
    };
    vdpa.set_vring_num(0, QSIZE).unwrap();
    VhostKernVdpa::set_vring_addr(&vdpa, 0, &cfg).unwrap();
    vdpa.set_vring_base(0, 0).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    vdpa.set_vring_call(0, &call).unwrap();
    vdpa.set_vring_kick(0, &kick).unwrap();
    vdpa.set_vring_enable(0, true).unwrap();
    vdpa.set_status(1 | 2 | 8 | 4).unwrap();

    let mut driver = Driver {
        mem: &mem,
        queue,
        kick,
        submitted: 0,
    };
    assert_eq!(driver.get_id(), 21, "a valid request before any abuse");

    // A write and a read-back through the whole path.
    let b = BASE + 0x30_0000;
    mem.write_slice(&[0x5a; 4096], GuestAddress(b + 0x1000)).unwrap();
    driver.header(b, VIRTIO_BLK_T_OUT, 8);
    let out = [
        (4, desc(b, 16, N, 5)),
        (5, desc(b + 0x1000, 4096, N, 6)),
        (6, desc(b + 0x3000, 1, W, 0)),
    ];
    assert_eq!(driver.submit(&out, 4), (4, 1));
    driver.header(b + 0x4000, VIRTIO_BLK_T_IN, 8);
    let inn = [
        (4, desc(b + 0x4000, 16, N, 5)),
        (5, desc(b + 0x5000, 4096, W | N, 6)),
        (6, desc(b + 0x7000, 1, W, 0)),
    ];
    assert_eq!(driver.submit(&inn, 4), (4, 4097));
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(b + 0x5000)).unwrap();
    assert!(back.iter().all(|&x| x == 0x5a), "read back what was written");

    let bad: Vec<(&str, Vec<(u16, RawDescriptor)>)> = vec![
        (
            "loop",
            vec![(10, desc(b, 16, N, 11)), (11, desc(b + 0x100, 16, N, 10))],
        ),
        ("next out of range", vec![(10, desc(b, 16, N, 999))]),
        (
            "readable after writable",
            vec![(10, desc(b + 0x3000, 1, W | N, 11)), (11, desc(b, 16, 0, 0))],
        ),
        (
            "zero length",
            vec![(10, desc(b, 0, N, 11)), (11, desc(b + 0x3000, 1, W, 0))],
        ),
        (
            "unmapped address",
            vec![
                (10, desc(0x4000_0000, 16, N, 11)),
                (11, desc(b + 0x3000, 1, W, 0)),
            ],
        ),
        (
            "address past the end",
            vec![
                (10, desc(BASE + SIZE as u64 - 8, 16, N, 11)),
                (11, desc(b + 0x3000, 1, W, 0)),
            ],
        ),
        (
            "write into read-only memory",
            vec![(10, desc(b, 16, N, 11)), (11, desc(RO_BASE, 1, W, 0))],
        ),
        (
            "huge length",
            vec![(10, desc(b, u32::MAX, N, 11)), (11, desc(b + 0x3000, 1, W, 0))],
        ),
        (
            "indirect table unmapped",
            vec![(10, desc(0x7000_0000, 64, VRING_DESC_F_INDIRECT, 0))],
        ),
        (
            "indirect table with bad length",
            vec![(10, desc(b, 17, VRING_DESC_F_INDIRECT, 0))],
        ),
    ];
    let count = bad.len() as u64;
    for (name, table) in bad {
        assert_eq!(
            driver.submit(&table, 10),
            (10, 0),
            "{name}: refused with used length 0"
        );
        assert_eq!(
            driver.get_id(),
            21,
            "{name}: the device still serves valid requests"
        );
    }
    let stats = device.stats();
    assert_eq!(stats.bad_chains, count, "every bad chain was counted: {stats:?}");

    vdpa.set_status(0).unwrap();
    drop(vdpa);
    sh(&format!("vdpa dev del {NAME}"));
    device.close().expect("destroy");
}
