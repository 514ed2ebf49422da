//! One virtqueue and the life of each request on it.
//!
//! ```text
//!  avail ring ──pop──► in the model (a slot, a ticket) ──complete──► used ring      exactly once
//!                            └──────fence (reset, IOTLB change)──► gone: the ticket is dead,
//!                                                                   a late completion is dropped
//! ```
//!
//! A request lives in a *slot*; its [`Ticket`] names the slot and the slot's generation, which changes
//! every time the slot is reused or fenced, so a late or duplicate completion can never complete another
//! request. At most a ring's worth of requests is in flight per queue (a valid driver cannot have more);
//! each pop round is bounded in requests and descriptors, so a hostile driver cannot make one round do
//! unbounded work while the queue lock is held. Nothing blocking (mmap, ioctl waits) happens under it.
//!
//! The queue's ring state machine: `Off` (no driver) → `Armed` (DRIVER_OK: set up on first use, which is
//! also how queues the driver enables late are served) → `Active` → `Broken` (the driver corrupted the
//! ring; until reset). The message loop moves queues back to `Off`, fencing what is still in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::chain::{self, ChainError, Segment, Shape};
use crate::inflight::QueueLog;
use crate::memory::{IotlbMap, Memory};

/// What a queue needs from its transport.
pub trait Transport: Send + Sync {
    /// Interrupts the driver for `queue` (VDUSE: `VDUSE_VQ_INJECT_IRQ`).
    fn notify(&self, queue: u16);
    /// The driver's ring setup for `queue` (VDUSE: `VDUSE_VQ_GET_INFO`).
    fn ring_info(&self, queue: u16) -> std::io::Result<RingInfo>;
}

/// Where the driver put a ring, and whether it enabled it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingInfo {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The avail index the driver set (the kernel does not track progress).
    pub avail_idx: u16,
    pub ready: bool,
}

/// Names one request: queue, slot, and the slot's generation. Fits in 53 bits, so JavaScript can hold it
/// in a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

impl Ticket {
    const SLOT_BITS: u32 = 15;
    const QUEUE_BITS: u32 = 8;
    pub const GEN_MASK: u32 = (1 << 30) - 1;
    /// Most queues a device may have (ticket encoding).
    pub const MAX_QUEUES: usize = 1 << Self::QUEUE_BITS;

    pub fn new(queue: u16, slot: u16, gen: u32) -> Self {
        Self(
            (u64::from(gen & Self::GEN_MASK) << (Self::SLOT_BITS + Self::QUEUE_BITS))
                | (u64::from(queue) << Self::SLOT_BITS)
                | u64::from(slot),
        )
    }
    pub fn queue(self) -> u16 {
        ((self.0 >> Self::SLOT_BITS) & ((1 << Self::QUEUE_BITS) - 1)) as u16
    }
    pub fn slot(self) -> u16 {
        (self.0 & ((1 << Self::SLOT_BITS) - 1)) as u16
    }
    pub fn gen(self) -> u32 {
        (self.0 >> (Self::SLOT_BITS + Self::QUEUE_BITS)) as u32
    }
    pub fn raw(self) -> u64 {
        self.0
    }
    pub fn from_raw(raw: u64) -> Self {
        Self(raw & ((1 << 53) - 1))
    }
}

/// Counters of one queue, readable at any time.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub kicks: AtomicU64,
    pub batches: AtomicU64,
    pub requests: AtomicU64,
    pub completions: AtomicU64,
    pub interrupts: AtomicU64,
    /// Refused chains, by [`ChainError::index`].
    pub bad_chains: [AtomicU64; ChainError::KINDS],
    /// A head made available again while still in flight (a hostile or broken driver).
    pub duplicate_heads: AtomicU64,
    /// Requests fenced (reset, IOTLB change) before the model completed them.
    pub fenced: AtomicU64,
    /// Completions for requests that were no longer in flight (fenced, or completed twice).
    pub stale_completions: AtomicU64,
    /// Times the queue stopped because the driver corrupted it.
    pub broken: AtomicU64,
}

impl QueueStats {
    pub fn bad_chains_total(&self) -> u64 {
        self.bad_chains.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// How much one pop round may do.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub requests: usize,
    pub descriptors: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            requests: 64,
            descriptors: 4096,
        }
    }
}

/// What a pop round found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pop {
    /// The ring is empty and notifications are enabled again: wait for a kick.
    Idle,
    /// The budget ran out (or more arrived meanwhile): call again soon.
    More,
    /// A ring's worth of requests is in flight: wait; the queue's waker fires when one completes.
    Full,
}

/// Requests in flight across all queues of a device, for bounded drains.
///
/// Completions on every queue pass through here, so they only touch atomics: the mutex and condvar are
/// taken only while a drain waits (`waiters`), which is rare and never on the request path.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    /// Bumped by every completion, so a waiter can tell whether one came between its check and its wait.
    epoch: AtomicUsize,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

impl InFlight {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
    fn add(&self, n: usize) {
        self.count.fetch_add(n, Ordering::AcqRel);
    }
    /// Call after the completed requests' slots are free (their ring lock may still be held: a waiter never
    /// takes a ring lock while it holds `lock`).
    fn sub(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.count.fetch_sub(n, Ordering::AcqRel);
        // SeqCst pairs with the waiter's `waiters` increment and `epoch` read: either the waiter reads the
        // new epoch (and checks again before waiting) or this sees the waiter (and wakes it).
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock();
            self.changed.notify_all();
        }
    }
    /// Waits until `done()` or `deadline`; `done` is re-evaluated after every completion. It runs without
    /// this lock held, so it may take ring locks.
    pub fn wait_until(&self, deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let drained = loop {
            let seen = self.epoch.load(Ordering::SeqCst);
            if done() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break done();
            }
            let mut g = self.lock.lock();
            // A completion since `seen` may have notified before we held the lock: check again instead.
            if self.epoch.load(Ordering::SeqCst) == seen {
                // The step caps the cost of predicates that change without a completion.
                let step = (deadline - now).min(std::time::Duration::from_millis(50));
                self.changed.wait_for(&mut g, step);
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        drained
    }
}

/// One request as the model sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub ticket: Ticket,
    pub head: u16,
    pub shape: Shape,
    pub readable: &'a [Segment],
    pub writable: &'a [Segment],
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    ticket: Ticket,
    head: u16,
    first: u32,
    shape: Shape,
}

/// Requests popped in one round, stored flat so a warmed-up batch allocates nothing.
#[derive(Debug)]
pub struct RequestBatch {
    memory: Arc<IotlbMap>,
    entries: Vec<Entry>,
    segments: Vec<Segment>,
}

impl Default for RequestBatch {
    fn default() -> Self {
        Self::new(Arc::new(IotlbMap::empty()))
    }
}

impl RequestBatch {
    pub fn new(memory: Arc<IotlbMap>) -> Self {
        Self {
            memory,
            entries: Vec::new(),
            segments: Vec::new(),
        }
    }
    /// The memory the requests' buffers live in.
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
        let mid = first + usize::from(e.shape.readable);
        let end = mid + usize::from(e.shape.writable);
        Some(Request {
            ticket: e.ticket,
            head: e.head,
            shape: e.shape,
            readable: &self.segments[first..mid],
            writable: &self.segments[mid..end],
        })
    }
    pub fn iter(&self) -> impl Iterator<Item = Request<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
    fn clear(&mut self, memory: Arc<IotlbMap>) {
        self.memory = memory;
        self.entries.clear();
        self.segments.clear();
    }
    fn push(&mut self, ticket: Ticket, head: u16, shape: Shape, segments: &[Segment]) {
        let first = self.segments.len() as u32;
        self.segments.extend_from_slice(segments);
        self.entries.push(Entry {
            ticket,
            head,
            first,
            shape,
        });
    }
}

#[derive(Default)]
struct Slot {
    live: bool,
    /// Native I/O owns the request (its buffers are being transferred): only that I/O may complete it.
    native: bool,
    gen: u32,
    head: u16,
    shape: Shape,
    /// Readable buffers, then writable ones; the capacity is kept across uses.
    segments: Vec<Segment>,
    map: Option<Arc<IotlbMap>>,
}

impl Slot {
    /// The slot of `ticket` while that very request is in flight and owned by native I/O (`native`) or
    /// not; `None` for a completed, fenced or reused slot.
    fn of(slots: &[Slot], ticket: Ticket, native: bool) -> Option<&Slot> {
        let s = slots.get(usize::from(ticket.slot()))?;
        (s.live && s.gen == ticket.gen() && s.native == native).then_some(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Off,
    Armed,
    Active,
    /// Being reset: no new requests, completions still published.
    Quiesced,
    Broken,
}

struct Ring {
    state: State,
    queue: Option<Queue>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Slot + 1 of the request each head belongs to (0: none), to refuse duplicate heads.
    head_slot: Vec<u16>,
    live: usize,
    /// Used entries were added since the last notification check.
    need_notify: bool,
    /// Used entries added since the last notification check (EVENT_IDX: which `used_event` they passed).
    added: u16,
    /// Heads whose used elements are written but not yet covered by the used index (see `push_used`).
    unpublished: Vec<u16>,
    /// Scratch for a group of completions published together (see [`Done::joined`]).
    group: Vec<Done>,
    /// Heads to serve before the avail ring (requests taken over from a previous server).
    resubmit: std::collections::VecDeque<u16>,
    /// Avail index to resume from, when taking over a running queue.
    resume_avail: Option<u16>,
    /// A pop round stopped for want of a free slot: wake the server when one is freed.
    full: bool,
}

/// What became of a chain.
enum Taken {
    /// In a slot, in the batch.
    Yes,
    /// Refused and published with used length 0.
    Refused(ChainError),
    /// A buffer is outside the map: left on the ring for the caller to look the address up.
    Missed(u64),
}

/// Why a pop round must start over outside the lock.
enum Again {
    /// The IOTLB changed since the caller's snapshot.
    Stale,
    /// A buffer at this address is outside the snapshot.
    Miss(u64),
}

/// Outcome of a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The request went into the used ring.
    Done,
    /// The ticket was not in flight (fenced, or completed already), or belongs to native I/O: nothing
    /// happened.
    Stale,
}

/// One completion for [`Virtqueue::complete_all`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub ticket: Ticket,
    /// Bytes written into the request's writable buffers (capped to what it can hold).
    pub used_len: u32,
    /// Written into the last writable byte first (virtio-blk's status byte).
    pub status: Option<u8>,
    /// The next completion belongs to the same unit — a received frame spread over several buffers
    /// (`num_buffers`). A unit is published whole with one used-index store; if any of its buffers was
    /// fenced meanwhile, the others are published with length 0 (the driver drops them as runts) rather
    /// than leaving it a frame with a hole in it.
    pub joined: bool,
}

impl Done {
    pub fn new(ticket: Ticket, used_len: u32, status: Option<u8>) -> Self {
        Self {
            ticket,
            used_len,
            status,
            joined: false,
        }
    }
}

/// How many times a publish retries for a map that keeps changing before using what it has.
const FRESH_MAP_TRIES: usize = 4;

/// A virtqueue shared by whoever serves it (a worker thread or the JavaScript thread), whoever completes
/// its requests (any thread), and the message loop (which arms, fences and stops it).
pub struct Virtqueue {
    pub index: u16,
    max_size: u16,
    max_segments: usize,
    ring: Mutex<Ring>,
    memory: Arc<Memory>,
    transport: Arc<dyn Transport>,
    inflight: Arc<InFlight>,
    log: Option<QueueLog>,
    pub stats: QueueStats,
    logged: [AtomicBool; ChainError::KINDS],
    event_idx: AtomicBool,
    /// The features the driver negotiated for the current session (set at DRIVER_OK, before arming).
    features: AtomicU64,
    waker: Mutex<Option<Arc<vmm_sys_util::eventfd::EventFd>>>,
    /// The model holds this queue's buffers until it has data for them (see `DeviceSpec::held_queues`).
    held: AtomicBool,
}

impl Virtqueue {
    pub fn new(
        index: u16,
        max_size: u16,
        max_segments: usize,
        memory: Arc<Memory>,
        transport: Arc<dyn Transport>,
        inflight: Arc<InFlight>,
        log: Option<QueueLog>,
    ) -> Arc<Self> {
        Arc::new(Self {
            index,
            max_size,
            max_segments: max_segments.max(1),
            ring: Mutex::new(Ring {
                state: State::Off,
                queue: None,
                slots: Vec::new(),
                free: Vec::new(),
                head_slot: Vec::new(),
                live: 0,
                need_notify: false,
                added: 0,
                unpublished: Vec::new(),
                group: Vec::new(),
                resubmit: Default::default(),
                resume_avail: None,
                full: false,
            }),
            memory,
            transport,
            inflight,
            log,
            stats: QueueStats::default(),
            logged: Default::default(),
            event_idx: AtomicBool::new(false),
            features: AtomicU64::new(0),
            waker: Mutex::new(None),
            held: AtomicBool::new(false),
        })
    }

    /// The eventfd that wakes whoever serves this queue (its kick fd): written when a slot is freed after
    /// a round stopped with [`Pop::Full`].
    pub fn set_waker(&self, waker: Arc<vmm_sys_util::eventfd::EventFd>) {
        *self.waker.lock() = Some(waker);
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().as_ref() {
            let _ = w.write(1);
        }
    }

    /// Turns EVENT_IDX on or off for the ring set up next (the negotiated features, at DRIVER_OK).
    pub fn set_event_idx(&self, on: bool) {
        self.event_idx.store(on, Ordering::Release);
    }

    /// Records the session's negotiated features (DRIVER_OK, before the queue is armed): a model reads
    /// them with the requests it pops, so requests and features always belong to the same session.
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Release);
    }

    /// The features negotiated for the session whose requests this queue serves.
    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Acquire)
    }

    /// The ring's size (the largest allowed until the driver set one up).
    pub fn size(&self) -> u16 {
        self.ring
            .lock()
            .queue
            .as_ref()
            .map_or(self.max_size, |q| q.size())
    }

    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// DRIVER_OK: the ring is set up on first use (the driver may also enable it later).
    pub fn arm(&self) {
        let mut r = self.ring.lock();
        if r.state == State::Off {
            r.state = State::Armed;
        }
    }

    /// Like [`arm`](Self::arm), for a queue a previous server was serving: `in_flight` heads (in pop order)
    /// are served again first, then the avail ring from `next_avail` (which the caller has checked
    /// against the rings: no head is both in `in_flight` and at or after `next_avail`).
    pub fn arm_resumed(&self, next_avail: u16, in_flight: Vec<u16>) {
        let mut r = self.ring.lock();
        r.state = State::Armed;
        r.resume_avail = Some(next_avail);
        r.resubmit = in_flight.into();
    }

    /// Stops taking new requests (a reset is draining); completions still go out.
    /// Marks the queue's buffers as held by design (a NIC's receive queue): drains do not wait for them.
    pub fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    pub fn quiesce(&self) {
        let mut r = self.ring.lock();
        if r.state != State::Off {
            r.state = State::Quiesced;
        }
    }

    /// Waits until no publish that may have used an older map is in progress (the message loop calls it
    /// after invalidating the map and before revoking mappings). `false` if the lock was not free in time.
    pub fn barrier(&self, deadline: Instant) -> bool {
        self.ring.try_lock_until(deadline).is_some()
    }

    /// Requests in flight on this queue.
    pub fn live(&self) -> usize {
        self.ring.lock().live
    }

    /// Whether a request of this queue is in flight and still the model's to complete (not handed to
    /// native I/O, which completes on its own threads).
    pub fn awaits_model(&self) -> bool {
        let r = self.ring.lock();
        r.live > 0 && r.slots.iter().any(|s| s.live && !s.native)
    }

    pub fn is_active(&self) -> bool {
        self.ring.lock().state == State::Active
    }

    /// The next avail index the device would process (`VDUSE_GET_VQ_STATE`), if the ring is set up.
    pub fn next_avail(&self) -> Option<u16> {
        self.ring.lock().queue.as_ref().map(|q| q.next_avail())
    }

    /// Fences every request in flight and stops serving until armed again: the driver reset the queue, so
    /// its in-flight log is cleared. Returns how many requests were fenced and the memory maps they held
    /// (drop them off the message loop).
    pub fn stop(&self) -> (usize, Vec<Arc<IotlbMap>>) {
        self.halt(true)
    }

    /// Like [`stop`](Self::stop), but the server is going away while the driver is not: the log keeps
    /// the fenced requests in flight, for a successor that takes the device over.
    pub fn abandon(&self) -> (usize, Vec<Arc<IotlbMap>>) {
        self.halt(false)
    }

    fn halt(&self, forget: bool) -> (usize, Vec<Arc<IotlbMap>>) {
        let mut r = self.ring.lock();
        let (n, maps) = self.fence_locked(&mut r, forget, |_| true);
        r.state = State::Off;
        r.queue = None;
        r.resubmit.clear();
        r.resume_avail = None;
        r.need_notify = false;
        r.added = 0;
        r.unpublished.clear();
        r.full = false;
        drop(r);
        if let (true, Some(log)) = (forget, &self.log) {
            log.clear();
        }
        (n, maps)
    }

    /// Fences the requests `affected` selects (their buffers are going away) and returns how many.
    pub fn fence_where(&self, affected: impl Fn(&[Segment]) -> bool) -> (usize, Vec<Arc<IotlbMap>>) {
        let mut r = self.ring.lock();
        let (n, maps) = self.fence_locked(&mut r, true, |s| affected(&s.segments));
        // Freed slots: a round that stopped on a full ring can go on.
        let wake = n > 0 && std::mem::take(&mut r.full);
        drop(r);
        if wake {
            self.wake();
        }
        (n, maps)
    }

    /// Gives the requests `affected` selects back to the driver unused (used length 0) instead of fencing
    /// them: for held buffers (a NIC's receive buffers) whose memory the driver is unmapping — they have
    /// nothing in them to lose, and a fenced one would be lost to the driver until it resets. Returns how
    /// many, and the maps they held (to dispose of off this thread, like [`fence_where`]'s). The used ring
    /// itself must still be reachable; where it is not, the ring breaks (as any publish would).
    ///
    /// Called by the message loop during an IOTLB update: it publishes through the map as it was (no
    /// reload: the loop must never mmap while the kernel waits), whose mappings stay valid until revoked.
    pub fn give_back_where(&self, affected: impl Fn(&[Segment]) -> bool) -> (usize, Vec<Arc<IotlbMap>>) {
        let map = self.memory.peek();
        let mut r = self.ring.lock();
        // Native I/O owns its requests: those are fenced, as on any other queue.
        let (_, mut old_maps) = self.fence_locked(&mut r, true, |s| s.native && affected(&s.segments));
        let mut n = 0;
        for i in 0..r.slots.len() {
            let s = &r.slots[i];
            if !s.live || s.native || !affected(&s.segments) {
                continue;
            }
            let ticket = Ticket::new(self.index, i as u16, s.gen);
            match self.complete_locked(&mut r, &map, ticket, 0, None, false) {
                Ok(Some(old)) if !old_maps.iter().any(|m| Arc::ptr_eq(m, &old)) => old_maps.push(old),
                _ => {}
            }
            n += 1;
        }
        self.inflight.sub(n);
        self.publish_used(&mut r, &map);
        self.notify_locked(&mut r, &map);
        let wake = n > 0 && std::mem::take(&mut r.full);
        drop(r);
        if wake {
            self.wake();
        }
        // Never the last reference while the memory holds it — but dropping maps is the janitor's job.
        old_maps.push(map);
        (n, old_maps)
    }

    /// How many in-flight requests `affected` selects.
    pub fn count_where(&self, affected: impl Fn(&[Segment]) -> bool) -> usize {
        let r = self.ring.lock();
        r.slots.iter().filter(|s| s.live && affected(&s.segments)).count()
    }

    /// Fences the slots `pick` selects. `end`: they are gone for good (the log forgets them); else the
    /// server is handing the device over, and the log keeps them in flight for its successor.
    fn fence_locked(
        &self,
        r: &mut Ring,
        end: bool,
        pick: impl Fn(&Slot) -> bool,
    ) -> (usize, Vec<Arc<IotlbMap>>) {
        let mut maps: Vec<Arc<IotlbMap>> = Vec::new();
        let mut n = 0;
        let Ring {
            slots,
            free,
            head_slot,
            ..
        } = r;
        for (i, s) in slots.iter_mut().enumerate() {
            if !s.live || !pick(s) {
                continue;
            }
            s.live = false;
            s.native = false;
            s.gen = s.gen.wrapping_add(1) & Ticket::GEN_MASK;
            if let Some(hs) = head_slot.get_mut(usize::from(s.head)) {
                *hs = 0;
            }
            if let (true, Some(log)) = (end, &self.log) {
                log.end(s.head);
            }
            if let Some(m) = s.map.take() {
                if !maps.iter().any(|x| Arc::ptr_eq(x, &m)) {
                    maps.push(m);
                }
            }
            free.push(i as u16);
            n += 1;
        }
        r.live -= n;
        self.stats.fenced.fetch_add(n as u64, Ordering::Relaxed);
        self.inflight.sub(n);
        (n, maps)
    }

    fn refuse(&self, r: &mut Ring, map: &IotlbMap, err: ChainError, head: u16, next_avail: u16) {
        self.stats.bad_chains[err.index()].fetch_add(1, Ordering::Relaxed);
        if !self.logged[err.index()].swap(true, Ordering::Relaxed) {
            log::warn!(
                "queue {}: refused request {head}: {} (logged once per kind; see the counters)",
                self.index,
                err.as_str()
            );
        }
        // The log counts the chain as taken before it is answered: a crash in between loses only it.
        if let Some(log) = &self.log {
            log.set_next_avail(next_avail);
        }
        if self.push_used(r, map, head, 0) {
            self.publish_used(r, map);
        }
    }

    fn break_ring(&self, r: &mut Ring, why: &str) {
        if r.state != State::Broken {
            r.state = State::Broken;
            self.stats.broken.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "queue {}: {why}; the queue stops until the driver resets it",
                self.index
            );
        }
    }

    /// Sets up the ring from the driver's info, checking that it lies in memory the device may use.
    fn activate(&self, r: &mut Ring, map: &IotlbMap) -> bool {
        let info = match self.transport.ring_info(self.index) {
            Ok(info) => info,
            Err(e) => {
                log::error!("queue {}: cannot read the ring setup: {e}", self.index);
                return false;
            }
        };
        if !info.ready {
            return false; // enabled later: the next kick tries again
        }
        let size = info.size;
        let mut queue = match build_queue(self.max_size, &info, self.event_idx.load(Ordering::Acquire)) {
            Ok(q) => q,
            Err(e) => {
                self.break_ring(r, &format!("the driver set up an invalid ring ({e})"));
                return false;
            }
        };
        let n = u64::from(size);
        let rings_ok = map.check_range(GuestAddress(info.desc), (16 * n) as usize, Permissions::Read)
            && map.check_range(GuestAddress(info.avail), (6 + 2 * n) as usize, Permissions::Read)
            && map.check_range(GuestAddress(info.used), (6 + 8 * n) as usize, Permissions::Write);
        if !rings_ok {
            self.break_ring(r, "the rings lie outside memory the device may access");
            return false;
        }
        let used = match queue.used_idx(map, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                self.break_ring(r, &format!("the used ring is unreadable ({e})"));
                return false;
            }
        };
        queue.set_next_used(used);
        let resumed = r.resume_avail.take();
        let next_avail = resumed.unwrap_or(info.avail_idx);
        queue.set_next_avail(next_avail);
        if let Some(log) = &self.log {
            if resumed.is_none() {
                // A fresh start: whatever the log held belongs to rings that are gone.
                log.clear();
            }
            log.set_used_idx(used);
            log.set_next_avail(next_avail);
        }
        // Slots are never dropped or recreated: their generations must keep counting across resets, or a
        // ticket fenced by a reset could complete a new request in the same slot.
        if r.slots.len() < usize::from(self.max_size) {
            r.slots.resize_with(usize::from(self.max_size), Slot::default);
        }
        debug_assert!(r.slots.iter().all(|s| !s.live));
        r.free = (0..size).rev().collect();
        r.head_slot = vec![0; usize::from(size)];
        r.live = 0;
        r.queue = Some(queue);
        r.state = State::Active;
        true
    }

    /// Pops up to `budget` requests into `batch` (cleared first). Chains that are malformed are refused
    /// (used length 0) and counted; a buffer outside the map makes the caller's thread ask the kernel once
    /// whether the IOTLB grew. Returns whether to call again without waiting for a kick.
    pub fn pop(&self, budget: Budget, batch: &mut RequestBatch) -> Pop {
        let mut missed_once = false;
        let mut tries = 0;
        loop {
            let map = self.memory.snapshot();
            batch.clear(map.clone());
            // After a few changes under our feet, go on with the last map: it is at most one update old,
            // and the next kick retries.
            let strict = tries < FRESH_MAP_TRIES;
            tries += 1;
            match self.pop_locked(&map, budget, batch, missed_once, strict) {
                Ok(p) => return p,
                Err(Again::Stale) => continue,
                Err(Again::Miss(addr)) => {
                    // Outside the lock: this may mmap, which must never happen while the message loop could
                    // be waiting for the queue lock.
                    missed_once = true;
                    let fresh = self.memory.miss(&map, addr);
                    log::debug!("queue {}: IOTLB miss at {addr:#x} (retry: {fresh})", self.index);
                }
            }
        }
    }

    fn pop_locked(
        &self,
        map: &Arc<IotlbMap>,
        budget: Budget,
        batch: &mut RequestBatch,
        refuse_unmapped: bool,
        strict: bool,
    ) -> Result<Pop, Again> {
        let mut guard = self.ring.lock();
        // The message loop changes the map before it revokes anything; it takes this lock in between, so
        // a map found current here stays mapped while we hold it.
        if strict && !self.memory.is_current(map) {
            return Err(Again::Stale);
        }
        let r = &mut *guard;
        if r.state == State::Armed && !self.activate(r, map) {
            return Ok(Pop::Idle);
        }
        if r.state != State::Active {
            return Ok(Pop::Idle);
        }
        let mut descriptors = 0usize;
        let mut out_of_budget = false;
        let mut full = false;
        let mut exhausted = false;
        let mut miss = None;
        // Taken-over requests first, then the avail ring.
        while let Some(&head) = r.resubmit.front() {
            if r.free.is_empty() {
                full = true;
                break;
            }
            if batch.len() >= budget.requests {
                out_of_budget = true;
                break;
            }
            r.resubmit.pop_front();
            let (desc_table, size, next) = r
                .queue
                .as_ref()
                .map_or((0, 0, 0), |q| (q.desc_table(), q.size(), q.next_avail()));
            if let Taken::Refused(ChainError::Unmapped(addr)) =
                self.take(r, map, desc_table, size, head, batch, true, next)
            {
                log::warn!(
                    "queue {}: a taken-over request points outside memory ({addr:#x})",
                    self.index
                );
            }
        }
        if !out_of_budget && !full {
            let q = r.queue.as_mut().expect("active queue");
            let _ = q.disable_notification(map.as_ref());
            let desc_table = q.desc_table();
            let avail_ring = q.avail_ring();
            let size = q.size();
            // One read of the avail index per round; the ring entries are read directly.
            let avail = match q.avail_idx(map.as_ref(), Ordering::Acquire) {
                Ok(idx) => idx.0,
                Err(e) => {
                    self.break_ring(r, &format!("the avail ring is unreadable ({e})"));
                    return Ok(Pop::Idle);
                }
            };
            let mut next = q.next_avail();
            if avail.wrapping_sub(next) > size {
                self.break_ring(r, "the driver's avail index ran more than a ring ahead");
                return Ok(Pop::Idle);
            }
            loop {
                if next == avail {
                    exhausted = true;
                    break;
                }
                if batch.len() >= budget.requests || descriptors >= budget.descriptors {
                    out_of_budget = true;
                    break;
                }
                if r.free.is_empty() {
                    // A ring's worth in flight: a valid driver cannot add more. Wait for completions.
                    full = true;
                    break;
                }
                let at = avail_ring + 4 + 2 * u64::from(next % size);
                let head = match map.load::<u16>(GuestAddress(at), Ordering::Acquire) {
                    Ok(h) => u16::from_le(h),
                    Err(e) => {
                        self.break_ring(r, &format!("the avail ring is unreadable ({e})"));
                        return Ok(Pop::Idle);
                    }
                };
                let before = batch.segments.len();
                match self.take(
                    r,
                    map,
                    desc_table,
                    size,
                    head,
                    batch,
                    refuse_unmapped,
                    next.wrapping_add(1),
                ) {
                    Taken::Yes => descriptors += batch.segments.len() - before + 1,
                    Taken::Missed(addr) => {
                        miss = Some(addr);
                        break;
                    }
                    Taken::Refused(_) => descriptors += 1,
                }
                next = next.wrapping_add(1);
            }
            if let Some(q) = r.queue.as_mut() {
                q.set_next_avail(next);
            }
        }
        let popped = batch.len();
        if popped > 0 {
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.requests.fetch_add(popped as u64, Ordering::Relaxed);
        }
        self.notify_locked(r, map);
        if let Some(addr) = miss {
            // Serve what was popped first: the caller retries after the miss.
            if popped == 0 {
                drop(guard);
                return Err(Again::Miss(addr));
            }
            return Ok(Pop::More);
        }
        if out_of_budget {
            return Ok(Pop::More);
        }
        if full {
            r.full = true;
            return Ok(if popped > 0 { Pop::More } else { Pop::Full });
        }
        debug_assert!(exhausted);
        // Re-enable notifications; if the driver added work meanwhile, go round again.
        let q = r.queue.as_mut().expect("active queue");
        Ok(match q.enable_notification(map.as_ref()) {
            Ok(true) => Pop::More,
            _ => Pop::Idle,
        })
    }

    /// Validates the chain at `head` and, if valid, gives it a slot and appends it to `batch`; otherwise
    /// refuses it — except an unmapped address when `refuse_unmapped` is false, which is left to the caller.
    /// `next_avail`: the avail index once this chain is taken (for the log).
    #[allow(clippy::too_many_arguments)]
    fn take(
        &self,
        r: &mut Ring,
        map: &Arc<IotlbMap>,
        desc_table: u64,
        size: u16,
        head: u16,
        batch: &mut RequestBatch,
        refuse_unmapped: bool,
        next_avail: u16,
    ) -> Taken {
        if usize::from(head) < r.head_slot.len() && r.head_slot[usize::from(head)] != 0 {
            self.stats.duplicate_heads.fetch_add(1, Ordering::Relaxed);
            if !self.logged[ChainError::BadIndex.index()].swap(true, Ordering::Relaxed) {
                log::warn!(
                    "queue {}: head {head} made available while in flight; refused",
                    self.index
                );
            }
            // Not published: the head's first request still owns its used entry.
            if let Some(log) = &self.log {
                log.set_next_avail(next_avail);
            }
            return Taken::Refused(ChainError::BadIndex);
        }
        let slot_id = *r.free.last().expect("a free slot");
        let slot = &mut r.slots[usize::from(slot_id)];
        slot.segments.clear();
        match chain::walk(map, desc_table, size, head, self.max_segments, &mut slot.segments) {
            Ok(shape) => {
                r.free.pop();
                let slot = &mut r.slots[usize::from(slot_id)];
                slot.live = true;
                slot.native = false;
                slot.gen = slot.gen.wrapping_add(1) & Ticket::GEN_MASK;
                slot.head = head;
                slot.shape = shape;
                slot.map = Some(map.clone());
                let ticket = Ticket::new(self.index, slot_id, slot.gen);
                batch.push(ticket, head, shape, &slot.segments);
                if let Some(hs) = r.head_slot.get_mut(usize::from(head)) {
                    *hs = slot_id + 1;
                }
                r.live += 1;
                self.inflight.add(1);
                if let Some(log) = &self.log {
                    log.begin(head);
                    log.set_next_avail(next_avail);
                }
                Taken::Yes
            }
            Err(ChainError::Unmapped(addr)) if !refuse_unmapped => Taken::Missed(addr),
            Err(e) => {
                self.refuse(r, map, e, head, next_avail);
                Taken::Refused(e)
            }
        }
    }

    /// Writes a used element without publishing it: [`publish_used`](Self::publish_used) stores the used
    /// index once for everything pushed since (under the same lock hold). `virtio-queue`'s `add_used`
    /// stores the index per element, which would show the driver the first buffers of a frame before the
    /// rest hold it. False if the used ring is out of reach.
    fn push_used(&self, r: &mut Ring, map: &IotlbMap, head: u16, len: u32) -> bool {
        if r.state == State::Broken {
            return false; // nothing more reaches the driver until it resets the queue
        }
        let Some(q) = r.queue.as_mut() else { return false };
        let next = q.next_used();
        // struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; }
        let addr = q.used_ring() + 4 + u64::from(next % q.size()) * 8;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        if let Err(e) = map.write_slice(&elem, GuestAddress(addr)) {
            // The used ring went out of reach (the driver unmapped it): nothing can be reported any more.
            self.break_ring(r, &format!("cannot write the used ring ({e})"));
            return false;
        }
        q.set_next_used(next.wrapping_add(1));
        r.added = r.added.wrapping_add(1);
        r.unpublished.push(head);
        true
    }

    /// Publishes the used elements pushed since the last publish: one used-index store (release: the
    /// elements are visible first), then the log (crash-consistent order, see `inflight`: used ring, then
    /// the heads' entries, then the used index).
    fn publish_used(&self, r: &mut Ring, map: &IotlbMap) {
        if r.unpublished.is_empty() {
            return;
        }
        let Some(q) = r.queue.as_ref() else {
            r.unpublished.clear();
            return;
        };
        if r.state == State::Broken {
            // A push failed halfway: publishing the rest would show the driver a hole.
            r.unpublished.clear();
            return;
        }
        let next = q.next_used();
        if let Err(e) = map.store(
            u16::to_le(next),
            GuestAddress(q.used_ring() + 2),
            Ordering::Release,
        ) {
            r.unpublished.clear();
            self.break_ring(r, &format!("cannot write the used index ({e})"));
            return;
        }
        r.need_notify = true;
        if let Some(log) = &self.log {
            for &head in &r.unpublished {
                log.end(head);
            }
            log.set_used_idx(next);
        }
        r.unpublished.clear();
    }

    /// Whether the driver wants an interrupt for the used entries added since the last check: with
    /// EVENT_IDX, when they passed its `used_event` (as Linux's `vring_need_event`); else always.
    fn needs_interrupt(r: &mut Ring, map: &IotlbMap) -> bool {
        let added = std::mem::take(&mut r.added);
        let Some(q) = r.queue.as_ref() else { return false };
        if !q.event_idx_enabled() {
            // VRING_AVAIL_F_NO_INTERRUPT (the driver is polling, e.g. in NAPI): the spec's SHOULD.
            let flags = map.load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire);
            return flags.map_or(true, |f| u16::from_le(f) & 1 == 0);
        }
        // The used index stores before the read of used_event (the driver orders the other way).
        std::sync::atomic::fence(Ordering::SeqCst);
        // used_event sits after the avail ring: flags, idx, ring[size].
        let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
        let Ok(event) = map.load::<u16>(GuestAddress(at), Ordering::Relaxed) else {
            return true;
        };
        let new = q.next_used();
        let old = new.wrapping_sub(added);
        new.wrapping_sub(u16::from_le(event)).wrapping_sub(1) < new.wrapping_sub(old)
    }

    fn notify_locked(&self, r: &mut Ring, map: &IotlbMap) -> bool {
        if !std::mem::take(&mut r.need_notify) {
            return false;
        }
        let notify = Self::needs_interrupt(r, map);
        if notify {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.transport.notify(self.index);
        }
        notify
    }

    /// Locks the ring with a map that is current under the lock (see [`pop_locked`]); after a few changes
    /// under our feet, with the last one.
    fn lock_fresh(&self) -> (parking_lot::MutexGuard<'_, Ring>, Arc<IotlbMap>) {
        let mut tries = 0;
        loop {
            let map = self.memory.snapshot();
            let guard = self.ring.lock();
            tries += 1;
            if tries >= FRESH_MAP_TRIES || self.memory.is_current(&map) {
                return (guard, map);
            }
        }
    }

    /// Runs `f` on a request in flight (its buffers and the map they live in); `None` if the ticket is not
    /// in flight. `f` runs under the queue lock: keep it short and never block in it.
    pub fn with_request<T>(
        &self,
        ticket: Ticket,
        f: impl FnOnce(&Arc<IotlbMap>, Shape, &[Segment]) -> T,
    ) -> Option<T> {
        let r = self.ring.lock();
        let s = Slot::of(&r.slots, ticket, false)?;
        Some(f(s.map.as_ref()?, s.shape, &s.segments))
    }

    /// Hands request `ticket` to native I/O: from now on only [`complete_native`](Self::complete_native)
    /// completes it. Runs `f` on it like [`with_request`](Self::with_request).
    pub fn start_native<T>(
        &self,
        ticket: Ticket,
        f: impl FnOnce(&Arc<IotlbMap>, Shape, &[Segment]) -> T,
    ) -> Option<T> {
        let mut r = self.ring.lock();
        Slot::of(&r.slots, ticket, false)?;
        let s = &mut r.slots[usize::from(ticket.slot())];
        s.native = true;
        Some(f(s.map.as_ref()?, s.shape, &s.segments))
    }

    /// Runs `f` on a request native I/O owns (see [`start_native`](Self::start_native)); `None` if it was
    /// fenced meanwhile.
    pub fn with_native<T>(
        &self,
        ticket: Ticket,
        f: impl FnOnce(&Arc<IotlbMap>, Shape, &[Segment]) -> T,
    ) -> Option<T> {
        let r = self.ring.lock();
        let s = Slot::of(&r.slots, ticket, true)?;
        Some(f(s.map.as_ref()?, s.shape, &s.segments))
    }

    /// Completes the request `ticket` with `used_len` bytes written (capped to what the request can hold),
    /// writing `status` into its last writable byte first if given. Publishes it at once; the interrupt
    /// waits for [`notify`](Self::notify), so a caller completing many requests raises at most one.
    pub fn complete(&self, ticket: Ticket, used_len: u32, status: Option<u8>) -> Completion {
        self.complete_one(ticket, used_len, status, false)
    }

    /// [`complete`](Self::complete) for native I/O, which owns its requests once started.
    pub fn complete_native(&self, ticket: Ticket, used_len: u32, status: Option<u8>) -> Completion {
        self.complete_one(ticket, used_len, status, true)
    }

    fn complete_one(&self, ticket: Ticket, used_len: u32, status: Option<u8>, native: bool) -> Completion {
        let (mut r, map) = self.lock_fresh();
        let done = self.complete_locked(&mut r, &map, ticket, used_len, status, native);
        self.publish_used(&mut r, &map);
        let wake = done.is_ok() && std::mem::take(&mut r.full);
        drop(r);
        self.inflight.sub(usize::from(done.is_ok()));
        if wake {
            self.wake();
        }
        // The request's map is released after the lock: the last reference unmaps.
        match done {
            Ok(old) => {
                drop(old);
                Completion::Done
            }
            Err(()) => Completion::Stale,
        }
    }

    /// Completes several requests (none native-owned), publishes them with one used-index store and
    /// raises at most one interrupt. Returns how many were in flight.
    pub fn complete_all(&self, done: impl IntoIterator<Item = Done>) -> usize {
        self.complete_many(done, true)
    }

    /// [`complete_all`](Self::complete_all) without the interrupt: [`notify`](Self::notify) raises it,
    /// once for many calls.
    pub fn complete_all_quietly(&self, done: impl IntoIterator<Item = Done>) -> usize {
        self.complete_many(done, false)
    }

    fn complete_many(&self, done: impl IntoIterator<Item = Done>, notify: bool) -> usize {
        let mut keep: Option<Arc<IotlbMap>> = None;
        let mut others: Vec<Arc<IotlbMap>> = Vec::new();
        let mut n = 0;
        let (mut r, map) = self.lock_fresh();
        let mut group = std::mem::take(&mut r.group);
        let mut done = done.into_iter();
        loop {
            group.clear();
            let mut terminated = false;
            for d in done.by_ref() {
                group.push(d);
                if !d.joined {
                    terminated = true;
                    break;
                }
            }
            if group.is_empty() {
                break;
            }
            // A unit with a fenced buffer, or cut short (its end never came), goes out as runts: no frame
            // with a hole in it.
            let whole = group.len() == 1
                || (terminated
                    && group.iter().all(|d| {
                        d.ticket.queue() == self.index && Slot::of(&r.slots, d.ticket, false).is_some()
                    }));
            for d in &group {
                let len = if whole { d.used_len } else { 0 };
                if let Ok(old) = self.complete_locked(&mut r, &map, d.ticket, len, d.status, false) {
                    n += 1;
                    // Old maps are released after the lock: the last reference unmaps.
                    match (&keep, old) {
                        (_, None) => {}
                        (Some(k), Some(old)) if Arc::ptr_eq(k, &old) => {}
                        (None, Some(old)) => keep = Some(old),
                        (Some(_), Some(old)) => others.push(old),
                    }
                }
            }
        }
        group.clear();
        r.group = group;
        self.publish_used(&mut r, &map);
        if notify {
            self.notify_locked(&mut r, &map);
        }
        let wake = n > 0 && std::mem::take(&mut r.full);
        drop(r);
        self.inflight.sub(n);
        if wake {
            self.wake();
        }
        drop(keep);
        drop(others);
        n
    }

    fn complete_locked(
        &self,
        r: &mut Ring,
        map: &IotlbMap,
        ticket: Ticket,
        used_len: u32,
        status: Option<u8>,
        native: bool,
    ) -> Result<Option<Arc<IotlbMap>>, ()> {
        let idx = usize::from(ticket.slot());
        let live = r.slots.get(idx).is_some_and(|s| {
            s.live && s.gen == ticket.gen() && s.native == native && ticket.queue() == self.index
        });
        if !live {
            self.stats.stale_completions.fetch_add(1, Ordering::Relaxed);
            return Err(());
        }
        let slot = &mut r.slots[idx];
        let old = slot.map.take();
        if let (Some(status), Some(m)) = (status, old.as_ref()) {
            if let Some(last) = slot.segments.last().filter(|_| slot.shape.writable > 0) {
                let _ = m.write_from(last.addr + u64::from(last.len) - 1, &[status]);
            }
        }
        let len = used_len.min(slot.shape.writable_bytes);
        let head = slot.head;
        slot.live = false;
        slot.native = false;
        slot.gen = slot.gen.wrapping_add(1) & Ticket::GEN_MASK;
        r.free.push(ticket.slot());
        if let Some(hs) = r.head_slot.get_mut(usize::from(head)) {
            *hs = 0;
        }
        r.live -= 1;
        // The caller publishes (`publish_used`): the log learns of it after the used index.
        self.push_used(r, map, head, len);
        self.stats.completions.fetch_add(1, Ordering::Relaxed);
        // The caller counts it out of `inflight` once for all it completes.
        Ok(old)
    }

    /// Raises the interrupt owed for completions published since the last one (EVENT_IDX honoured).
    pub fn notify(&self) {
        let (mut r, map) = self.lock_fresh();
        self.notify_locked(&mut r, &map);
    }

    /// For busy polling: stops the driver's notifications while the caller polls
    /// [`has_avail`](Self::has_avail) instead of sleeping. The next [`pop`](Self::pop) that finds the ring
    /// empty turns them back on and checks once more, so no request can slip between the two.
    pub fn suppress_notifications(&self) {
        let (mut r, map) = self.lock_fresh();
        if r.state == State::Active {
            if let Some(q) = r.queue.as_mut() {
                let _ = q.disable_notification(map.as_ref());
            }
        }
    }

    /// Whether the driver made requests available that were not popped yet: one read of the avail
    /// index (false when the queue is not active or the ring is unreadable; `pop` reports those).
    pub fn has_avail(&self) -> bool {
        let (r, map) = self.lock_fresh();
        if r.state != State::Active {
            return false;
        }
        if !r.resubmit.is_empty() {
            return true;
        }
        let Some(q) = r.queue.as_ref() else { return false };
        q.avail_idx(map.as_ref(), Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != q.next_avail())
    }

    /// Counts a kick.
    pub fn kicked(&self) {
        self.stats.kicks.fetch_add(1, Ordering::Relaxed);
    }
}

fn build_queue(max_size: u16, info: &RingInfo, event_idx: bool) -> Result<Queue, QueueError> {
    let mut q = Queue::new(max_size)?;
    q.set_event_idx(event_idx);
    q.try_set_size(info.size)?;
    q.try_set_desc_table_address(GuestAddress(info.desc))?;
    q.try_set_avail_ring_address(GuestAddress(info.avail))?;
    q.try_set_used_ring_address(GuestAddress(info.used))?;
    q.set_ready(true);
    Ok(q)
}
