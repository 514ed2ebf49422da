//! Serving queues on the JavaScript thread.
//!
//! Each queue's kick eventfd is a libuv poll handle on Node's own loop. When the driver kicks, the poll
//! callback — on the JavaScript thread, no thread hop — pops and validates a bounded batch in Rust,
//! writes it into typed arrays JavaScript owns, and calls the model once for the whole batch. Completions
//! the model made synchronously are read back from another typed array and published right after the
//! call: one used-ring update per request, at most one interrupt per queue. Completions made later (a
//! backend's promise) go out together once per event-loop turn (`flush`).
//!
//! Batch format (all numbers, JavaScript-owned, reused for every batch):
//! - `reqs`: per request `[ticket, queue, readableBytes, writableBytes, headLength, features]` (`features`:
//!   the session's negotiated device features, bits 0–23);
//! - `heads`: per request the first 64 readable bytes (a virtio request header, without a copy call);
//! - `done`: per completion `[ticket, usedLength, status]` (`status` < 0: write no status byte; -2: and
//!   the next completion belongs to the same unit, a frame over several receive buffers — published
//!   together, see `Done::joined`);
//! - `ctl[0]`: how many completions `done` holds.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use napi::sys;
use vduse_core::forward::{Forward, Forwarded};
use vduse_core::queue::{Budget, Done, Owner, Pop, RequestBatch, Ticket, Virtqueue};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{native, Failure};
use crate::uv;

pub const HEAD_BYTES: usize = vduse_core::queue::HEAD_BYTES;
pub const REQ_FIELDS: usize = 6;
pub const DONE_FIELDS: usize = 3;
/// A `done` status: no status byte, and the next completion joins this one (see `Done::joined`).
const STATUS_JOINED: f64 = -2.0;
/// Pop rounds per wake-up before other events get their turn.
const ROUNDS: usize = 4;
/// Adaptive polling starts here when it turns on.
const POLL_START_NS: u64 = 4_000;
/// Polling pays at low queue depth only: there every request costs a wake-up, while a deeper load
/// batches requests during the wake-up itself, and polling would take them one by one (one JS call and
/// one interrupt each). A queue whose wake-ups find this many requests on average (×16, so 1.5) is
/// served without polling.
const DEEP_X16: u16 = 24;
/// While polling, one idle in this many sleeps instead, to measure the load again (what a wake-up finds).
const PROBE_EVERY: u32 = 32;
/// An automatic poll cap is this many times what serving a one-request wake-up costs here: polling pays
/// while the driver's next request comes within a few wake-ups' worth of our own work, and both scale
/// with the machine (88–114 µs measured on a native host's loopback, where QEMU's iothreads default to
/// 32 µs; the 1 ms clamp under TCG).
const AUTO_CAP_FACTOR: u64 = 16;
const AUTO_CAP_MIN_NS: u64 = 16_000;
/// The most any cap may be, explicit or automatic.
pub const POLL_CAP_MAX_NS: u64 = 1_000_000;

/// How long the JavaScript-thread server may poll a ring before it sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollCap {
    /// Never poll: every request costs a wake-up.
    Off,
    /// Up to this many nanoseconds (clamped to `POLL_CAP_MAX_NS`).
    Fixed(u64),
    /// Sized from this machine's measured cost of serving a wake-up (see `AUTO_CAP_FACTOR`).
    Auto,
}

/// A typed array JavaScript owns, kept alive by a reference while we use it. Its address is read again
/// before every use: JavaScript can detach (transfer) an ArrayBuffer, which would otherwise leave us a
/// dangling pointer.
struct JsArray<T> {
    ptr: Cell<*mut T>,
    len: Cell<usize>,
    kind: sys::napi_typedarray_type,
    reference: Cell<sys::napi_ref>,
}

/// The typed array's element type, data and length; `None` if `value` is not a typed array of `kind`
/// over a plain (non-shared) ArrayBuffer.
///
/// # Safety
/// `env` is the current environment and `value` one of its values.
pub unsafe fn typed_array<T>(
    env: sys::napi_env,
    value: sys::napi_value,
    kind: sys::napi_typedarray_type,
) -> Option<(*mut T, usize)> {
    let mut actual = 0;
    let mut len = 0usize;
    let mut data: *mut c_void = ptr::null_mut();
    let mut buffer = ptr::null_mut();
    let mut offset = 0usize;
    let mut is_plain = false;
    // SAFETY: forwarded from the caller; out-pointers are valid locals.
    unsafe {
        if sys::napi_get_typedarray_info(
            env,
            value,
            &mut actual,
            &mut len,
            &mut data,
            &mut buffer,
            &mut offset,
        ) != sys::Status::napi_ok
            || actual != kind
            || sys::napi_is_arraybuffer(env, buffer, &mut is_plain) != sys::Status::napi_ok
        {
            return None;
        }
    }
    // A SharedArrayBuffer is not an ArrayBuffer: another thread could write it while we do.
    if !is_plain
        || (len > 0 && (data.is_null() || !(data as usize).is_multiple_of(std::mem::align_of::<T>())))
    {
        return None;
    }
    Some((data.cast(), len))
}

impl<T> JsArray<T> {
    /// # Safety
    /// `env` is the current environment and `value` one of its values.
    unsafe fn new(
        env: sys::napi_env,
        value: sys::napi_value,
        kind: sys::napi_typedarray_type,
        what: &str,
    ) -> Result<Self, Failure> {
        // SAFETY: forwarded from the caller.
        let (ptr, len) = unsafe { typed_array::<T>(env, value, kind) }.ok_or_else(|| {
            native(format!(
                "{what} must be a typed array of the right kind, not shared"
            ))
        })?;
        let mut reference = ptr::null_mut();
        // SAFETY: a strong reference keeps the array alive.
        if unsafe { sys::napi_create_reference(env, value, 1, &mut reference) } != sys::Status::napi_ok {
            return Err(native("cannot reference a typed array"));
        }
        Ok(Self {
            ptr: Cell::new(ptr),
            len: Cell::new(len),
            kind,
            reference: Cell::new(reference),
        })
    }

    /// Reads the array's address and length again; false (and empty) if it was detached or released.
    ///
    /// # Safety
    /// `env` is the current environment, on its thread.
    unsafe fn refresh(&self, env: sys::napi_env) -> bool {
        let reference = self.reference.get();
        let mut value = ptr::null_mut();
        let found = !reference.is_null()
            // SAFETY: a live reference of this env.
            && unsafe { sys::napi_get_reference_value(env, reference, &mut value) } == sys::Status::napi_ok
            && !value.is_null();
        let array = if found {
            // SAFETY: `value` is a value of this env.
            unsafe { typed_array::<T>(env, value, self.kind) }
        } else {
            None
        };
        match array {
            Some((ptr, len)) => {
                self.ptr.set(ptr);
                self.len.set(len);
                len > 0
            }
            None => {
                self.len.set(0);
                false
            }
        }
    }

    /// # Safety
    /// As for `refresh`.
    unsafe fn release(&self, env: sys::napi_env) {
        let reference = self.reference.replace(ptr::null_mut());
        self.len.set(0);
        if !reference.is_null() {
            // SAFETY: our reference, deleted once.
            unsafe { sys::napi_delete_reference(env, reference) };
        }
    }

    fn len(&self) -> usize {
        self.len.get()
    }

    fn get(&self, i: usize) -> Option<T>
    where
        T: Copy,
    {
        // SAFETY: bounds checked against the length read at the last refresh, which happened after the
        // last time JavaScript ran; only this thread touches the array.
        (i < self.len()).then(|| unsafe { self.ptr.get().add(i).read() })
    }

    fn set(&self, i: usize, v: T) {
        if i < self.len() {
            // SAFETY: as in `get`.
            unsafe { self.ptr.get().add(i).write(v) };
        }
    }

    /// Lends elements `[start, start+n)` (clamped) to `f` for writing.
    fn with_slice<R>(&self, start: usize, n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
        let end = (start + n).min(self.len());
        let start = start.min(end);
        // SAFETY: in bounds of the last refresh; the array is only touched on the JS thread, never while
        // JavaScript runs, and the slice does not outlive `f`.
        f(unsafe { std::slice::from_raw_parts_mut(self.ptr.get().add(start), end - start) })
    }
}

/// The JavaScript side's typed arrays.
pub struct Arrays {
    reqs: JsArray<f64>,
    heads: JsArray<u8>,
    done: JsArray<f64>,
    ctl: JsArray<u32>,
}

impl Arrays {
    /// # Safety
    /// The values are a `Float64Array`, `Uint8Array`, `Float64Array` and `Uint32Array` of `env`.
    pub unsafe fn new(
        env: sys::napi_env,
        reqs: sys::napi_value,
        heads: sys::napi_value,
        done: sys::napi_value,
        ctl: sys::napi_value,
    ) -> Result<Self, Failure> {
        // SAFETY: forwarded from the caller.
        unsafe {
            Ok(Self {
                reqs: JsArray::new(env, reqs, sys::TypedarrayType::float64_array, "reqs")?,
                heads: JsArray::new(env, heads, sys::TypedarrayType::uint8_array, "heads")?,
                done: JsArray::new(env, done, sys::TypedarrayType::float64_array, "done")?,
                ctl: JsArray::new(env, ctl, sys::TypedarrayType::uint32_array, "ctl")?,
            })
        }
    }

    /// Requests per batch the arrays hold.
    pub fn capacity(&self) -> usize {
        (self.reqs.len() / REQ_FIELDS).min(self.heads.len() / HEAD_BYTES)
    }

    /// # Safety
    /// `env` is the current environment, on its thread.
    unsafe fn refresh(&self, env: sys::napi_env) -> bool {
        // SAFETY: forwarded.
        unsafe {
            self.reqs.refresh(env) & self.heads.refresh(env) & self.done.refresh(env) & self.ctl.refresh(env)
        }
    }

    /// # Safety
    /// As for `refresh`.
    unsafe fn release(&self, env: sys::napi_env) {
        // SAFETY: forwarded.
        unsafe {
            self.reqs.release(env);
            self.heads.release(env);
            self.done.release(env);
            self.ctl.release(env);
        }
    }
}

struct PollCtx {
    server: *const JsServer,
    queue: usize,
}

/// Serves a set of queues from the JavaScript thread. Owned through a [`ServerHandle`]: libuv's poll
/// handles point at it, so it lives at a fixed address (a leaked box) until the handle closes the polls.
pub struct JsServer {
    env: sys::napi_env,
    queues: Vec<Arc<Virtqueue>>,
    kicks: Vec<Arc<EventFd>>,
    on_batch: Cell<sys::napi_ref>,
    async_ctx: Cell<sys::napi_async_context>,
    arrays: Arrays,
    budget: Budget,
    batch: RefCell<RequestBatch>,
    touched: RefCell<Vec<bool>>,
    closed: Cell<bool>,
    /// Inside `serve`: JavaScript called back into us (a nested `serve` does nothing).
    serving: Cell<bool>,
    pub wakeups: Cell<u64>,
    pub js_calls: Cell<u64>,
    /// Adaptive polling (see `poll`): how long to poll now, the most it may grow to (fixed, or sized by
    /// `service_ns` when automatic), and per queue since when it has been waiting for a kick.
    poll_ns: Cell<u64>,
    poll_max_ns: Cell<u64>,
    poll_auto: bool,
    /// What serving a one-request wake-up costs (an EWMA with weight 1/8; 0 until measured).
    service_ns: Cell<u64>,
    idle_since: RefCell<Vec<Option<Instant>>>,
    /// Per queue, the requests a wake-up from sleep finds, averaged (×16; see `DEEP_X16`).
    depth_x16: Box<[Cell<u16>]>,
    /// Per queue, polls left before its next probe sleep.
    probe: Box<[Cell<u32>]>,
    /// Batches found by polling rather than by a kick.
    pub polled: Cell<u64>,
    /// Requests come from a native model (per queue) rather than from the rings: see `start_forwarded`.
    forward: Option<Vec<Arc<Forward>>>,
    forwarded: RefCell<Vec<Forwarded>>,
}

/// Owns a [`JsServer`] and its poll handles.
pub struct ServerHandle {
    server: std::ptr::NonNull<JsServer>,
    ctxs: Box<[PollCtx]>,
    polls: RefCell<Vec<uv::Poll>>,
}

impl std::ops::Deref for ServerHandle {
    type Target = JsServer;
    fn deref(&self) -> &JsServer {
        // SAFETY: the box leaked in `start` lives until `Drop` reclaims it; only shared references to it
        // are ever made.
        unsafe { self.server.as_ref() }
    }
}

impl JsServer {
    /// Creates the server and starts polling every queue's kick fd on Node's loop.
    ///
    /// # Safety
    /// `on_batch` is a function value of `env`; call on the JavaScript thread.
    pub unsafe fn start(
        env: sys::napi_env,
        queues: Vec<Arc<Virtqueue>>,
        kicks: Vec<Arc<EventFd>>,
        arrays: Arrays,
        on_batch: sys::napi_value,
        poll: PollCap,
    ) -> Result<ServerHandle, Failure> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::launch(env, queues, kicks, arrays, on_batch, poll, None) }
    }

    /// Creates a server of the requests a native model forwards (one [`Forward`] per queue, e.g. a
    /// virtio-fs router's): it waits on their eventfds instead of the kicks, and never pops a ring.
    /// Batches and completions are as for [`start`](Self::start); the requests stay owned by the model.
    ///
    /// # Safety
    /// As for `start`.
    pub unsafe fn start_forwarded(
        env: sys::napi_env,
        queues: Vec<Arc<Virtqueue>>,
        forward: Vec<Arc<Forward>>,
        arrays: Arrays,
        on_batch: sys::napi_value,
    ) -> Result<ServerHandle, Failure> {
        if forward.len() != queues.len() {
            return Err(native("one forward per queue"));
        }
        let wakes = forward
            .iter()
            .map(|f| f.wake_fd().try_clone().map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| native(format!("eventfd: {e}")))?;
        // SAFETY: forwarded from the caller.
        unsafe { Self::launch(env, queues, wakes, arrays, on_batch, PollCap::Off, Some(forward)) }
    }

    /// # Safety
    /// As for `start`.
    unsafe fn launch(
        env: sys::napi_env,
        queues: Vec<Arc<Virtqueue>>,
        kicks: Vec<Arc<EventFd>>,
        arrays: Arrays,
        on_batch: sys::napi_value,
        poll: PollCap,
        forward: Option<Vec<Arc<Forward>>>,
    ) -> Result<ServerHandle, Failure> {
        let capacity = arrays.capacity();
        if capacity == 0 || arrays.done.len() < DONE_FIELDS || arrays.ctl.len() < 1 {
            return Err(native("batch arrays are too small"));
        }
        let mut on_batch_ref = ptr::null_mut();
        let mut async_ctx = ptr::null_mut();
        let mut name = ptr::null_mut();
        let mut lp: *mut sys::uv_loop_s = ptr::null_mut();
        // SAFETY: plain N-API calls on the JS thread with valid out-pointers.
        unsafe {
            if sys::napi_create_reference(env, on_batch, 1, &mut on_batch_ref) != sys::Status::napi_ok {
                return Err(native("onBatch must be a function"));
            }
            sys::napi_create_string_utf8(env, c"vduse:batch".as_ptr(), usize::MAX as isize, &mut name);
            if sys::napi_async_init(env, ptr::null_mut(), name, &mut async_ctx) != sys::Status::napi_ok {
                return Err(native("napi_async_init failed"));
            }
            if sys::napi_get_uv_event_loop(env, &mut lp) != sys::Status::napi_ok {
                return Err(native("cannot get the event loop"));
            }
        }
        let n = queues.len();
        let server = Box::into_raw(Box::new(Self {
            env,
            queues,
            kicks,
            on_batch: Cell::new(on_batch_ref),
            async_ctx: Cell::new(async_ctx),
            arrays,
            budget: Budget {
                requests: capacity,
                descriptors: capacity * 64,
            },
            batch: RefCell::new(RequestBatch::default()),
            touched: RefCell::new(vec![false; n]),
            closed: Cell::new(false),
            serving: Cell::new(false),
            wakeups: Cell::new(0),
            js_calls: Cell::new(0),
            poll_ns: Cell::new(0),
            poll_max_ns: Cell::new(match poll {
                PollCap::Off => 0,
                PollCap::Fixed(ns) => ns.min(POLL_CAP_MAX_NS),
                PollCap::Auto => AUTO_CAP_MIN_NS,
            }),
            poll_auto: poll == PollCap::Auto,
            service_ns: Cell::new(0),
            idle_since: RefCell::new(vec![None; n]),
            depth_x16: (0..n).map(|_| Cell::new(16)).collect(),
            probe: (0..n).map(|_| Cell::new(PROBE_EVERY)).collect(),
            polled: Cell::new(0),
            forward,
            forwarded: RefCell::new(Vec::new()),
        }));
        let handle = ServerHandle {
            // SAFETY: from Box::into_raw, never null.
            server: unsafe { std::ptr::NonNull::new_unchecked(server) },
            ctxs: (0..n).map(|queue| PollCtx { server, queue }).collect(),
            polls: RefCell::new(Vec::new()),
        };
        let mut polls = Vec::new();
        for (ctx, kick) in handle.ctxs.iter().zip(&handle.kicks) {
            let data = (ctx as *const PollCtx).cast_mut().cast::<c_void>();
            use std::os::fd::AsRawFd;
            // SAFETY: our thread's loop; `data` lives in `handle.ctxs` until the handle closes the polls.
            let poll = unsafe { uv::Poll::start(lp.cast(), kick.as_raw_fd(), data, on_kick) };
            match poll {
                Ok(p) => polls.push(p),
                Err(e) => {
                    for p in polls {
                        p.close();
                    }
                    return Err(native(format!("uv_poll_start: {e}")));
                }
            }
        }
        *handle.polls.borrow_mut() = polls;
        Ok(handle)
    }

    /// Serves queue `q` now (the poll callback does this on a kick). Re-entered from JavaScript (a model
    /// that calls back into the binding), it does nothing.
    pub fn serve(&self, q: usize) {
        if self.closed.get() || self.serving.replace(true) {
            return;
        }
        // Reading our references creates handles: a libuv callback has no scope of its own.
        let mut scope = ptr::null_mut();
        // SAFETY: on the JS thread; the scope is closed below.
        unsafe { sys::napi_open_handle_scope(self.env, &mut scope) };
        self.serve_rounds(q);
        // SAFETY: the scope opened above.
        unsafe { sys::napi_close_handle_scope(self.env, scope) };
        self.serving.set(false);
    }

    fn serve_rounds(&self, q: usize) {
        if let Some(forward) = &self.forward {
            return self.serve_forwarded(q, forward);
        }
        let (Some(vq), Some(kick)) = (self.queues.get(q), self.kicks.get(q)) else {
            return;
        };
        let _ = kick.read();
        vq.kicked();
        self.wakeups.set(self.wakeups.get() + 1);
        // Polling is off unless asked for: then not even a clock read per wake-up.
        let polling = self.poll_max_ns.get() > 0;
        let woke = polling.then(Instant::now);
        // A wake-up from sleep: what it finds measures the load (see `may_poll`).
        let mut measure = false;
        if polling {
            let slept = self.idle_since.borrow_mut()[q].take();
            if let Some(since) = slept {
                self.adapt(since.elapsed());
                measure = true;
            }
        }
        let mut polled = false;
        // JavaScript may have run since the arrays were last read (it can detach them): read them again
        // before the first fill, and after every call into it.
        let mut fresh = false;
        let mut rounds = 0;
        while rounds < ROUNDS {
            rounds += 1;
            let (more, count) = {
                let mut batch = self.batch.borrow_mut();
                let more = vq.pop(self.budget, &mut batch);
                if batch.is_empty() {
                    (more, 0)
                } else {
                    if !fresh {
                        // SAFETY: the JS thread, our env.
                        if !unsafe { self.arrays.refresh(self.env) } {
                            // Popped requests must not stay in flight with nobody to complete them (a
                            // reset would wait its whole drain timeout for them): they fail as the
                            // device fails what it cannot serve (virtio-blk: IOERR — never a bare
                            // completion whose stale status byte the driver would take for success).
                            vq.complete_all(batch.iter().map(|req| vq.failure(req.ticket)));
                            drop(batch);
                            self.fail(
                                "the batch arrays were detached or released; the device cannot deliver requests",
                            );
                            return;
                        }
                        fresh = true;
                    }
                    (more, self.fill(&batch, vq.features()))
                }
            };
            if count > 0 {
                if std::mem::take(&mut measure) {
                    self.measure(q, count);
                }
                self.call(q, count);
                fresh = false;
                if self.closed.get() {
                    return;
                }
                self.flush();
                // The cost of a latency-bound wake-up (one request, first round) sizes an automatic cap.
                if let (true, 1, 1, Some(t)) = (self.poll_auto, rounds, count, woke) {
                    self.size_cap(t.elapsed());
                }
            }
            match more {
                Pop::More => {}
                // A completion writes the kick fd.
                Pop::Full => return,
                Pop::Idle if !polled && self.poll_ns.get() > 0 && self.may_poll(q) => {
                    // Poll a while instead of sleeping; either way, pop once more: it turns the
                    // notifications back on (when the ring is empty) and catches what raced with that.
                    polled = true;
                    if self.poll(q) {
                        self.polled.set(self.polled.get() + 1);
                        polled = false;
                    }
                }
                Pop::Idle => {
                    if polling {
                        self.idle_since.borrow_mut()[q] = Some(Instant::now());
                    }
                    return; // wait for a kick
                }
            }
        }
        // The budget ran out: continue after the other events of this loop turn.
        let _ = kick.write(1);
    }

    /// Serves what the model forwarded for queue `q`, in bounded rounds like `serve_rounds`.
    fn serve_forwarded(&self, q: usize, forward: &[Arc<Forward>]) {
        let (Some(vq), Some(kick), Some(from)) = (self.queues.get(q), self.kicks.get(q), forward.get(q))
        else {
            return;
        };
        let _ = kick.read();
        self.wakeups.set(self.wakeups.get() + 1);
        for _ in 0..ROUNDS {
            let (more, count) = {
                let mut reqs = self.forwarded.borrow_mut();
                let more = from.take(self.budget.requests, &mut reqs);
                // Fenced since they were forwarded (a reset, a memory change): nobody waits for them, and
                // a model must never act on one (a stale DESTROY would end the next session).
                reqs.retain(|r| vq.is_live(r.ticket));
                if reqs.is_empty() {
                    if more {
                        continue;
                    }
                    return;
                }
                // SAFETY: the JS thread, our env.
                if !unsafe { self.arrays.refresh(self.env) } {
                    vq.complete_all(reqs.drain(..).map(|r| vq.failure(r.ticket)));
                    drop(reqs);
                    self.fail(
                        "the batch arrays were detached or released; the device cannot deliver requests",
                    );
                    return;
                }
                let count = self.fill_from(reqs.iter().map(|r| (r.ticket, r.shape, r.header(), r.features)));
                reqs.clear();
                (more, count)
            };
            self.call(q, count);
            if self.closed.get() {
                return;
            }
            self.flush();
            if !more {
                return;
            }
        }
        // The budget ran out: continue after the other events of this loop turn.
        let _ = kick.write(1);
    }

    /// An automatic cap follows what a one-request wake-up costs to serve (kick read to completions
    /// published), `AUTO_CAP_FACTOR` times, clamped.
    fn size_cap(&self, served: Duration) {
        // A sample past what saturates the cap (a GC pause, a preemption) counts as just that much.
        let sample = served
            .as_nanos()
            .min(u128::from(POLL_CAP_MAX_NS / AUTO_CAP_FACTOR)) as u64;
        let ewma = match self.service_ns.get() {
            0 => sample,
            e => e - e / 8 + sample / 8,
        };
        self.service_ns.set(ewma);
        let cap = (ewma * AUTO_CAP_FACTOR).clamp(AUTO_CAP_MIN_NS, POLL_CAP_MAX_NS);
        self.poll_max_ns.set(cap);
        if self.poll_ns.get() > cap {
            self.poll_ns.set(cap);
        }
    }

    /// The most polling may take now (ns; 0: polling is off).
    pub fn poll_cap_ns(&self) -> u64 {
        self.poll_max_ns.get()
    }

    /// Polls queue `q`'s avail ring for up to the current poll time, with its notifications suppressed.
    /// Returns whether the driver made requests available meanwhile. Gives up early when another queue
    /// has requests: they wait for this same thread.
    fn poll(&self, q: usize) -> bool {
        let ns = self.poll_ns.get();
        let Some(vq) = self.queues.get(q) else {
            return false;
        };
        if ns == 0 {
            return false;
        }
        vq.suppress_notifications();
        let deadline = Instant::now() + Duration::from_nanos(ns);
        loop {
            if vq.has_avail() {
                return true;
            }
            if Instant::now() >= deadline
                || self
                    .queues
                    .iter()
                    .enumerate()
                    .any(|(i, other)| i != q && other.has_avail())
            {
                return false;
            }
            // Yield, not spin: on a busy machine the work that produces the next request (the driver's
            // process, the kernel's interrupt worker) may be waiting for this very CPU.
            std::thread::yield_now();
        }
    }

    /// Folds what a wake-up from sleep found into the queue's average (an EWMA with weight 1/8).
    fn measure(&self, q: usize, count: usize) {
        let d = &self.depth_x16[q];
        let found = count.min(64) as u16 * 16;
        d.set(d.get() - d.get() / 8 + found / 8);
    }

    /// Whether queue `q` polls now: only at low depth, only while no queue of this server has a request
    /// the model still has to complete, and not on a probe (one idle in `PROBE_EVERY` sleeps, so that the
    /// next wake-up measures the load again — polling itself hides it).
    ///
    /// A request the model still holds belongs to an asynchronous backend (a socket, a promise): its
    /// completion arrives as an event on this very loop, which polling would only delay. Requests handed
    /// to native I/O complete on its own threads and do not count.
    fn may_poll(&self, q: usize) -> bool {
        if self.depth_x16[q].get() >= DEEP_X16 || self.queues.iter().any(|vq| vq.awaits_model()) {
            return false;
        }
        let probe = &self.probe[q];
        match probe.get() {
            0 => {
                probe.set(PROBE_EVERY);
                false
            }
            p => {
                probe.set(p - 1);
                true
            }
        }
    }

    /// Adaptive polling, as QEMU's event loop does it: a kick that came soon after polling gave up means a
    /// longer poll would have caught it (grow, up to the maximum); a long sleep means polling is wasted
    /// here (shrink).
    fn adapt(&self, slept: Duration) {
        let max = self.poll_max_ns.get();
        let slept = slept.as_nanos() as u64;
        let ns = self.poll_ns.get();
        if slept <= max {
            self.poll_ns.set(((ns * 2).max(POLL_START_NS)).min(max));
        } else if ns > 0 {
            self.poll_ns.set(if ns / 2 < POLL_START_NS { 0 } else { ns / 2 });
        }
    }

    /// Reports a failure of the serving machinery itself as an uncaught exception (like any bug).
    fn fail(&self, message: &str) {
        let env = self.env;
        // SAFETY: N-API calls on the JS thread with valid out-pointers.
        unsafe {
            let mut scope = ptr::null_mut();
            sys::napi_open_handle_scope(env, &mut scope);
            let mut msg = ptr::null_mut();
            let mut err = ptr::null_mut();
            sys::napi_create_string_utf8(env, message.as_ptr().cast(), message.len() as isize, &mut msg);
            sys::napi_create_error(env, ptr::null_mut(), msg, &mut err);
            sys::napi_fatal_exception(env, err);
            sys::napi_close_handle_scope(env, scope);
        }
    }

    /// Writes the batch into the JavaScript arrays; returns how many requests it holds.
    fn fill(&self, batch: &RequestBatch, features: u64) -> usize {
        self.fill_from(
            batch
                .iter()
                .map(|req| (req.ticket, req.shape, req.header, features)),
        )
    }

    /// Writes requests (ticket, shape, first readable bytes, the session's features when it was popped)
    /// into the JavaScript arrays; returns how many.
    fn fill_from<'h>(
        &self,
        reqs: impl Iterator<Item = (Ticket, vduse_core::chain::Shape, &'h [u8], u64)>,
    ) -> usize {
        let a = &self.arrays;
        let mut n = 0;
        for (ticket, shape, header, features) in reqs {
            // The session's device features (bits 0–23, exact in a double): requests carry them, so a
            // model never reads a request with the features of another session.
            let features = (features & 0xff_ffff) as f64;
            let r = n * REQ_FIELDS;
            // The header was copied when the request was popped, under the queue lock.
            let at = a.heads.with_slice(n * HEAD_BYTES, header.len(), |dst| {
                let k = dst.len();
                dst.copy_from_slice(&header[..k]);
                k
            });
            a.reqs.set(r, ticket.raw() as f64);
            a.reqs.set(r + 1, f64::from(ticket.queue()));
            a.reqs.set(r + 2, f64::from(shape.readable_bytes));
            a.reqs.set(r + 3, f64::from(shape.writable_bytes));
            a.reqs.set(r + 4, at as f64);
            a.reqs.set(r + 5, features);
            n += 1;
        }
        n
    }

    fn call(&self, queue: usize, count: usize) {
        let on_batch = self.on_batch.get();
        if on_batch.is_null() {
            return;
        }
        self.js_calls.set(self.js_calls.get() + 1);
        let env = self.env;
        // SAFETY: N-API calls on the JS thread, inside a handle scope; values are from this env.
        unsafe {
            let mut scope = ptr::null_mut();
            sys::napi_open_handle_scope(env, &mut scope);
            let mut func = ptr::null_mut();
            let mut recv = ptr::null_mut();
            let mut args = [ptr::null_mut(); 2];
            sys::napi_get_reference_value(env, on_batch, &mut func);
            sys::napi_get_global(env, &mut recv);
            sys::napi_create_uint32(env, queue as u32, &mut args[0]);
            sys::napi_create_uint32(env, count as u32, &mut args[1]);
            let mut result = ptr::null_mut();
            // make_callback: async hooks see it, and microtasks run when it returns (we are the bottom
            // of the stack here).
            let status = sys::napi_make_callback(
                env,
                self.async_ctx.get(),
                recv,
                func,
                2,
                args.as_ptr(),
                &mut result,
            );
            if status == sys::Status::napi_pending_exception {
                // The TypeScript side catches model errors itself; anything else is a bug that must
                // surface like any uncaught exception.
                let mut err = ptr::null_mut();
                sys::napi_get_and_clear_last_exception(env, &mut err);
                sys::napi_fatal_exception(env, err);
            }
            sys::napi_close_handle_scope(env, scope);
        }
    }

    /// Publishes what JavaScript completed since the last flush: per queue one lock, and at most one
    /// interrupt.
    pub fn flush(&self) {
        if self.closed.get() {
            return;
        }
        // SAFETY: called on the JS thread (poll callbacks and napi methods), our env.
        let fresh = unsafe { self.arrays.done.refresh(self.env) & self.arrays.ctl.refresh(self.env) };
        if !fresh {
            return;
        }
        let a = &self.arrays;
        let n = (a.ctl.get(0).unwrap_or(0) as usize).min(a.done.len() / DONE_FIELDS);
        if n == 0 {
            return;
        }
        self.check_units(n);
        let entry = |i: usize| -> Option<Done> {
            let d = i * DONE_FIELDS;
            let ticket = Ticket::from_raw(a.done.get(d)? as u64);
            let used = a.done.get(d + 1)?.clamp(0.0, f64::from(u32::MAX)) as u32;
            let status = a.done.get(d + 2)?;
            Some(Done {
                ticket,
                used_len: used,
                status: (status >= 0.0).then_some(status as u8),
                joined: status == STATUS_JOINED,
            })
        };
        if self.queues.len() == 1 {
            self.queues[0].complete_all((0..n).filter_map(entry));
        } else {
            let mut touched = self.touched.borrow_mut();
            for i in 0..n {
                if let Some(d) = entry(i) {
                    if let Some(flag) = touched.get_mut(usize::from(d.ticket.queue())) {
                        *flag = true;
                    }
                }
            }
            for (q, flag) in touched.iter_mut().enumerate() {
                if std::mem::take(flag) {
                    let q16 = q as u16;
                    self.queues[q].complete_all((0..n).filter_map(entry).filter(|d| d.ticket.queue() == q16));
                }
            }
        }
        a.ctl.set(0, 0);
    }

    /// A unit of joined completions must be whole in one flush and on one queue (a frame over one queue's
    /// receive buffers); one that is not — cut off at the end, or spread over queues, which the per-queue
    /// publish below would tear apart — is turned into runts (length 0, no unit) in place.
    fn check_units(&self, n: usize) {
        let a = &self.arrays;
        let queue_of = |i: usize| {
            a.done
                .get(i * DONE_FIELDS)
                .map(|t| Ticket::from_raw(t as u64).queue())
        };
        let joined = |i: usize| a.done.get(i * DONE_FIELDS + 2) == Some(STATUS_JOINED);
        let mut start = 0;
        while start < n {
            let mut end = start;
            let mut sound = true;
            while joined(end) {
                end += 1;
                if end == n {
                    sound = false; // its last member never came
                    end = n - 1;
                    break;
                }
                sound &= queue_of(end) == queue_of(start);
            }
            if !sound {
                for i in start..=end {
                    a.done.set(i * DONE_FIELDS + 1, 0.0);
                    a.done.set(i * DONE_FIELDS + 2, -1.0);
                }
            }
            start = end + 1;
        }
    }

    /// Inside `serve` (JavaScript is handling a batch).
    pub fn is_serving(&self) -> bool {
        self.serving.get()
    }
}

impl ServerHandle {
    /// Stops serving and lets go of everything JavaScript (the model and its arrays): no callback runs
    /// after this, and the device object can be collected. Safe inside `onBatch` (the server itself stays
    /// until the handle is dropped).
    pub fn close(&self) {
        let server: &JsServer = self;
        if server.closed.replace(true) {
            return;
        }
        for p in self.polls.borrow_mut().drain(..) {
            p.close();
        }
        let env = server.env;
        // SAFETY: on the JS thread (napi methods and finalizers run there); our references, deleted once.
        unsafe {
            let r = server.on_batch.replace(ptr::null_mut());
            if !r.is_null() {
                sys::napi_delete_reference(env, r);
            }
            let ctx = server.async_ctx.replace(ptr::null_mut());
            if !ctx.is_null() {
                sys::napi_async_destroy(env, ctx);
            }
            server.arrays.release(env);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.close();
        // SAFETY: the polls are closed (no callback will dereference the server any more), and this is the
        // only owner of the leaked box.
        drop(unsafe { Box::from_raw(self.server.as_ptr()) });
    }
}

unsafe extern "C" fn on_kick(handle: *mut uv::Handle, status: std::ffi::c_int, _events: std::ffi::c_int) {
    if status < 0 {
        return;
    }
    // SAFETY: `data` is the PollCtx set in `start`, alive until the poll is closed; the server it points
    // at outlives its polls (the handle closes them before freeing it).
    let ctx = unsafe { &*((*handle).data as *const PollCtx) };
    // SAFETY: as above.
    let server = unsafe { &*ctx.server };
    server.serve(ctx.queue);
}

/// Copies from the request's readable buffers (driver → device), `offset` bytes in, into `dst`: the bytes
/// copied, or -1 if the ticket is not in flight (completed or fenced — also if it died mid-copy).
pub fn copy_out(queue: &Virtqueue, ticket: Ticket, offset: u64, dst: &mut [u8]) -> f64 {
    queue
        .read_request(ticket, Owner::Model, offset, dst)
        .map_or(-1.0, |n| n as f64)
}

/// Copies `src` into the request's writable buffers (device → driver), `offset` bytes in.
pub fn copy_in(queue: &Virtqueue, ticket: Ticket, offset: u64, src: &[u8]) -> f64 {
    queue
        .write_request(ticket, Owner::Model, offset, src)
        .map_or(-1.0, |n| n as f64)
}
