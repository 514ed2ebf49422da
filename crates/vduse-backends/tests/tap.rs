//! The tap model's transmit path against a driver that rewrites a frame's virtio-net header while the
//! frame is being sent: what reaches the tap is always a frame whose header was checked — the check and
//! the send read the same copy.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vduse_backends::tap::TapModel;
use vduse_core::model::{Completer, DeviceModel};
use vduse_core::queue::{Budget, RequestBatch};
use vduse_core::rig::{desc, offer, Rig};
use vm_memory::{Bytes, GuestAddress};

const TX_QUEUE: u16 = 1;
const FRAME: usize = 12 + 60;

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two fds we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: fresh fds from socketpair.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn a_header_the_driver_rewrites_mid_send_never_reaches_the_tap_unchecked() {
    let (ours, theirs) = seqpacket_pair();
    let model = TapModel::over(ours, "test".into()).unwrap();
    let rig = Rig::new();
    let (ring, q) = rig.queue(8, false);
    let completer = Completer::new(q.clone());
    let mut batch = RequestBatch::default();
    // Eight frames, each one readable descriptor: a virtio-net header (no offloads) and 60 bytes.
    let table: Vec<_> = (0..8u16)
        .map(|h| (h, desc(0x10_000 + 0x100 * u64::from(h), FRAME as u32, 0, 0)))
        .collect();
    for h in 0..8u64 {
        rig.map
            .write_slice(&[0u8; FRAME], GuestAddress(0x10_000 + 0x100 * h))
            .unwrap();
    }
    // A hostile driver flips every header's GSO type between "none" and an invalid one, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (map, stop) = (rig.map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 0u8;
            while !stop.load(Ordering::Relaxed) {
                v ^= 0xff;
                for h in 0..8u64 {
                    let _ = map.write_obj(v, GuestAddress(0x10_000 + 0x100 * h + 1));
                }
            }
        })
    };
    let mut sent = 0;
    let mut frame = [0u8; 2048];
    for _ in 0..2000 {
        offer(&ring, &table, &(0..8).collect::<Vec<_>>());
        q.pop(Budget::default(), &mut batch);
        model.handle(TX_QUEUE, &batch, &completer);
        loop {
            // SAFETY: reading into our own buffer of its length.
            let n = unsafe { libc::read(theirs.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len()) };
            if n < 0 {
                break;
            }
            assert_eq!(n as usize, FRAME);
            assert_eq!(frame[1], 0, "a header that was never checked reached the tap");
            sent += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let stats = model.stats();
    assert_eq!(
        stats.tx_frames.load(Ordering::Relaxed) + stats.tx_dropped.load(Ordering::Relaxed),
        16_000
    );
    assert!(sent > 0, "valid frames were sent");
    model.stop();
}

/// A frame from the tap spreads over the receive buffers the driver posted, published whole with its
/// `num_buffers`.
#[test]
fn a_received_frame_spreads_over_the_posted_buffers() {
    const VERSION_1: u64 = 1 << 32;
    const MRG_RXBUF: u64 = 1 << 15;
    const BUF: u64 = 0x10_000;
    const SIZE: u32 = 2048;
    let (ours, theirs) = seqpacket_pair();
    let model = TapModel::over(ours, "test".into()).unwrap();
    let rig = Rig::new();
    let (ring, q) = rig.queue_sized(128, 8, false);
    q.set_features(VERSION_1 | MRG_RXBUF);
    let completer = Completer::new(q.clone());
    let mut batch = RequestBatch::default();
    let post = |heads: std::ops::Range<u16>| {
        let table: Vec<_> = heads
            .clone()
            .map(|h| (h, desc(BUF + u64::from(SIZE) * u64::from(h), SIZE, 2, 0)))
            .collect();
        offer(&ring, &table, &heads.collect::<Vec<_>>());
    };
    let send = |payload: usize, fill: u8| {
        let mut f = vec![0u8; 12];
        f.extend(std::iter::repeat_n(fill, payload));
        // SAFETY: writing our own buffer of its length.
        let n = unsafe { libc::write(theirs.as_raw_fd(), f.as_ptr().cast(), f.len()) };
        assert_eq!(n as usize, f.len());
        f
    };
    let wait_used = |count: u16| {
        for _ in 0..500 {
            if ring.used_idx() >= count {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!(
            "used index {} never reached {count}: rx {} dropped {}",
            ring.used_idx(),
            model.stats().rx_frames.load(Ordering::Relaxed),
            model.stats().rx_dropped.load(Ordering::Relaxed)
        );
    };
    let read_back = |from: u16, to: u16| -> Vec<u8> {
        let mut out = Vec::new();
        for k in from..to {
            let (head, len) = vduse_core::rig::used(&ring, k)[0];
            let mut b = vec![0u8; len as usize];
            rig.map
                .read_slice(&mut b, GuestAddress(BUF + u64::from(SIZE) * u64::from(head)))
                .unwrap();
            out.extend(b);
        }
        out
    };
    post(0..100);
    q.pop(Budget::default(), &mut batch);
    model.handle(0, &batch, &completer);
    let f = send(5000, 0x5a);
    wait_used(3);
    let got = read_back(0, 3);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    model.stop();
}
