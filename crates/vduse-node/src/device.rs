//! `BindingDevice`: one VDUSE device served by a JavaScript model. The TypeScript class `VirtioDevice`
//! wraps it; nothing else should use it directly.

use std::sync::Arc;

use napi::bindgen_prelude::{
    ArrayBuffer, BigInt, Buffer, Env, Float64ArraySlice, Function, Uint32ArraySlice,
};
use napi_derive::napi;
use vduse_core::{DeviceOptions, VduseDevice};

use crate::error::{native, to_napi, Code};
use crate::js_model::{Doorbell, JsModel, JsSide, ModelInfo, StatusCallback};
use crate::native_io::{IoPool, Op};

/// What TypeScript tells the binding about a device.
#[napi(object)]
pub struct DeviceInit {
    pub name: String,
    pub device_id: u32,
    pub vendor_id: Option<u32>,
    /// Device feature bits (the transport adds VERSION_1, ACCESS_PLATFORM, EVENT_IDX, INDIRECT_DESC).
    pub features: BigInt,
    pub config: Buffer,
    pub num_queues: u32,
    pub queue_size: u32,
    /// Most buffers per request (longer chains are refused before reaching JS).
    pub max_segments: Option<u32>,
    /// Replace a leftover device of the same name from a dead process.
    pub replace_stale: Option<bool>,
    /// Longest wait for in-flight requests on reset or IOTLB change (ms).
    pub drain_timeout_ms: Option<u32>,
    /// Threads for native file I/O.
    pub io_threads: Option<u32>,
}

/// Counters of the device (all queues).
#[napi(object)]
pub struct DeviceCounters {
    pub kicks: f64,
    pub batches: f64,
    pub requests: f64,
    pub completions: f64,
    pub interrupts: f64,
    pub bad_chains: f64,
    pub stale_completions: f64,
    /// Requests JavaScript holds right now.
    pub in_flight: f64,
    /// Requests waiting to be drained by JavaScript.
    pub pending: f64,
}

#[napi]
pub struct BindingDevice {
    device: Option<VduseDevice>,
    model: Arc<JsModel>,
    js: JsSide,
    io: Option<IoPool>,
    /// The counters as they were when the device was closed.
    final_stats: vduse_core::DeviceStats,
}

/// Creates a VDUSE device served by JavaScript. `onRequests` is called (at most one call queued) when
/// requests wait to be drained; `onStatus` with each new device status.
#[napi]
pub fn create_device(
    init: DeviceInit,
    on_requests: Function<(), ()>,
    on_status: Function<u32, ()>,
) -> napi::Result<BindingDevice, Code> {
    let model = js_model(&init, on_requests, on_status)?;
    let io = IoPool::new(init.io_threads.unwrap_or(4) as usize, model.clone()).map_err(native)?;
    let mut options = DeviceOptions::new(init.name);
    options.vendor_id = init.vendor_id.unwrap_or(0);
    options.replace_stale = init.replace_stale.unwrap_or(false);
    if let Some(ms) = init.drain_timeout_ms {
        options.drain_timeout = std::time::Duration::from_millis(u64::from(ms));
    }
    let device = VduseDevice::create(options, model.clone()).map_err(to_napi)?;
    Ok(BindingDevice {
        device: Some(device),
        js: JsSide::new(model.clone()),
        model,
        io: Some(io),
        final_stats: Default::default(),
    })
}

/// The JavaScript-served model of a device described by `init`.
pub fn js_model(
    init: &DeviceInit,
    on_requests: Function<(), ()>,
    on_status: Function<u32, ()>,
) -> napi::Result<Arc<JsModel>, Code> {
    let (_, features, lossless) = init.features.get_u64();
    if !lossless {
        return Err(native("features must fit in 64 bits"));
    }
    let queue_size = u16::try_from(init.queue_size).map_err(|_| native("queueSize out of range"))?;
    let num_queues = u16::try_from(init.num_queues).map_err(|_| native("numQueues out of range"))?;
    let doorbell: Doorbell = on_requests
        .build_threadsafe_function()
        .callee_handled::<false>()
        .weak::<true>()
        .max_queue_size::<1>()
        .build()
        .map_err(native)?;
    let status: StatusCallback = on_status
        .build_threadsafe_function()
        .callee_handled::<false>()
        .weak::<true>()
        .build()
        .map_err(native)?;
    let info = ModelInfo {
        device_id: init.device_id,
        features,
        config: init.config.to_vec(),
        num_queues,
        queue_size,
        max_segments: init.max_segments.map_or(usize::from(queue_size), |m| m as usize),
    };
    Ok(Arc::new(JsModel::new(info, doorbell, status)))
}

#[napi]
impl BindingDevice {
    /// Moves waiting requests into the caller's arrays: `reqs` gets `[slot, queue, firstSegment,
    /// readable << 16 | writable]` per request, `segs` gets `[regionKey, offset, length]` per buffer piece
    /// (readable ones first). `header` gets `[requests, segments]`. Returns the number of requests;
    /// 0 means none were waiting (and the doorbell is re-armed).
    #[napi]
    pub fn drain(
        &mut self,
        header: Uint32ArraySlice,
        reqs: Uint32ArraySlice,
        segs: Float64ArraySlice,
    ) -> u32 {
        self.js.drain(header, reqs, segs)
    }

    /// A zero-copy view of one region of the memory map request `slot` refers to. The view keeps the
    /// mapping alive until it is garbage-collected, so it can never point at unmapped memory. Ask once
    /// per region key (from `drain`) and cache it.
    #[napi]
    pub fn region<'env>(
        &self,
        env: &'env Env,
        slot: u32,
        region_key: f64,
    ) -> napi::Result<ArrayBuffer<'env>, Code> {
        self.js.region(env, slot, region_key)
    }

    /// Completes requests: `done` holds `[slot, usedLength]` pairs. One used-ring update and at most one
    /// interrupt per queue for the whole call.
    #[napi]
    pub fn complete(&self, done: Uint32ArraySlice, count: u32) {
        self.js.complete(done, count)
    }

    /// Hands block I/O to native threads: `ops` holds `[slot, fd, kind (0 read, 1 write, 2 flush),
    /// position, skip]` per request. Each completes its request itself, status byte included.
    #[napi]
    pub fn file_io(&self, ops: Float64ArraySlice, count: u32) {
        let Some(io) = self.io.as_ref() else { return };
        io.submit(ops.chunks_exact(5).take(count as usize).map(|o| Op {
            slot: o[0] as u32,
            fd: o[1] as i32,
            kind: o[2] as u8,
            position: o[3] as u64,
            skip: o[4] as u32,
        }));
    }

    /// Rewrites part of the config space; tells the driver once it is running.
    #[napi]
    pub fn update_config(&self, offset: u32, data: Buffer) -> napi::Result<(), Code> {
        let device = self.device.as_ref().ok_or_else(|| native("device is closed"))?;
        device.update_config(offset, &data).map_err(to_napi)
    }

    #[napi]
    pub fn status(&self) -> u32 {
        self.device.as_ref().map_or(0, |d| u32::from(d.status()))
    }

    #[napi]
    pub fn negotiated_features(&self) -> BigInt {
        BigInt::from(self.device.as_ref().map_or(0, |d| d.negotiated_features()))
    }

    #[napi]
    pub fn counters(&self) -> DeviceCounters {
        let s = self.device.as_ref().map_or(self.final_stats, |d| d.stats());
        DeviceCounters {
            kicks: s.kicks as f64,
            batches: s.batches as f64,
            requests: s.requests as f64,
            completions: s.completions as f64,
            interrupts: s.interrupts as f64,
            bad_chains: s.bad_chains as f64,
            stale_completions: s.stale_completions as f64,
            in_flight: self.model.slots().live() as f64,
            pending: self.model.pending_len() as f64,
        }
    }

    /// Stops serving and destroys the device. Fails with ERR_VDUSE_BUSY while it is still attached.
    #[napi]
    pub fn close(&mut self) -> napi::Result<(), Code> {
        if let Some(mut io) = self.io.take() {
            io.stop();
        }
        match self.device.take() {
            Some(device) => {
                self.final_stats = device.stats();
                device.close().map_err(to_napi)
            }
            None => Ok(()),
        }
    }
}
