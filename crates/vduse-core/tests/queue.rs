//! The request lifecycle on one queue, in process: a hostile driver's chains, tickets that cannot complete
//! the wrong request, fencing, a full ring, IOTLB misses, and revocation of fenced memory — each checked
//! from the driver's side of the ring.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vduse_core::chain::ChainError;
use vduse_core::memory::{Access, IotlbMap, Memory, Pins};
use vduse_core::model::Completer;
use vduse_core::queue::{Budget, Completion, Done, Gone, Owner, Part, Pop, RequestBatch, Ticket};
use vduse_core::ram_blk::{
    RamBlk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vduse_core::uapi::{VDUSE_ACCESS_RO, VDUSE_ACCESS_RW};
use vduse_core::worker::drain;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use vduse_core::rig::{desc, memfd, offer, used, MemfdIotlb, Rig, QSIZE, RO_START};

const W: u32 = VRING_DESC_F_WRITE;
const N: u32 = VRING_DESC_F_NEXT;
const I: u32 = VRING_DESC_F_INDIRECT;

/// A valid GET_ID request at descriptors `first..first+3` using scratch memory `base`.
fn get_id(rig: &Rig, first: u16, base: u64) -> Vec<(u16, RawDescriptor)> {
    rig.header(base, VIRTIO_BLK_T_GET_ID, 0);
    vec![
        (first, desc(base, 16, N, first + 1)),
        (first + 1, desc(base + 0x100, 20, W | N, first + 2)),
        (first + 2, desc(base + 0x200, 1, W, 0)),
    ]
}

/// Serves everything available through the RAM model.
fn serve(q: &Arc<vduse_core::Virtqueue>, model: &RamBlk) {
    let mut batch = RequestBatch::default();
    drain(
        q,
        model,
        &mut batch,
        &Completer::new(q.clone()),
        Budget::default(),
    );
}

#[test]
fn valid_requests_round_trip_through_the_model() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(64, false);
    let data = 0x10_0000u64;
    rig.map
        .write_slice(&[0xab; 512], GuestAddress(data + 0x1000))
        .unwrap();
    rig.header(data, VIRTIO_BLK_T_OUT, 3);
    rig.header(data + 0x3000, VIRTIO_BLK_T_IN, 3);
    let table = vec![
        (0, desc(data, 16, N, 1)),
        (1, desc(data + 0x1000, 512, N, 2)),
        (2, desc(data + 0x2000, 1, W, 0)),
        (3, desc(data + 0x3000, 16, N, 4)),
        (4, desc(data + 0x4000, 512, W | N, 5)),
        (5, desc(data + 0x5000, 1, W, 0)),
    ];
    offer(&mock, &table, &[0, 3]);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "x"));
    assert_eq!(used(&mock, 0), vec![(0, 1), (3, 513)]);
    let mut back = [0u8; 512];
    rig.map
        .read_slice(&mut back, GuestAddress(data + 0x4000))
        .unwrap();
    assert_eq!(back, [0xab; 512]);
    assert_eq!(
        rig.map.read_obj::<u8>(GuestAddress(data + 0x5000)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(q.stats.bad_chains_total(), 0);
    assert!(rig.transport.interrupts.load(Ordering::Relaxed) >= 1);
    assert_eq!(rig.inflight.get(), 0);
}

/// (name, descriptor table entries, head, expected refusal)
type Case = (&'static str, Vec<(u16, RawDescriptor)>, u16, ChainError);

#[test]
fn malformed_chains_get_error_completions_and_valid_ones_still_work() {
    let rig = Rig::new();
    let b = 0x10_0000u64;
    // A valid 20-descriptor indirect table: more buffers than the model accepts (16).
    for i in 0..20u16 {
        let d = if i < 19 {
            desc(b, 16, N, i + 1)
        } else {
            desc(b + 0x200, 1, W, 0)
        };
        rig.map
            .write_obj(d, GuestAddress(0x12_0000 + u64::from(i) * 16))
            .unwrap();
    }
    rig.map
        .write_obj(desc(0x12_1000, 32, I, 0), GuestAddress(0x12_2000))
        .unwrap();
    let cases: Vec<Case> = vec![
        (
            "loop",
            vec![(3, desc(b, 16, N, 4)), (4, desc(b + 0x100, 16, N, 3))],
            3,
            ChainError::Loop,
        ),
        (
            "next out of range",
            vec![(3, desc(b, 16, N, 200))],
            3,
            ChainError::BadIndex,
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
            ChainError::Unmapped(0x4000_0000),
        ),
        (
            "device write into read-only memory",
            vec![(3, desc(b, 16, N, 4)), (4, desc(RO_START + 0x10, 1, W, 0))],
            3,
            ChainError::Forbidden,
        ),
        (
            "huge length",
            vec![(3, desc(b, u32::MAX, N, 4)), (4, desc(b + 0x200, 1, W, 0))],
            3,
            ChainError::Unmapped(0x20_0000),
        ),
        (
            "more buffers than the device accepts",
            vec![(3, desc(0x12_0000, 20 * 16, I, 0))],
            3,
            ChainError::TooManySegments,
        ),
        (
            "indirect table outside memory",
            vec![(3, desc(0x5000_0000, 64, I, 0))],
            3,
            ChainError::Unmapped(0x5000_0000),
        ),
        (
            "nested indirect table",
            vec![(3, desc(0x12_2000, 16, I, 0))],
            3,
            ChainError::BadIndirect,
        ),
        (
            "indirect table with a bad length",
            vec![(3, desc(0x12_0000, 17, I, 0))],
            3,
            ChainError::BadIndirect,
        ),
    ];
    for (name, bad, head, expected) in cases {
        let (mock, q) = rig.queue(16, false);
        let mut table = get_id(&rig, 0, 0x14_0000);
        table.extend(bad);
        table.extend(get_id(&rig, 8, 0x15_0000));
        offer(&mock, &table, &[0, head, 8]);
        serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "mock-serial"));
        let done = used(&mock, 0);
        assert_eq!(done.len(), 3, "{name}: every request completed: {done:?}");
        assert!(
            done.contains(&(0, 21)),
            "{name}: the request before succeeded: {done:?}"
        );
        assert!(
            done.contains(&(u32::from(head), 0)),
            "{name}: the bad one failed with used length 0: {done:?}"
        );
        assert!(
            done.contains(&(8, 21)),
            "{name}: the request after succeeded: {done:?}"
        );
        assert_eq!(
            q.stats.bad_chains[expected.index()].load(Ordering::Relaxed),
            1,
            "{name}: counted as {expected:?}"
        );
        assert_eq!(q.stats.bad_chains_total(), 1, "{name}");
        let mut id = [0u8; 11];
        rig.map.read_slice(&mut id, GuestAddress(0x15_0100)).unwrap();
        assert_eq!(&id, b"mock-serial");
    }
}

#[test]
fn an_avail_index_beyond_the_ring_stops_the_queue_without_spinning() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    mock.set_avail_idx(QSIZE * 3);
    let mut batch = RequestBatch::default();
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Idle);
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Idle, "stays stopped");
    assert_eq!(q.stats.broken.load(Ordering::Relaxed), 1);
    // A reset brings it back.
    q.stop();
    mock.set_avail_idx(0);
    mock.set_used_idx(0);
    q.arm();
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Idle);
    assert!(q.is_active());
}

#[test]
fn rings_in_read_only_memory_are_refused_without_touching_them() {
    let rig = Rig::new();
    let (_ok, q) = rig.queue(16, false);
    // Move the used ring into read-only memory: a write there would be a SIGSEGV without the checks.
    rig.transport.ring.lock().unwrap().used = RO_START;
    q.stop();
    q.arm();
    let mut batch = RequestBatch::default();
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Idle);
    assert!(!q.is_active());
    assert_eq!(q.stats.broken.load(Ordering::Relaxed), 1);
}

/// Pops what is available without completing anything (a model that holds requests).
fn pop_all(q: &Arc<vduse_core::Virtqueue>) -> Vec<Ticket> {
    let mut batch = RequestBatch::default();
    let mut tickets = Vec::new();
    loop {
        let p = q.pop(Budget::default(), &mut batch);
        tickets.extend(batch.iter().map(|r| r.ticket));
        if p != Pop::More {
            return tickets;
        }
    }
}

#[test]
fn tickets_complete_exactly_once_and_never_another_request() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    let mut table = get_id(&rig, 0, 0x14_0000);
    table.extend(get_id(&rig, 3, 0x15_0000));
    offer(&mock, &table, &[0, 3]);
    let t = pop_all(&q);
    assert_eq!(t.len(), 2);
    assert_eq!(rig.inflight.get(), 2);
    // used_len larger than the writable space is capped (21 bytes: 20 id + 1 status).
    assert_eq!(q.complete(t[0], 1 << 20, Some(VIRTIO_BLK_S_OK)), Completion::Done);
    assert_eq!(
        q.complete(t[0], 21, Some(VIRTIO_BLK_S_OK)),
        Completion::Stale,
        "a duplicate completion"
    );
    // The slot is reused by the next request: the old ticket must not complete it.
    offer(&mock, &get_id(&rig, 6, 0x16_0000), &[6]);
    let t2 = pop_all(&q);
    assert_eq!(t2.len(), 1);
    assert_eq!(t2[0].slot(), t[0].slot(), "the slot was reused");
    assert_eq!(
        q.complete(t[0], 5, None),
        Completion::Stale,
        "a late ticket of the slot's last life"
    );
    assert_eq!(q.complete(t2[0], 21, Some(VIRTIO_BLK_S_IOERR)), Completion::Done);
    assert_eq!(q.complete(t[1], 0, None), Completion::Done);
    q.notify();
    assert_eq!(used(&mock, 0), vec![(0, 21), (6, 21), (3, 0)]);
    assert_eq!(
        rig.map.read_obj::<u8>(GuestAddress(0x16_0200)).unwrap(),
        VIRTIO_BLK_S_IOERR,
        "status written"
    );
    assert_eq!(q.stats.stale_completions.load(Ordering::Relaxed), 2);
    assert_eq!(rig.inflight.get(), 0);
}

#[test]
fn a_stop_fences_requests_in_the_model_and_their_late_completions_are_dropped() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    offer(&mock, &get_id(&rig, 0, 0x14_0000), &[0]);
    let t = pop_all(&q);
    let (fenced, maps) = q.stop();
    assert_eq!((fenced, maps.len()), (1, 1));
    assert_eq!(rig.inflight.get(), 0, "fenced requests are not in flight");
    assert_eq!(q.complete(t[0], 21, Some(VIRTIO_BLK_S_OK)), Completion::Stale);
    assert_eq!(
        q.read_request(t[0], Owner::Model, 0, &mut [0u8; 16]),
        Err(Gone),
        "its buffers are out of reach"
    );
    assert!(used(&mock, 0).is_empty(), "nothing reached the used ring");
    assert_eq!(
        rig.map.read_obj::<u8>(GuestAddress(0x14_0200)).unwrap(),
        0,
        "no status was written"
    );
    assert_eq!(q.stats.fenced.load(Ordering::Relaxed), 1);
    // The driver resets its ring and starts again: the queue serves the new life.
    mock.set_avail_idx(0);
    mock.set_used_idx(0);
    q.arm();
    offer(&mock, &get_id(&rig, 0, 0x14_0000), &[0]);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "again"));
    assert_eq!(used(&mock, 0), vec![(0, 21)]);
}

/// A queue with a waker whose driver offered one single-descriptor request per head, all of them.
fn offer_every_head(
    rig: &Rig,
) -> (
    vduse_core::rig::DriverRing,
    Arc<vduse_core::Virtqueue>,
    Arc<EventFd>,
) {
    let (mock, q) = rig.queue(16, false);
    let waker = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    q.set_waker(waker.clone());
    let table: Vec<_> = (0..QSIZE)
        .map(|h| (h, desc(0x14_0000 + 0x100 * u64::from(h), 8, W, 0)))
        .collect();
    offer(&mock, &table, &(0..QSIZE).collect::<Vec<_>>());
    (mock, q, waker)
}

#[test]
fn a_full_ring_waits_and_duplicate_heads_are_refused() {
    let rig = Rig::new();
    let (mock, q, waker) = offer_every_head(&rig);
    let t = pop_all(&q);
    assert_eq!(t.len(), usize::from(QSIZE));
    // A hostile driver offers head 3 again while it is in flight (and the ring is "full").
    offer(&mock, &[], &[3]);
    let mut batch = RequestBatch::default();
    assert_eq!(
        q.pop(Budget::default(), &mut batch),
        Pop::Full,
        "no free slot: wait"
    );
    assert!(waker.read().is_err(), "nothing to wake yet");
    assert_eq!(q.complete(t[0], 0, None), Completion::Done);
    assert_eq!(waker.read().unwrap(), 1, "a freed slot wakes the server");
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Idle);
    assert!(batch.is_empty(), "the duplicate head was not served");
    assert_eq!(q.stats.duplicate_heads.load(Ordering::Relaxed), 1);
    assert_eq!(
        q.complete(t[3], 0, None),
        Completion::Done,
        "the first request of head 3 completes"
    );
}

#[test]
fn pop_rounds_are_bounded() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    let table: Vec<_> = (0..QSIZE)
        .map(|h| (h, desc(0x14_0000 + 0x100 * u64::from(h), 8, W, 0)))
        .collect();
    let heads: Vec<u16> = (0..QSIZE).collect();
    offer(&mock, &table, &heads);
    let mut batch = RequestBatch::default();
    let budget = Budget {
        requests: 5,
        descriptors: 4096,
    };
    assert_eq!(q.pop(budget, &mut batch), Pop::More);
    assert_eq!(batch.len(), 5);
    let budget = Budget {
        requests: 64,
        descriptors: 6,
    };
    assert_eq!(q.pop(budget, &mut batch), Pop::More);
    assert_eq!(batch.len(), 6, "6 one-descriptor chains fill 6 descriptors");
}

/// A 4 GiB device-writable buffer running from mapped memory into the hole after it.
fn into_the_hole(h: u16) -> (u16, RawDescriptor) {
    (h, desc(0x8000, u32::MAX, W, 0))
}

#[test]
fn refused_chains_count_against_the_round_budget() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    let table: Vec<_> = (0..QSIZE).map(into_the_hole).collect();
    offer(&mock, &table, &(0..QSIZE).collect::<Vec<_>>());
    let mut batch = RequestBatch::default();
    let budget = Budget {
        requests: 5,
        descriptors: 4096,
    };
    assert_eq!(q.pop(budget, &mut batch), Pop::More, "the budget ran out");
    assert_eq!(
        used(&mock, 0).len(),
        5,
        "a round refuses no more chains than it may take"
    );
    assert!(batch.is_empty());
    let budget = Budget {
        requests: 64,
        descriptors: 3,
    };
    assert_eq!(q.pop(budget, &mut batch), Pop::More);
    assert_eq!(
        used(&mock, 0).len(),
        8,
        "and no more than its descriptors pay for"
    );
    assert_eq!(
        q.stats.bad_chains[ChainError::Unmapped(0).index()].load(Ordering::Relaxed),
        8
    );
}

#[test]
fn a_ring_of_malformed_chains_in_a_row_breaks_the_queue_until_reset() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    // A malformed chain between valid ones is refused and the queue goes on…
    let mut table = get_id(&rig, 0, 0x14_0000);
    table.push(into_the_hole(3));
    offer(&mock, &table, &[0, 3]);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "s"));
    assert_eq!(used(&mock, 0), vec![(0, 21), (3, 0)]);
    // …but a ring's worth in a row is a driver to stop listening to.
    let storm: Vec<_> = (0..QSIZE).map(into_the_hole).collect();
    offer(&mock, &storm, &(0..QSIZE).collect::<Vec<_>>());
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "s"));
    assert_eq!(q.stats.broken.load(Ordering::Relaxed), 1);
    let refused = used(&mock, 0).len();
    assert!(refused <= 2 + usize::from(QSIZE), "{refused}");
    offer(&mock, &get_id(&rig, 0, 0x14_0000), &[0]);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "s"));
    assert_eq!(used(&mock, 0).len(), refused, "a broken queue serves nothing");
    // The driver resets the queue: it is served again.
    q.stop();
    mock.set_avail_idx(0);
    mock.set_used_idx(0);
    q.arm();
    offer(&mock, &get_id(&rig, 0, 0x14_0000), &[0]);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "s"));
    assert_eq!(used(&mock, 0), vec![(0, 21)]);
}

#[test]
fn a_hostile_driver_cannot_make_a_queue_hold_unbounded_buffer_lists() {
    const SIZE: u16 = 256;
    const CHAIN: u16 = 1024;
    let rig = Rig::new();
    let (mock, q) = rig.queue_sized(SIZE, usize::from(CHAIN), false);
    let budget = 1usize << 16;
    // One indirect table of 1024 one-byte buffers, shared by every big request.
    for i in 0..CHAIN {
        let next = if i + 1 < CHAIN { N } else { 0 };
        rig.map
            .write_obj(
                desc(0x14_0000, 1, next, i + 1),
                GuestAddress(0x10_0000 + 16 * u64::from(i)),
            )
            .unwrap();
    }
    let big = |h: u16| (h, desc(0x10_0000, 16 * u32::from(CHAIN), I, 0));
    let small = |h: u16| (h, desc(0x14_0000, 16, 0, 0));
    let mut free_heads: Vec<u16> = (0..SIZE).rev().collect();
    let mut smalls = 0;
    let mut batch = RequestBatch::default();
    for round in 0..4 {
        // Small requests stay in flight, so the big ones of each round land in other slots.
        if round > 0 {
            let fresh: Vec<u16> = (0..48).map(|_| free_heads.pop().unwrap()).collect();
            offer(
                &mock,
                &fresh.iter().map(|&h| small(h)).collect::<Vec<_>>(),
                &fresh,
            );
            smalls += 48;
            while q.live() < smalls {
                assert_ne!(q.pop(Budget::default(), &mut batch), Pop::Full);
            }
        }
        let bigs: Vec<u16> = (0..70).map(|_| free_heads.pop().unwrap()).collect();
        offer(&mock, &bigs.iter().map(|&h| big(h)).collect::<Vec<_>>(), &bigs);
        let mut taken = Vec::new();
        loop {
            let more = q.pop(Budget::default(), &mut batch);
            taken.extend(batch.iter().map(|r| (r.ticket, r.head)));
            let (held, _) = q.segment_usage();
            assert!(held <= budget, "round {round}: {held} segments held");
            if more != Pop::More {
                assert_eq!(more, Pop::Full, "round {round}: waits for completions");
                break;
            }
        }
        assert!(
            taken.len() < 70,
            "round {round}: the budget, not the ring, stopped it"
        );
        // Complete the big ones; the rest come as room is made.
        while !taken.is_empty() {
            for (t, h) in taken.drain(..) {
                assert_eq!(q.complete(t, 0, None), Completion::Done);
                free_heads.push(h);
            }
            loop {
                let more = q.pop(Budget::default(), &mut batch);
                taken.extend(batch.iter().map(|r| (r.ticket, r.head)));
                if more != Pop::More {
                    break;
                }
            }
        }
        let (_, capacity) = q.segment_usage();
        assert!(
            capacity <= budget * 5 / 2,
            "round {round}: the slots keep {capacity} segments of capacity"
        );
    }
}

#[test]
fn a_unit_of_one_that_says_more_follow_is_a_runt() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(4, false);
    let (table, heads) = rx_buffers(0, 1);
    offer(&mock, &table, &heads);
    let t = pop_all(&q);
    let cut = Done {
        ticket: t[0],
        used_len: 64,
        status: None,
        joined: true,
    };
    assert_eq!(q.complete_all([cut]), 1);
    assert_eq!(
        used(&mock, 0),
        vec![(0, 0)],
        "its end never came: no length the driver could take for a frame"
    );
}

#[test]
fn a_taken_over_queue_reports_its_logged_progress_before_its_ring_is_set_up() {
    let rig = Rig::new();
    let (_mock, q) = rig.queue(4, false);
    q.stop();
    assert_eq!(q.next_avail(), None, "nothing to report before a driver");
    q.arm_resumed(7, vec![5, 6]);
    assert_eq!(
        q.next_avail(),
        Some(7),
        "GET_VQ_STATE answers where the log resumes, not the ring setup's index"
    );
}

#[test]
fn the_transport_fails_a_request_with_the_devices_error_status() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    offer(&mock, &get_id(&rig, 0, 0x14_0000), &[0]);
    let t = pop_all(&q);
    q.set_fail_status(Some(VIRTIO_BLK_S_IOERR));
    assert_eq!(q.complete_all([q.failure(t[0])]), 1);
    assert_eq!(used(&mock, 0), vec![(0, 1)]);
    assert_eq!(
        rig.map.read_obj::<u8>(GuestAddress(0x14_0200)).unwrap(),
        VIRTIO_BLK_S_IOERR,
        "a status byte the driver reads as an error, not a stale 0 (OK)"
    );
}

#[test]
fn copies_check_the_ticket_at_every_chunk() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    rig.header(0x8000, VIRTIO_BLK_T_OUT, 0);
    rig.map
        .write_slice(&[0xab; 0x10_0000], GuestAddress(0x2_0000))
        .unwrap();
    let table = vec![
        (0, desc(0x8000, 16, N, 1)),
        (1, desc(0x2_0000, 0x10_0000, N, 2)),
        (2, desc(0x9000, 1, W, 0)),
    ];
    offer(&mock, &table, &[0]);
    let t = pop_all(&q)[0];
    let mut data = vec![0u8; 0x10_0000];
    assert_eq!(q.read_request(t, Owner::Model, 16, &mut data), Ok(0x10_0000));
    assert!(data.iter().all(|&b| b == 0xab));
    assert_eq!(
        q.read_request(t, Owner::Model, 0x10_0000 + 8, &mut data),
        Ok(8),
        "short: the request ends there"
    );
    // A fence from another thread while a large copy runs stops it between chunks.
    let (q2, stop) = (q.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let fencer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
            q2.fence_where(|_, _| true)
        })
    };
    let mut copies = 0;
    let result = loop {
        copies += 1;
        if copies == 3 {
            stop.store(true, Ordering::Relaxed);
        }
        match q.read_request(t, Owner::Model, 16, &mut data) {
            Ok(_) if copies < 10_000 => continue,
            other => break other,
        }
    };
    assert_eq!(fencer.join().unwrap().0, 1);
    assert_eq!(result, Err(Gone), "a fenced request's memory is out of reach");
    let mut pins = Pins::new();
    assert_eq!(
        q.pin(t, Owner::Model, Part::Readable, 0, 16, &mut pins),
        Err(Gone)
    );
    assert!(pins.is_empty());
}

#[test]
fn an_iotlb_miss_asks_the_kernel_once_and_uses_memory_that_appeared() {
    let source = Arc::new(MemfdIotlb::default());
    source
        .entries
        .lock()
        .unwrap()
        .push((0, 0x10_0000, VDUSE_ACCESS_RW, memfd(0x10_0000)));
    let memory = Arc::new(Memory::new(source.clone()));
    memory.invalidate();
    let rig = Rig::with_memory(memory.clone());
    let map = memory.snapshot();
    let rig = Rig { map, ..rig };
    let (mock, q) = rig.queue(16, false);
    // The data buffer is in memory the device has not mapped yet (a bounce region appearing).
    let late = 0x4000_0000u64;
    rig.header(0x8000, VIRTIO_BLK_T_GET_ID, 0);
    let table = vec![
        (0, desc(0x8000, 16, N, 1)),
        (1, desc(late, 20, W | N, 2)),
        (2, desc(0x9000, 1, W, 0)),
    ];
    offer(&mock, &table, &[0]);
    let region = memfd(0x1000);
    source
        .entries
        .lock()
        .unwrap()
        .push((late, 0x1000, VDUSE_ACCESS_RW, region.clone()));
    let before = source.queries.load(Ordering::Relaxed);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "found-it"));
    assert_eq!(used(&mock, 0), vec![(0, 21)]);
    let mut id = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(region.as_ref(), &mut id, 0).unwrap();
    assert_eq!(&id, b"found-it", "the device wrote through its new mapping");
    // An address no entry covers: refused after one query, not a reload per request.
    let q0 = source.queries.load(Ordering::Relaxed);
    let table = vec![
        (0, desc(0x8000, 16, N, 1)),
        (1, desc(0x7000_0000, 20, W | N, 2)),
        (2, desc(0x9000, 1, W, 0)),
    ];
    offer(&mock, &table, &[0]);
    serve(&q, &RamBlk::new(1 << 20, 1, QSIZE, "x"));
    assert_eq!(used(&mock, 1), vec![(0, 0)]);
    assert_eq!(
        source.queries.load(Ordering::Relaxed) - q0,
        1,
        "one kernel query for the bad chain"
    );
    assert!(source.queries.load(Ordering::Relaxed) > before);
    assert_eq!(
        memory.reloads(),
        2,
        "loaded once at start and once when the region appeared"
    );
}

#[test]
fn revoked_memory_keeps_late_writers_away_from_the_drivers_pages() {
    // The driver's memory is a memfd it maps itself; the device maps it through the IOTLB, as with VDUSE.
    let driver_mem = memfd(0x20_0000);
    let source = Arc::new(MemfdIotlb::default());
    source
        .entries
        .lock()
        .unwrap()
        .push((0, 0x20_0000, VDUSE_ACCESS_RW, driver_mem.clone()));
    let memory = Arc::new(Memory::new(source.clone()));
    memory.invalidate();
    let device_map = memory.snapshot();
    let rig = Rig::with_memory(memory.clone());
    let rig = Rig {
        map: device_map.clone(),
        ..rig
    };
    let (mock, q) = rig.queue(16, false);
    rig.header(0x8000, VIRTIO_BLK_T_IN, 0);
    let table = vec![
        (0, desc(0x8000, 16, N, 1)),
        (1, desc(0xa000, 512, W | N, 2)),
        (2, desc(0x9000, 1, W, 0)),
    ];
    offer(&mock, &table, &[0]);
    let t = pop_all(&q);
    // A backend pinned the data buffer (a zero-copy native read in flight)...
    let mut pins = Pins::new();
    assert_eq!(
        q.pin(t[0], Owner::Model, Part::Writable, 0, 512, &mut pins),
        Ok(true)
    );
    let ptrs = pins.ranges().to_vec();
    // ...then the driver resets: the request is fenced; its memory is still pinned, so it is revoked.
    let (fenced, maps) = q.stop();
    assert_eq!(fenced, 1);
    let old = memory.clear();
    let pinned: Vec<_> = old.mappings().into_iter().filter(|m| m.is_pinned()).collect();
    assert_eq!(pinned.len(), 1, "the pin names the mapping to revoke");
    for m in pinned {
        m.revoke().unwrap();
    }
    // The late result comes, through the stale pointer: the system call fails...
    assert_eq!(
        vduse_core::rig::late_read(ptrs[0].0, ptrs[0].1, 0x5a),
        Err(libc::EFAULT)
    );
    // ...and the driver's pages never see it.
    let mut page = [0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(driver_mem.as_ref(), &mut page, 0xa000).unwrap();
    assert_eq!(
        page, [0u8; 512],
        "the late write did not reach the driver's memory"
    );
    assert_eq!(q.complete(t[0], 513, Some(VIRTIO_BLK_S_OK)), Completion::Stale);
    pins.release();
    drop((old, maps, device_map));
}

#[test]
fn an_iotlb_reload_keeps_unchanged_mappings() {
    let source = Arc::new(MemfdIotlb::default());
    let a = memfd(0x1000);
    source
        .entries
        .lock()
        .unwrap()
        .push((0, 0x1000, VDUSE_ACCESS_RW, a.clone()));
    let memory = Memory::new(source.clone());
    memory.invalidate();
    let first = memory.snapshot();
    source
        .entries
        .lock()
        .unwrap()
        .push((0x10_0000, 0x1000, VDUSE_ACCESS_RO, memfd(0x1000)));
    memory.invalidate();
    let second = memory.snapshot();
    assert_eq!(second.regions(), 2);
    let kept = second.keys().next().unwrap();
    assert!(first.contains_key(&kept));
    assert!(
        Arc::ptr_eq(&first.mappings()[0], &second.mappings()[0]),
        "the same mapping, not a new mmap"
    );
    assert!(
        !second.check(0x10_0000, 1, Access::Write),
        "read-only entries stay read-only"
    );
    // A removed entry: what the message loop would revoke.
    source.entries.lock().unwrap().remove(0);
    let keys = vduse_core::memory::entry_keys(source.as_ref()).unwrap();
    let removed = second.mappings_not_in(&keys);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].0.first, 0);
    let _ = IotlbMap::empty();
    let _ = VDUSE_ACCESS_RO;
}

#[test]
fn fences_wake_a_full_ring_and_stale_completions_do_not_eat_the_wake() {
    let rig = Rig::new();
    let (mock, q, waker) = offer_every_head(&rig);
    let t = pop_all(&q);
    let mut batch = RequestBatch::default();
    offer(&mock, &[], &[7]);
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Full);
    // A late completion of an old ticket neither completes anything nor consumes the pending wake-up.
    assert_eq!(q.complete(t[0], 0, None), Completion::Done);
    assert_eq!(waker.read().unwrap(), 1);
    assert_eq!(q.complete(t[0], 0, None), Completion::Stale);
    assert_eq!(q.pop(Budget::default(), &mut batch), Pop::Idle);
    // Fill it again, then fence everything: the server is woken to go on.
    offer(&mock, &[], &[0]);
    assert_eq!(pop_all(&q).len(), 1);
    offer(&mock, &[], &[5]);
    assert_eq!(
        q.pop(Budget::default(), &mut batch),
        Pop::Full,
        "work waits, no free slot"
    );
    let (n, _) = q.fence_where(|_, _| true);
    assert_eq!(n, usize::from(QSIZE));
    assert_eq!(
        waker.read().unwrap(),
        1,
        "fencing freed slots and woke the server"
    );
}

#[test]
fn requests_handed_to_native_io_complete_only_through_it() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(16, false);
    offer(&mock, &get_id(&rig, 0, 0x14_0000), &[0]);
    assert!(!q.awaits_model(), "nothing in flight");
    let t = pop_all(&q)[0];
    assert!(q.awaits_model(), "popped: the model's");
    assert_eq!(q.begin_native(t).map(|s| s.writable_bytes), Some(21));
    assert!(!q.awaits_model(), "native I/O's now");
    assert_eq!(q.live(), 1);
    assert!(q.begin_native(t).is_none(), "started once");
    assert_eq!(
        q.write_request(t, Owner::Model, 0, &[1]),
        Err(Gone),
        "its buffers are the native I/O's now"
    );
    assert_eq!(q.write_request(t, Owner::Native, 0, b"serial"), Ok(6));
    assert_eq!(
        q.complete(t, 21, Some(VIRTIO_BLK_S_OK)),
        Completion::Stale,
        "not by another path"
    );
    assert_eq!(q.complete_native(t, 21, Some(VIRTIO_BLK_S_OK)), Completion::Done);
    q.notify();
    assert_eq!(used(&mock, 0), vec![(0, 21)]);
}

#[test]
fn the_state_file_follows_pops_completions_and_refusals() {
    use vduse_core::inflight::{StateFile, StateInfo};
    let dir = std::env::temp_dir().join(format!("vduse-q-{}", std::process::id()));
    let state = StateFile::create(
        &dir.join("q"),
        &StateInfo {
            device_id: 2,
            num_queues: 1,
            queue_size: QSIZE,
            features: 0,
            config: vec![],
        },
    )
    .unwrap();
    let rig = Rig::new();
    let (mock, _) = rig.queue(16, false);
    let q = vduse_core::Virtqueue::new(
        0,
        QSIZE,
        16,
        rig.memory.clone(),
        rig.transport.clone(),
        rig.inflight.clone(),
        state.queue(0),
    );
    q.arm();
    let mut table = get_id(&rig, 0, 0x14_0000);
    table.extend(get_id(&rig, 3, 0x15_0000));
    table.push((6, desc(0x7000_0000, 8, W, 0))); // refused: unmapped
    table.extend(get_id(&rig, 8, 0x16_0000));
    offer(&mock, &table, &[0, 3, 6, 8]);
    let t = pop_all(&q);
    assert_eq!(t.len(), 3);
    let log = state.queue(0).unwrap();
    assert_eq!(log.next_avail(), 4, "every chain taken, the refused one too");
    assert_eq!(log.used_idx(), 1, "the refused chain is published");
    assert_eq!(log.in_flight(), vec![0, 3, 8]);
    assert_eq!(q.complete(t[1], 21, Some(VIRTIO_BLK_S_OK)), Completion::Done);
    assert_eq!(log.in_flight(), vec![0, 8]);
    assert_eq!(log.used_idx(), 2);
    // A handover: the requests still in the model stay in the log, for the successor to serve again.
    let (fenced, _maps) = q.abandon();
    assert_eq!(fenced, 2);
    assert_eq!(log.in_flight(), vec![0, 8], "a handover keeps what was in flight");
    q.arm();
    q.stop();
    assert!(log.in_flight().is_empty(), "a reset forgets everything");
    state.remove();
    let _ = std::fs::remove_dir(&dir);
}

/// `n` receive-buffer-like chains (one writable 64-byte descriptor each) at heads `first..first+n`.
fn rx_buffers(first: u16, n: u16) -> (Vec<(u16, RawDescriptor)>, Vec<u16>) {
    let table = (first..first + n)
        .map(|h| (h, desc(0x14_0000 + 0x100 * u64::from(h), 64, W, 0)))
        .collect();
    (table, (first..first + n).collect())
}

fn unit(tickets: &[Ticket], len: u32) -> Vec<Done> {
    let last = tickets.len() - 1;
    tickets
        .iter()
        .enumerate()
        .map(|(k, &t)| Done {
            ticket: t,
            used_len: len,
            status: None,
            joined: k < last,
        })
        .collect()
}

#[test]
fn a_unit_of_joined_completions_is_published_whole_never_in_part() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(4, false);
    // A driver on another CPU reads the used index all along: it must only ever see whole frames.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (map, used_at, stop) = (rig.map.clone(), mock.used, stop.clone());
        std::thread::spawn(move || {
            let mut seen_parts = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let idx: u16 = map.load(GuestAddress(used_at + 2), Ordering::Acquire).unwrap();
                if !u16::from_le(idx).is_multiple_of(3) {
                    seen_parts += 1;
                }
            }
            seen_parts
        })
    };
    for round in 0..3000u32 {
        let first = (round % 5) as u16 * 3;
        let (table, heads) = rx_buffers(first, 3);
        offer(&mock, &table, &heads);
        let t = pop_all(&q);
        assert_eq!(t.len(), 3);
        assert_eq!(q.complete_all(unit(&t, 40)), 3);
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(watcher.join().unwrap(), 0, "the driver saw part of a frame");
    assert_eq!(mock.used_idx(), 9000);
}

#[test]
fn a_unit_with_a_fenced_buffer_goes_out_as_runts() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(4, false);
    let (table, heads) = rx_buffers(0, 3);
    offer(&mock, &table, &heads);
    let t = pop_all(&q);
    // The driver unmapped the middle buffer's memory (an IOTLB change) while the frame was copied.
    let middle = 0x14_0100;
    let (fenced, _maps) = q.fence_where(|_, segs| segs.iter().any(|s| s.addr == middle));
    assert_eq!(fenced, 1);
    assert_eq!(q.complete_all(unit(&t, 64)), 2);
    assert_eq!(
        used(&mock, 0),
        vec![(0, 0), (2, 0)],
        "no frame with a hole: both runts"
    );
    // A single completion is not a unit: its length stands.
    let (table, heads) = rx_buffers(3, 1);
    offer(&mock, &table, &heads);
    let t = pop_all(&q);
    assert_eq!(q.complete_all(unit(&t, 64)), 1);
    assert_eq!(used(&mock, 2), vec![(3, 64)]);
}

#[test]
fn held_buffers_under_unmapped_memory_are_given_back_not_lost() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(4, false);
    q.set_held(true);
    let (table, heads) = rx_buffers(0, 2);
    offer(&mock, &table, &heads);
    let t = pop_all(&q);
    let (given, _maps) = q.give_back_where(|_, segs| segs.iter().any(|s| s.addr == 0x14_0000));
    assert_eq!(given, 1);
    assert_eq!(
        used(&mock, 0),
        vec![(0, 0)],
        "the driver has its buffer back, empty"
    );
    assert_eq!(
        q.complete(t[0], 64, None),
        Completion::Stale,
        "and the model cannot fill it any more"
    );
    assert_eq!(q.complete(t[1], 64, None), Completion::Done);
    assert_eq!(q.stats.fenced.load(Ordering::Relaxed), 0);
}

#[test]
fn event_idx_interrupts_only_when_the_drivers_used_event_is_passed() {
    let rig = Rig::new();
    let (mock, q) = rig.queue(4, true);
    let interrupts = || rig.transport.interrupts.load(Ordering::Relaxed);
    let before = interrupts();
    // The driver wants an interrupt once used entry 2 is published (used_event = 2).
    mock.set_used_event(2);
    let (table, heads) = rx_buffers(0, 4);
    offer(&mock, &table, &heads);
    let t = pop_all(&q);
    let one = |k: usize| vec![Done::new(t[k], 8, None)];
    q.complete_all(one(0)); // used idx 1: entry 0 published, not past 2
    q.complete_all(one(1)); // used idx 2
    assert_eq!(interrupts(), before, "used_event not passed yet");
    q.complete_all(one(2)); // used idx 3: entry 2 published
    assert_eq!(interrupts(), before + 1);
    q.complete_all(one(3)); // past it already, and the driver did not move it
    assert_eq!(interrupts(), before + 1);
    // Several at once that pass it: one interrupt.
    mock.set_used_event(5);
    let (table, heads) = rx_buffers(4, 4);
    offer(&mock, &table, &heads);
    let t = pop_all(&q);
    q.complete_all(t.iter().map(|&t| Done::new(t, 8, None)));
    assert_eq!(interrupts(), before + 2);
}

#[test]
fn the_ram_model_never_stores_bytes_of_a_request_fenced_before_it_copied_them() {
    let (rig, _driver_mem) = Rig::memfd_backed(1 << 20);
    let (mock, q) = rig.queue(16, false);
    let model = RamBlk::new(1 << 20, 1, QSIZE, "ram");
    // Sector 0 holds 0xaa first.
    rig.header(0x8000, VIRTIO_BLK_T_OUT, 0);
    rig.map.write_slice(&[0xaa; 4096], GuestAddress(0xa000)).unwrap();
    let write = vec![
        (0, desc(0x8000, 16, N, 1)),
        (1, desc(0xa000, 4096, N, 2)),
        (2, desc(0x9000, 1, W, 0)),
    ];
    offer(&mock, &write, &[0]);
    serve(&q, &model);
    assert_eq!(used(&mock, 0), vec![(0, 1)]);
    // A second write of 0xbb is popped, then fenced and its memory revoked before the model runs.
    rig.map.write_slice(&[0xbb; 4096], GuestAddress(0xa000)).unwrap();
    offer(&mock, &write, &[0]);
    let mut batch = RequestBatch::default();
    q.pop(Budget::default(), &mut batch);
    assert_eq!(q.fence_where(|_, _| true).0, 1);
    for m in rig.memory.peek().mappings() {
        m.revoke().unwrap();
    }
    vduse_core::DeviceModel::handle(&model, 0, &batch, &Completer::new(q.clone()));
    // The disk still holds 0xaa — not the zeros the revoked mapping reads as now.
    let (rig2, _mem2) = Rig::memfd_backed(1 << 20);
    let (mock2, q2) = rig2.queue(16, false);
    rig2.header(0x8000, VIRTIO_BLK_T_IN, 0);
    offer(
        &mock2,
        &[
            (0, desc(0x8000, 16, N, 1)),
            (1, desc(0xa000, 4096, W | N, 2)),
            (2, desc(0x9000, 1, W, 0)),
        ],
        &[0],
    );
    serve(&q2, &model);
    assert_eq!(used(&mock2, 0), vec![(0, 4097)]);
    let mut back = [0u8; 4096];
    rig2.map.read_slice(&mut back, GuestAddress(0xa000)).unwrap();
    assert!(back.iter().all(|&b| b == 0xaa), "found {:#x}", back[0]);
}
