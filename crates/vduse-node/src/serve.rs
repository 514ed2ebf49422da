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
//! - `reqs`: per request `[ticket, queue, readableBytes, writableBytes, headLength, 0]`;
//! - `heads`: per request the first 64 readable bytes (a virtio request header, without a copy call);
//! - `done`: per completion `[ticket, usedLength, status]` (`status` < 0: write no status byte);
//! - `ctl[0]`: how many completions `done` holds.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;

use napi::sys;
use vduse_core::queue::{Budget, Pop, RequestBatch, Ticket, Virtqueue};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{native, NativeError};
use crate::uv;

pub const HEAD_BYTES: usize = 64;
pub const REQ_FIELDS: usize = 6;
pub const DONE_FIELDS: usize = 3;
/// Pop rounds per wake-up before other events get their turn.
const ROUNDS: usize = 4;

/// A typed array JavaScript owns, kept alive by a reference while we read or write it.
struct JsArray<T> {
    ptr: *mut T,
    len: usize,
    reference: sys::napi_ref,
}

impl<T> JsArray<T> {
    /// # Safety
    /// `value` is a typed array of `T` elements, and `env` the current environment.
    unsafe fn new(env: sys::napi_env, value: sys::napi_value) -> Result<Self, NativeError> {
        let mut kind = 0;
        let mut len = 0usize;
        let mut data: *mut c_void = ptr::null_mut();
        let mut buffer = ptr::null_mut();
        let mut offset = 0usize;
        // SAFETY: the caller passes a typed array value of this env.
        let status = unsafe {
            sys::napi_get_typedarray_info(
                env,
                value,
                &mut kind,
                &mut len,
                &mut data,
                &mut buffer,
                &mut offset,
            )
        };
        if status != sys::Status::napi_ok {
            return Err(native("expected a typed array"));
        }
        if len * std::mem::size_of::<T>() > 0 && data.is_null() {
            return Err(native("typed array has no memory"));
        }
        let mut reference = ptr::null_mut();
        // SAFETY: a strong reference keeps the array (and its backing store, which never moves) alive.
        let status = unsafe { sys::napi_create_reference(env, value, 1, &mut reference) };
        if status != sys::Status::napi_ok {
            return Err(native("cannot reference a typed array"));
        }
        Ok(Self {
            ptr: data.cast(),
            len,
            reference,
        })
    }

    fn get(&self, i: usize) -> Option<T>
    where
        T: Copy,
    {
        // SAFETY: bounds checked; the array is alive (referenced) and only touched on the JS thread.
        (i < self.len).then(|| unsafe { self.ptr.add(i).read() })
    }

    fn set(&self, i: usize, v: T) {
        if i < self.len {
            // SAFETY: as in `get`.
            unsafe { self.ptr.add(i).write(v) };
        }
    }

    /// Lends elements `[start, start+n)` (clamped) to `f` for writing.
    fn with_slice<R>(&self, start: usize, n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
        let end = (start + n).min(self.len);
        let start = start.min(end);
        // SAFETY: in bounds; the array is only touched on the JS thread, never while JavaScript runs, and
        // the slice does not outlive `f`.
        f(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) })
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
    ) -> Result<Self, NativeError> {
        // SAFETY: forwarded from the caller.
        unsafe {
            Ok(Self {
                reqs: JsArray::new(env, reqs)?,
                heads: JsArray::new(env, heads)?,
                done: JsArray::new(env, done)?,
                ctl: JsArray::new(env, ctl)?,
            })
        }
    }

    /// Requests per batch the arrays hold.
    pub fn capacity(&self) -> usize {
        (self.reqs.len / REQ_FIELDS).min(self.heads.len / HEAD_BYTES)
    }
}

struct PollCtx {
    server: *const JsServer,
    queue: usize,
}

/// Serves a set of queues from the JavaScript thread. Lives in a `Box` (polls point at it) owned by a
/// binding object; [`close`](Self::close) stops it before it goes.
pub struct JsServer {
    env: sys::napi_env,
    queues: Vec<Arc<Virtqueue>>,
    kicks: Vec<Arc<EventFd>>,
    /// One per queue; a boxed slice never moves, and the poll handles point into it.
    ctxs: Box<[PollCtx]>,
    polls: RefCell<Vec<uv::Poll>>,
    on_batch: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    arrays: Arrays,
    budget: Budget,
    batch: RefCell<RequestBatch>,
    touched: RefCell<Vec<bool>>,
    closed: Cell<bool>,
    pub wakeups: Cell<u64>,
    pub js_calls: Cell<u64>,
}

impl JsServer {
    /// # Safety
    /// `on_batch` is a function value of `env`; call on the JavaScript thread.
    pub unsafe fn new(
        env: sys::napi_env,
        queues: Vec<Arc<Virtqueue>>,
        kicks: Vec<Arc<EventFd>>,
        arrays: Arrays,
        on_batch: sys::napi_value,
    ) -> Result<Box<Self>, NativeError> {
        let capacity = arrays.capacity();
        if capacity == 0 || arrays.done.len < DONE_FIELDS || arrays.ctl.len < 1 {
            return Err(native("batch arrays are too small"));
        }
        let mut on_batch_ref = ptr::null_mut();
        let mut async_ctx = ptr::null_mut();
        let mut name = ptr::null_mut();
        // SAFETY: plain N-API calls on the JS thread with valid out-pointers.
        unsafe {
            if sys::napi_create_reference(env, on_batch, 1, &mut on_batch_ref) != sys::Status::napi_ok {
                return Err(native("onBatch must be a function"));
            }
            sys::napi_create_string_utf8(env, c"vduse:batch".as_ptr(), usize::MAX as isize, &mut name);
            if sys::napi_async_init(env, ptr::null_mut(), name, &mut async_ctx) != sys::Status::napi_ok {
                return Err(native("napi_async_init failed"));
            }
        }
        let n = queues.len();
        let server = Box::new(Self {
            env,
            queues,
            kicks,
            ctxs: Box::new([]),
            polls: RefCell::new(Vec::new()),
            on_batch: on_batch_ref,
            async_ctx,
            arrays,
            budget: Budget {
                requests: capacity,
                descriptors: capacity * 64,
            },
            batch: RefCell::new(RequestBatch::default()),
            touched: RefCell::new(vec![false; n]),
            closed: Cell::new(false),
            wakeups: Cell::new(0),
            js_calls: Cell::new(0),
        });
        Ok(server)
    }

    /// Starts polling every queue's kick fd on Node's loop.
    pub fn start(self: &mut Box<Self>) -> Result<(), NativeError> {
        let mut lp: *mut sys::uv_loop_s = ptr::null_mut();
        // SAFETY: the env is alive and this is its thread.
        if unsafe { sys::napi_get_uv_event_loop(self.env, &mut lp) } != sys::Status::napi_ok {
            return Err(native("cannot get the event loop"));
        }
        let me: *const JsServer = &**self;
        self.ctxs = (0..self.queues.len())
            .map(|queue| PollCtx { server: me, queue })
            .collect();
        let mut polls = Vec::new();
        for (ctx, kick) in self.ctxs.iter().zip(&self.kicks) {
            let data = (ctx as *const PollCtx).cast_mut().cast::<c_void>();
            use std::os::fd::AsRawFd;
            // SAFETY: our thread's loop; `data` lives in `self.ctxs` until `close` closes the polls.
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
        *self.polls.borrow_mut() = polls;
        Ok(())
    }

    /// Stops serving: no callback runs after this. Requests JavaScript holds can still be completed.
    pub fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        for p in self.polls.borrow_mut().drain(..) {
            p.close();
        }
    }

    /// Serves queue `q` now (the poll callback does this on a kick).
    pub fn serve(&self, q: usize) {
        if self.closed.get() {
            return;
        }
        let (Some(vq), Some(kick)) = (self.queues.get(q), self.kicks.get(q)) else {
            return;
        };
        let _ = kick.read();
        vq.kicked();
        self.wakeups.set(self.wakeups.get() + 1);
        for _ in 0..ROUNDS {
            let (more, count) = {
                let mut batch = self.batch.borrow_mut();
                let more = vq.pop(self.budget, &mut batch);
                (more, self.fill(&batch))
            };
            if count > 0 {
                self.call(q, count);
                self.flush();
                if self.closed.get() {
                    return;
                }
            }
            if more != Pop::More {
                return; // Idle: wait for a kick; Full: a completion writes the kick fd
            }
        }
        // The budget ran out: continue after the other events of this loop turn.
        let _ = kick.write(1);
    }

    /// Writes the batch into the JavaScript arrays; returns how many requests it holds.
    fn fill(&self, batch: &RequestBatch) -> usize {
        let a = &self.arrays;
        let map = batch.memory();
        let mut n = 0;
        for req in batch.iter() {
            let r = n * REQ_FIELDS;
            let head = (req.shape.readable_bytes as usize).min(HEAD_BYTES);
            let at = a.heads.with_slice(n * HEAD_BYTES, head, |dst| {
                let mut at = 0;
                for seg in req.readable {
                    if at == dst.len() {
                        break;
                    }
                    let k = (seg.len as usize).min(dst.len() - at);
                    if !map.read_into(seg.addr, &mut dst[at..at + k]) {
                        break;
                    }
                    at += k;
                }
                at
            });
            a.reqs.set(r, req.ticket.raw() as f64);
            a.reqs.set(r + 1, f64::from(req.ticket.queue()));
            a.reqs.set(r + 2, f64::from(req.shape.readable_bytes));
            a.reqs.set(r + 3, f64::from(req.shape.writable_bytes));
            a.reqs.set(r + 4, at as f64);
            a.reqs.set(r + 5, 0.0);
            n += 1;
        }
        n
    }

    fn call(&self, queue: usize, count: usize) {
        self.js_calls.set(self.js_calls.get() + 1);
        let env = self.env;
        // SAFETY: N-API calls on the JS thread, inside a handle scope; values are from this env.
        unsafe {
            let mut scope = ptr::null_mut();
            sys::napi_open_handle_scope(env, &mut scope);
            let mut func = ptr::null_mut();
            let mut recv = ptr::null_mut();
            let mut args = [ptr::null_mut(); 2];
            sys::napi_get_reference_value(env, self.on_batch, &mut func);
            sys::napi_get_global(env, &mut recv);
            sys::napi_create_uint32(env, queue as u32, &mut args[0]);
            sys::napi_create_uint32(env, count as u32, &mut args[1]);
            let mut result = ptr::null_mut();
            // make_callback: async hooks see it, and microtasks run when it returns (we are the bottom
            // of the stack here).
            let status =
                sys::napi_make_callback(env, self.async_ctx, recv, func, 2, args.as_ptr(), &mut result);
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
        let a = &self.arrays;
        let n = (a.ctl.get(0).unwrap_or(0) as usize).min(a.done.len / DONE_FIELDS);
        if n == 0 {
            return;
        }
        let entry = |i: usize| -> Option<(Ticket, u32, Option<u8>)> {
            let d = i * DONE_FIELDS;
            let ticket = Ticket::from_raw(a.done.get(d)? as u64);
            let used = a.done.get(d + 1)?.clamp(0.0, f64::from(u32::MAX)) as u32;
            let status = a.done.get(d + 2)?;
            Some((ticket, used, (status >= 0.0).then_some(status as u8)))
        };
        if self.queues.len() == 1 {
            self.queues[0].complete_all((0..n).filter_map(entry));
        } else {
            let mut touched = self.touched.borrow_mut();
            for i in 0..n {
                if let Some((t, _, _)) = entry(i) {
                    if let Some(flag) = touched.get_mut(usize::from(t.queue())) {
                        *flag = true;
                    }
                }
            }
            for (q, flag) in touched.iter_mut().enumerate() {
                if std::mem::take(flag) {
                    let q16 = q as u16;
                    self.queues[q]
                        .complete_all((0..n).filter_map(entry).filter(|(t, _, _)| t.queue() == q16));
                }
            }
        }
        a.ctl.set(0, 0);
    }
}

impl Drop for JsServer {
    fn drop(&mut self) {
        self.close();
        // SAFETY: releasing what `new` created, on the JS thread (finalizers run there).
        unsafe {
            sys::napi_async_destroy(self.env, self.async_ctx);
            sys::napi_delete_reference(self.env, self.on_batch);
            for r in [
                self.arrays.reqs.reference,
                self.arrays.heads.reference,
                self.arrays.done.reference,
                self.arrays.ctl.reference,
            ] {
                sys::napi_delete_reference(self.env, r);
            }
        }
    }
}

unsafe extern "C" fn on_kick(handle: *mut uv::Handle, status: std::ffi::c_int, _events: std::ffi::c_int) {
    if status < 0 {
        return;
    }
    // SAFETY: `data` is the PollCtx set in `start`, alive until the poll is closed; the server it points
    // at outlives its polls (it closes them before it goes).
    let ctx = unsafe { &*((*handle).data as *const PollCtx) };
    // SAFETY: as above.
    let server = unsafe { &*ctx.server };
    server.serve(ctx.queue);
}

/// Walks `len` bytes of a request's readable (or writable) buffers from `offset`, handing each
/// contiguous piece to `f(map, guest address, position in the piece list, length)`. Returns the bytes
/// walked, or -1 if the ticket is not in flight (completed or fenced: its memory is out of reach).
fn walk(
    queue: &Virtqueue,
    ticket: Ticket,
    offset: u64,
    len: usize,
    writable: bool,
    mut f: impl FnMut(&vduse_core::memory::IotlbMap, u64, usize, usize) -> bool,
) -> f64 {
    let done = queue.with_request(ticket, |map, shape, segs| {
        let (segs, total) = if writable {
            (
                &segs[usize::from(shape.readable)..],
                u64::from(shape.writable_bytes),
            )
        } else {
            (
                &segs[..usize::from(shape.readable)],
                u64::from(shape.readable_bytes),
            )
        };
        if offset >= total {
            return 0usize;
        }
        let want = (len as u64).min(total - offset) as usize;
        let mut skip = offset;
        let mut at = 0usize;
        for seg in segs {
            if at == want {
                break;
            }
            let seg_len = u64::from(seg.len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let k = ((seg_len - skip) as usize).min(want - at);
            if !f(map, seg.addr + skip, at, k) {
                break;
            }
            at += k;
            skip = 0;
        }
        at
    });
    done.map_or(-1.0, |n| n as f64)
}

/// Copies from the request's readable buffers (driver → device), `offset` bytes in, into `dst`.
pub fn copy_out(queue: &Virtqueue, ticket: Ticket, offset: u64, dst: &mut [u8]) -> f64 {
    let len = dst.len();
    walk(queue, ticket, offset, len, false, |map, addr, at, k| {
        map.read_into(addr, &mut dst[at..at + k])
    })
}

/// Copies `src` into the request's writable buffers (device → driver), `offset` bytes in.
pub fn copy_in(queue: &Virtqueue, ticket: Ticket, offset: u64, src: &[u8]) -> f64 {
    walk(queue, ticket, offset, src.len(), true, |map, addr, at, k| {
        map.write_from(addr, &src[at..at + k])
    })
}
