//! The native switch between in-process drivers (split rings in real memory): learning and flooding,
//! port security, receivers that negotiated fewer offloads (checksums completed, TCP segmented — each
//! segment's checksums recomputed here independently), backpressure, unplugging, and a driver rewriting
//! a frame's header while it is being forwarded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vduse_backends::nic::{
    F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_HOST_TSO4, F_MRG_RXBUF, GSO_TCPV4, HDR, HDR_F_NEEDS_CSUM, RX_QUEUE,
    TX_QUEUE,
};
use vduse_backends::switch::{Switch, SwitchOptions, SwitchPort};
use vduse_core::model::{Completer, DeviceModel};
use vduse_core::queue::{Budget, RequestBatch, Virtqueue};
use vduse_core::rig::{desc, offer, used, DriverRing, Rig};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const ALL: u64 = VERSION_1 | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4 | F_MRG_RXBUF;
const WRITE: u32 = 2;
const BUF: u64 = 0x10_000;
const BUF_SIZE: u32 = 2048;

/// One in-process driver's NIC: a receive and a transmit ring, each in its own memory.
struct Nic {
    model: Arc<SwitchPort>,
    rx: (Rig, DriverRing, Arc<Virtqueue>, Completer),
    tx: (Rig, DriverRing, Arc<Virtqueue>, Completer),
    rx_seen: u16,
    tx_next: u16,
    /// Receive descriptors not posted (or given back).
    free: Vec<u16>,
}

impl Nic {
    fn new(switch: &Arc<Switch>, name: &str, features: u64) -> Self {
        let queue = |features| {
            let rig = Rig::new();
            let (ring, q) = rig.queue(64, false);
            q.set_features(features);
            let c = Completer::new(q.clone());
            (rig, ring, q, c)
        };
        Nic {
            model: switch.port(name, 1500),
            rx: queue(features),
            tx: queue(features),
            rx_seen: 0,
            tx_next: 0,
            free: (0..16).rev().collect(),
        }
    }

    /// Posts up to `n` receive buffers of BUF_SIZE bytes (one descriptor each).
    fn post(&mut self, n: u16) {
        self.post_sized(n, BUF_SIZE);
    }

    /// Posts up to `n` receive buffers of `size` bytes (at most BUF_SIZE).
    fn post_sized(&mut self, n: u16, size: u32) {
        let (_, ring, q, c) = &self.rx;
        let heads: Vec<u16> = (0..n).filter_map(|_| self.free.pop()).collect();
        let table: Vec<_> = heads
            .iter()
            .map(|&h| (h, desc(BUF + u64::from(BUF_SIZE) * u64::from(h), size, WRITE, 0)))
            .collect();
        offer(ring, &table, &heads);
        let mut batch = RequestBatch::default();
        q.pop(Budget::default(), &mut batch);
        self.model.handle(RX_QUEUE, &batch, c);
    }

    /// Sends frames (each: virtio-net header + Ethernet frame, one descriptor) as one batch.
    fn send(&mut self, frames: &[Vec<u8>]) {
        let (rig, ring, q, c) = &self.tx;
        let mut table = Vec::new();
        let mut heads = Vec::new();
        for f in frames {
            let h = self.tx_next % ring.size;
            self.tx_next = self.tx_next.wrapping_add(1);
            let at = BUF + 0x1_0000 * u64::from(h % 8);
            rig.map.write_slice(f, GuestAddress(at)).unwrap();
            table.push((h, desc(at, f.len() as u32, 0, 0)));
            heads.push(h);
        }
        offer(ring, &table, &heads);
        let mut batch = RequestBatch::default();
        q.pop(Budget::default(), &mut batch);
        self.model.handle(TX_QUEUE, &batch, c);
    }

    /// Frames received since the last call: (header + frame) as the driver reads them.
    fn received(&mut self) -> Vec<Vec<u8>> {
        let (rig, ring, _, _) = &self.rx;
        let got = used(ring, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(got.len() as u16);
        self.free.extend(got.iter().map(|&(head, _)| head as u16));
        got.iter()
            .map(|&(head, len)| {
                let mut b = vec![0u8; len as usize];
                rig.map
                    .read_slice(&mut b, GuestAddress(BUF + u64::from(BUF_SIZE) * u64::from(head)))
                    .unwrap();
                b
            })
            .collect()
    }
}

fn mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, last]
}

/// A plain frame from `src` to `dst` with `payload` bytes of `fill`.
fn frame(dst: [u8; 6], src: [u8; 6], payload: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend(std::iter::repeat_n(fill, payload));
    f
}

const BROADCAST: [u8; 6] = [0xff; 6];

#[test]
fn learns_forwards_unicast_and_floods_broadcast_and_unknown() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b, mut c) = (
        Nic::new(&sw, "a", ALL),
        Nic::new(&sw, "b", ALL),
        Nic::new(&sw, "c", ALL),
    );
    for n in [&mut a, &mut b, &mut c] {
        n.post(16);
    }
    // Unknown destination: flooded to b and c, never back to a.
    a.send(&[frame(mac(2), mac(1), 100, 0xaa)]);
    let (rb, rc) = (b.received(), c.received());
    assert_eq!((rb.len(), rc.len(), a.received().len()), (1, 1, 0));
    assert_eq!(&rb[0][HDR..], &frame(mac(2), mac(1), 100, 0xaa)[HDR..]);
    assert_eq!(u16::from_le_bytes([rb[0][10], rb[0][11]]), 1, "num_buffers");
    // b answers a: a was learned, so only a gets it.
    b.send(&[frame(mac(1), mac(2), 60, 0xbb)]);
    assert_eq!((a.received().len(), c.received().len()), (1, 0));
    // Now both are known: a → b is unicast.
    a.send(&[
        frame(mac(2), mac(1), 60, 0xcc),
        frame(BROADCAST, mac(1), 60, 0xdd),
    ]);
    assert_eq!(b.received().len(), 2);
    assert_eq!(c.received().len(), 1, "only the broadcast");
    let s = sw.stats();
    assert_eq!(s.forwarded.load(Ordering::Relaxed), 2);
    assert_eq!(s.flooded.load(Ordering::Relaxed), 2);
    assert_eq!(sw.port_of(mac(1)).as_deref(), Some("a"));
    assert_eq!(a.model.stats().tx_frames.load(Ordering::Relaxed), 3);
    assert_eq!(b.model.stats().rx_frames.load(Ordering::Relaxed), 3);
}

#[test]
fn a_port_cannot_take_anothers_address_and_a_flood_of_new_ones_evicts_nobody() {
    let sw = Switch::new(SwitchOptions {
        max_macs_per_port: 4,
        ..SwitchOptions::default()
    });
    let (mut a, mut b, mut evil) = (
        Nic::new(&sw, "a", ALL),
        Nic::new(&sw, "b", ALL),
        Nic::new(&sw, "evil", ALL),
    );
    for n in [&mut a, &mut b, &mut evil] {
        n.post(16);
    }
    a.send(&[frame(BROADCAST, mac(1), 60, 1)]);
    b.send(&[frame(BROADCAST, mac(2), 60, 2)]);
    let _ = (a.received(), b.received(), evil.received());
    // The hostile port claims a's address, then floods 100 new ones.
    evil.send(&[frame(mac(2), mac(1), 60, 3)]);
    for k in 0..100u8 {
        evil.send(&[frame(BROADCAST, [0x02, 0xee, 0, 0, 0, k], 60, 4)]);
        let _ = (a.received(), b.received());
        a.post(1);
        b.post(1);
    }
    assert_eq!(sw.stats().spoofed.load(Ordering::Relaxed), 1);
    assert!(sw.stats().unlearned.load(Ordering::Relaxed) >= 96);
    assert_eq!(sw.port_of(mac(1)).as_deref(), Some("a"));
    // b → a still reaches a alone.
    let _ = (a.received(), evil.received());
    b.send(&[frame(mac(1), mac(2), 60, 5)]);
    assert_eq!((a.received().len(), evil.received().len()), (1, 0));
}

#[test]
fn no_buffers_drops_and_counts_and_unplugging_forgets_the_port() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, b) = (Nic::new(&sw, "a", ALL), Nic::new(&sw, "b", ALL));
    a.send(&[frame(mac(2), mac(1), 60, 0)]);
    assert_eq!(b.model.stats().rx_no_buffers.load(Ordering::Relaxed), 1);
    // The sender's buffers came back anyway.
    assert_eq!(used(&a.tx.1, 0).len(), 1);
    assert_eq!(sw.port_count(), 2);
    b.model.leave();
    assert_eq!(sw.port_count(), 1);
    drop(b);
    assert_eq!(sw.port_of(mac(1)).as_deref(), Some("a"));
    drop(a);
    assert_eq!(sw.port_count(), 0);
    assert_eq!(sw.port_of(mac(1)), None);
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b) = (Nic::new(&sw, "a", VERSION_1), Nic::new(&sw, "b", ALL));
    b.post(16);
    let mut csum = frame(mac(2), mac(1), 60, 0);
    csum[0] = HDR_F_NEEDS_CSUM; // CSUM not negotiated by a
    let mut ecn = frame(mac(2), mac(1), 60, 0);
    ecn[1] = 0x80;
    let jumbo = frame(mac(2), mac(1), 1501 + 4, 0);
    let runt = vec![0u8; HDR + 10];
    a.send(&[csum, ecn, jumbo, runt]);
    assert_eq!(a.model.stats().tx_malformed.load(Ordering::Relaxed), 4);
    assert!(b.received().is_empty());
}

/// A TCP/IPv4 packet of `payload` bytes from a (10.0.0.1) to b, with a partial checksum and TSO4.
fn tso_packet(payload: usize, mss: u16) -> Vec<u8> {
    let mut f = frame(mac(2), mac(1), 0, 0);
    f.truncate(HDR + 12);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 20 + payload;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ];
    ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let sum = !fold(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18 | 0x01 | 0x80; // PSH ACK FIN CWR
                                  // Partial checksum: the pseudo-header sum (addresses, protocol, TCP length), not inverted.
    let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2];
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    tcp[16..18].copy_from_slice(&fold(&pseudo, 0).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f[0] = HDR_F_NEEDS_CSUM;
    f[1] = GSO_TCPV4;
    f[2..4].copy_from_slice(&54u16.to_le_bytes());
    f[4..6].copy_from_slice(&mss.to_le_bytes());
    f[6..8].copy_from_slice(&34u16.to_le_bytes());
    f[8..10].copy_from_slice(&16u16.to_le_bytes());
    f
}

fn fold(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn tcp_for_a_driver_without_tso_or_csum_is_cut_into_segments_with_full_checksums() {
    let sw = Switch::new(SwitchOptions::default());
    // b negotiated neither GUEST_TSO4 nor GUEST_CSUM: it gets complete, MTU-sized segments.
    let (mut a, mut b) = (
        Nic::new(&sw, "a", ALL),
        Nic::new(&sw, "b", VERSION_1 | F_MRG_RXBUF),
    );
    b.post(16);
    a.send(&[tso_packet(3000, 1400)]);
    let got = b.received();
    assert_eq!(got.len(), 3);
    let mut seq = 1000u32;
    let mut data = Vec::new();
    for (i, seg) in got.iter().enumerate() {
        assert_eq!(&seg[..2], &[0, 0], "no offload flags for this driver");
        let f = &seg[HDR..];
        let ip = &f[14..34];
        assert_eq!(fold(ip, 0), 0xffff, "segment {i}: IPv4 header checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, f.len() - 14);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 0x1234 + i as u16);
        let tcp = &f[34..];
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), seq);
        let last = i == 2;
        assert_eq!(tcp[13] & 0x01 != 0, last, "FIN only on the last");
        assert_eq!(tcp[13] & 0x80 != 0, i == 0, "CWR only on the first");
        let mut pseudo = ip[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        assert_eq!(
            fold(tcp, u32::from(fold(&pseudo, 0))),
            0xffff,
            "segment {i}: TCP checksum"
        );
        seq += (tcp.len() - 20) as u32;
        data.extend_from_slice(&tcp[20..]);
    }
    assert_eq!(data, (0..3000).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    // A receiver with GUEST_CSUM but not TSO gets partial checksums instead.
    let mut c = Nic::new(&sw, "c", VERSION_1 | F_GUEST_CSUM | F_MRG_RXBUF);
    c.post(16);
    a.send(&[{
        let mut p = tso_packet(2000, 1000);
        p[HDR..HDR + 6].copy_from_slice(&BROADCAST);
        p
    }]);
    let got = c.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|s| s[0] == HDR_F_NEEDS_CSUM && s[1] == 0));
}

#[test]
fn a_header_the_sender_rewrites_mid_forward_never_reaches_a_receiver_unchecked() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b) = (
        Nic::new(&sw, "a", VERSION_1 | F_MRG_RXBUF),
        Nic::new(&sw, "b", ALL),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // a's driver flips the GSO byte of every frame slot between none and TCPV4 (not negotiated), all along.
    let flipper = {
        let (map, stop) = (a.tx.0.map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 0u8;
            while !stop.load(Ordering::Relaxed) {
                v ^= GSO_TCPV4;
                for h in 0..8u64 {
                    let _ = map.write_obj(v, GuestAddress(BUF + 0x1_0000 * h + 1));
                }
            }
        })
    };
    let mut delivered = 0;
    for _ in 0..200 {
        b.post(8);
        a.send(&vec![frame(mac(2), mac(1), 60, 7); 8]);
        for f in b.received() {
            assert_eq!(f[1], 0, "an unchecked header reached the receiver");
            delivered += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let s = a.model.stats();
    assert_eq!(
        s.tx_frames.load(Ordering::Relaxed) + s.tx_malformed.load(Ordering::Relaxed),
        1600
    );
    assert!(delivered > 0);
}

#[test]
fn a_frame_spans_receive_buffers_and_its_checked_head_may_straddle_them() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b) = (Nic::new(&sw, "a", ALL), Nic::new(&sw, "b", ALL));
    // Buffers of 20 bytes: the 26-byte head (virtio-net + Ethernet header) straddles the first two.
    b.post_sized(16, 20);
    let mut f = frame(mac(2), mac(1), 200, 0);
    for (i, x) in f[HDR + 14..].iter_mut().enumerate() {
        *x = i as u8;
    }
    a.send(std::slice::from_ref(&f));
    let got = b.received();
    assert_eq!(got.len(), (f.len()).div_ceil(20));
    assert_eq!(
        usize::from(u16::from_le_bytes([got[0][10], got[0][11]])),
        got.len()
    );
    let joined: Vec<u8> = got.concat();
    assert_eq!(&joined[HDR..], &f[HDR..], "the frame arrives whole, in order");
    // Too few buffers left for the next one: it waits (a copy) until the driver posts more.
    a.send(std::slice::from_ref(&f));
    assert!(b.received().is_empty());
    b.post_sized(16, 2048);
    // Into the four 20-byte buffers left, then a large one.
    let got = b.received();
    assert_eq!(got.len(), 5);
    assert_eq!(&got.concat()[HDR..], &f[HDR..]);
    assert_eq!(b.model.stats().rx_no_buffers.load(Ordering::Relaxed), 0);
}

#[test]
fn frames_wait_in_order_for_receive_buffers_and_the_wait_is_bounded() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b) = (Nic::new(&sw, "a", ALL), Nic::new(&sw, "b", ALL));
    b.post(1);
    // 300 frames of 1000 bytes with one buffer posted: one delivered, 256 wait (the frame bound), the rest
    // are dropped and counted.
    for k in 0..300u16 {
        let mut f = frame(mac(2), mac(1), 1000, 0);
        f[HDR + 14..HDR + 16].copy_from_slice(&k.to_be_bytes());
        a.send(&[f]);
    }
    let port = b.model.clone();
    let stats = port.stats();
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rx_no_buffers.load(Ordering::Relaxed), 300 - 1 - 256);
    let mut seen = vec![0u16];
    assert_eq!(b.received().len(), 1);
    // Buffers come: the waiting frames arrive, oldest first.
    while seen.len() < 257 {
        b.post(16);
        for f in b.received() {
            seen.push(u16::from_be_bytes([f[HDR + 14], f[HDR + 15]]));
        }
    }
    assert_eq!(seen, (0..257).collect::<Vec<_>>());
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 257);
}

#[test]
fn short_or_hostile_gso_frames_and_group_sources_are_refused_without_harm() {
    let sw = Switch::new(SwitchOptions::default());
    // b cannot take TSO: GSO frames for it would be cut here.
    let (mut a, mut b) = (
        Nic::new(&sw, "a", ALL),
        Nic::new(&sw, "b", VERSION_1 | F_MRG_RXBUF),
    );
    b.post(16);
    // A GSO header on a frame too short for IP and TCP headers, and one asking for 1-byte segments.
    let mut short = frame(BROADCAST, mac(1), 0, 0);
    short[0] = HDR_F_NEEDS_CSUM;
    short[1] = GSO_TCPV4;
    short[4..6].copy_from_slice(&1u16.to_le_bytes());
    let mut tiny_mss = tso_packet(3000, 1);
    tiny_mss[HDR..HDR + 6].copy_from_slice(&BROADCAST);
    // Frames from a multicast and from the zero address.
    let group = frame(mac(2), [0x03, 0, 0, 0, 0, 1], 60, 0);
    let zero = frame(mac(2), [0; 6], 60, 0);
    a.send(&[short, tiny_mss, group, zero]);
    assert_eq!(a.model.stats().tx_malformed.load(Ordering::Relaxed), 2);
    assert_eq!(sw.stats().invalid.load(Ordering::Relaxed), 2);
    // A well-formed GSO header with no payload behind it: nothing to cut, refused for b.
    let mut empty = tso_packet(0, 1000);
    empty[HDR..HDR + 6].copy_from_slice(&BROADCAST);
    a.send(&[empty]);
    assert_eq!(b.model.stats().rx_refused.load(Ordering::Relaxed), 1);
    assert!(b.received().is_empty());
    assert_eq!(sw.port_of([0; 6]), None);
}

#[test]
fn buffers_given_back_by_a_reset_are_never_written_and_a_new_session_forgets_the_backlog() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b) = (Nic::new(&sw, "a", ALL), Nic::new(&sw, "b", ALL));
    b.post(2);
    // The driver resets (or changes its memory map): its held buffers are given back, empty.
    let (given, _) = b.rx.2.give_back_where(|_, _| true);
    assert_eq!(given, 2);
    let used_after_reset = b.rx.1.used_idx();
    a.send(&[frame(mac(2), mac(1), 100, 0xee)]);
    let mut first = vec![0u8; BUF_SIZE as usize * 2];
    b.rx.0.map.read_slice(&mut first, GuestAddress(BUF)).unwrap();
    assert!(first.iter().all(|&x| x == 0), "a given-back buffer was written");
    assert_eq!(b.rx.1.used_idx(), used_after_reset);
    // The frame waits for the next buffers — unless a new session starts first.
    b.model.started(ALL);
    b.rx_seen = b.rx.1.used_idx();
    b.free = (0..16).rev().collect();
    b.post(4);
    assert!(
        b.received().is_empty(),
        "a frame of the session before reached the new one"
    );
    a.send(&[frame(mac(2), mac(1), 100, 0xef)]);
    assert_eq!(b.received().len(), 1);
}

#[test]
fn the_backlog_is_bounded_in_bytes_of_the_buffers_it_holds() {
    let sw = Switch::new(SwitchOptions::default());
    let (mut a, mut b) = (Nic::new(&sw, "a", ALL), Nic::new(&sw, "b", ALL));
    b.post(1);
    let _ = b.received();
    // 100 TSO packets of 60 KB for a driver that takes them whole, and nothing posted.
    let packet = tso_packet(60_000, 1400);
    for _ in 0..100 {
        a.send(std::slice::from_ref(&packet));
    }
    let len = packet.len();
    let queued = 100 - b.model.stats().rx_no_buffers.load(Ordering::Relaxed) as usize;
    assert!(queued * len <= 4 << 20, "{queued} frames of {len} bytes queued");
    assert!((queued + 1) * len > 4 << 20, "only {queued} queued");
}

#[test]
fn a_frame_over_several_descriptors_lands_whole_in_small_buffers() {
    let sw = Switch::new(SwitchOptions::default());
    let (a, mut b) = (Nic::new(&sw, "a", ALL), Nic::new(&sw, "b", ALL));
    b.post_sized(16, 40);
    let mut f = frame(mac(2), mac(1), 400, 0);
    for (i, x) in f[HDR + 14..].iter_mut().enumerate() {
        *x = (i * 7) as u8;
    }
    // The chain: 10 bytes, 50 bytes, then the rest — pieces that never line up with the 40-byte buffers.
    let (rig, ring, q, c) = &a.tx;
    let at = [0x40_000u64, 0x50_000, 0x60_000];
    let cuts = [0, 10, 60, f.len()];
    for k in 0..3 {
        rig.map
            .write_slice(&f[cuts[k]..cuts[k + 1]], GuestAddress(at[k]))
            .unwrap();
    }
    let table: Vec<_> = (0..3u16)
        .map(|k| {
            let len = (cuts[usize::from(k) + 1] - cuts[usize::from(k)]) as u32;
            let next = if k < 2 { 1 } else { 0 };
            (k, desc(at[usize::from(k)], len, next, k + 1))
        })
        .collect();
    offer(ring, &table, &[0]);
    let mut batch = RequestBatch::default();
    q.pop(Budget::default(), &mut batch);
    a.model.handle(TX_QUEUE, &batch, c);
    let got = b.received();
    assert_eq!(got.len(), f.len().div_ceil(40));
    assert_eq!(&got.concat()[HDR..], &f[HDR..]);
}
