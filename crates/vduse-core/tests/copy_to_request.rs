//! `Virtqueue::copy_to_request`: one copy from a request of one queue into a request of another (a
//! switch moving a frame between two drivers' memories) — across IOTLB regions on both sides and over
//! several chunks, never into a request that was given back, never between a ticket and the wrong
//! queue, and without deadlock when two queues copy into each other at once.

use vduse_core::queue::{Budget, Gone, Owner, RequestBatch, Ticket};
use vduse_core::rig::{desc, offer, DriverRing, Rig};
use vduse_core::Virtqueue;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

/// A driver whose memory is two IOTLB entries of 1 MiB each, backed by two memfds: a buffer across
/// 1 MiB crosses from one mapping into the other.
fn two_region_rig() -> Rig {
    Rig::memfd_regions(&[MIB, MIB]).0
}

/// Offers one request (`parts`: address, length, device-writable) and pops it; its ticket.
fn request(ring: &DriverRing, q: &Virtqueue, parts: &[(u64, u32, bool)]) -> Ticket {
    let table: Vec<_> = parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let i = i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if usize::from(i) + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            (i, desc(addr, len, flags, i + 1))
        })
        .collect();
    offer(ring, &table, &[0]);
    let mut batch = RequestBatch::default();
    q.pop(Budget::default(), &mut batch);
    batch.get(0).expect("the request was popped").ticket
}

#[test]
fn a_large_copy_crosses_regions_on_both_sides_and_several_chunks() {
    let (a, b) = (two_region_rig(), two_region_rig());
    let (ring_a, qa) = a.queue(8, false);
    let (ring_b, qb) = b.queue(8, false);
    // 600 KiB readable around a's region boundary, written into three buffers of b around its own,
    // cut where nothing lines up.
    let len = 600 << 10;
    let src_at = MIB - 300_000;
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    a.map.write_slice(&data, GuestAddress(src_at)).unwrap();
    let src = request(&ring_a, &qa, &[(src_at, len as u32, false)]);
    let cuts = [
        (0x20_000u64, 100_000u32),
        (MIB - 77_777, 200_000),
        (MIB + 0x40_000, 400_000),
    ];
    let dst = request(&ring_b, &qb, &cuts.map(|(at, n)| (at, n, true)));
    // Skip 10 bytes of the source, write from 5 bytes into the destination.
    let n = qa.copy_to_request(src, 10, &qb, dst, 5, len).unwrap();
    assert_eq!(n, len - 10, "bounded by what is left of the source");
    let mut got = Vec::new();
    for (at, n) in cuts {
        let mut part = vec![0u8; n as usize];
        b.map.read_slice(&mut part, GuestAddress(at)).unwrap();
        got.extend(part);
    }
    assert_eq!(&got[5..5 + len - 10], &data[10..]);
    assert!(got[..5].iter().all(|&x| x == 0));
}

#[test]
fn dead_tickets_and_tickets_of_another_queue_are_gone_and_nothing_is_written() {
    let (a, b) = (two_region_rig(), two_region_rig());
    let (ring_a, qa) = a.queue(8, false);
    let (ring_b, qb) = b.queue(8, false);
    a.map.write_slice(&[0xaa; 64], GuestAddress(0x1_0000)).unwrap();
    let src = request(&ring_a, &qa, &[(0x1_0000, 64, false)]);
    let dst = request(&ring_b, &qb, &[(0x2_0000, 64, true)]);
    // A ticket of the other queue (same slot and generation, wrong queue index) is refused.
    let foreign = Ticket::new(7, dst.slot(), dst.gen());
    assert_eq!(qa.copy_to_request(src, 0, &qb, foreign, 0, 64), Err(Gone));
    // The receiver's buffers given back (a reset, a memory-map change): never written after.
    let (given, _) = qb.give_back_where(|_, _| true);
    assert_eq!(given, 1);
    assert_eq!(qa.copy_to_request(src, 0, &qb, dst, 0, 64), Err(Gone));
    let mut after = [0u8; 64];
    b.map.read_slice(&mut after, GuestAddress(0x2_0000)).unwrap();
    assert_eq!(after, [0u8; 64]);
}

#[test]
fn two_queues_copying_into_each_other_at_once_do_not_deadlock() {
    let (a, b) = (two_region_rig(), two_region_rig());
    // Each side has a readable and a writable request: a's into b's, b's into a's, from two threads.
    let (ring_a, qa) = a.queue(8, false);
    let (ring_b, qb) = b.queue(8, false);
    let ta = request(&ring_a, &qa, &[(0x1_0000, 4096, false), (0x2_0000, 4096, true)]);
    let tb = request(&ring_b, &qb, &[(0x1_0000, 4096, false), (0x2_0000, 4096, true)]);
    let threads: Vec<_> = [(qa.clone(), ta, qb.clone(), tb), (qb.clone(), tb, qa.clone(), ta)]
        .into_iter()
        .map(|(from, t_from, to, t_to)| {
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    assert_eq!(from.copy_to_request(t_from, 0, &to, t_to, 0, 4096), Ok(4096));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_ticket_of_another_queue_reaches_no_buffer_of_this_one() {
    // The same slot and generation on another queue: a model that completes or copies through the wrong
    // queue must find nothing, never the live request that happens to share the numbers.
    let a = two_region_rig();
    let (ring, q) = a.queue(8, false);
    a.map.write_slice(&[0xaa; 64], GuestAddress(0x1_0000)).unwrap();
    let t = request(&ring, &q, &[(0x1_0000, 64, false), (0x2_0000, 64, true)]);
    let foreign = Ticket::new(t.queue() + 1, t.slot(), t.gen());
    let mut buf = [0u8; 64];
    assert_eq!(q.read_request(foreign, Owner::Model, 0, &mut buf), Err(Gone));
    assert_eq!(q.write_request(foreign, Owner::Model, 0, &[0x55; 64]), Err(Gone));
    assert!(q.begin_native(foreign).is_none());
    assert!(!q.is_live(foreign));
    let mut after = [0u8; 64];
    a.map.read_slice(&mut after, GuestAddress(0x2_0000)).unwrap();
    assert_eq!(after, [0u8; 64], "nothing written");
    // The request's own ticket still works.
    assert_eq!(q.read_request(t, Owner::Model, 0, &mut buf), Ok(64));
    assert_eq!(buf, [0xaa; 64]);
}
