//! A malicious driver, for real (needs VDUSE: run inside the test guest). The RAM virtio-blk device is
//! bound to `vhost_vdpa` and driven through `/dev/vhost-vdpa-N` by our own driver, which submits malformed
//! chains between valid requests. The device must answer the valid ones correctly, refuse every bad one,
//! and keep serving.

use vduse_core::ram_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::init_log;
use common::vdpa::{attach_vhost, ram_device, Setup, VdpaDriver, BASE, RO_BASE, SIZE};
use vduse_core::rig::desc;

const NAME: &str = "vduse-hostile";
const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;

/// A valid GET_ID request; returns the used length.
fn get_id(d: &mut VdpaDriver) -> u32 {
    let b = BASE + 0x20_0000;
    d.header(b, VIRTIO_BLK_T_GET_ID, 0);
    d.mem.write_slice(&[0u8; 20], GuestAddress(b + 0x100)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(b + 0x200)).unwrap();
    let (id, len) = d.submit(
        &[
            (0, desc(b, 16, N, 1)),
            (1, desc(b + 0x100, 20, W | N, 2)),
            (2, desc(b + 0x200, 1, W, 0)),
        ],
        0,
    );
    assert_eq!(id, 0);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(b + 0x200)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut serial = [0u8; 13];
    d.mem.read_slice(&mut serial, GuestAddress(b + 0x100)).unwrap();
    assert_eq!(&serial, NAME.as_bytes());
    len
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_hostile_driver_over_vhost_vdpa() {
    init_log();
    let device = ram_device(NAME, 1 << 20, 1, 64, |_| {});
    let node = attach_vhost(NAME);
    let mut d = VdpaDriver::open(
        &node,
        Setup {
            qsize: 64,
            event_idx: false,
            enable_late: false,
        },
    );
    assert_eq!(get_id(&mut d), 21, "a valid request before any abuse");

    // A write and a read-back through the whole path.
    let b = BASE + 0x30_0000;
    d.mem
        .write_slice(&[0x5a; 4096], GuestAddress(b + 0x1000))
        .unwrap();
    d.header(b, VIRTIO_BLK_T_OUT, 8);
    let out = [
        (4, desc(b, 16, N, 5)),
        (5, desc(b + 0x1000, 4096, N, 6)),
        (6, desc(b + 0x3000, 1, W, 0)),
    ];
    assert_eq!(d.submit(&out, 4), (4, 1));
    d.header(b + 0x4000, VIRTIO_BLK_T_IN, 8);
    let inn = [
        (4, desc(b + 0x4000, 16, N, 5)),
        (5, desc(b + 0x5000, 4096, W | N, 6)),
        (6, desc(b + 0x7000, 1, W, 0)),
    ];
    assert_eq!(d.submit(&inn, 4), (4, 4097));
    let mut back = vec![0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(b + 0x5000)).unwrap();
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
        (
            "indirect with next",
            vec![(10, desc(b, 32, VRING_DESC_F_INDIRECT | N, 11))],
        ),
    ];
    let count = bad.len() as u64;
    let reloads_before = device.stats().iotlb_reloads;
    for (name, table) in bad {
        assert_eq!(
            d.submit(&table, 10),
            (10, 0),
            "{name}: refused with used length 0"
        );
        assert_eq!(
            get_id(&mut d),
            21,
            "{name}: the device still serves valid requests"
        );
    }
    let stats = device.stats();
    assert_eq!(stats.bad_chains, count, "every bad chain was counted: {stats:?}");
    assert_eq!(
        stats.iotlb_reloads, reloads_before,
        "bad addresses cost a kernel query each, never a reload of the map: {stats:?}"
    );

    d.finish(NAME, device);
}
