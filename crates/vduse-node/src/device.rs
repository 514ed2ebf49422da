//! `BindingDevice`: one VDUSE device served by a JavaScript model on the JavaScript thread. The
//! TypeScript class `VirtioDevice` wraps it; nothing else should use it directly.

use std::sync::Arc;

use napi::bindgen_prelude::{AsyncTask, BigInt, Buffer, Env, FnArgs, Function, Unknown};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{JsValue, Status};
use napi_derive::napi;
use vduse_core::queue::{Ticket, Virtqueue};
use vduse_core::{
    DeviceEvent, DeviceEvents, DeviceOptions, DeviceSpec, DeviceStats, DrainReason, Serving, VduseDevice,
    VhostUserDevice,
};

use vduse_backends::file_io::{IoPool, Op};
use vduse_backends::switch::SwitchPort;
use vduse_backends::tap::TapModel;

use crate::error::{native, Failure, OrThrow, Parked};
use crate::serve::{copy_in, copy_out, typed_array, Arrays, JsServer, PollCap, ServerHandle};
use crate::served::Served;

/// What TypeScript tells the binding about a device.
#[napi(object)]
pub struct DeviceInit {
    pub name: String,
    pub device_id: u32,
    pub vendor_id: Option<u32>,
    /// Device feature bits (0–23, 50–63; the transport adds VERSION_1, ACCESS_PLATFORM, EVENT_IDX,
    /// INDIRECT_DESC).
    pub features: BigInt,
    pub config: Buffer,
    pub num_queues: u32,
    pub queue_size: u32,
    /// Most buffers per request (longer chains are refused before reaching JS).
    pub max_segments: Option<u32>,
    /// A short model name ("blk") recorded in the state file.
    pub kind: Option<String>,
    /// Replace a leftover device of the same name from a dead process.
    pub replace_stale: Option<bool>,
    /// Longest a reset or IOTLB change waits for requests in flight, all queues together (ms).
    pub drain_timeout_ms: Option<u32>,
    /// Threads for native file I/O.
    pub io_threads: Option<u32>,
    /// Directory of the state file; empty: none. Default /run/vduse.
    pub state_dir: Option<String>,
    /// Take over a device of this name whose server died (its state file must match), instead of creating
    /// one; a device that does not exist is created.
    pub recover: Option<bool>,
    /// What stores the data, as a stable identity (recorded for, and checked by, a takeover).
    pub backend_id: Option<String>,
    /// Longest the JavaScript-thread server polls a ring for new requests before it sleeps (µs, at most
    /// 1000; default 0: never). Adaptive: it polls only while polling catches requests.
    pub poll_us: Option<u32>,
    /// Size the poll cap from this machine's measured cost of a wake-up instead (`poll_us` is ignored).
    pub poll_auto: Option<bool>,
    /// Queues whose buffers the model holds until it has data for them (a NIC's receive queue): a reset
    /// or an IOTLB change fences them at once instead of waiting for them.
    pub held_queues: Option<Vec<u32>>,
    /// Serve the device natively as a NIC bridged to this tap interface ("" lets the kernel name one)
    /// instead of on the JavaScript thread: frames never reach JavaScript.
    pub tap: Option<String>,
    /// Serve the device natively as a port of this switch (`BindingSwitch.id`) instead of on the
    /// JavaScript thread: frames move between its ports on native threads.
    pub switch_id: Option<u32>,
    /// Serve the device natively as virtio-fs sharing this host directory, on worker threads: no
    /// request reaches JavaScript.
    pub fs_share: Option<crate::fs::FsShareInit>,
    /// Host directories mounted in the tree of the TypeScript file system this device serves (mount `i`
    /// is `fsAnswerMount(ticket, i)`): a router on worker threads serves their requests natively and
    /// forwards the rest to `onBatch`.
    pub fs_mounts: Option<Vec<crate::fs::FsShareInit>>,
    /// Serve the device over a vhost-user socket at this path (listening; one client at a time) instead
    /// of creating it in the kernel.
    pub vhost_user: Option<String>,
    /// With `vhost_user`: connect to a VMM listening there (QEMU `server=on`), again whenever it goes, instead
    /// of listening.
    pub vhost_user_connect: Option<bool>,
    /// Serve the device natively as virtio-blk over NBD, on worker threads: requests wait for the engine
    /// (`nbdStart`) and its connections (`nbdAttach`); none reaches JavaScript.
    pub nbd_model: Option<crate::nbd::NbdModelInit>,
}

/// The JavaScript arrays of the batch protocol (see `serve.rs`).
#[napi(object)]
pub struct BatchArrays<'a> {
    pub reqs: Unknown<'a>,
    pub heads: Unknown<'a>,
    pub done: Unknown<'a>,
    pub ctl: Unknown<'a>,
}

/// Something the kernel-facing side did, reported to JavaScript.
#[napi(object)]
pub struct DeviceEventJs {
    /// `status`, `drained` or `broken`.
    pub kind: String,
    pub status: Option<u32>,
    pub features: Option<BigInt>,
    /// `reset` or `iotlb` (drained).
    pub reason: Option<String>,
    pub waited_ms: Option<f64>,
    pub fenced: Option<u32>,
    pub revoked: Option<bool>,
}

type EventSink = ThreadsafeFunction<DeviceEventJs, (), DeviceEventJs, Status, false, true, 0>;

struct JsEvents {
    sink: EventSink,
}

impl DeviceEvents for JsEvents {
    fn event(&self, event: &DeviceEvent) {
        let e = match *event {
            DeviceEvent::Status { status, features } => DeviceEventJs {
                kind: "status".into(),
                status: Some(u32::from(status)),
                features: Some(BigInt::from(features)),
                reason: None,
                waited_ms: None,
                fenced: None,
                revoked: None,
            },
            DeviceEvent::Drained {
                reason,
                waited,
                fenced,
                revoked,
            } => DeviceEventJs {
                kind: "drained".into(),
                status: None,
                features: None,
                reason: Some(match reason {
                    DrainReason::Reset => "reset".into(),
                    DrainReason::IotlbChange => "iotlb".into(),
                }),
                waited_ms: Some(waited.as_secs_f64() * 1000.0),
                fenced: Some(fenced as u32),
                revoked: Some(revoked),
            },
            DeviceEvent::Broken => DeviceEventJs {
                kind: "broken".into(),
                status: None,
                features: None,
                reason: None,
                waited_ms: None,
                fenced: None,
                revoked: None,
            },
        };
        let _ = self.sink.call(e, ThreadsafeFunctionCallMode::NonBlocking);
    }
}

/// Counters of the device (all queues) and of its JavaScript serving.
#[napi(object)]
#[derive(Default, Clone, Copy)]
pub struct DeviceCounters {
    pub kicks: f64,
    pub batches: f64,
    pub requests: f64,
    pub completions: f64,
    pub interrupts: f64,
    pub bad_chains: f64,
    pub duplicate_heads: f64,
    /// Requests fenced by a reset or IOTLB change before the model completed them.
    pub fenced: f64,
    /// Completions for requests no longer in flight (dropped).
    pub stale_completions: f64,
    pub broken_queues: f64,
    pub in_flight: f64,
    pub iotlb_reloads: f64,
    pub drains: f64,
    pub max_drain_ms: f64,
    /// Wake-ups of the JavaScript thread by kicks, and model calls (one per batch).
    pub wakeups: f64,
    pub js_calls: f64,
    /// Times polling the rings (instead of sleeping) found requests: wake-ups saved.
    pub polled: f64,
    /// The most the JavaScript-thread server polls now (µs; 0: never): the `pollUs` setting, or what
    /// automatic sizing chose.
    pub poll_cap_us: f64,
    pub io_ops: f64,
    pub io_errors: f64,
    /// Requests a taken-over device found in flight and served again.
    pub resubmitted: f64,
}

pub fn counters(stats: DeviceStats, server: Option<&JsServer>, io: Option<&IoPool>) -> DeviceCounters {
    DeviceCounters {
        kicks: stats.kicks as f64,
        batches: stats.batches as f64,
        requests: stats.requests as f64,
        completions: stats.completions as f64,
        interrupts: stats.interrupts as f64,
        bad_chains: stats.bad_chains as f64,
        duplicate_heads: stats.duplicate_heads as f64,
        fenced: stats.fenced as f64,
        stale_completions: stats.stale_completions as f64,
        broken_queues: stats.broken_queues as f64,
        in_flight: stats.in_flight as f64,
        iotlb_reloads: stats.iotlb_reloads as f64,
        drains: stats.drains as f64,
        max_drain_ms: stats.max_drain_us as f64 / 1000.0,
        wakeups: server.map_or(0.0, |s| s.wakeups.get() as f64),
        js_calls: server.map_or(0.0, |s| s.js_calls.get() as f64),
        polled: server.map_or(0.0, |s| s.polled.get() as f64),
        poll_cap_us: server.map_or(0.0, |s| s.poll_cap_ns() as f64 / 1000.0),
        io_ops: io.map_or(0.0, |i| {
            i.stats().ops.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
        io_errors: io.map_or(0.0, |i| {
            i.stats().errors.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
        resubmitted: stats.resubmitted as f64,
    }
}

/// The poll cap a device's options ask for.
pub fn poll_cap(auto: Option<bool>, us: Option<u32>) -> PollCap {
    match (auto, us) {
        (Some(true), _) => PollCap::Auto,
        (_, None | Some(0)) => PollCap::Off,
        (_, Some(us)) => PollCap::Fixed(u64::from(us) * 1_000),
    }
}

/// Memory access and completions, shared by every binding class that serves queues from JavaScript.
pub struct JsQueues {
    pub queues: Vec<Arc<Virtqueue>>,
    pub server: Option<ServerHandle>,
}

/// The bytes of a `Uint8Array` (or `Buffer`) argument — refused when it is a view of a
/// `SharedArrayBuffer`: another thread could write it while Rust holds it as `&mut [u8]` (undefined
/// behaviour), and a copy into memory another thread changes meanwhile is no copy at all.
fn plain_bytes<'a>(env: &Env, value: &Unknown<'a>, what: &str) -> napi::Result<&'a mut [u8]> {
    // SAFETY: `value` is a value of this env, on its thread.
    let found = unsafe { typed_array::<u8>(env.raw(), value.raw(), napi::sys::TypedarrayType::uint8_array) };
    let (ptr, len) = found.ok_or_else(|| {
        Failure::new(
            "ERR_VDUSE_INVALID_ARGUMENT",
            format!("{what} must be a Uint8Array or Buffer over a plain (not shared) ArrayBuffer"),
            None,
            None,
            Some("copy a SharedArrayBuffer's bytes into a Buffer first"),
        )
        .into_js(env)
    })?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: a live, non-shared typed array of `len` bytes; only this thread runs JavaScript, and it is
    // blocked in the synchronous call this slice does not outlive.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// `len` bytes of `bytes` from `at`, clamped to what it holds.
fn window(bytes: &mut [u8], at: u32, len: u32) -> &mut [u8] {
    let start = (at as usize).min(bytes.len());
    let end = start.saturating_add(len as usize).min(bytes.len());
    &mut bytes[start..end]
}

impl JsQueues {
    fn queue(&self, ticket: f64) -> Option<(&Virtqueue, Ticket)> {
        let t = Ticket::from_raw(ticket as u64);
        self.queues.get(usize::from(t.queue())).map(|q| (q.as_ref(), t))
    }

    pub fn read(
        &self,
        env: &Env,
        ticket: f64,
        offset: f64,
        dst: Unknown,
        at: u32,
        len: u32,
    ) -> napi::Result<f64> {
        let dst = plain_bytes(env, &dst, "dst")?;
        let Some((q, t)) = self.queue(ticket) else {
            return Ok(-1.0);
        };
        Ok(copy_out(q, t, offset as u64, window(dst, at, len)))
    }

    pub fn write(
        &self,
        env: &Env,
        ticket: f64,
        offset: f64,
        src: Unknown,
        at: u32,
        len: u32,
    ) -> napi::Result<f64> {
        let src = plain_bytes(env, &src, "src")?;
        let Some((q, t)) = self.queue(ticket) else {
            return Ok(-1.0);
        };
        Ok(copy_in(q, t, offset as u64, window(src, at, len)))
    }

    pub fn flush(&self) {
        if let Some(s) = &self.server {
            s.flush();
        }
    }

    /// Whether request `ticket` is still in flight (not completed, not fenced).
    pub fn is_live(&self, ticket: f64) -> bool {
        self.queue(ticket).is_some_and(|(q, t)| q.is_live(t))
    }
}

#[napi]
pub struct BindingDevice {
    device: Option<Served>,
    io: Option<Arc<IoPool>>,
    serving: JsQueues,
    final_counters: Option<DeviceCounters>,
    /// The model of a natively served NIC, if the device is one.
    nic: Option<NativeNic>,
    /// Its counters as they were when it stopped serving (the model is gone by then).
    final_nic: Option<NicCounters>,
    /// The server of a natively shared directory, and its counters once it stopped.
    fs: Option<Arc<vduse_fs::Server>>,
    final_fs: Option<crate::fs::FsCounters>,
    /// The router of host directories mounted in a TypeScript file system's tree (`fsMounts`).
    router: Option<Arc<vduse_fs::FsRouter>>,
    final_mounts: Vec<crate::fs::FsCounters>,
    /// The native NBD data path of a blk device (`nbdStart`), and its counters once it stopped.
    nbd: Option<crate::nbd::Engine>,
    final_nbd: Option<crate::nbd::NbdCounters>,
    /// The virtio-blk model its workers serve when the device was created for NBD (`nbdModel`).
    nbd_model: Option<Arc<vduse_backends::nbd::model::NbdBlk>>,
    recovered: bool,
}

#[derive(Clone)]
enum NicCounters {
    Tap(TapCounters),
    Port(crate::switch::PortCounters),
}

/// A NIC served natively, on worker threads: bridged to a tap, or a port of a switch.
#[derive(Clone)]
enum NativeNic {
    Tap(Arc<TapModel>),
    Port(Arc<SwitchPort>),
}

impl NativeNic {
    fn counters(&self) -> NicCounters {
        match self {
            NativeNic::Tap(t) => {
                let s = t.stats();
                let get =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
                NicCounters::Tap(TapCounters {
                    tx_frames: get(&s.tx_frames),
                    tx_dropped: get(&s.tx_dropped),
                    rx_frames: get(&s.rx_frames),
                    rx_dropped: get(&s.rx_dropped),
                })
            }
            NativeNic::Port(p) => NicCounters::Port(crate::switch::port_counters(p.stats())),
        }
    }

    fn model(&self) -> Arc<dyn vduse_core::DeviceModel> {
        match self {
            NativeNic::Tap(t) => t.clone(),
            NativeNic::Port(p) => p.clone(),
        }
    }

    /// After the device is closed (its workers no longer use the model): stops the tap's reader and
    /// closes it, or unplugs the port.
    fn stop(&self) {
        match self {
            NativeNic::Tap(t) => t.stop(),
            NativeNic::Port(p) => p.leave(),
        }
    }
}

/// The MTU a virtio-net config space tells the driver (`mtu` at offset 10), or 1500.
fn config_mtu(config: &[u8]) -> u16 {
    config
        .get(10..12)
        .map_or(1500, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn spec_of(init: &DeviceInit) -> Result<DeviceSpec, Failure> {
    let (_, features, lossless) = init.features.get_u64();
    if !lossless {
        return Err(native("features must fit in 64 bits"));
    }
    let queue_size = u16::try_from(init.queue_size).map_err(|_| native("queueSize out of range"))?;
    let num_queues = u16::try_from(init.num_queues).map_err(|_| native("numQueues out of range"))?;
    Ok(DeviceSpec {
        device_id: init.device_id,
        features,
        config: init.config.to_vec(),
        num_queues,
        queue_size,
        max_segments: init.max_segments.map_or(usize::from(queue_size), |m| m as usize),
        kind: init.kind.clone().unwrap_or_default(),
        held_queues: init
            .held_queues
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|&&q| q < 64)
            .fold(0u64, |m, &q| m | (1 << q)),
    })
}

/// Creates a VDUSE device served on the JavaScript thread: `onBatch(queue, count)` is called with a batch
/// in `arrays`; `onEvent` reports status changes, drains and a broken device.
#[napi]
pub fn create_device(
    env: Env,
    init: DeviceInit,
    arrays: BatchArrays,
    on_batch: Function<FnArgs<(u32, u32)>, ()>,
    on_event: Function<DeviceEventJs, ()>,
) -> napi::Result<BindingDevice> {
    crate::logger::install();
    let spec = spec_of(&init).or_throw(&env)?;
    let mut options = DeviceOptions::new(init.name.clone());
    options.vendor_id = init.vendor_id.unwrap_or(0);
    options.replace_stale = init.replace_stale.unwrap_or(false);
    if let Some(ms) = init.drain_timeout_ms {
        options.drain_timeout = std::time::Duration::from_millis(u64::from(ms));
    }
    match init.state_dir.as_deref() {
        Some("") => options.state_dir = None,
        Some(dir) => options.state_dir = Some(dir.into()),
        None => {}
    }
    options.backend = init.backend_id.clone().filter(|b| !b.is_empty());
    let recover = init.vhost_user.is_none()
        && init.recover.unwrap_or(false)
        && vduse_core::list_devices().contains(&init.name);
    // SAFETY: the values come straight from this call's arguments, on the JS thread.
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
    let sink: EventSink = on_event
        .build_threadsafe_function()
        .callee_handled::<false>()
        .weak::<true>()
        .build()
        .map_err(native)
        .or_throw(&env)?;
    let events: Arc<dyn DeviceEvents> = Arc::new(JsEvents { sink });
    let nic = match (init.tap.as_deref(), init.switch_id) {
        (Some(_), Some(_)) => {
            return Err(native("a NIC is bridged to a tap or a port of a switch, not both")).or_throw(&env)
        }
        (Some(name), None) => Some(NativeNic::Tap(
            TapModel::open(name)
                .map_err(|(syscall, e)| {
                    let (code, hint) = match e.raw_os_error() {
                        Some(libc::EPERM | libc::EACCES) => (
                            "ERR_VDUSE_PERMISSION",
                            "creating or opening a tap needs CAP_NET_ADMIN (run as root)",
                        ),
                        Some(libc::EBUSY) => (
                            "ERR_VDUSE_BUSY",
                            "another process has this tap open (or it is not a tap with virtio-net headers); pick another name",
                        ),
                        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) if syscall.starts_with("open") => (
                            "ERR_VDUSE_UNAVAILABLE",
                            "no /dev/net/tun: load the tun module (modprobe tun)",
                        ),
                        _ => ("ERR_VDUSE_SYSCALL", "see the errno"),
                    };
                    Failure::new(
                        code,
                        format!("cannot open tap interface {name:?}: {syscall} failed: {e}"),
                        e.raw_os_error(),
                        Some(syscall),
                        Some(hint),
                    )
                })
                .or_throw(&env)?,
        )),
        (None, Some(id)) => {
            let switch = crate::switch::switch_of(id)
                .ok_or_else(|| native("the switch of this port is gone"))
                .or_throw(&env)?;
            Some(NativeNic::Port(switch.port(&init.name, config_mtu(&init.config))))
        }
        (None, None) => None,
    };
    let fs = match &init.fs_share {
        Some(_) if nic.is_some() => {
            return Err(native("a device is a NIC or a shared directory, not both")).or_throw(&env)
        }
        Some(share) => Some(crate::fs::server_of(share, 0).or_throw(&env)?),
        None => None,
    };
    let router = match init.fs_mounts.as_deref() {
        None | Some([]) => None,
        Some(_) if nic.is_some() || fs.is_some() => {
            return Err(native("fsMounts are for a device served in JavaScript")).or_throw(&env)
        }
        Some(mounts) => Some(crate::fs::router_of(mounts, usize::from(spec.num_queues)).or_throw(&env)?),
    };
    let nbd_model = match &init.nbd_model {
        Some(_) if nic.is_some() || fs.is_some() || router.is_some() => {
            return Err(native("an NBD disk is not also a NIC or a file system")).or_throw(&env)
        }
        Some(m) => Some(Arc::new(crate::nbd::model_of(m))),
        None => None,
    };
    let serving = || match (&nic, &fs, &router, &nbd_model) {
        (Some(nic), _, _, _) => Serving::Workers(nic.model()),
        (None, Some(server), _, _) => Serving::Workers(Arc::new(vduse_fs::FsModel::new(server.clone()))),
        (None, None, Some(router), _) => Serving::Workers(router.clone()),
        (None, None, None, Some(m)) => Serving::Workers(m.clone()),
        (None, None, None, None) => Serving::External,
    };
    let device = match init.vhost_user.as_deref() {
        Some(path) if init.vhost_user_connect.unwrap_or(false) => {
            VhostUserDevice::connect(std::path::Path::new(path), options, spec, serving(), Some(events))
                .map(Served::VhostUser)
        }
        Some(path) => {
            VhostUserDevice::listen(std::path::Path::new(path), options, spec, serving(), Some(events))
                .map(Served::VhostUser)
        }
        None if recover => {
            VduseDevice::adopt(options, Some(&spec), |_| serving(), Some(events)).map(Served::Kernel)
        }
        None => VduseDevice::create(options, spec, serving(), Some(events)).map(Served::Kernel),
    }
    .or_throw(&env)?;
    let queues = device.queues().to_vec();
    if nic.is_some() || fs.is_some() || nbd_model.is_some() {
        // Native serving: worker threads pop the queues; no JavaScript server, no file I/O pool.
        return Ok(BindingDevice {
            device: Some(device),
            io: None,
            serving: JsQueues { queues, server: None },
            final_counters: None,
            recovered: recover,
            nic,
            final_nic: None,
            fs,
            final_fs: None,
            router: None,
            final_mounts: Vec::new(),
            nbd: None,
            final_nbd: None,
            nbd_model,
        });
    }
    // SAFETY: `on_batch` is a function of this env; we are on the JS thread.
    let server = unsafe {
        match &router {
            // The router's workers pop the rings; JavaScript gets what they forward.
            Some(r) => JsServer::start_forwarded(
                env.raw(),
                queues.clone(),
                r.forwards().to_vec(),
                arrays,
                on_batch.raw(),
            ),
            None => JsServer::start(
                env.raw(),
                queues.clone(),
                device.kick_fds().to_vec(),
                arrays,
                on_batch.raw(),
                poll_cap(init.poll_auto, init.poll_us),
            ),
        }
    }
    .or_throw(&env)?;
    let io = Arc::new(
        IoPool::new(init.io_threads.unwrap_or(4) as usize, queues.clone())
            .map_err(native)
            .or_throw(&env)?,
    );
    Ok(BindingDevice {
        device: Some(device),
        io: Some(io),
        serving: JsQueues {
            queues,
            server: Some(server),
        },
        final_counters: None,
        recovered: recover,
        nic: None,
        final_nic: None,
        fs: None,
        final_fs: None,
        router,
        final_mounts: Vec::new(),
        nbd: None,
        final_nbd: None,
        nbd_model: None,
    })
}

/// Frames a natively served NIC moved between the driver and its tap.
#[napi(object)]
#[derive(Clone)]
pub struct TapCounters {
    pub tx_frames: f64,
    pub tx_dropped: f64,
    pub rx_frames: f64,
    pub rx_dropped: f64,
}

pub struct Close {
    device: Option<Served>,
    io: Option<Arc<IoPool>>,
    nbd: Option<crate::nbd::Engine>,
    nic: Option<NativeNic>,
    fs: Option<Arc<vduse_fs::Server>>,
    router: Option<Arc<vduse_fs::FsRouter>>,
    /// Destroy the device (close), or leave it to a successor (release).
    destroy: bool,
    failure: Parked,
}

impl napi::Task for Close {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        if let Some(nbd) = self.nbd.take() {
            // Nothing new is sent; the sessions end politely. What the server still has is answered by
            // nobody: the transport fences it (a release checked that nothing was pending).
            nbd.stop();
        }
        if let Some(io) = self.io.take() {
            // A release checked that the pool was idle; a close lets it finish what runs, for a while.
            if !io.stop(std::time::Instant::now() + vduse_core::device::MAX_DRAIN) {
                log::warn!(
                    "native I/O still running after {:?}; closing anyway",
                    vduse_core::device::MAX_DRAIN
                );
            }
        }
        if let Some(mut device) = self.device.take() {
            let done = if self.destroy {
                device.close()
            } else {
                device.release()
            };
            done.map_err(|e| self.failure.park(e))?;
        }
        if let Some(nic) = self.nic.take() {
            nic.stop();
        }
        if let Some(fs) = self.fs.take() {
            // The workers are gone: close every node's and handle's fd now, not when JavaScript lets go.
            fs.fs().forget_all();
        }
        if let Some(router) = self.router.take() {
            for m in router.mounts() {
                m.fs().forget_all();
            }
        }
        Ok(())
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }

    fn reject(&mut self, env: Env, err: napi::Error) -> napi::Result<()> {
        self.failure.reject(&env, err)
    }
}

#[napi]
impl BindingDevice {
    /// Copies `length` bytes from the readable part of request `ticket`, starting `offset` bytes in, into
    /// `dst[at..]`. Returns the bytes copied, or -1 if the request is no longer in flight. Throws
    /// ERR_VDUSE_INVALID_ARGUMENT for a view of a SharedArrayBuffer.
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

    /// Copies `src[at..at+length]` into the writable part of request `ticket`, `offset` bytes in.
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

    /// Whether native block I/O has nothing queued, waiting or running right now. (Callers poll: a wait
    /// here would hold a thread of libuv's pool, which file and crypto calls share.)
    #[napi]
    pub fn io_is_quiet(&self) -> bool {
        self.io.as_ref().is_none_or(|io| io.is_quiet())
            && self.nbd.as_ref().is_none_or(|e| e.pending() == 0)
            && self.nbd_model.as_ref().is_none_or(|m| !m.busy())
    }

    /// A device served over NBD by its workers: holds new requests back (a handover is being decided;
    /// `ioIsQuiet` then says when nothing of this server is under way) or lets them go again.
    #[napi]
    pub fn nbd_hold(&self, hold: bool) {
        if let Some(m) = &self.nbd_model {
            m.hold(hold);
        }
    }

    /// Whether no native transfer overlaps bytes `[offset, offset+length)` of `fd` right now.
    #[napi]
    pub fn io_range_is_quiet(&self, fd: i32, offset: f64, length: f64) -> bool {
        let start = offset.max(0.0) as u64;
        let end = start.saturating_add(length.max(0.0) as u64);
        self.io
            .as_ref()
            .is_none_or(|io| io.range_is_quiet(fd, start, end))
    }

    /// Native transfers still running for requests that are no longer in flight (fenced writes whose
    /// system call has not returned): while there are any, a range operation on the same bytes waits.
    #[napi]
    pub fn io_ghosts(&self) -> u32 {
        self.io.as_ref().map_or(0, |io| io.ghosts() as u32)
    }

    /// Publishes the completions JavaScript wrote into `done` since the last flush.
    #[napi]
    pub fn flush(&self) {
        self.serving.flush();
    }

    /// Whether request `ticket` is still in flight: false once it was completed or fenced (a reset, an
    /// IOTLB change).
    #[napi]
    pub fn is_live(&self, ticket: f64) -> bool {
        self.serving.is_live(ticket)
    }

    /// Hands block I/O to native threads: `ops` holds `[ticket, fd, kind (0 read, 1 write, 2 flush),
    /// position, skip]` per request. Each completes its request itself, status byte included.
    #[napi]
    pub fn submit_io(&self, ops: &[f64], count: u32) {
        let Some(io) = self.io.as_ref() else { return };
        io.submit(ops.chunks_exact(5).take(count as usize).map(|o| Op {
            ticket: Ticket::from_raw(o[0] as u64),
            fd: o[1] as i32,
            kind: o[2] as u8,
            position: o[3] as u64,
            skip: o[4] as u32,
        }));
    }

    /// Starts the native NBD data path of a blk device created with `nbdModel`: its workers hand their
    /// requests to it, served over the connections given with `nbdAttach`. `onEvent` hears of lost
    /// connections (give a new one) and of requests that failed waiting for one.
    #[napi]
    pub fn nbd_start(
        &mut self,
        env: Env,
        info: crate::nbd::NbdExportJs,
        options: crate::nbd::NbdOptionsJs,
        on_event: Function<crate::nbd::NbdEventJs, ()>,
    ) -> napi::Result<()> {
        use vduse_backends::nbd::engine::{Export, NbdEngine, Options};
        if self.nbd.is_some() || self.device.is_none() || self.nbd_model.is_none() {
            return Err(native(
                "the NBD data path needs an open device created with nbdModel, not started already",
            ))
            .or_throw(&env);
        }
        let sink: crate::nbd::NbdSink = on_event
            .build_threadsafe_function()
            .callee_handled::<false>()
            .weak::<true>()
            .build()
            .map_err(native)
            .or_throw(&env)?;
        let ms = |v: f64| (v > 0.0).then(|| std::time::Duration::from_secs_f64(v / 1000.0));
        let engine = NbdEngine::new(
            self.serving.queues.clone(),
            Export {
                size: info.size as u64,
                block_size: info.block_size,
                max_payload: info.max_payload,
                max_range: info.max_range,
                volatile: info.volatile,
                always_fua: info.always_fua,
            },
            Options {
                slots: options.connections.clamp(1, 64) as usize,
                hang_timeout: ms(options.hang_timeout_ms),
                reconnect_timeout: ms(options.reconnect_timeout_ms).unwrap_or(std::time::Duration::ZERO),
                request_timeout: ms(options.request_timeout_ms),
                keep_unflushed_bytes: options.keep_unflushed_bytes.max(0.0) as u64,
            },
            Arc::new(crate::nbd::JsNbdEvents { sink }),
        )
        .map_err(native)
        .or_throw(&env)?;
        let engine = Arc::new(engine);
        if let Some(model) = &self.nbd_model {
            // The workers hand their requests to it from now on (those that waited go first).
            model.set_engine(engine.clone());
        }
        self.nbd = Some(engine);
        Ok(())
    }

    /// Gives connection `slot` of the NBD data path the engine's half of `socket` (handshake done;
    /// `structured`: structured replies were agreed).
    #[napi]
    pub fn nbd_attach(
        &self,
        env: Env,
        slot: u32,
        socket: &mut crate::nbd::BindingNbdSocket,
        structured: bool,
    ) -> napi::Result<()> {
        let engine = self
            .nbd
            .as_ref()
            .ok_or_else(|| {
                crate::error::Failure::new(
                    "ERR_VDUSE_CLOSED",
                    "the NBD data path is not running (the device was closed)".into(),
                    None,
                    None,
                    None,
                )
            })
            .or_throw(&env)?;
        let fd = socket
            .take()
            .ok_or_else(|| native("this socket was attached or closed already"))
            .or_throw(&env)?;
        engine
            .attach(slot as usize, fd, structured)
            .map_err(|e| crate::error::syscall("nbd attach", e))
            .or_throw(&env)
    }

    /// Makes every change the NBD data path had acknowledged durable (NBD_CMD_FLUSH), waiting at most
    /// `timeoutMs`. Rejects (ERR_VDUSE_SYSCALL) when the server fails it or acknowledged changes may have
    /// been lost with a connection.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn nbd_flush(&self, env: Env, timeout_ms: f64) -> napi::Result<AsyncTask<crate::nbd::Flush>> {
        let engine = self
            .nbd
            .clone()
            .ok_or_else(|| native("the NBD data path is not started"))
            .or_throw(&env)?;
        Ok(AsyncTask::new(crate::nbd::Flush {
            engine,
            timeout: std::time::Duration::from_secs_f64(timeout_ms.max(1.0) / 1000.0),
            failure: Parked::default(),
        }))
    }

    /// Counters of the NBD data path (`nbdStart`).
    #[napi]
    pub fn nbd_stats(&self) -> Option<crate::nbd::NbdCounters> {
        self.nbd
            .as_deref()
            .map(crate::nbd::counters)
            .or_else(|| self.final_nbd.clone())
    }

    /// Rewrites part of the config space; tells the driver once it is running.
    #[napi]
    pub fn update_config(&self, env: Env, offset: u32, data: Buffer) -> napi::Result<()> {
        let device = self
            .device
            .as_ref()
            .ok_or_else(|| native("device is closed"))
            .or_throw(&env)?;
        device.update_config(offset, &data).or_throw(&env)
    }

    /// The tap interface a natively served NIC is bridged to.
    #[napi(getter)]
    pub fn tap_name(&self) -> Option<String> {
        match &self.nic {
            Some(NativeNic::Tap(t)) => Some(t.name().to_string()),
            _ => None,
        }
    }

    /// Frame counters of a natively served NIC.
    #[napi]
    pub fn tap_stats(&self) -> Option<TapCounters> {
        match self.nic_counters()? {
            NicCounters::Tap(c) => Some(c),
            NicCounters::Port(_) => None,
        }
    }

    /// Frame counters of a NIC served natively as a switch port.
    #[napi]
    pub fn port_stats(&self) -> Option<crate::switch::PortCounters> {
        match self.nic_counters()? {
            NicCounters::Port(c) => Some(c),
            NicCounters::Tap(_) => None,
        }
    }

    /// Counters of a natively shared directory (`fsShare`).
    #[napi]
    pub fn fs_stats(&self) -> Option<crate::fs::FsCounters> {
        self.fs
            .as_deref()
            .map(crate::fs::counters)
            .or_else(|| self.final_fs.clone())
    }

    /// Answers request `ticket` — a LOOKUP of a name where host directory `mount` of `fsMounts` is mounted
    /// — with that directory's root (the driver mounts it there), the name valid for `entrySeconds`, and
    /// completes it. `writable`: the request's writable bytes. False if it is no longer in flight or
    /// could hold no answer (then completed empty).
    #[napi]
    pub fn fs_answer_mount(&self, ticket: f64, writable: u32, mount: u32, entry_seconds: f64) -> bool {
        let (Some(router), Some((vq, t))) = (&self.router, self.serving.queue(ticket)) else {
            return false;
        };
        crate::fs::answer_mount(router, vq, t, writable, mount, entry_seconds)
    }

    /// Counters of each host directory mounted in the tree (`fsMounts`), in order.
    #[napi]
    pub fn fs_mount_stats(&self) -> Vec<crate::fs::FsCounters> {
        match &self.router {
            Some(r) => r.mounts().iter().map(|m| crate::fs::counters(m)).collect(),
            None => self.final_mounts.clone(),
        }
    }

    /// Whether this device was taken over from a server that died (`recover`), rather than created.
    #[napi(getter)]
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    #[napi]
    pub fn status(&self) -> u32 {
        self.device.as_ref().map_or(0, |d| u32::from(d.status()))
    }

    #[napi]
    pub fn negotiated_features(&self) -> BigInt {
        BigInt::from(self.device.as_ref().map_or(0, |d| d.negotiated_features()))
    }

    /// The state file that lets a restarted server take the device over, if any.
    #[napi]
    pub fn state_path(&self) -> Option<String> {
        self.device
            .as_ref()
            .and_then(|d| d.state_path())
            .map(|p| p.display().to_string())
    }

    #[napi]
    pub fn counters(&self) -> DeviceCounters {
        match (&self.device, &self.final_counters) {
            (Some(d), _) => counters(d.stats(), self.serving.server.as_deref(), self.io.as_deref()),
            (None, Some(c)) => *c,
            (None, None) => DeviceCounters::default(),
        }
    }

    /// Stops serving and destroys the device (off the JavaScript thread). Throws ERR_VDUSE_BUSY — and
    /// keeps serving — while the device is still attached to the vDPA bus.
    #[napi]
    pub fn close(&mut self, env: Env) -> napi::Result<AsyncTask<Close>> {
        if let Some(d) = &self.device {
            if d.is_attached() {
                return Err(vduse_core::Error::Busy {
                    name: d.name().to_string(),
                    reason: "still attached to the vDPA bus; detach it first",
                })
                .or_throw(&env);
            }
        }
        Ok(self.stop_serving(true))
    }

    /// Stops serving without detaching or destroying the device, for a successor that takes it over with
    /// `recover` (off the JavaScript thread). Requests still in flight are served again by the successor.
    /// Throws ERR_VDUSE_BUSY — and changes nothing — while native I/O is queued or running (a write of
    /// this server could land after the successor's): wait for `ioQuiet` first, holding new submissions.
    #[napi]
    pub fn release(&mut self, env: Env) -> napi::Result<AsyncTask<Close>> {
        if let Some(d) = &self.device {
            if d.state_path().is_none() {
                return Err(vduse_core::Error::NotRecoverable {
                    name: d.name().to_string(),
                    reason: "it keeps no state file, so no successor could take it over".into(),
                })
                .or_throw(&env);
            }
            if !self.io_is_quiet() {
                return Err(vduse_core::Error::Busy {
                    name: d.name().to_string(),
                    reason: "native I/O is still running; a successor could be overtaken by its writes",
                })
                .or_throw(&env);
            }
        }
        Ok(self.stop_serving(false))
    }
}

impl BindingDevice {
    fn nic_counters(&self) -> Option<NicCounters> {
        self.nic
            .as_ref()
            .map(NativeNic::counters)
            .or_else(|| self.final_nic.clone())
    }

    /// Records the final counters, publishes what completed, stops serving on this thread, and hands the
    /// device to a task that closes (`destroy`) or releases it off the JavaScript thread.
    fn stop_serving(&mut self, destroy: bool) -> AsyncTask<Close> {
        if let Some(d) = &self.device {
            self.final_counters = Some(counters(
                d.stats(),
                self.serving.server.as_deref(),
                self.io.as_deref(),
            ));
        }
        if let Some(s) = &self.serving.server {
            s.flush();
            s.close();
        }
        if let Some(nic) = &self.nic {
            self.final_nic = Some(nic.counters());
        }
        if let Some(fs) = &self.fs {
            self.final_fs = Some(crate::fs::counters(fs));
        }
        self.final_mounts = self.fs_mount_stats();
        if let Some(e) = &self.nbd {
            self.final_nbd = Some(crate::nbd::counters(e));
        }
        AsyncTask::new(Close {
            device: self.device.take(),
            io: self.io.take(),
            nbd: self.nbd.take(),
            nic: self.nic.take(),
            fs: self.fs.take(),
            router: self.router.take(),
            destroy,
            failure: Parked::default(),
        })
    }
}

impl Drop for BindingDevice {
    fn drop(&mut self) {
        // Collected without close(): the NBD engine goes first — its sockets shut down, so no worker the
        // device joins below stays blocked writing to a server.
        if let Some(nbd) = self.nbd.take() {
            nbd.stop();
        }
    }
}
