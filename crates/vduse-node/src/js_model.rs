//! The device model that hands requests to JavaScript in batches.
//!
//! Queue workers park each request in a slot (its buffers, its queue's completer, the memory map it
//! refers to) and append the slot to a pending list; only the empty → non-empty edge rings the JS
//! doorbell, so one wake-up of the JS thread serves any number of requests. JS then drains the list
//! synchronously into typed arrays it owns and answers with one `complete` call per batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use vduse_core::chain::Segment;
use vduse_core::memory::IotlbMap;
use vduse_core::{Completer, DeviceModel, RequestBatch};

/// `() => void`, weak (never keeps the process alive), at most one call queued.
pub type Doorbell = ThreadsafeFunction<(), (), (), Status, false, true, 1>;
/// `(status: number) => void`, weak.
pub type StatusCallback = ThreadsafeFunction<u32, (), u32, Status, false, true, 0>;

/// The static description of the device, given by TypeScript.
pub struct ModelInfo {
    pub device_id: u32,
    pub features: u64,
    pub config: Vec<u8>,
    pub num_queues: u16,
    pub queue_size: u16,
    pub max_segments: usize,
}

/// A request JavaScript is working on.
pub struct Slot {
    pub live: bool,
    pub queue: u16,
    pub head: u16,
    pub readable: u16,
    /// Readable buffers, then writable ones. Kept across uses so a warmed-up slot allocates nothing.
    pub segments: Vec<Segment>,
    pub map: Option<Arc<IotlbMap>>,
    pub completer: Option<Completer>,
}

impl Slot {
    fn empty() -> Self {
        Slot {
            live: false,
            queue: 0,
            head: 0,
            readable: 0,
            segments: Vec::new(),
            map: None,
            completer: None,
        }
    }
}

#[derive(Default)]
pub struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Slots {
    fn alloc(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.slots.push(Slot::empty());
        (self.slots.len() - 1) as u32
    }

    pub fn get(&self, id: u32) -> Option<&Slot> {
        self.slots.get(id as usize).filter(|s| s.live)
    }

    /// Ends a request: returns its completer and head, and recycles the slot.
    pub fn release(&mut self, id: u32) -> Option<(Completer, u16)> {
        let slot = self.slots.get_mut(id as usize).filter(|s| s.live)?;
        slot.live = false;
        slot.map = None;
        let completer = slot.completer.take()?;
        let head = slot.head;
        self.free.push(id);
        Some((completer, head))
    }

    pub fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

struct Pending {
    queue: VecDeque<u32>,
    /// A doorbell is on its way to JS (or JS is draining): producers need not ring again.
    armed: bool,
}

pub struct JsModel {
    info: ModelInfo,
    pub slots: Mutex<Slots>,
    pending: Mutex<Pending>,
    doorbell: Doorbell,
    on_status: StatusCallback,
    status: AtomicU8,
}

impl JsModel {
    pub fn new(info: ModelInfo, doorbell: Doorbell, on_status: StatusCallback) -> Self {
        Self {
            info,
            slots: Mutex::new(Slots::default()),
            pending: Mutex::new(Pending {
                queue: VecDeque::new(),
                armed: false,
            }),
            doorbell,
            on_status,
            status: AtomicU8::new(0),
        }
    }

    pub fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves up to `max` pending slot ids out; when none are left the doorbell is disarmed, so the next
    /// request rings it again (checked under the same lock producers use: no lost wake-ups).
    pub fn take_pending(&self, max: usize, out: &mut Vec<u32>) {
        let mut p = self.pending();
        let n = max.min(p.queue.len());
        out.extend(p.queue.drain(..n));
        if p.queue.is_empty() && out.is_empty() {
            p.armed = false;
        }
    }

    /// Puts back ids JS had no room for, at the front.
    pub fn unget(&self, ids: &[u32]) {
        let mut p = self.pending();
        for &id in ids.iter().rev() {
            p.queue.push_front(id);
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending().queue.len()
    }
}

impl DeviceModel for JsModel {
    fn device_id(&self) -> u32 {
        self.info.device_id
    }
    fn device_features(&self) -> u64 {
        self.info.features
    }
    fn config_space(&self) -> Vec<u8> {
        self.info.config.clone()
    }
    fn num_queues(&self) -> u16 {
        self.info.num_queues
    }
    fn queue_size(&self) -> u16 {
        self.info.queue_size
    }
    fn max_segments(&self) -> usize {
        self.info.max_segments
    }

    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer) {
        let mut ids = Vec::with_capacity(batch.len());
        {
            let mut slots = self.slots();
            for req in batch.iter() {
                let id = slots.alloc();
                let slot = &mut slots.slots[id as usize];
                slot.live = true;
                slot.queue = queue;
                slot.head = req.head;
                slot.readable = req.readable.len() as u16;
                slot.segments.clear();
                slot.segments.extend_from_slice(req.readable);
                slot.segments.extend_from_slice(req.writable);
                slot.map = Some(batch.memory().clone());
                slot.completer = Some(completer.clone());
                ids.push(id);
            }
        }
        let ring = {
            let mut p = self.pending();
            p.queue.extend(ids);
            !std::mem::replace(&mut p.armed, true)
        };
        if ring {
            // QueueFull means a wake-up is already queued: nothing is lost.
            let _ = self.doorbell.call((), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }

    fn status_changed(&self, status: u8, _features: u64) {
        if self.status.swap(status, Ordering::AcqRel) != status {
            let _ = self
                .on_status
                .call(u32::from(status), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }
}
