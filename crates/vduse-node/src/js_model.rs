//! The device model that hands requests to JavaScript in batches.
//!
//! Queue workers park each request in a slot (its buffers, its queue's completer, the memory map it
//! refers to) and append the slot to a pending list; only the empty → non-empty edge rings the JS
//! doorbell, so one wake-up of the JS thread serves any number of requests. JS then drains the list
//! synchronously into typed arrays it owns and answers with one `complete` call per batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use napi::bindgen_prelude::{ArrayBuffer, Env, Float64ArraySlice, Uint32ArraySlice};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use vduse_core::chain::Segment;
use vduse_core::memory::IotlbMap;
use vduse_core::{Completer, DeviceModel, RequestBatch};

use crate::error::{native, Code};

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

/// The JavaScript-facing half of a served device: drain, region views, completions. Shared by every
/// binding class that serves a `JsModel` (a VDUSE device, the loopback benchmark).
pub struct JsSide {
    model: Arc<JsModel>,
    /// Slot ids being drained; a RefCell so `drain` can take `&self` (napi keeps `&self` borrows of a
    /// class alive while an async method of it runs, which would refuse a `&mut self` call meanwhile).
    scratch: std::cell::RefCell<Vec<u32>>,
}

impl JsSide {
    pub fn new(model: Arc<JsModel>) -> Self {
        Self {
            model,
            scratch: std::cell::RefCell::new(Vec::new()),
        }
    }

    pub fn drain(
        &mut self,
        mut header: Uint32ArraySlice,
        mut reqs: Uint32ArraySlice,
        mut segs: Float64ArraySlice,
    ) -> u32 {
        // SAFETY: the arrays belong to the caller, which is blocked in this synchronous call; nothing else
        // touches them meanwhile.
        let (header, reqs, segs) = unsafe { (header.as_mut(), reqs.as_mut(), segs.as_mut()) };
        let max_reqs = reqs.len() / 4;
        let max_segs = segs.len() / 3;
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        self.model.take_pending(max_reqs, &mut scratch);
        let (mut n, mut s) = (0usize, 0usize);
        let slots = self.model.slots();
        let mut stop_at = None;
        for (k, &id) in scratch.iter().enumerate() {
            let Some(slot) = slots.get(id) else { continue };
            let Some(map) = slot.map.as_ref() else { continue };
            let first = s;
            let mut counts = [0u32; 2];
            let mut fits = true;
            'pieces: for (i, seg) in slot.segments.iter().enumerate() {
                let mut addr = seg.addr;
                let mut left = u64::from(seg.len);
                // A buffer may cross adjacent regions: one piece per region.
                while left > 0 {
                    let Some((region, offset)) = map.locate(addr) else {
                        break;
                    };
                    let piece = left.min(map.region_len(region).unwrap_or(0) - offset);
                    if s >= max_segs {
                        fits = false;
                        break 'pieces;
                    }
                    segs[s * 3] = (map.epoch() * 65536 + region as u64) as f64;
                    segs[s * 3 + 1] = offset as f64;
                    segs[s * 3 + 2] = piece as f64;
                    s += 1;
                    counts[usize::from(i >= usize::from(slot.readable))] += 1;
                    addr += piece;
                    left -= piece;
                }
            }
            if !fits {
                s = first;
                stop_at = Some(k);
                break;
            }
            reqs[n * 4] = id;
            reqs[n * 4 + 1] = u32::from(slot.queue);
            reqs[n * 4 + 2] = first as u32;
            reqs[n * 4 + 3] = (counts[0] << 16) | counts[1];
            n += 1;
        }
        drop(slots);
        if let Some(k) = stop_at {
            self.model.unget(&scratch[k..]);
        }
        if header.len() >= 2 {
            header[0] = n as u32;
            header[1] = s as u32;
        }
        n as u32
    }

    pub fn region<'env>(
        &self,
        env: &'env Env,
        slot: u32,
        region_key: f64,
    ) -> napi::Result<ArrayBuffer<'env>, Code> {
        let slots = self.model.slots();
        let map = slots
            .get(slot)
            .and_then(|s| s.map.clone())
            .ok_or_else(|| native("no such request"))?;
        drop(slots);
        let key = region_key as u64;
        if key / 65536 != map.epoch() {
            return Err(native("region key does not belong to this request's memory map"));
        }
        let (ptr, len) = map
            .region_host((key % 65536) as usize)
            .ok_or_else(|| native("no such region"))?;
        // SAFETY: ptr/len describe a live mapping owned by `map`; the finalizer drops the Arc that keeps
        // it mapped, so the buffer never outlives the memory.
        unsafe { ArrayBuffer::from_external(env, ptr, len, map, |_, map| drop(map)) }.map_err(native)
    }

    pub fn complete(&self, done: Uint32ArraySlice, count: u32) {
        let mut touched: Vec<Completer> = Vec::new();
        {
            let mut slots = self.model.slots();
            for pair in done.chunks_exact(2).take(count as usize) {
                if let Some((completer, head)) = slots.release(pair[0]) {
                    completer.complete(head, pair[1]);
                    if !touched.iter().any(|c| c.queue_index() == completer.queue_index()) {
                        touched.push(completer);
                    }
                }
            }
        }
        for c in touched {
            c.flush();
        }
    }
}
