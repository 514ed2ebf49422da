//! Handing requests a native model took to another server: a model on the worker threads serves what it
//! can and forwards the rest (a virtio-fs router forwards the requests of nodes a TypeScript file system
//! owns). The forwarded request stays in flight on its queue, owned by the model: whoever takes it reaches
//! its buffers through ticket-checked copies and completes it on the queue, like any model's request —
//! so a reset or a memory change fences it exactly as if the worker still held it.

use std::collections::VecDeque;

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chain::Shape;
use crate::queue::{Request, Ticket, HEAD_BYTES};

/// A forwarded request: what a server needs to start on it (the rest it reads through the ticket).
#[derive(Clone, Copy)]
pub struct Forwarded {
    pub ticket: Ticket,
    pub shape: Shape,
    /// The session's negotiated device features when the request was popped (a server reads it with
    /// them, never with a later session's).
    pub features: u64,
    header: [u8; HEAD_BYTES],
    header_len: u8,
}

impl Forwarded {
    pub fn of(req: &Request<'_>, features: u64) -> Self {
        let mut header = [0u8; HEAD_BYTES];
        let n = req.header.len().min(HEAD_BYTES);
        header[..n].copy_from_slice(&req.header[..n]);
        Self {
            ticket: req.ticket,
            shape: req.shape,
            features,
            header,
            header_len: n as u8,
        }
    }

    /// The first (up to [`HEAD_BYTES`]) readable bytes, copied when the request was popped.
    pub fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }
}

/// One queue's forwarded requests and the eventfd that tells their server there are some. At most the
/// requests in flight on that queue (a ring's worth) plus those a reset or a memory change fenced since
/// the server last took them (it drops those, see `Virtqueue::is_live`).
pub struct Forward {
    reqs: Mutex<VecDeque<Forwarded>>,
    wake: EventFd,
}

impl Forward {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reqs: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues requests for the server and wakes it once.
    pub fn push(&self, reqs: impl IntoIterator<Item = Forwarded>) {
        let mut q = self.reqs.lock();
        let before = q.len();
        q.extend(reqs);
        let added = q.len() > before;
        drop(q);
        if added {
            // A full counter (2^64 - 2 wakes unread) cannot happen: the server reads it on every wake.
            let _ = self.wake.write(1);
        }
    }

    /// Moves up to `max` requests into `out` (cleared first); returns whether more are left.
    pub fn take(&self, max: usize, out: &mut Vec<Forwarded>) -> bool {
        out.clear();
        let mut q = self.reqs.lock();
        let n = max.min(q.len());
        out.extend(q.drain(..n));
        !q.is_empty()
    }

    /// The eventfd the server waits on: readable while requests may be queued.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn len(&self) -> usize {
        self.reqs.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_is_bounded_and_wakes_once_per_push() {
        let f = Forward::new().unwrap();
        let req = |t: u64| Forwarded {
            ticket: Ticket::from_raw(t),
            shape: Shape::default(),
            features: 0,
            header: [t as u8; HEAD_BYTES],
            header_len: 40,
        };
        f.push((0..5).map(req));
        f.push(std::iter::empty());
        assert_eq!(f.wake_fd().read().unwrap(), 1, "an empty push does not wake");
        let mut out = Vec::new();
        assert!(f.take(3, &mut out));
        assert_eq!(out.iter().map(|r| r.ticket.raw()).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(out[2].header(), &[2u8; 40][..]);
        assert!(!f.take(3, &mut out));
        assert_eq!(out.len(), 2);
        assert!(f.is_empty());
    }
}
