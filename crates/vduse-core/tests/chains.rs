//! A hostile driver's descriptor chains, in process: virtio-queue's mock driver lays out rings in plain
//! memory, the queue worker drains them into the RAM virtio-blk model. Every malformed chain must come
//! back as an error completion (used length 0), counted, while valid requests around it succeed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vduse_core::chain::ChainError;
use vduse_core::memory::{IotlbMap, Memory};
use vduse_core::queue::{QueueShared, Transport};
use vduse_core::ram_blk::{RamBlk, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vduse_core::uapi::{VDUSE_ACCESS_RO, VDUSE_ACCESS_RW};
use vduse_core::RequestBatch;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const RO_START: u64 = 0x18_0000;
const MEM_END: u64 = 0x20_0000;

#[derive(Default)]
struct CountingTransport {
    interrupts: AtomicUsize,
}

impl Transport for CountingTransport {
    fn notify(&self, _queue: u16) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }
    fn refresh_memory(&self) -> bool {
        false
    }
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

struct Rig {
    mem: GuestMemoryMmap,
}

impl Rig {
    fn new() -> Self {
        Self {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap(),
        }
    }

    /// A blk request header at `at`.
    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }
}

/// Runs `chains` (descriptor table entries and the heads to put in the avail ring) through a queue and
/// returns the used ring entries `(head, len)` in completion order, plus the queue.
fn run(rig: &Rig, table: &[(u16, RawDescriptor)], heads: &[u16]) -> (Vec<(u32, u32)>, Arc<QueueShared>) {
    let mock = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    for &(i, d) in table {
        mock.desc_table().store(i, d).unwrap();
    }
    for (slot, &head) in heads.iter().enumerate() {
        mock.avail().ring().ref_at(slot).unwrap().store(u16::to_le(head));
    }
    mock.avail().idx().store(u16::to_le(heads.len() as u16));
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_event_idx(false);
    let map = IotlbMap::with_memory(
        rig.mem.clone(),
        vec![
            (0, RO_START - 1, VDUSE_ACCESS_RW),
            (RO_START, MEM_END - 1, VDUSE_ACCESS_RO),
        ],
    );
    let memory = Arc::new(Memory::default());
    memory.replace(map);
    let transport = Arc::new(CountingTransport::default());
    let shared = QueueShared::new(0, memory, transport.clone());
    shared.activate(queue);
    let model = RamBlk::new(1 << 20, 1, QSIZE, "mock-serial");
    let mut batch = RequestBatch::new(Arc::new(IotlbMap::empty()));
    let mut rounds = 0;
    while shared.process(&model, &mut batch) {
        rounds += 1;
        assert!(rounds < 100, "the worker must not spin");
    }
    let used_idx = u16::from_le(mock.used().idx().load());
    let used = (0..used_idx as usize)
        .map(|i| {
            let e = mock.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    assert!(
        transport.interrupts.load(Ordering::Relaxed) >= 1,
        "the driver was notified"
    );
    (used, shared)
}

const W: u32 = VRING_DESC_F_WRITE;
const N: u32 = VRING_DESC_F_NEXT;

/// A valid GET_ID request at descriptors `first..first+3` using scratch memory `base`.
fn get_id(rig: &Rig, first: u16, base: u64) -> Vec<(u16, RawDescriptor)> {
    rig.header(base, VIRTIO_BLK_T_GET_ID, 0);
    vec![
        (first, desc(base, 16, N, first + 1)),
        (first + 1, desc(base + 0x100, 20, W | N, first + 2)),
        (first + 2, desc(base + 0x200, 1, W, 0)),
    ]
}

#[test]
fn valid_requests_round_trip_through_the_model() {
    let rig = Rig::new();
    let data = 0x10_0000u64;
    rig.mem
        .write_slice(&[0xab; 512], GuestAddress(data + 0x1000))
        .unwrap();
    rig.header(data, VIRTIO_BLK_T_OUT, 3);
    rig.header(data + 0x3000, VIRTIO_BLK_T_IN, 3);
    let table = vec![
        // OUT sector 3 from 0x..1000, status at 0x..2000
        (0, desc(data, 16, N, 1)),
        (1, desc(data + 0x1000, 512, N, 2)),
        (2, desc(data + 0x2000, 1, W, 0)),
        // IN sector 3 into 0x..4000, status at 0x..5000
        (3, desc(data + 0x3000, 16, N, 4)),
        (4, desc(data + 0x4000, 512, W | N, 5)),
        (5, desc(data + 0x5000, 1, W, 0)),
    ];
    let (used, shared) = run(&rig, &table, &[0, 3]);
    assert_eq!(used, vec![(0, 1), (3, 513)]);
    let mut back = [0u8; 512];
    rig.mem
        .read_slice(&mut back, GuestAddress(data + 0x4000))
        .unwrap();
    assert_eq!(back, [0xab; 512]);
    assert_eq!(
        rig.mem.read_obj::<u8>(GuestAddress(data + 0x5000)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(shared.stats.bad_chains_total(), 0);
}

/// (name, descriptor table entries, head, expected refusal)
type Case = (&'static str, Vec<(u16, RawDescriptor)>, u16, ChainError);

#[test]
fn malformed_chains_get_error_completions_and_valid_ones_still_work() {
    let rig = Rig::new();
    let b = 0x10_0000u64;
    let cases: Vec<Case> = vec![
        (
            "loop",
            vec![(3, desc(b, 16, N, 4)), (4, desc(b + 0x100, 16, N, 3))],
            3,
            ChainError::Truncated,
        ),
        (
            "next out of range",
            vec![(3, desc(b, 16, N, 200))],
            3,
            ChainError::Truncated,
        ),
        (
            "readable after writable",
            vec![(3, desc(b + 0x200, 1, W | N, 4)), (4, desc(b, 16, 0, 0))],
            3,
            ChainError::ReadableAfterWritable,
        ),
        (
            "zero length",
            vec![(3, desc(b, 0, N, 4)), (4, desc(b + 0x200, 1, W, 0))],
            3,
            ChainError::ZeroLength,
        ),
        (
            "address outside memory",
            vec![(3, desc(0x4000_0000, 16, N, 4)), (4, desc(b + 0x200, 1, W, 0))],
            3,
            ChainError::BadAddress,
        ),
        (
            "device write into read-only memory",
            vec![(3, desc(b, 16, N, 4)), (4, desc(RO_START + 0x10, 1, W, 0))],
            3,
            ChainError::BadAddress,
        ),
        (
            "huge length",
            vec![(3, desc(b, u32::MAX, N, 4)), (4, desc(b + 0x200, 1, W, 0))],
            3,
            ChainError::BadAddress,
        ),
        (
            // Each buffer alone exceeds the mapped memory, so the address check refuses it first.
            "length overflowing 4 GiB in total",
            vec![(3, desc(b, 0xffff_0000, N, 4)), (4, desc(b, 0xffff_0000, W, 0))],
            3,
            ChainError::BadAddress,
        ),
        (
            "more buffers than the device accepts (indirect table longer than the ring)",
            vec![(3, desc(0x12_0000, 20 * 16, VRING_DESC_F_INDIRECT, 0))],
            3,
            ChainError::TooLong,
        ),
        (
            "indirect table outside memory",
            vec![(3, desc(0x5000_0000, 64, VRING_DESC_F_INDIRECT, 0))],
            3,
            ChainError::Empty,
        ),
    ];
    for i in 0..20u16 {
        let d = if i < 19 {
            desc(b, 16, N, i + 1)
        } else {
            desc(b + 0x200, 1, W, 0)
        };
        rig.mem
            .write_obj(d, GuestAddress(0x12_0000 + u64::from(i) * 16))
            .unwrap();
    }
    for (name, bad, head, expected) in cases {
        let mut table = get_id(&rig, 0, 0x14_0000);
        table.extend(bad);
        table.extend(get_id(&rig, 8, 0x15_0000));
        let (used, shared) = run(&rig, &table, &[0, head, 8]);
        assert_eq!(used.len(), 3, "{name}: every request completed: {used:?}");
        assert!(
            used.contains(&(0, 21)),
            "{name}: the request before succeeded: {used:?}"
        );
        assert!(
            used.contains(&(u32::from(head), 0)),
            "{name}: the bad one failed with used length 0: {used:?}"
        );
        assert!(
            used.contains(&(8, 21)),
            "{name}: the request after succeeded: {used:?}"
        );
        assert_eq!(
            shared.stats.bad_chains[expected.index()].load(Ordering::Relaxed),
            1,
            "{name}: counted as {expected:?}"
        );
        let mut id = [0u8; 11];
        rig.mem.read_slice(&mut id, GuestAddress(0x15_0100)).unwrap();
        assert_eq!(&id, b"mock-serial");
    }
}

#[test]
fn nested_indirect_tables_are_refused() {
    let rig = Rig::new();
    let table_at = 0x12_0000u64;
    // An indirect table whose first entry is itself indirect.
    rig.mem
        .write_obj(
            desc(table_at + 0x100, 32, VRING_DESC_F_INDIRECT, 0),
            GuestAddress(table_at),
        )
        .unwrap();
    let mut table = vec![(3, desc(table_at, 16, VRING_DESC_F_INDIRECT, 0))];
    table.extend(get_id(&rig, 8, 0x15_0000));
    let (used, shared) = run(&rig, &table, &[3, 8]);
    assert!(used.contains(&(3, 0)) && used.contains(&(8, 21)), "{used:?}");
    assert_eq!(shared.stats.bad_chains_total(), 1);
}

#[test]
fn an_avail_index_beyond_the_ring_stops_the_queue_without_spinning() {
    let rig = Rig::new();
    let mock = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_event_idx(false);
    mock.avail().idx().store(u16::to_le(QSIZE * 3));
    let memory = Arc::new(Memory::default());
    memory.replace(IotlbMap::with_memory(
        rig.mem.clone(),
        vec![(0, MEM_END - 1, VDUSE_ACCESS_RW)],
    ));
    let shared = QueueShared::new(0, memory, Arc::new(CountingTransport::default()));
    shared.activate(queue);
    let model = RamBlk::new(1 << 20, 1, QSIZE, "x");
    let mut batch = RequestBatch::new(Arc::new(IotlbMap::empty()));
    assert!(!shared.process(&model, &mut batch));
    assert!(!shared.process(&model, &mut batch), "stays stopped");
}
