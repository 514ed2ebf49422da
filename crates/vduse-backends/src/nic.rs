//! What every natively served virtio-net NIC shares, whatever moves its frames (a tap, a switch): the
//! virtio-net header rules, and the receive buffers the driver posted, held until a frame comes and then
//! filled and published whole.
//!
//! A frame is given to the driver only in the shape it negotiated: the session's features come with the
//! receive queue (`Virtqueue::features`), so a header the driver did not accept is refused here, never
//! written; without MRG_RXBUF a frame takes exactly one buffer; with it, all the buffers of a frame are
//! published with one used-index store, so the driver never sees part of a frame.

use std::collections::VecDeque;
use std::sync::Mutex;

use vduse_core::queue::Owner;
use vduse_core::{Completer, Done, RequestBatch, Ticket, Virtqueue};

/// `struct virtio_net_hdr_v1`: with VERSION_1, 12 bytes, `num_buffers` at 10.
pub const HDR: usize = 12;
pub const ETH_HLEN: usize = 14;
/// A 64 KiB GSO packet plus its Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65_535 + ETH_HLEN + 4;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;

/// virtio_net_hdr flags and GSO types.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

/// Whether a TX frame's virtio-net header (its first two bytes, from the frame's copy) asks only for
/// what the driver negotiated (spec 5.1.6.2): no flags but NEEDS_CSUM (and that only with CSUM), GSO only
/// of a negotiated kind and with a partial checksum.
pub fn header_allowed(hdr: &[u8], features: u64) -> bool {
    // No ECN bit: HOST_ECN is not offered.
    let (flags, gso) = (hdr[0], hdr[1]);
    let csum = flags & HDR_F_NEEDS_CSUM != 0;
    if flags & !HDR_F_NEEDS_CSUM != 0 || (csum && features & F_CSUM == 0) {
        return false;
    }
    match gso {
        GSO_NONE => true,
        GSO_TCPV4 => csum && features & F_HOST_TSO4 != 0,
        GSO_TCPV6 => csum && features & F_HOST_TSO6 != 0,
        _ => false,
    }
}

/// Fits a received frame's header to what the driver negotiated; false: the driver cannot take it.
pub fn fit_header(frame: &mut [u8], features: u64) -> bool {
    let csum = features & F_GUEST_CSUM != 0;
    if frame[0] & HDR_F_NEEDS_CSUM != 0 && !csum {
        return false;
    }
    if !csum {
        frame[0] = 0; // no DATA_VALID either: without GUEST_CSUM the flags must be 0
    }
    match frame[1] {
        GSO_NONE => true,
        GSO_TCPV4 => features & F_GUEST_TSO4 != 0,
        GSO_TCPV6 => features & F_GUEST_TSO6 != 0,
        _ => false,
    }
}

/// What became of a frame offered to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Published (the interrupt waits for [`ReceiveBuffers::flush`]).
    Done,
    /// The driver can never take it: larger than its buffers, or offloads it did not negotiate.
    Dropped,
    /// Not enough buffers posted right now.
    NoBuffers,
}

#[derive(Default)]
struct Held {
    /// Oldest first: the ticket and its writable size.
    buffers: VecDeque<(Ticket, u32)>,
    completer: Option<Completer>,
}

/// The receive buffers a driver posted, held until frames come.
#[derive(Default)]
pub struct ReceiveBuffers {
    held: Mutex<Held>,
}

impl ReceiveBuffers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the buffers of a batch popped from the receive queue (a buffer that cannot take even a
    /// header is given back empty).
    pub fn post(&self, batch: &RequestBatch, completer: &Completer) {
        let mut held = self.lock();
        if held.completer.is_none() {
            held.completer = Some(completer.clone());
        }
        // Buffers of past sessions (fenced by resets) are forgotten here too, not only when a frame
        // comes: a driver that posts and resets in a loop cannot grow the list.
        let ring = usize::from(completer.queue().size());
        if held.buffers.len() + batch.len() > ring {
            let queue = completer.queue().clone();
            held.buffers.retain(|&(t, _)| queue.is_live(t));
        }
        for req in batch.iter() {
            if (req.shape.writable_bytes as usize) < HDR {
                completer.complete(req.ticket, 0, None);
            } else {
                held.buffers.push_back((req.ticket, req.shape.writable_bytes));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().buffers.is_empty()
    }

    /// The features of the driver's session, once it posted buffers (`None` before).
    pub fn features(&self) -> Option<u64> {
        self.lock().completer.as_ref().map(|c| c.queue().features())
    }

    /// Raises the interrupt owed for the frames delivered since the last flush (at most one).
    pub fn flush(&self) {
        if let Some(c) = self.lock().completer.as_ref() {
            c.flush();
        }
    }

    /// Spreads `frame` (virtio-net header + data) over the oldest held buffers (dead ones, fenced, are
    /// skipped), after fitting its header to the driver's features, and publishes them together.
    /// `frame`'s header is rewritten (flags, `num_buffers`).
    pub fn deliver(&self, frame: &mut [u8], done: &mut Vec<Done>) -> Delivery {
        self.deliver_parts(frame, 0, done, |_, _, _, _, _| false)
    }

    /// [`deliver`](Self::deliver) for a frame in two parts: `head` (the virtio-net header and what else
    /// was copied and checked) and `tail` more bytes that `copy_tail(queue, ticket, buffer offset, tail
    /// offset, length)` puts straight into a receive buffer (false: it could not; the frame goes out as
    /// runts).
    pub fn deliver_parts(
        &self,
        head: &mut [u8],
        tail: usize,
        done: &mut Vec<Done>,
        mut copy_tail: impl FnMut(&Virtqueue, Ticket, u64, usize, usize) -> bool,
    ) -> Delivery {
        let mut held = self.lock();
        let Held { buffers, completer } = &mut *held;
        let Some(completer) = completer.as_ref() else {
            return Delivery::NoBuffers;
        };
        let queue = completer.queue();
        let features = queue.features();
        if !fit_header(head, features) {
            return Delivery::Dropped;
        }
        let total = head.len() + tail;
        let mergeable = features & F_MRG_RXBUF != 0;
        // Enough room among the live buffers at the front?
        let mut room = 0usize;
        let mut count = 0usize;
        let mut i = 0;
        while room < total && i < buffers.len() {
            let (ticket, size) = buffers[i];
            if !queue.is_live(ticket) {
                buffers.remove(i); // fenced since it was posted
                continue;
            }
            room += size as usize;
            count += 1;
            i += 1;
            if !mergeable {
                break;
            }
        }
        if room < total {
            // Without MRG_RXBUF a frame takes one buffer: one too small for it means the frame is larger
            // than the driver takes (the buffer stays for the next one). With it, a frame that a full
            // ring of buffers cannot hold never will be.
            let never = if mergeable {
                count >= usize::from(queue.size())
            } else {
                count == 1
            };
            return if never {
                Delivery::Dropped
            } else {
                Delivery::NoBuffers
            };
        }
        head[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        done.clear();
        let mut at = 0usize;
        let mut whole = true;
        for k in 0..count {
            let Some((ticket, size)) = buffers.pop_front() else {
                break;
            };
            let n = (size as usize).min(total - at);
            // The part of this buffer's share in `head`, then the part in the tail.
            let split = (at + n).min(head.len()).max(at);
            if split > at {
                whole &= queue.write_request(ticket, Owner::Model, 0, &head[at..split]) == Ok(split - at);
            }
            if at + n > split {
                let (off, from) = ((split - at) as u64, split - head.len());
                whole &= copy_tail(queue, ticket, off, from, at + n - split);
            }
            done.push(Done {
                ticket,
                used_len: n as u32,
                status: None,
                joined: k + 1 < count,
            });
            at += n;
        }
        if !whole {
            // A buffer that could not take its part (fenced meanwhile): the frame goes out as runts.
            for d in done.iter_mut() {
                d.used_len = 0;
            }
        }
        // All buffers of the frame become visible to the driver at once (one used-index store).
        completer.complete_all(done.drain(..));
        Delivery::Done
    }
}
