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
