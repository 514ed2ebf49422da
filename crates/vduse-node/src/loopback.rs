//! `BindingLoopback`: the batch path to JavaScript and back without a kernel — a driver thread fills a
//! real split ring, queue processing hands batches to the JS model exactly as a VDUSE device does.
//! For the boundary micro-benchmark (`npm run bench:boundary`).

use std::sync::Arc;

use napi::bindgen_prelude::{ArrayBuffer, AsyncTask, Env, Float64ArraySlice, Function, Uint32ArraySlice};
use napi_derive::napi;
use vduse_core::loopback::Loopback;

use crate::device::{js_model, DeviceInit};
use crate::error::Code;
use crate::js_model::{JsModel, JsSide};

#[napi]
pub struct BindingLoopback {
    js: JsSide,
    model: Arc<JsModel>,
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
    model: Arc<JsModel>,
    total: u64,
    batch: u16,
}

impl napi::Task for LoopbackRun {
    type Output = vduse_core::loopback::LoopbackReport;
    type JsValue = LoopbackReport;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        Ok(self.lb.run(self.model.as_ref(), self.total, self.batch))
    }

    fn resolve(&mut self, _env: Env, r: Self::Output) -> napi::Result<LoopbackReport> {
        Ok(LoopbackReport {
            requests: r.requests as f64,
            elapsed_ns: r.elapsed.as_nanos() as f64,
            interrupts: r.interrupts as f64,
        })
    }
}

/// A one-queue loopback device served by JavaScript (same callbacks as `createDevice`).
#[napi]
pub fn create_loopback(
    init: DeviceInit,
    on_requests: Function<(), ()>,
    on_status: Function<u32, ()>,
) -> napi::Result<BindingLoopback, Code> {
    let model = js_model(&init, on_requests, on_status)?;
    let lb = Arc::new(Loopback::new(init.queue_size.clamp(4, 32768) as u16));
    Ok(BindingLoopback {
        js: JsSide::new(model.clone()),
        model,
        lb,
    })
}

#[napi]
impl BindingLoopback {
    #[napi]
    pub fn drain(
        &mut self,
        header: Uint32ArraySlice,
        reqs: Uint32ArraySlice,
        segs: Float64ArraySlice,
    ) -> u32 {
        self.js.drain(header, reqs, segs)
    }

    #[napi]
    pub fn region<'env>(
        &self,
        env: &'env Env,
        slot: u32,
        region_key: f64,
    ) -> napi::Result<ArrayBuffer<'env>, Code> {
        self.js.region(env, slot, region_key)
    }

    #[napi]
    pub fn complete(&self, done: Uint32ArraySlice, count: u32) {
        self.js.complete(done, count)
    }

    /// Most requests in flight at once (the ring holds this many 3-buffer chains).
    #[napi]
    pub fn capacity(&self) -> u32 {
        u32::from(self.lb.capacity())
    }

    /// The driver side, a separate object: its async `run` must not hold a borrow of this one, whose
    /// `drain`/`complete` JavaScript calls meanwhile.
    #[napi]
    pub fn driver(&self) -> BindingLoopbackDriver {
        BindingLoopbackDriver {
            model: self.model.clone(),
            lb: self.lb.clone(),
        }
    }
}

#[napi]
pub struct BindingLoopbackDriver {
    model: Arc<JsModel>,
    lb: Arc<Loopback>,
}

#[napi]
impl BindingLoopbackDriver {
    /// Drives `total` requests through, `batch` per kick, on a libuv thread; resolves with the timing.
    #[napi]
    pub fn run(&self, total: f64, batch: u32) -> AsyncTask<LoopbackRun> {
        AsyncTask::new(LoopbackRun {
            lb: self.lb.clone(),
            model: self.model.clone(),
            total: total as u64,
            batch: batch.min(u32::from(u16::MAX)) as u16,
        })
    }
}
