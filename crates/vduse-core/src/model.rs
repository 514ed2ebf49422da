//! The transport-free device model: what a virtio device is ([`DeviceSpec`]) and, for models written in
//! Rust, how it serves requests ([`DeviceModel`]). A model never sees rings, fds or the kernel — only
//! validated requests in batches, and a [`Completer`] to answer them now or later, from any thread.

use std::sync::Arc;

use crate::queue::{Completion, Done, RequestBatch, Ticket, Virtqueue};

/// What a virtio device is, as the transport needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Virtio device id (`VIRTIO_ID_BLOCK` = 2, `VIRTIO_ID_NET` = 1).
    pub device_id: u32,
    /// Device feature bits (0–23, 50–63). The transport adds the ring and platform bits it implements.
    pub features: u64,
    /// The initial config space (read-only to the driver).
    pub config: Vec<u8>,
    pub num_queues: u16,
    /// Largest ring size per queue (a power of two).
    pub queue_size: u16,
    /// Most buffers one request may have; longer chains are refused before they reach the model.
    pub max_segments: usize,
    /// A short name of the model ("blk", "net"), recorded for whoever takes the device over.
    pub kind: String,
    /// Queues whose buffers the model holds until it has something to put in them (a NIC's receive
    /// queue), as a bit mask. A reset or an IOTLB change does not wait for them: they are fenced at once.
    pub held_queues: u64,
}

impl DeviceSpec {
    /// The status byte of a request the transport has to fail on the model's behalf (it cannot reach the
    /// model): virtio-blk's IOERR. Other devices have no status byte: such a request is given back empty
    /// (a NIC's buffer unused, a frame dropped).
    pub fn fail_status(&self) -> Option<u8> {
        (self.device_id == crate::ram_blk::VIRTIO_ID_BLOCK).then_some(crate::ram_blk::VIRTIO_BLK_S_IOERR)
    }
}

/// A device model written in Rust, served by one worker thread per queue.
pub trait DeviceModel: Send + Sync + 'static {
    /// Serves one batch popped from `queue`. Complete every request exactly once through `completer` —
    /// now, or later from another thread (clone the completer; the ticket stays valid until completed or
    /// fenced). Each request's header comes with it (`Request::header`); its buffers are reached through
    /// the queue's ticket-checked copies (`completer.queue().read_request(…)` and the like), never
    /// directly: a fence must be able to end every access to them.
    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer);

    /// The driver started a session (DRIVER_OK) with these negotiated features, before any of its requests
    /// reach [`handle`](Self::handle) (the same features are on every request's queue:
    /// [`Virtqueue::features`]). Called on the message loop, which the kernel waits on: never block.
    fn started(&self, _features: u64) {}
}

/// Answers requests of one queue. Completions are published at once; [`flush`](Self::flush) raises the
/// interrupt owed for all of them (at most one, EVENT_IDX honoured).
#[derive(Clone)]
pub struct Completer {
    queue: Arc<Virtqueue>,
}

impl Completer {
    pub fn new(queue: Arc<Virtqueue>) -> Self {
        Self { queue }
    }

    pub fn queue(&self) -> &Arc<Virtqueue> {
        &self.queue
    }

    /// Completes `ticket` with `used_len` bytes written into its writable buffers; `status`, if given,
    /// goes into the last writable byte first (virtio-blk's status byte). A ticket that was fenced or
    /// completed already is ignored (and counted).
    pub fn complete(&self, ticket: Ticket, used_len: u32, status: Option<u8>) -> Completion {
        self.queue.complete(ticket, used_len, status)
    }

    /// Completes several requests under one lock, published with one used-index store (a unit of
    /// [`Done::joined`] completions — a frame over several receive buffers — goes out whole or as
    /// runts); [`flush`](Self::flush) raises the interrupt. Returns how many were in flight.
    pub fn complete_all(&self, done: impl IntoIterator<Item = Done>) -> usize {
        self.queue.complete_all_quietly(done)
    }

    /// Raises the interrupt for what was completed since the last flush.
    pub fn flush(&self) {
        self.queue.notify();
    }
}

impl std::fmt::Debug for Completer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer")
            .field("queue", &self.queue.index)
            .finish()
    }
}
