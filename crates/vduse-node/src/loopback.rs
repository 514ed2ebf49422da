//! `BindingLoopback`: the JavaScript-thread serving path without a kernel — a driver thread fills a real
//! split ring and kicks; the JavaScript thread serves it exactly as it serves a VDUSE device. For the
//! boundary micro-benchmark (`npm run bench:boundary`) and host tests of the batch protocol.

use std::sync::Arc;

use napi::bindgen_prelude::{AsyncTask, Env, FnArgs, Function, Unknown};
use napi::JsValue;
use napi_derive::napi;
use vduse_core::loopback::Loopback;

use crate::device::{counters, poll_cap, BatchArrays, DeviceCounters, JsQueues};
use crate::error::{native, OrThrow};
use crate::serve::{Arrays, JsServer};

#[napi]
pub struct BindingLoopback {
    serving: JsQueues,
    lb: Arc<Loopback>,
}

#[napi(object)]
pub struct LoopbackReport {
    pub requests: f64,
    pub elapsed_ns: f64,
    pub interrupts: f64,
}

pub struct LoopbackRun {
    lb: Arc<Loopback>,
    total: u64,
    batch: u16,
}

impl napi::Task for LoopbackRun {
    type Output = vduse_core::loopback::LoopbackReport;
    type JsValue = LoopbackReport;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        // The JavaScript thread serves the queue (its poll sees the kicks); this thread only drives.
        Ok(self.lb.run(self.total, self.batch, || {}))
    }

    fn resolve(&mut self, _env: Env, r: Self::Output) -> napi::Result<LoopbackReport> {
        Ok(LoopbackReport {
            requests: r.requests as f64,
            elapsed_ns: r.elapsed.as_nanos() as f64,
            interrupts: r.interrupts as f64,
        })
    }
}

/// A one-queue loopback device served by JavaScript (`onBatch(queue, count)` as for `createDevice`).
#[napi]
pub fn create_loopback(
    env: Env,
    queue_size: u32,
    arrays: BatchArrays,
    on_batch: Function<FnArgs<(u32, u32)>, ()>,
    poll_auto: Option<bool>,
) -> napi::Result<BindingLoopback> {
    let lb = Arc::new(
        Loopback::new(queue_size.clamp(4, 32768) as u16)
            .map_err(native)
            .or_throw(&env)?,
    );
    // SAFETY: values from this call's arguments, on the JS thread.
    let arrays = unsafe {
        Arrays::new(
            env.raw(),
            arrays.reqs.raw(),
            arrays.heads.raw(),
            arrays.done.raw(),
            arrays.ctl.raw(),
        )
    }
    .or_throw(&env)?;
    // SAFETY: as above.
    let server = unsafe {
        JsServer::start(
            env.raw(),
            vec![lb.queue().clone()],
            vec![lb.kick_fd().clone()],
            arrays,
            on_batch.raw(),
            poll_cap(poll_auto, None),
        )
    }
    .or_throw(&env)?;
    Ok(BindingLoopback {
        serving: JsQueues {
            queues: vec![lb.queue().clone()],
            server: Some(server),
        },
        lb,
    })
}

#[napi]
impl BindingLoopback {
    #[napi(ts_args_type = "ticket: number, offset: number, dst: Uint8Array, at: number, length: number")]
    pub fn read(
        &self,
        env: Env,
        ticket: f64,
        offset: f64,
        dst: Unknown,
        at: u32,
        length: u32,
    ) -> napi::Result<f64> {
        self.serving.read(&env, ticket, offset, dst, at, length)
    }

    #[napi(ts_args_type = "ticket: number, offset: number, src: Uint8Array, at: number, length: number")]
    pub fn write(
        &self,
        env: Env,
        ticket: f64,
        offset: f64,
        src: Unknown,
        at: u32,
        length: u32,
    ) -> napi::Result<f64> {
        self.serving.write(&env, ticket, offset, src, at, length)
    }

    #[napi]
    pub fn flush(&self) {
        self.serving.flush();
    }

    #[napi]
    pub fn is_live(&self, ticket: f64) -> bool {
        self.serving.is_live(ticket)
    }

    /// Most requests in flight at once (the ring holds this many 3-buffer chains).
    #[napi]
    pub fn capacity(&self) -> u32 {
        u32::from(self.lb.capacity())
    }

    #[napi]
    pub fn counters(&self) -> DeviceCounters {
        let q = &self.lb.queue().stats;
        let stats = vduse_core::DeviceStats {
            kicks: q.kicks.load(std::sync::atomic::Ordering::Relaxed),
            batches: q.batches.load(std::sync::atomic::Ordering::Relaxed),
            requests: q.requests.load(std::sync::atomic::Ordering::Relaxed),
            completions: q.completions.load(std::sync::atomic::Ordering::Relaxed),
            interrupts: q.interrupts.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        };
        counters(stats, self.serving.server.as_deref(), None)
    }

    /// Drives `total` requests through, `batch` per kick, from a libuv worker; resolves with the timing.
    #[napi]
    pub fn run(&self, total: f64, batch: u32) -> AsyncTask<LoopbackRun> {
        AsyncTask::new(LoopbackRun {
            lb: self.lb.clone(),
            total: total as u64,
            batch: batch.min(u32::from(u16::MAX)) as u16,
        })
    }

    /// Like `run`, but the driver runs on this thread and the queue is served right after each kick:
    /// no thread wake-ups at all, so the time is the boundary's own cost (pop and validate in Rust, one
    /// model call per batch, completions).
    #[napi]
    pub fn run_inline(&self, total: f64, batch: u32) -> LoopbackReport {
        // The driver waits for completions this thread makes: refuse to run from inside the model.
        let Some(server) = self.serving.server.as_deref().filter(|s| !s.is_serving()) else {
            return LoopbackReport {
                requests: 0.0,
                elapsed_ns: 0.0,
                interrupts: 0.0,
            };
        };
        let r = self
            .lb
            .run(total as u64, batch.min(u32::from(u16::MAX)) as u16, || {
                server.serve(0)
            });
        LoopbackReport {
            requests: r.requests as f64,
            elapsed_ns: r.elapsed.as_nanos() as f64,
            interrupts: r.interrupts as f64,
        }
    }

    /// Stops serving.
    #[napi]
    pub fn close(&mut self) {
        // Not dropped here: `close` may be called from inside `onBatch`, while the server is serving.
        if let Some(s) = &self.serving.server {
            s.close();
        }
    }
}
