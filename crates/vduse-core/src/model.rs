//! The transport-free device model: what a virtio device is (id, features, config space, queues) and
//! how it serves requests. It never sees rings, fds or the kernel — only validated requests in
//! batches, and a [`Completer`] to answer them now or later, from any thread, also in batches.

use std::sync::Arc;

use crate::chain::Segment;
use crate::memory::IotlbMap;
use crate::queue::QueueShared;

/// A virtio device implementation, driven by a transport (VDUSE today).
pub trait DeviceModel: Send + Sync + 'static {
    /// Virtio device id (`VIRTIO_ID_BLOCK` = 2, `VIRTIO_ID_NET` = 1).
    fn device_id(&self) -> u32;
    /// Device feature bits offered to the driver. The transport adds the ring and platform bits it
    /// implements (`VERSION_1`, `ACCESS_PLATFORM`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`).
    fn device_features(&self) -> u64;
    /// The initial config space (read-only to the driver).
    fn config_space(&self) -> Vec<u8>;
    fn num_queues(&self) -> u16;
    /// Largest ring size per queue (a power of two).
    fn queue_size(&self) -> u16;
    /// Most buffers one request may have; longer chains are refused before they reach the model.
    fn max_segments(&self) -> usize {
        usize::from(self.queue_size())
    }
    /// Serves one batch popped from `queue`. Complete every request exactly once through `completer` —
    /// now, or later from another thread (clone it, and clone `batch.memory()` to keep the buffers mapped).
    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer);
    /// The driver wrote a new status (after the transport acted on it). `features` are the negotiated ones.
    fn status_changed(&self, _status: u8, _features: u64) {}
}

/// A validated request: its head descriptor and its buffers.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub head: u16,
    pub readable: &'a [Segment],
    pub writable: &'a [Segment],
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    head: u16,
    first: u32,
    readable: u16,
    writable: u16,
}

/// Requests popped in one go, stored flat so a batch allocates nothing once warmed up.
#[derive(Debug)]
pub struct RequestBatch {
    memory: Arc<IotlbMap>,
    entries: Vec<Entry>,
    segments: Vec<Segment>,
}

impl RequestBatch {
    pub fn new(memory: Arc<IotlbMap>) -> Self {
        Self {
            memory,
            entries: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// The memory the buffers live in (keep a clone to complete after `handle` returns).
    pub fn memory(&self) -> &Arc<IotlbMap> {
        &self.memory
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<Request<'_>> {
        let e = self.entries.get(i)?;
        let first = e.first as usize;
        let mid = first + usize::from(e.readable);
        let end = mid + usize::from(e.writable);
        Some(Request {
            head: e.head,
            readable: &self.segments[first..mid],
            writable: &self.segments[mid..end],
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = Request<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    pub(crate) fn reset(&mut self, memory: Arc<IotlbMap>) {
        self.memory = memory;
        self.entries.clear();
        self.segments.clear();
    }

    pub(crate) fn segments_mut(&mut self) -> &mut Vec<Segment> {
        &mut self.segments
    }

    pub(crate) fn push(&mut self, head: u16, first: usize, readable: u16, writable: u16) {
        self.entries.push(Entry {
            head,
            first: first as u32,
            readable,
            writable,
        });
    }

    /// Test support: builds a batch from explicit requests.
    pub fn from_requests(memory: Arc<IotlbMap>, requests: &[(u16, Vec<Segment>, Vec<Segment>)]) -> Self {
        let mut batch = Self::new(memory);
        for (head, r, w) in requests {
            let first = batch.segments.len();
            batch.segments.extend_from_slice(r);
            batch.segments.extend_from_slice(w);
            batch.push(*head, first, r.len() as u16, w.len() as u16);
        }
        batch
    }
}

/// Answers requests of one queue. Completions are buffered by [`complete`](Self::complete) and published
/// by [`flush`](Self::flush): one used-ring update and at most one interrupt per flush. Completions that
/// arrive after the device was reset are dropped (their requests belong to a driver that is gone).
#[derive(Clone)]
pub struct Completer {
    queue: Arc<QueueShared>,
    generation: u64,
}

impl Completer {
    pub(crate) fn new(queue: Arc<QueueShared>, generation: u64) -> Self {
        Self { queue, generation }
    }

    pub fn queue_index(&self) -> u16 {
        self.queue.index
    }

    /// Records that request `head` is done and wrote `used_len` bytes into its writable buffers.
    pub fn complete(&self, head: u16, used_len: u32) {
        self.queue.push_completion(self.generation, head, used_len);
    }

    /// Publishes everything recorded so far on this queue.
    pub fn flush(&self) {
        self.queue.flush_completions();
    }
}

impl std::fmt::Debug for Completer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer")
            .field("queue", &self.queue.index)
            .field("generation", &self.generation)
            .finish()
    }
}
