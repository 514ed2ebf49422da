//! Node.js binding for `vduse-core`. Thin on purpose: the public API lives in TypeScript (`src/`),
//! which wraps these `Binding*` items and turns their errors into `VduseError`s.

// napi registers exports at load time; the test harness never loads them, so they look unused there.
#![cfg_attr(test, allow(dead_code))]

use napi_derive::napi;

mod device;
mod error;
mod file;
mod fs;
mod logger;
mod loopback;
mod nbd;
mod serve;
mod served;
mod switch;
mod uv;

use error::{OrThrow, Parked};
use napi::Env;

/// The VDUSE API version spoken by `/dev/vduse/control` (0 on Linux 6.12).
/// Throws `ERR_VDUSE_UNAVAILABLE` when the node is missing and `ERR_VDUSE_PERMISSION` when it may not be opened.
#[napi]
pub fn get_api_version(env: Env, control_path: Option<String>) -> napi::Result<u32> {
    let control = match control_path {
        Some(p) => vduse_core::Control::open_path(p),
        None => vduse_core::Control::open(),
    }
    .or_throw(&env)?;
    let version = control.api_version().or_throw(&env)?;
    Ok(version as u32)
}

/// The VDUSE feature mask of `/dev/vduse/control` (`VDUSE_GET_FEATURES`, Linux 7.3+: QUEUE_READY = 1,
/// SUSPEND = 2), or null on kernels without it (6.12).
#[napi]
pub fn get_vduse_features(env: Env, control_path: Option<String>) -> napi::Result<Option<i64>> {
    let control = match control_path {
        Some(p) => vduse_core::Control::open_path(p),
        None => vduse_core::Control::open(),
    }
    .or_throw(&env)?;
    // The mask has a handful of low bits; a JavaScript number holds it exactly.
    Ok(control.vduse_features().map(|f| f as i64))
}

/// Names of all VDUSE devices that exist (any process's, including stale ones).
#[napi]
pub fn list_devices() -> Vec<String> {
    vduse_core::list_devices()
}

/// Destroys a VDUSE device by name (detached and not served by any process).
#[napi]
pub fn destroy_device(env: Env, name: String) -> napi::Result<()> {
    let control = vduse_core::Control::open().or_throw(&env)?;
    vduse_core::destroy_device(&control, &name).or_throw(&env)
}

/// Takes a stale device over (its server died) so that it can be detached cleanly: answers the kernel,
/// and — with the dead server's state file — fails the requests it left in flight.
#[napi]
pub struct BindingReclaim {
    inner: Option<vduse_core::Reclaim>,
    took_over: bool,
}

#[napi]
impl BindingReclaim {
    /// Whether the queues were taken over (requests in flight are being failed, so a detach completes).
    #[napi(getter)]
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Destroys the device (detach it first), off the JavaScript thread: the kernel may need a moment
    /// after a detach before it lets go. Rejects with ERR_VDUSE_BUSY while it is attached.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn destroy(&mut self) -> napi::bindgen_prelude::AsyncTask<ReclaimDestroy> {
        napi::bindgen_prelude::AsyncTask::new(ReclaimDestroy {
            reclaim: self.inner.take(),
            failure: Parked::default(),
        })
    }
}

pub struct ReclaimDestroy {
    reclaim: Option<vduse_core::Reclaim>,
    failure: Parked,
}

impl napi::Task for ReclaimDestroy {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        match self.reclaim.take() {
            Some(r) => r.destroy().map_err(|e| self.failure.park(e)),
            None => Ok(()),
        }
    }

    fn resolve(&mut self, _env: napi::Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }

    fn reject(&mut self, env: napi::Env, err: napi::Error) -> napi::Result<()> {
        self.failure.reject(&env, err)
    }
}

/// Starts serving a stale device (no live process serves it). Throws `ERR_VDUSE_BUSY` if a live process
/// serves it. `stateDir`: where the dead server kept its state file (default /run/vduse).
#[napi]
pub fn reclaim_device(env: Env, name: String, state_dir: Option<String>) -> napi::Result<BindingReclaim> {
    logger::install();
    let dir = match state_dir.as_deref() {
        Some("") => None,
        Some(d) => Some(d.into()),
        None => Some(vduse_core::device::DEFAULT_STATE_DIR.into()),
    };
    let inner = vduse_core::Reclaim::open(&name, dir).or_throw(&env)?;
    let took_over = inner.took_over();
    Ok(BindingReclaim {
        inner: Some(inner),
        took_over,
    })
}

/// What a device's state file says (for `vduse list`), read without changing it.
#[napi(object)]
pub struct StateSummary {
    pub kind: String,
    /// The backend's identity; empty: the data died with the server (not recoverable).
    pub backend: String,
    /// The last server's process id.
    pub pid: u32,
    /// The status the device acknowledged last.
    pub status: u32,
    pub num_queues: u32,
    pub queue_size: u32,
    /// Servers that have served the device: 1, plus one per takeover.
    pub servings: f64,
}

/// Reads device `name`'s state file in `stateDir` (default /run/vduse; empty: none). Null when there is no
/// valid one.
#[napi]
pub fn inspect_state(name: String, state_dir: Option<String>) -> Option<StateSummary> {
    let dir = match state_dir.as_deref() {
        Some("") => return None,
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(vduse_core::device::DEFAULT_STATE_DIR),
    };
    let s = vduse_core::inflight::StateFile::inspect(&dir.join(&name)).ok()?;
    Some(StateSummary {
        kind: s.kind,
        backend: s.backend,
        pid: s.pid,
        status: u32::from(s.status),
        num_queues: u32::from(s.num_queues),
        queue_size: u32::from(s.queue_size),
        servings: s.servings as f64,
    })
}
