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
//! request. At most a ring's worth of requests is in flight per queue (a valid driver cannot have more),
//! holding at most a fixed budget of buffer descriptors between them. Each pop round is bounded in chains
//! and in descriptors read — refused chains are charged what they cost — so a hostile driver cannot make
//! one round do unbounded work while the queue lock is held; a driver that posts nothing but malformed
//! chains for a ring's worth in a row breaks the queue until it resets it. Nothing blocking (mmap, ioctl
//! waits) happens under the lock, and no hold of it is long: copies between a request's buffers and the
//! model go in chunks, each under the lock with the ticket checked, so a fence (taken under the lock)
//! ends every access to a request's memory at once.
//!
//! Ring accesses (avail, used, event indices) go through the *current* memory map only; when it cannot be
//! brought up to date the queue breaks rather than write through a map that may name memory the driver
//! took back.
//!
//! The queue's ring state machine: `Off` (no driver) → `Armed` (DRIVER_OK: set up on first use, which is
//! also how queues the driver enables late are served) → `Active` → `Broken` (the driver corrupted the
//! ring; until reset). The message loop moves queues back to `Off`, fencing what is still in flight.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex, RwLock};
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::chain::{self, ChainError, Segment, Shape};
use crate::inflight::QueueLog;
use crate::memory::{push_unique, Access, IotlbMap, Memory, Pins};

/// Bytes of each request's readable buffers copied into its batch while it is popped (a request header
/// fits): models read headers there, never from driver memory after the pop.
pub const HEAD_BYTES: usize = 64;
/// The most bytes one hold of the queue lock copies between a request's buffers and the model.
const COPY_CHUNK: usize = 256 << 10;
/// A freed slot keeps this many segments of capacity at most once the queue holds more than its budget.
const SLOT_SEGMENTS_KEPT: usize = 16;

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
    /// Of those, requests fenced while native I/O was moving their data (it may still touch their buffers
    /// until its system calls return).
    pub fenced_native: AtomicU64,
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
    /// The first (up to [`HEAD_BYTES`]) readable bytes, copied when the request was popped.
    pub header: &'a [u8],
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    ticket: Ticket,
    head: u16,
    first: u32,
    shape: Shape,
    header_len: u8,
}

/// Requests popped in one round, stored flat so a warmed-up batch allocates nothing.
#[derive(Debug, Default)]
pub struct RequestBatch {
    entries: Vec<Entry>,
    segments: Vec<Segment>,
    /// `HEAD_BYTES` per entry.
    headers: Vec<u8>,
}

impl RequestBatch {
    pub fn new() -> Self {
        Self::default()
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
        let h = i * HEAD_BYTES;
        Some(Request {
            ticket: e.ticket,
            head: e.head,
            shape: e.shape,
            readable: &self.segments[first..mid],
            writable: &self.segments[mid..end],
            header: &self.headers[h..h + usize::from(e.header_len)],
        })
    }
    pub fn iter(&self) -> impl Iterator<Item = Request<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
    fn clear(&mut self) {
        self.entries.clear();
        self.segments.clear();
        self.headers.clear();
    }
    /// Appends a request, copying its header out of `map` (the lock is held: the memory is the driver's).
    fn push(&mut self, map: &IotlbMap, ticket: Ticket, head: u16, shape: Shape, segments: &[Segment]) {
        let first = self.segments.len() as u32;
        self.segments.extend_from_slice(segments);
        let h = self.headers.len();
        self.headers.resize(h + HEAD_BYTES, 0);
        let want = u64::from(shape.readable_bytes).min(HEAD_BYTES as u64);
        let headers = &mut self.headers[h..h + HEAD_BYTES];
        let at = walk_bytes(
            &segments[..usize::from(shape.readable)],
            0,
            want,
            |addr, at, n| map.read_into(addr, &mut headers[at as usize..(at + n) as usize]),
        );
        self.entries.push(Entry {
            ticket,
            head,
            first,
            shape,
            header_len: at as u8,
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

/// Walks `len` bytes of the buffers `segs` from byte `skip`, calling `f(guest address, position, length)`
/// per piece until it returns false. Returns how many bytes the pieces `f` accepted cover.
fn walk_bytes(segs: &[Segment], mut skip: u64, len: u64, mut f: impl FnMut(u64, u64, u64) -> bool) -> u64 {
    let mut done = 0;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len - done);
        if !f(seg.addr + skip, done, n) {
            break;
        }
        done += n;
        skip = 0;
    }
    done
}

/// Copies `n` bytes of `src` at `from` to `dst` at `to`, region by region through the maps'
/// permission-checked slices; false if either range is not mapped with the access it needs.
fn copy_between(src: &IotlbMap, from: u64, dst: &IotlbMap, to: u64, n: usize) -> bool {
    let (Ok(mut s), Ok(mut d)) = (
        src.get_slices(GuestAddress(from), n, Permissions::Read),
        dst.get_slices(GuestAddress(to), n, Permissions::Write),
    ) else {
        return false;
    };
    let (mut a, mut b) = (None, None);
    let mut left = n;
    while left > 0 {
        let (Some(Ok(x)), Some(Ok(y))) = (a.take().or_else(|| s.next()), b.take().or_else(|| d.next()))
        else {
            return false;
        };
        let m = x.len().min(y.len()).min(left);
        let (Ok(xs), Ok(ys)) = (x.subslice(0, m), y.subslice(0, m)) else {
            return false;
        };
        xs.copy_to_volatile_slice(ys);
        left -= m;
        // What is left of either piece comes first next time.
        a = (x.len() > m).then(|| x.offset(m).map_err(Into::into));
        b = (y.len() > m).then(|| y.offset(m).map_err(Into::into));
    }
    true
}

impl Slot {
    /// The buffers of `part`, their total length, and the access they allow the device.
    fn part(&self, part: Part) -> (&[Segment], u64, Access) {
        let mid = usize::from(self.shape.readable);
        match part {
            Part::Readable => (
                &self.segments[..mid],
                u64::from(self.shape.readable_bytes),
                Access::Read,
            ),
            Part::Writable => (
                &self.segments[mid..],
                u64::from(self.shape.writable_bytes),
                Access::Write,
            ),
        }
    }

    /// What `affected` says of this request's buffers and the map it was popped with (a request without a
    /// map is taken as affected).
    fn affected(&self, affected: &impl Fn(&IotlbMap, &[Segment]) -> bool) -> bool {
        self.map.as_deref().is_none_or(|m| affected(m, &self.segments))
    }

    /// The slot of `ticket` in queue `queue`'s `slots` while that very request is in flight and owned
    /// by native I/O (`native`) or not; `None` for a completed, fenced or reused slot — or a ticket of
    /// another queue of the device, whose slot number and generation may well match a live request
    /// here. (Tickets carry no device: one of another device's queue of the same index passes.)
    fn of(slots: &[Slot], queue: u16, ticket: Ticket, native: bool) -> Option<&Slot> {
        if ticket.queue() != queue {
            return None;
        }
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
    /// Chains refused in a row (a valid one resets it): a ring's worth breaks the queue.
    refused_streak: usize,
    /// Segments held by requests in flight, and the capacity all slots keep (see `seg_budget`).
    held_segments: usize,
    slot_capacity: usize,
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

/// How many times a pop or publish tries for a current map while it keeps changing under its feet (each
/// try reloads it) before it gives up: a pop then tries again later, a publish breaks the queue.
const FRESH_MAP_TRIES: usize = 64;
/// Marks `Virtqueue::fail_status` as set (its low byte is the status).
const FAIL_STATUS_SET: u16 = 0x100;
/// How long a publish keeps trying past `FRESH_MAP_TRIES` before it breaks the queue.
const FRESH_MAP_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);

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
    /// The in-flight log (a state file's, or a vhost-user inflight region's); set while the queue is off.
    log: RwLock<Option<QueueLog>>,
    pub stats: QueueStats,
    logged: [AtomicBool; ChainError::KINDS],
    event_idx: AtomicBool,
    /// The features the driver negotiated for the current session (set at DRIVER_OK, before arming).
    features: AtomicU64,
    waker: Mutex<Option<Arc<vmm_sys_util::eventfd::EventFd>>>,
    /// The model holds this queue's buffers until it has data for them (see `DeviceSpec::held_queues`).
    held: AtomicBool,
    /// The most segments all requests in flight may hold together, and all slots may keep.
    seg_budget: usize,
    /// Written into the status byte of a request the transport fails on the model's behalf (virtio-blk:
    /// IOERR), as `FAIL_STATUS_SET | status`; 0: such a request is given back empty.
    fail_status: AtomicU16,
    /// `Pins` reaching this queue's requests right now (`pin`): a system call may be moving data through
    /// their buffers even after they were fenced.
    pinned: Arc<AtomicUsize>,
}

/// Which buffers of a request a copy or pin reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Driver → device (headers, data to write).
    Readable,
    /// Device → driver (data read, status).
    Writable,
}

/// Who completes a request now: the model, or native I/O it was handed to (`begin_native`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Model,
    Native,
}

/// The request is no longer in flight (completed or fenced): its memory is out of reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone;

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
        let max_segments = max_segments.max(1);
        Arc::new(Self {
            index,
            max_size,
            max_segments,
            seg_budget: (1usize << 16)
                .max(4 * usize::from(max_size))
                .max(2 * max_segments),
            fail_status: AtomicU16::new(0),
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
                refused_streak: 0,
                held_segments: 0,
                slot_capacity: 0,
            }),
            memory,
            transport,
            inflight,
            log: RwLock::new(log),
            stats: QueueStats::default(),
            logged: Default::default(),
            event_idx: AtomicBool::new(false),
            features: AtomicU64::new(0),
            waker: Mutex::new(None),
            held: AtomicBool::new(false),
            pinned: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// How many `Pins` reach this queue's requests right now (see [`pin`](Self::pin)).
    pub fn pinned_now(&self) -> usize {
        self.pinned.load(Ordering::Acquire)
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

    /// Gives the queue an in-flight log (a vhost-user client's inflight region), or takes it away. Only
    /// while the queue is off: a running queue's requests belong to the log they were popped under.
    pub fn set_log(&self, log: Option<QueueLog>) -> bool {
        let r = self.ring.lock();
        if r.state != State::Off {
            return false;
        }
        *self.log.write() = log;
        true
    }

    /// The queue's in-flight log, if it has one.
    pub fn log(&self) -> Option<QueueLog> {
        self.log.read().clone()
    }

    /// The status byte a request failed by the transport gets (see [`failure`](Self::failure)).
    pub fn set_fail_status(&self, status: Option<u8>) {
        let v = status.map_or(0, |s| FAIL_STATUS_SET | u16::from(s));
        self.fail_status.store(v, Ordering::Relaxed);
    }

    /// The completion that fails `ticket` on the model's behalf — when the transport cannot deliver it to
    /// the model at all: the device's error status (virtio-blk: IOERR, so a read never "succeeds" with
    /// stale data nor a write is acknowledged unwritten), or an empty completion for devices without one.
    pub fn failure(&self, ticket: Ticket) -> Done {
        let v = self.fail_status.load(Ordering::Relaxed);
        let status = (v & FAIL_STATUS_SET != 0).then_some(v as u8);
        Done::new(ticket, u32::from(status.is_some()), status)
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

    /// The next avail index the device would process (`VDUSE_GET_VQ_STATE`): the ring's, once it is set
    /// up; before that, where a taken-over queue resumes (the log's progress, not the driver's initial
    /// index); `None` for a queue with neither.
    pub fn next_avail(&self) -> Option<u16> {
        let r = self.ring.lock();
        r.queue.as_ref().map(|q| q.next_avail()).or(r.resume_avail)
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
        r.refused_streak = 0;
        drop(r);
        if let (true, Some(log)) = (forget, self.log.read().as_ref()) {
            log.clear();
        }
        (n, maps)
    }

    /// Fences the requests `affected` selects (their buffers are going away) and returns how many. The
    /// predicate gets each request's buffers and the map they were popped with.
    pub fn fence_where(
        &self,
        affected: impl Fn(&IotlbMap, &[Segment]) -> bool,
    ) -> (usize, Vec<Arc<IotlbMap>>) {
        let mut r = self.ring.lock();
        let (n, maps) = self.fence_locked(&mut r, true, |s| s.affected(&affected));
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
    /// many, and the maps they held (to dispose of off this thread, like [`fence_where`](Self::fence_where)'s). The used ring
    /// itself must still be reachable; where it is not, the ring breaks (as any publish would).
    ///
    /// Called by the message loop during an IOTLB update: it publishes through the map as it was (no
    /// reload: the loop must never mmap while the kernel waits), whose mappings stay valid until revoked.
    pub fn give_back_where(
        &self,
        affected: impl Fn(&IotlbMap, &[Segment]) -> bool,
    ) -> (usize, Vec<Arc<IotlbMap>>) {
        let map = self.memory.peek();
        let mut r = self.ring.lock();
        // Native I/O owns its requests: those are fenced, as on any other queue.
        let (_, mut old_maps) = self.fence_locked(&mut r, true, |s| s.native && s.affected(&affected));
        let mut n = 0;
        for i in 0..r.slots.len() {
            let s = &r.slots[i];
            if !s.live || s.native || !s.affected(&affected) {
                continue;
            }
            let ticket = Ticket::new(self.index, i as u16, s.gen);
            if let Ok(Some(old)) = self.complete_locked(&mut r, &map, ticket, 0, None, false) {
                push_unique(&mut old_maps, old);
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
    pub fn count_where(&self, affected: impl Fn(&IotlbMap, &[Segment]) -> bool) -> usize {
        let r = self.ring.lock();
        r.slots.iter().filter(|s| s.live && s.affected(&affected)).count()
    }

    /// The distinct maps requests in flight were popped with: memory they may still reach, whatever the
    /// current map says (a serving thread may have loaded a newer one already).
    pub fn maps_in_use(&self) -> Vec<Arc<IotlbMap>> {
        let r = self.ring.lock();
        let mut maps: Vec<Arc<IotlbMap>> = Vec::new();
        for m in r.slots.iter().filter(|s| s.live).filter_map(|s| s.map.as_ref()) {
            push_unique(&mut maps, m.clone());
        }
        maps
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
            held_segments,
            slot_capacity,
            ..
        } = r;
        for (i, s) in slots.iter_mut().enumerate() {
            if !s.live || !pick(s) {
                continue;
            }
            s.live = false;
            if std::mem::take(&mut s.native) {
                self.stats.fenced_native.fetch_add(1, Ordering::Relaxed);
            }
            s.gen = s.gen.wrapping_add(1) & Ticket::GEN_MASK;
            *held_segments -= s.segments.len();
            self.trim_slot(s, slot_capacity);
            if let Some(hs) = head_slot.get_mut(usize::from(s.head)) {
                *hs = 0;
            }
            if let (true, Some(log)) = (end, self.log.read().as_ref()) {
                log.end(s.head);
            }
            if let Some(m) = s.map.take() {
                push_unique(&mut maps, m);
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
        if let Some(log) = self.log.read().as_ref() {
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
        if let Some(log) = self.log.read().as_ref() {
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
    /// (used length 0) and counted — against the budget too, by the descriptors they cost; a buffer
    /// outside the map makes the caller's thread ask the kernel once whether the IOTLB grew. Returns
    /// whether to call again without waiting for a kick.
    pub fn pop(&self, budget: Budget, batch: &mut RequestBatch) -> Pop {
        let mut missed_once = false;
        for _ in 0..FRESH_MAP_TRIES {
            let map = self.memory.snapshot();
            batch.clear();
            match self.pop_locked(&map, budget, batch, missed_once) {
                Ok(p) => return p,
                Err(Again::Stale) if self.memory.reload_failing() => break,
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
        batch.clear();
        if !self.memory.reload_failing() {
            // The map kept changing under our feet: nothing is popped through an outdated one; later.
            return Pop::More;
        }
        // The map cannot be brought up to date: the queue stops until the driver resets it.
        let mut r = self.ring.lock();
        if matches!(r.state, State::Armed | State::Active) {
            self.break_ring(&mut r, "the driver's memory map cannot be brought up to date");
        }
        Pop::Idle
    }

    fn pop_locked(
        &self,
        map: &Arc<IotlbMap>,
        budget: Budget,
        batch: &mut RequestBatch,
        refuse_unmapped: bool,
    ) -> Result<Pop, Again> {
        let mut guard = self.ring.lock();
        // The message loop changes the map before it fences or revokes anything; it takes this lock in
        // between, so a map found current here stays the driver's while we hold it.
        if !self.memory.is_current(map) {
            return Err(Again::Stale);
        }
        let r = &mut *guard;
        if r.state == State::Armed && !self.activate(r, map) {
            return Ok(Pop::Idle);
        }
        if r.state != State::Active {
            return Ok(Pop::Idle);
        }
        // Every chain taken or refused counts against `requests`, and what reading it cost against
        // `descriptors`: a round never does more than the budget, whatever the driver posts.
        let mut chains = 0usize;
        let mut descriptors = 0usize;
        let mut out_of_budget = false;
        let mut full = false;
        let mut exhausted = false;
        let mut miss = None;
        // Taken-over requests first, then the avail ring.
        while let Some(&head) = r.resubmit.front() {
            if r.free.is_empty() || r.held_segments + self.max_segments > self.seg_budget {
                full = true;
                break;
            }
            if chains >= budget.requests || descriptors >= budget.descriptors {
                out_of_budget = true;
                break;
            }
            r.resubmit.pop_front();
            let (desc_table, size, next) = r
                .queue
                .as_ref()
                .map_or((0, 0, 0), |q| (q.desc_table(), q.size(), q.next_avail()));
            chains += 1;
            if let Taken::Refused(ChainError::Unmapped(addr)) = self.take(
                r,
                map,
                desc_table,
                size,
                head,
                batch,
                true,
                next,
                &mut descriptors,
            ) {
                log::warn!(
                    "queue {}: a taken-over request points outside memory ({addr:#x})",
                    self.index
                );
            }
        }
        if !out_of_budget && !full && r.state == State::Active {
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
                if chains >= budget.requests || descriptors >= budget.descriptors {
                    out_of_budget = true;
                    break;
                }
                if r.free.is_empty() || r.held_segments + self.max_segments > self.seg_budget {
                    // A ring's worth in flight (a valid driver cannot add more), or as many buffers as
                    // the queue may hold: wait for completions.
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
                chains += 1;
                match self.take(
                    r,
                    map,
                    desc_table,
                    size,
                    head,
                    batch,
                    refuse_unmapped,
                    next.wrapping_add(1),
                    &mut descriptors,
                ) {
                    Taken::Yes => {}
                    Taken::Missed(addr) => {
                        miss = Some(addr);
                        break;
                    }
                    Taken::Refused(_) => {}
                }
                next = next.wrapping_add(1);
                if r.state != State::Active {
                    break; // a refusal streak broke the queue
                }
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
        if r.state != State::Active {
            return Ok(if popped > 0 { Pop::More } else { Pop::Idle });
        }
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
    /// `next_avail`: the avail index once this chain is taken (for the log). `descriptors` grows by what
    /// reading the chain cost, valid or not.
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
        descriptors: &mut usize,
    ) -> Taken {
        if usize::from(head) < r.head_slot.len() && r.head_slot[usize::from(head)] != 0 {
            // Even a refusal costs a descriptor's worth of the budget.
            *descriptors += 1;
            self.stats.duplicate_heads.fetch_add(1, Ordering::Relaxed);
            if !self.logged[ChainError::BadIndex.index()].swap(true, Ordering::Relaxed) {
                log::warn!(
                    "queue {}: head {head} made available while in flight; refused",
                    self.index
                );
            }
            // Not published: the head's first request still owns its used entry.
            if let Some(log) = self.log.read().as_ref() {
                log.set_next_avail(next_avail);
            }
            self.count_refusal(r);
            return Taken::Refused(ChainError::BadIndex);
        }
        let slot_id = *r.free.last().expect("a free slot");
        let slot = &mut r.slots[usize::from(slot_id)];
        slot.segments.clear();
        let capacity = slot.segments.capacity();
        let mut cost = 0;
        let walked = chain::walk(
            map,
            desc_table,
            size,
            head,
            self.max_segments,
            &mut slot.segments,
            &mut cost,
        );
        r.slot_capacity += slot.segments.capacity() - capacity;
        *descriptors += cost.max(1);
        match walked {
            Ok(shape) => {
                r.free.pop();
                r.refused_streak = 0;
                let slot = &mut r.slots[usize::from(slot_id)];
                slot.live = true;
                slot.native = false;
                slot.gen = slot.gen.wrapping_add(1) & Ticket::GEN_MASK;
                slot.head = head;
                slot.shape = shape;
                slot.map = Some(map.clone());
                let ticket = Ticket::new(self.index, slot_id, slot.gen);
                batch.push(map, ticket, head, shape, &slot.segments);
                r.held_segments += slot.segments.len();
                if let Some(hs) = r.head_slot.get_mut(usize::from(head)) {
                    *hs = slot_id + 1;
                }
                r.live += 1;
                self.inflight.add(1);
                if let Some(log) = self.log.read().as_ref() {
                    log.begin(head);
                    log.set_next_avail(next_avail);
                }
                Taken::Yes
            }
            Err(ChainError::Unmapped(addr)) if !refuse_unmapped => Taken::Missed(addr),
            Err(e) => {
                let Ring {
                    slots, slot_capacity, ..
                } = &mut *r;
                self.trim_slot(&mut slots[usize::from(slot_id)], slot_capacity);
                self.refuse(r, map, e, head, next_avail);
                self.count_refusal(r);
                Taken::Refused(e)
            }
        }
    }

    /// A driver that posts nothing but malformed chains, a ring's worth in a row, is not a driver having
    /// a bad moment: stop serving the queue until it resets it (QEMU marks such a device broken).
    fn count_refusal(&self, r: &mut Ring) {
        r.refused_streak += 1;
        let ring = r
            .queue
            .as_ref()
            .map_or(usize::from(self.max_size), |q| usize::from(q.size()));
        if r.refused_streak >= ring.max(1) {
            self.break_ring(
                r,
                &format!("the driver posted {} malformed chains in a row", r.refused_streak),
            );
        }
    }

    /// A freed slot gives back the capacity it grew beyond a few segments once the queue keeps more than
    /// its budget: a driver that once posted huge chains cannot make every slot hold that much for good.
    fn trim_slot(&self, slot: &mut Slot, capacity: &mut usize) {
        if *capacity > self.seg_budget && slot.segments.capacity() > SLOT_SEGMENTS_KEPT {
            let before = slot.segments.capacity();
            slot.segments.clear();
            slot.segments.shrink_to(SLOT_SEGMENTS_KEPT);
            *capacity = *capacity + slot.segments.capacity() - before;
        }
    }

    /// Segments held by requests in flight, and the capacity all slots keep (both bounded by the queue's
    /// budget, give or take one chain).
    pub fn segment_usage(&self) -> (usize, usize) {
        let r = self.ring.lock();
        (r.held_segments, r.slot_capacity)
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
        if let Some(log) = self.log.read().as_ref() {
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

    /// Locks the ring with a map that is current under the lock (see [`pop_locked`]) — the only kind the
    /// rings are touched through. `None` if none could be had (the reload keeps failing, or the map keeps
    /// changing under our feet): then the caller must not touch the rings, and the queue is broken.
    fn lock_fresh(&self) -> (parking_lot::MutexGuard<'_, Ring>, Option<Arc<IotlbMap>>) {
        // A map that keeps changing (updates in a burst) is waited out for a while; a reload that fails
        // is not.
        let give_up = Instant::now() + FRESH_MAP_PATIENCE;
        let mut tries = 0;
        loop {
            let map = self.memory.snapshot();
            let guard = self.ring.lock();
            if self.memory.is_current(&map) {
                return (guard, Some(map));
            }
            tries += 1;
            if self.memory.reload_failing() || (tries >= FRESH_MAP_TRIES && Instant::now() >= give_up) {
                return (guard, None);
            }
            drop(guard);
            if tries >= FRESH_MAP_TRIES {
                std::thread::yield_now();
            }
        }
    }

    /// The current map for a publish, or — failing that — a broken ring (fail closed: nothing is written
    /// through a map that may name memory the driver took back) and an empty map that is never touched.
    fn map_or_break(&self, r: &mut Ring, map: Option<Arc<IotlbMap>>) -> Arc<IotlbMap> {
        match map {
            Some(m) => m,
            None => {
                self.break_ring(r, "the driver's memory map cannot be brought up to date");
                Arc::new(IotlbMap::empty())
            }
        }
    }

    /// Whether `ticket` is in flight (owned by the model or by native I/O): false once it was completed
    /// or fenced.
    pub fn is_live(&self, ticket: Ticket) -> bool {
        let r = self.ring.lock();
        r.slots
            .get(usize::from(ticket.slot()))
            .is_some_and(|s| s.live && s.gen == ticket.gen() && ticket.queue() == self.index)
    }

    /// Hands request `ticket` to native I/O: from now on only [`complete_native`](Self::complete_native)
    /// completes it. Returns its shape; `None` if it is not in flight (or native I/O has it already).
    pub fn begin_native(&self, ticket: Ticket) -> Option<Shape> {
        let mut r = self.ring.lock();
        Slot::of(&r.slots, self.index, ticket, false)?;
        let s = &mut r.slots[usize::from(ticket.slot())];
        s.native = true;
        Some(s.shape)
    }

    /// Copies the request's readable bytes (driver → device) from `offset` into `dst`. Returns how many
    /// were copied (fewer if the request has fewer), or `Gone` if the ticket died — before or during the
    /// copy: then `dst` holds a partial copy that must not be used.
    pub fn read_request(
        &self,
        ticket: Ticket,
        owner: Owner,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<usize, Gone> {
        self.copy(
            ticket,
            owner,
            Part::Readable,
            offset,
            dst.len(),
            |map, addr, at, n| map.read_into(addr, &mut dst[at..at + n]),
        )
    }

    /// Copies `src` into the request's writable bytes (device → driver) from `offset`. Returns how many
    /// were copied, or `Gone` if the ticket died (the part copied before lies in the request's buffers,
    /// which the driver will never read as this request's answer).
    pub fn write_request(
        &self,
        ticket: Ticket,
        owner: Owner,
        offset: u64,
        src: &[u8],
    ) -> Result<usize, Gone> {
        self.copy(
            ticket,
            owner,
            Part::Writable,
            offset,
            src.len(),
            |map, addr, at, n| map.write_from(addr, &src[at..at + n]),
        )
    }

    /// Walks `len` bytes of a request's `part` from `offset`, calling `f(map, guest address, position,
    /// length)` per piece, at most `COPY_CHUNK` bytes per hold of the lock and with the ticket checked at
    /// every hold: a fence between two chunks ends the copy (`Gone`), so nothing reaches the request's
    /// memory after it was fenced, and no control message waits long for the lock.
    fn copy(
        &self,
        ticket: Ticket,
        owner: Owner,
        part: Part,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&IotlbMap, u64, usize, usize) -> bool,
    ) -> Result<usize, Gone> {
        let mut done = 0usize;
        let mut want = None;
        loop {
            let r = self.ring.lock();
            let s = Slot::of(&r.slots, self.index, ticket, owner == Owner::Native).ok_or(Gone)?;
            let map = s.map.as_deref().ok_or(Gone)?;
            let (segs, total, _) = s.part(part);
            let want = *want.get_or_insert_with(|| total.saturating_sub(offset).min(len as u64) as usize);
            if done == want {
                return Ok(done);
            }
            let chunk = (want - done).min(COPY_CHUNK);
            let base = done;
            let moved = walk_bytes(segs, offset + base as u64, chunk as u64, |addr, at, n| {
                f(map, addr, base + at as usize, n as usize)
            }) as usize;
            done += moved;
            if moved < chunk {
                return Ok(done);
            }
        }
    }

    /// Copies `len` readable bytes of request `src` (from `src_offset`) straight into the writable bytes
    /// of request `dst` of another queue `to` (from `dst_offset`): one copy between two drivers' memories
    /// (a switch moving a frame between NICs). It is ticket-checked like [`read_request`](Self::read_request)
    /// and [`write_request`](Self::write_request) — both rings locked for each chunk of at most
    /// `COPY_CHUNK` bytes — so nothing reaches either request's memory after it was fenced or given back.
    /// The second lock is only tried while the first is held: a queue waiting for another device's ring
    /// never holds its own meanwhile, so neither device's message loop waits on the other's traffic beyond
    /// one chunk. Returns the bytes copied (fewer if either request is shorter), or `Gone` if either
    /// ticket died (or is not of its queue).
    pub fn copy_to_request(
        &self,
        src: Ticket,
        src_offset: u64,
        to: &Virtqueue,
        dst: Ticket,
        dst_offset: u64,
        len: usize,
    ) -> Result<usize, Gone> {
        if src.queue() != self.index || dst.queue() != to.index {
            return Err(Gone);
        }
        if std::ptr::eq(self, to) {
            // Never asked for (a queue's requests are all of one direction): through a bounce, by chunks.
            let mut bounce = vec![0u8; len.min(COPY_CHUNK)];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(COPY_CHUNK);
                let got = self.read_request(src, Owner::Model, src_offset + done as u64, &mut bounce[..n])?;
                let put = to.write_request(dst, Owner::Model, dst_offset + done as u64, &bounce[..got])?;
                done += put;
                if put < n {
                    break;
                }
            }
            return Ok(done);
        }
        let mut done = 0usize;
        let mut want = None;
        loop {
            let (r_src, r_dst) = self.lock_both(to);
            let s = Slot::of(&r_src.slots, self.index, src, false).ok_or(Gone)?;
            let d = Slot::of(&r_dst.slots, to.index, dst, false).ok_or(Gone)?;
            let (s_map, d_map) = (s.map.as_deref().ok_or(Gone)?, d.map.as_deref().ok_or(Gone)?);
            let (s_segs, s_total, _) = s.part(Part::Readable);
            let (d_segs, d_total, _) = d.part(Part::Writable);
            let want = *want.get_or_insert_with(|| {
                let room = d_total.saturating_sub(dst_offset);
                s_total.saturating_sub(src_offset).min(room).min(len as u64) as usize
            });
            if done == want {
                return Ok(done);
            }
            let chunk = ((want - done).min(COPY_CHUNK)) as u64;
            let base = done as u64;
            // Each readable piece, then the writable pieces its bytes go to.
            let moved = walk_bytes(s_segs, src_offset + base, chunk, |s_addr, at, n| {
                walk_bytes(d_segs, dst_offset + base + at, n, |d_addr, k, m| {
                    copy_between(s_map, s_addr + k, d_map, d_addr, m as usize)
                }) == n
            }) as usize;
            done += moved;
            if (moved as u64) < chunk {
                return Ok(done);
            }
        }
    }

    /// Locks this queue's ring and `to`'s: the second only by trying, with the first held; when it is
    /// busy, neither is held while waiting for it.
    fn lock_both<'a>(
        &'a self,
        to: &'a Virtqueue,
    ) -> (
        parking_lot::MutexGuard<'a, Ring>,
        parking_lot::MutexGuard<'a, Ring>,
    ) {
        loop {
            let mine = self.ring.lock();
            if let Some(theirs) = to.ring.try_lock() {
                return (mine, theirs);
            }
            drop(mine);
            drop(to.ring.lock());
        }
    }

    /// Host pointers for `len` bytes of the request's `part` from `offset`, for a system call that moves
    /// data straight between a file and the driver's buffers (a native read or write): appended to
    /// `pins`' ranges, with their mappings pinned and counted on this queue (the message loop does not
    /// answer the kernel or the VMM while they are: keep the call short, and release the pins when it
    /// returns). `Ok(false)` if the range is not wholly mapped
    /// with the access `part` needs (nothing is added); `Gone` if the ticket is not in flight.
    pub fn pin(
        &self,
        ticket: Ticket,
        owner: Owner,
        part: Part,
        offset: u64,
        len: u64,
        pins: &mut Pins,
    ) -> Result<bool, Gone> {
        let r = self.ring.lock();
        let s = Slot::of(&r.slots, self.index, ticket, owner == Owner::Native).ok_or(Gone)?;
        let map = s.map.as_deref().ok_or(Gone)?;
        let (segs, _, access) = s.part(part);
        let pinned = walk_bytes(segs, offset, len, |addr, _, n| {
            map.host_ranges_pinned(addr, n, access, pins)
        });
        if pinned < len {
            pins.release();
            return Ok(false);
        }
        // Counted under the ring lock, like the ticket check: a stop that fences this request next sees it.
        pins.count_in(&self.pinned);
        Ok(true)
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
        let map = self.map_or_break(&mut r, map);
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
        let map = self.map_or_break(&mut r, map);
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
            // A unit with a fenced buffer, or cut short (its end never came — even a unit of one that says
            // more follow), goes out as runts: no frame with a hole in it.
            let whole = terminated
                && (group.len() == 1
                    || group
                        .iter()
                        .all(|d| Slot::of(&r.slots, self.index, d.ticket, false).is_some()));
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
        if Slot::of(&r.slots, self.index, ticket, native).is_none() {
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
        r.held_segments -= slot.segments.len();
        self.trim_slot(slot, &mut r.slot_capacity);
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
        let map = self.map_or_break(&mut r, map);
        self.notify_locked(&mut r, &map);
    }

    /// For busy polling: stops the driver's notifications while the caller polls
    /// [`has_avail`](Self::has_avail) instead of sleeping. The next [`pop`](Self::pop) that finds the ring
    /// empty turns them back on and checks once more, so no request can slip between the two.
    pub fn suppress_notifications(&self) {
        let (mut r, map) = self.lock_fresh();
        let Some(map) = map else { return };
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
        let Some(map) = map else { return false };
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
