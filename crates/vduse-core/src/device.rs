//! A VDUSE device: created on `/dev/vduse/control` (or taken over from a server that died), served
//! through `/dev/vduse/$NAME` by a message-loop thread and by whoever serves its queues — one worker
//! thread per queue for models written in Rust, or the embedder (the Node binding serves them from the
//! JavaScript thread).
//!
//! The message loop answers every kernel message within a bounded time (all queues together), far below
//! the kernel's 30 s timeout that would break the device for good — and answers only when nothing of
//! this process can still touch memory the message takes from the device:
//!
//! - reset (`SET_STATUS` 0, or DRIVER_OK cleared): requests in flight get until the drain deadline to
//!   finish; the rest are fenced (their tickets die, so no copy reaches their memory any more);
//! - `UPDATE_IOTLB`: if no entry was removed or changed nothing waits; otherwise only requests that use
//!   removed memory are drained and, at the deadline, fenced;
//! - DRIVER_OK: kick fds are registered and queues armed; they are set up on first use.
//!
//! After a fence, the only accesses left are system calls moving data straight into driver memory
//! (native reads), which pin the mappings they use: the loop waits for those pins until the drain
//! deadline, then revokes the pinned mappings (a late read lands in memory the device owns) and waits for
//! that. It **fails closed**: an IOTLB update whose new map cannot be read, or whose memory cannot be
//! revoked in time, is refused (the kernel rolls the update back); a reset — which the kernel carries out
//! whatever the answer — is not answered until the memory is safe, and if that never happens within the
//! budget, not at all (the kernel then marks the device broken rather than reuse pages we may touch).
//! The loop never waits on the model beyond the drain deadline, and never mmaps or munmaps (see
//! [`Janitor`](crate::memory::Janitor)).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};

use crate::control::Control;
use crate::error::{last_os, Error, Result};
use crate::inflight::{StateFile, StateInfo};
use crate::lifecycle::{Lifecycle, ResumePlan, Settled, Stop};
use crate::memory::{mappings_of, IotlbMap, Memory};
use crate::model::{DeviceModel, DeviceSpec};
use crate::queue::{Budget, RingInfo, Ticket, Transport, Virtqueue};
use crate::uapi::{self, vduse_dev_config, vduse_dev_request, vduse_dev_response, vduse_vq_info};
use crate::worker::Worker;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;

/// Ring and platform features the transport implements for every model.
pub const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_ACCESS_PLATFORM)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// Feature bits 24–49 belong to the transport (virtio 1.2 §6); a model may not offer them.
/// How long a destroy waits for the kernel to let go of a device that was just detached.
pub const DESTROY_WAIT: Duration = Duration::from_secs(2);
const TRANSPORT_BITS: u64 = ((1u64 << 50) - 1) & !((1u64 << 24) - 1);

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_FS: u32 = 26;
const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;

/// The longest a reset or IOTLB change may wait for requests, whatever the options say: the kernel
/// breaks the device for good after 30 s.
pub const MAX_DRAIN: Duration = Duration::from_secs(10);
/// The longest the message loop keeps one message waiting, from when it read it — revocations included:
/// past it, the answer is a refusal (or, for a reset, none). Two thirds of the kernel's timeout (30 s by
/// default, `msg_timeout` in sysfs, read when the device is served), which also counts the time the
/// message waited behind the one before it; at most this.
pub const ANSWER_BUDGET: Duration = Duration::from_secs(20);

/// The answer budget for device `name`: two thirds of its kernel message timeout, at most
/// [`ANSWER_BUDGET`], at least 1 s (a timeout of 0, "wait forever", keeps the default).
fn answer_budget(name: &str) -> Duration {
    let secs = std::fs::read_to_string(format!("/sys/class/vduse/{name}/msg_timeout"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if secs == 0 {
        return ANSWER_BUDGET;
    }
    Duration::from_millis(secs * 2000 / 3).clamp(Duration::from_secs(1), ANSWER_BUDGET)
}
/// Where state files live unless the options say otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/vduse";

/// How to create a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Device name: `/dev/vduse/NAME` and the name given to `vdpa dev add`.
    pub name: String,
    pub vendor_id: u32,
    /// Destroy a leftover device of the same name (from a process that died) instead of failing.
    pub replace_stale: bool,
    /// Longest a reset or IOTLB change waits for requests in flight, all queues together (capped at
    /// [`MAX_DRAIN`]); requests still running then are fenced.
    pub drain_timeout: Duration,
    /// Directory of the state file (in-flight log) that lets a restarted server take the device over.
    /// `None`: no state file.
    pub state_dir: Option<PathBuf>,
    /// What stores the device's data, as a stable identity (a file's device and inode, a volume id):
    /// recorded in the state file. A takeover ([`VduseDevice::adopt`] with a spec) refuses a different
    /// backend, and a device whose backend has none — its data died with its server — cannot be taken
    /// over.
    pub backend: Option<String>,
    /// How much one pop round may take.
    pub budget: Budget,
}

impl DeviceOptions {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            vendor_id: 0,
            replace_stale: false,
            drain_timeout: Duration::from_secs(5),
            state_dir: Some(PathBuf::from(DEFAULT_STATE_DIR)),
            backend: None,
            budget: Budget::default(),
        }
    }

    fn state_path(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join(&self.name))
    }
}

/// Who serves the queues.
#[derive(Clone)]
pub enum Serving {
    /// One worker thread per queue runs this model.
    Workers(Arc<dyn DeviceModel>),
    /// The embedder polls [`VduseDevice::kick_fds`] and pops [`VduseDevice::queues`] itself.
    External,
}

/// Why the message loop drained requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainReason {
    Reset,
    IotlbChange,
}

/// Things the embedder wants to hear about (called on the message-loop thread: do not block).
#[derive(Clone, Debug)]
pub enum DeviceEvent {
    /// The driver set a new status (acknowledged). `features`: the negotiated ones.
    Status { status: u8, features: u64 },
    /// A reset or an IOTLB change waited for requests and/or fenced some.
    Drained {
        reason: DrainReason,
        waited: Duration,
        fenced: usize,
        /// Native I/O still held the fenced memory at the deadline, so it was revoked before the answer.
        revoked: bool,
    },
    /// The kernel marked the device broken (a message went unanswered past its timeout).
    Broken,
}

pub trait DeviceEvents: Send + Sync {
    fn event(&self, event: &DeviceEvent);
}

/// Checks what the kernel would reject, with a message that says which option is wrong.
pub fn validate(name: &str, spec: &DeviceSpec) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if name.is_empty() || name.len() >= uapi::VDUSE_NAME_MAX {
        return bad(format!("name must be 1 to {} bytes", uapi::VDUSE_NAME_MAX - 1));
    }
    if name == "control" || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return bad(format!("name {name:?} is not usable as /dev/vduse/NAME"));
    }
    let queues = usize::from(spec.num_queues);
    if queues == 0 || queues > Ticket::MAX_QUEUES {
        return bad(format!("queue count {queues} must be 1..={}", Ticket::MAX_QUEUES));
    }
    let size = spec.queue_size;
    if !size.is_power_of_two() || size > uapi::VDUSE_MAX_VQ_SIZE {
        return bad(format!(
            "queue size {size} must be a power of two up to {}",
            uapi::VDUSE_MAX_VQ_SIZE
        ));
    }
    if spec.config.len() > uapi::VDUSE_MAX_CONFIG_SIZE {
        return bad(format!(
            "config space is larger than {} bytes",
            uapi::VDUSE_MAX_CONFIG_SIZE
        ));
    }
    let transport = spec.features & TRANSPORT_BITS;
    if transport != 0 {
        let bits: Vec<String> = (24..50)
            .filter(|b| transport & (1 << b) != 0)
            .map(|b| b.to_string())
            .collect();
        return bad(format!(
            "feature bit(s) {} belong to the transport (packed rings, IN_ORDER, NOTIFICATION_DATA, …); vduse \
             implements the split ring with INDIRECT_DESC and EVENT_IDX and adds those itself",
            bits.join(", ")
        ));
    }
    let features = spec.features;
    match spec.device_id {
        VIRTIO_ID_BLOCK if features & VIRTIO_BLK_F_CONFIG_WCE != 0 => {
            bad("virtio-blk over VDUSE cannot offer CONFIG_WCE (the config space is read-only)".into())
        }
        VIRTIO_ID_NET if features & VIRTIO_NET_F_CTRL_VQ != 0 => {
            bad("virtio-net over VDUSE cannot offer CTRL_VQ (and so no multiqueue)".into())
        }
        VIRTIO_ID_BLOCK | VIRTIO_ID_NET | VIRTIO_ID_FS => Ok(()),
        id => bad(format!(
            "device id {id} is not allowed by VDUSE (net = 1, block = 2, fs = 26 since 6.15)"
        )),
    }
}

/// Destroys a device by name (it must be detached from the vDPA bus and not opened by any process).
pub fn destroy_device(control: &Control, name: &str) -> Result<()> {
    let mut buf = [0u8; uapi::VDUSE_NAME_MAX];
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= buf.len() {
        return Err(Error::NotFound { name: name.into() });
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: VDUSE_DESTROY_DEV reads a 256-byte name from the pointer.
    let ret = unsafe { ioctl_with_ref(control.file(), uapi::VDUSE_DESTROY_DEV(), &buf) };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EINVAL) => Error::NotFound { name: name.into() },
            Some(libc::EBUSY) => Error::Busy {
                name: name.into(),
                reason: "attached to the vDPA bus or opened by a process",
            },
            _ => Error::sys("ioctl(VDUSE_DESTROY_DEV)", err),
        });
    }
    Ok(())
}

/// [`destroy_device`], waiting out a transient `Busy`: right after a detach the kernel may still hold the
/// device for a moment (the vDPA device is released after its driver's removal returns). Gives up after
/// `timeout` with the last `Busy`.
pub fn destroy_device_waiting(control: &Control, name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match destroy_device(control, name) {
            Err(Error::Busy { .. }) if Instant::now() < deadline && !is_attached(name) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Names of the VDUSE devices that exist now (any process's, including stale ones).
pub fn list_devices() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/vduse")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "control")
        .collect();
    names.sort();
    names
}

/// Whether `name` is on the vDPA bus (attached to a driver or not).
pub fn is_attached(name: &str) -> bool {
    Path::new("/sys/bus/vdpa/devices").join(name).exists()
}

/// The kernel side of one device: interrupts, ring setup, IOTLB entries.
struct Kernel {
    dev: Arc<File>,
}

impl Transport for Kernel {
    fn notify(&self, queue: u16) {
        let index = u32::from(queue);
        // SAFETY: VDUSE_VQ_INJECT_IRQ reads one u32 from the pointer.
        let ret = unsafe { ioctl_with_ref(self.dev.as_ref(), uapi::VDUSE_VQ_INJECT_IRQ(), &index) };
        if ret < 0 {
            log::debug!("queue {queue}: inject irq: {}", std::io::Error::last_os_error());
        }
    }

    fn ring_info(&self, queue: u16) -> std::io::Result<RingInfo> {
        let mut info = vduse_vq_info {
            index: u32::from(queue),
            ..Default::default()
        };
        // SAFETY: VDUSE_VQ_GET_INFO reads the index and fills one vduse_vq_info.
        let ret = unsafe { ioctl_with_mut_ref(self.dev.as_ref(), uapi::VDUSE_VQ_GET_INFO(), &mut info) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RingInfo {
            size: u16::try_from(info.num).unwrap_or(0),
            desc: info.desc_addr,
            avail: info.driver_addr,
            used: info.device_addr,
            avail_idx: info.split_avail_index(),
            ready: info.ready != 0,
        })
    }
}

/// Device-wide counters (sums over queues).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub kicks: u64,
    pub batches: u64,
    pub requests: u64,
    pub completions: u64,
    pub interrupts: u64,
    pub bad_chains: u64,
    pub duplicate_heads: u64,
    pub fenced: u64,
    pub stale_completions: u64,
    pub broken_queues: u64,
    pub in_flight: u64,
    pub iotlb_reloads: u64,
    pub drains: u64,
    /// Longest a single drain kept the kernel waiting (microseconds).
    pub max_drain_us: u64,
    /// Requests a taken-over device found in flight and served again.
    pub resubmitted: u64,
}

struct Shared {
    /// Queues, memory and drains: what every transport shares.
    life: Lifecycle,
    dev: Arc<File>,
    spec: DeviceSpec,
    status: AtomicU8,
    features: AtomicU64,
    /// The native model, told of each session's features before its first request.
    model: Option<Arc<dyn DeviceModel>>,
    state: Option<Arc<StateFile>>,
    broken: AtomicBool,
    resubmitted: AtomicU64,
}

/// A created (or taken-over) VDUSE device being served. Close it after detaching it; dropping it without
/// closing keeps answering the kernel if it is still attached (see [`VduseDevice::close`]).
pub struct VduseDevice {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    message_loop: Option<JoinHandle<()>>,
    workers: Vec<Worker>,
    closed: bool,
}

impl VduseDevice {
    /// Creates the device in the kernel and starts serving it. Attach it afterwards with
    /// `vdpa dev add name NAME mgmtdev vduse` (from another thread or process: the kernel's probe
    /// sends messages and I/O that this device must answer while the attach waits).
    pub fn create(
        options: DeviceOptions,
        spec: DeviceSpec,
        serving: Serving,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> Result<Self> {
        validate(&options.name, &spec)?;
        let control = Control::open()?;
        control.set_api_version(uapi::VDUSE_API_VERSION_0)?;
        match create_in_kernel(&control, &options, &spec) {
            Err(Error::Exists { .. }) if options.replace_stale => {
                destroy_device(&control, &options.name).map_err(|e| match e {
                    Error::Busy { .. } => Error::Exists {
                        name: options.name.clone(),
                    },
                    e => e,
                })?;
                log::info!("replaced a stale VDUSE device named {:?}", options.name);
                create_in_kernel(&control, &options, &spec)?;
            }
            other => other?,
        }
        let opened = open_device(&options.name).and_then(|dev| setup_queues(&dev, &spec).map(|_| dev));
        let dev = match opened {
            Ok(dev) => Arc::new(dev),
            Err(e) => {
                let _ = destroy_device(&control, &options.name);
                return Err(e);
            }
        };
        // A state file of an earlier device of this name describes rings that are gone: one that stayed
        // where a successor would look must not be taken for this device's.
        let default_path = Path::new(DEFAULT_STATE_DIR).join(&options.name);
        if options.state_path().as_deref() != Some(default_path.as_path()) {
            let _ = std::fs::remove_file(&default_path);
        }
        let state = match options.state_path() {
            Some(path) => {
                let info = StateInfo {
                    device_id: spec.device_id,
                    num_queues: spec.num_queues,
                    queue_size: spec.queue_size,
                    features: spec.features | TRANSPORT_FEATURES,
                    config: spec.config.clone(),
                };
                match StateFile::create(&path, &info) {
                    Ok(s) => {
                        s.set_kind(&spec.kind);
                        s.set_backend(options.backend.as_deref().unwrap_or(""));
                        Some(s)
                    }
                    Err(e) => {
                        log::warn!(
                            "device {:?}: no state file at {} ({e}); a restarted server cannot take it over",
                            options.name,
                            path.display()
                        );
                        let _ = std::fs::remove_file(&path);
                        None
                    }
                }
            }
            None => None,
        };
        let device = Self::serve(&options, spec, serving, events, dev, state, 0, 0);
        if device.is_err() {
            let _ = destroy_device(&control, &options.name);
        }
        device
    }

    /// Takes over a device whose server died: reopens `/dev/vduse/NAME`, reads its state file (which must
    /// match `expect` if given: same device, features, queues and config), answers what the kernel kept
    /// for us, and serves the queues again — the requests the dead server had in flight first, in their
    /// original order. `Busy` if a live process still serves it.
    pub fn adopt(
        options: DeviceOptions,
        expect: Option<&DeviceSpec>,
        serving: impl FnOnce(&DeviceSpec) -> Serving,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> Result<Self> {
        let node = format!("{}/{}", uapi::DEV_DIR, options.name);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&node)
        };
        // The node admits one opener: a tool probing it (`vduse list`) holds it for an instant.
        let mut opened = open();
        for _ in 0..5 {
            match &opened {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                    opened = open();
                }
                _ => break,
            }
        }
        let dev = match opened {
            Ok(f) => Arc::new(f),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::Busy {
                    name: options.name.clone(),
                    reason: "a live process serves it",
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(Error::NotFound {
                    name: options.name.clone(),
                })
            }
            Err(e) => return Err(Error::open(node, e)),
        };
        let path = options.state_path().ok_or_else(|| Error::NotRecoverable {
            name: options.name.clone(),
            reason: "no state directory was given".into(),
        })?;
        let state = StateFile::open(&path).map_err(|e| Error::NotRecoverable {
            name: options.name.clone(),
            reason: format!("state file {}: {e}", path.display()),
        })?;
        let info = state.info();
        let spec = DeviceSpec {
            device_id: info.device_id,
            features: info.features & !TRANSPORT_FEATURES,
            config: info.config.clone(),
            num_queues: info.num_queues,
            queue_size: info.queue_size,
            max_segments: expect.map_or(usize::from(info.queue_size), |s| s.max_segments),
            kind: state.kind(),
            held_queues: expect.map_or(0, |s| s.held_queues),
        };
        if let Some(want) = expect {
            // The storage first: a device whose data died with its server is not worth comparing.
            let recorded = state.backend();
            match options.backend.as_deref() {
                _ if recorded.is_empty() => {
                    return Err(Error::NotRecoverable {
                        name: options.name.clone(),
                        reason: "its data did not outlive its server (the backend had no identity)".into(),
                    })
                }
                None | Some("") => {
                    return Err(Error::NotRecoverable {
                        name: options.name.clone(),
                        reason: "the new backend has no identity to check against the old one".into(),
                    })
                }
                Some(ours) if ours != recorded => {
                    return Err(Error::Mismatch {
                        name: options.name.clone(),
                        what: "backend".into(),
                        expected: ours.into(),
                        found: recorded,
                    })
                }
                Some(_) => {}
            }
            mismatch(&options.name, want, &spec)?;
        }
        let status = state.status();
        let features = state.driver_features();
        let serving = serving(&spec);
        let device = Self::serve(
            &options,
            spec,
            serving,
            events,
            dev,
            Some(state.clone()),
            status,
            features,
        )?;
        state.begin_serving();
        Ok(device)
    }

    #[allow(clippy::too_many_arguments)]
    fn serve(
        options: &DeviceOptions,
        spec: DeviceSpec,
        serving: Serving,
        events: Option<Arc<dyn DeviceEvents>>,
        dev: Arc<File>,
        state: Option<Arc<StateFile>>,
        status: u8,
        features: u64,
    ) -> Result<Self> {
        let kernel = Arc::new(Kernel { dev: dev.clone() });
        let life = Lifecycle::new(
            &options.name,
            &spec,
            Arc::new(Memory::new(dev.clone())),
            kernel,
            |i| state.as_ref().and_then(|s| s.queue(i)),
            options.drain_timeout,
            answer_budget(&options.name),
            events,
        )?;
        let shared = Arc::new(Shared {
            life,
            dev,
            spec,
            status: AtomicU8::new(status),
            features: AtomicU64::new(features),
            model: match &serving {
                Serving::Workers(model) => Some(model.clone()),
                Serving::External => None,
            },
            state,
            broken: AtomicBool::new(false),
            resubmitted: AtomicU64::new(0),
        });
        let workers = match &serving {
            Serving::Workers(model) => shared.life.spawn_workers(model, options.budget)?,
            Serving::External => Vec::new(),
        };
        // A taken-over device: first answer what the kernel kept for us (a reset pending since the crash
        // must not see the old requests run), then resume the queues if the driver is still running.
        if shared.state.is_some() && status & STATUS_DRIVER_OK != 0 {
            shared.answer_pending();
            if shared.status.load(Ordering::Acquire) & STATUS_DRIVER_OK != 0 {
                shared.resume()?;
            }
        }
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
        let loop_shared = shared.clone();
        let loop_stop = stop.clone();
        let message_loop = std::thread::Builder::new()
            .name(format!("vduse-msg-{}", options.name))
            .spawn(move || loop_shared.message_loop(&loop_stop))
            .map_err(|e| Error::sys("spawn", e))?;
        Ok(Self {
            shared,
            stop,
            message_loop: Some(message_loop),
            workers,
            closed: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.life.name
    }

    pub fn spec(&self) -> &DeviceSpec {
        &self.shared.spec
    }

    /// The queues, for [`Serving::External`].
    pub fn queues(&self) -> &[Arc<Virtqueue>] {
        &self.shared.life.queues
    }

    /// One eventfd per queue, readable when the queue needs serving (kicks, and completions that free
    /// room), for [`Serving::External`].
    pub fn kick_fds(&self) -> &[Arc<EventFd>] {
        &self.shared.life.kicks
    }

    pub fn memory(&self) -> &Arc<Memory> {
        &self.shared.life.memory
    }

    /// The last device status the driver set (virtio status bits).
    pub fn status(&self) -> u8 {
        self.shared.status.load(Ordering::Acquire)
    }

    /// Features the driver accepted (meaningful after FEATURES_OK).
    pub fn negotiated_features(&self) -> u64 {
        self.shared.features.load(Ordering::Acquire)
    }

    pub fn is_broken(&self) -> bool {
        self.shared.broken.load(Ordering::Acquire)
    }

    /// Path of the state file, if there is one.
    pub fn state_path(&self) -> Option<PathBuf> {
        self.shared.state.as_ref().map(|s| s.path().to_owned())
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            resubmitted: self.shared.resubmitted.load(Ordering::Relaxed),
            ..self.shared.life.stats()
        }
    }

    /// Rewrites part of the config space and, once the driver is running, tells it with a config interrupt.
    pub fn update_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        let mut buf = vec![0u8; 8 + data.len()];
        buf[..4].copy_from_slice(&offset.to_ne_bytes());
        buf[4..8].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        buf[8..].copy_from_slice(data);
        // The state file first: a successor compares its own config (from the resized backend) with it.
        if let Some(state) = &self.shared.state {
            state.set_config(offset as usize, data);
        }
        // SAFETY: VDUSE_DEV_SET_CONFIG reads a vduse_config_data header followed by `length` bytes.
        let ret = unsafe {
            ioctl_with_ptr(
                self.shared.dev.as_ref(),
                uapi::VDUSE_DEV_SET_CONFIG(),
                buf.as_ptr(),
            )
        };
        if ret < 0 {
            return Err(self.shared.device_error("ioctl(VDUSE_DEV_SET_CONFIG)"));
        }
        if self.status() & STATUS_DRIVER_OK != 0 {
            // SAFETY: VDUSE_DEV_INJECT_CONFIG_IRQ takes no argument.
            let ret = unsafe { ioctl(self.shared.dev.as_ref(), uapi::VDUSE_DEV_INJECT_CONFIG_IRQ()) };
            if ret < 0 {
                return Err(self.shared.device_error("ioctl(VDUSE_DEV_INJECT_CONFIG_IRQ)"));
            }
        }
        Ok(())
    }

    /// Stops serving, closes the device node and destroys the device. Fails with `Busy` — and keeps
    /// serving — while the device is still on the vDPA bus: stopping then would leave the kernel's
    /// detach unanswered until its timeout breaks the device. Detach first (`vdpa dev del NAME`), then
    /// call again.
    pub fn close(&mut self) -> Result<()> {
        if !self.closed && is_attached(&self.shared.life.name) {
            return Err(Error::Busy {
                name: self.shared.life.name.clone(),
                reason: "still attached to the vDPA bus; detach it first (vdpa dev del NAME)",
            });
        }
        self.shutdown(true)
    }

    fn shutdown(&mut self, destroy: bool) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        for w in &mut self.workers {
            w.stop();
        }
        let _ = self.stop.write(1);
        if let Some(t) = self.message_loop.take() {
            let _ = t.join();
        }
        // Nothing may touch guest memory any more: fenced tickets reach no buffer; native reads still
        // pinned get until the drain timeout, then their memory is revoked.
        let mut maps = Vec::new();
        for q in &self.shared.life.queues {
            maps.extend(q.abandon().1);
        }
        let old = self.shared.life.memory.clear();
        let mappings = mappings_of(std::iter::once(&old).chain(&maps));
        let started = Instant::now();
        if self
            .shared
            .life
            .settle(mappings, started + self.shared.life.drain_timeout, started, false)
            == Settled::Unsafe
        {
            log::error!(
                "device {:?}: closing while native I/O may still touch the driver's memory",
                self.shared.life.name
            );
        }
        drop((old, maps));
        // DESTROY_DEV fails while the device node is open: close it now. Other holders of the fd (a late
        // completion's interrupt) keep working on /dev/null instead of a recycled fd number.
        // SAFETY: dup2 atomically replaces the fd with one on /dev/null.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, self.shared.dev.as_raw_fd());
                libc::close(null);
            }
        }
        if !destroy {
            return Ok(());
        }
        let control = Control::open()?;
        destroy_device_waiting(&control, &self.shared.life.name, DESTROY_WAIT)?;
        if let Some(state) = &self.shared.state {
            state.remove();
        }
        Ok(())
    }

    /// Stops serving without destroying or detaching the device: a server handing over to its successor
    /// (an upgrade), which takes the device over with [`adopt`](Self::adopt). Requests still in flight stay
    /// in the state file and are served again by the successor. Until it comes, the driver waits — and a
    /// control message it sends meanwhile breaks the device if nobody answers it within the kernel's 30 s.
    pub fn release(&mut self) -> Result<()> {
        if self.shared.state.is_none() {
            return Err(Error::NotRecoverable {
                name: self.shared.life.name.clone(),
                reason: "it keeps no state file, so no successor could take it over".into(),
            });
        }
        self.shutdown(false)
    }
}

impl Drop for VduseDevice {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if is_attached(&self.shared.life.name) {
            log::error!(
                "device {:?} dropped while attached: it keeps answering the kernel until the process exits",
                self.shared.life.name
            );
            for w in &mut self.workers {
                w.stop();
            }
            for q in &self.shared.life.queues {
                q.abandon();
            }
            // The message loop thread keeps the device answerable; it ends with the process.
            self.message_loop.take();
            self.closed = true;
            return;
        }
        if let Err(e) = self.shutdown(true) {
            log::warn!("VDUSE device {:?} not destroyed: {e}", self.shared.life.name);
        }
    }
}

fn mismatch(name: &str, want: &DeviceSpec, have: &DeviceSpec) -> Result<()> {
    let differ = |what: &str, a: String, b: String| {
        Err(Error::Mismatch {
            name: name.into(),
            what: what.into(),
            expected: a,
            found: b,
        })
    };
    if want.device_id != have.device_id {
        return differ(
            "device id",
            want.device_id.to_string(),
            have.device_id.to_string(),
        );
    }
    if want.features != have.features {
        return differ(
            "features",
            format!("{:#x}", want.features),
            format!("{:#x}", have.features),
        );
    }
    if want.num_queues != have.num_queues {
        return differ(
            "queue count",
            want.num_queues.to_string(),
            have.num_queues.to_string(),
        );
    }
    if want.queue_size != have.queue_size {
        return differ(
            "queue size",
            want.queue_size.to_string(),
            have.queue_size.to_string(),
        );
    }
    if want.config != have.config {
        return differ(
            "config space",
            format!("{:02x?}", want.config),
            format!("{:02x?}", have.config),
        );
    }
    Ok(())
}

fn open_device(name: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(format!("{}/{name}", uapi::DEV_DIR))
        .map_err(|e| Error::sys("open(/dev/vduse/NAME)", e))
}

fn create_in_kernel(control: &Control, options: &DeviceOptions, spec: &DeviceSpec) -> Result<()> {
    let config = &spec.config;
    let mut header = vduse_dev_config {
        name: [0; uapi::VDUSE_NAME_MAX],
        vendor_id: options.vendor_id,
        device_id: spec.device_id,
        features: spec.features | TRANSPORT_FEATURES,
        vq_num: u32::from(spec.num_queues),
        vq_align: 4096,
        reserved: [0; 13],
        config_size: config.len() as u32,
    };
    header.name[..options.name.len()].copy_from_slice(options.name.as_bytes());
    let mut buf = vec![0u8; std::mem::size_of::<vduse_dev_config>() + config.len()];
    buf[..std::mem::size_of::<vduse_dev_config>()].copy_from_slice(header.as_bytes());
    buf[std::mem::size_of::<vduse_dev_config>()..].copy_from_slice(config);
    // SAFETY: VDUSE_CREATE_DEV reads the header and then `config_size` bytes, all inside `buf`.
    let ret = unsafe { ioctl_with_ptr(control.file(), uapi::VDUSE_CREATE_DEV(), buf.as_ptr()) };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EEXIST) => Error::Exists {
                name: options.name.clone(),
            },
            Some(libc::EPERM) => Error::PermissionDenied {
                path: uapi::CONTROL_PATH.into(),
                source: err,
            },
            _ => Error::sys("ioctl(VDUSE_CREATE_DEV)", err),
        });
    }
    Ok(())
}

/// Every queue needs its maximum size before `vdpa dev add` accepts the device.
fn setup_queues(dev: &File, spec: &DeviceSpec) -> Result<()> {
    for index in 0..u32::from(spec.num_queues) {
        let cfg = uapi::vduse_vq_config {
            index,
            max_size: spec.queue_size,
            reserved: [0; 13],
        };
        // SAFETY: VDUSE_VQ_SETUP reads one vduse_vq_config from the pointer.
        let ret = unsafe { ioctl_with_ref(dev, uapi::VDUSE_VQ_SETUP(), &cfg) };
        if ret < 0 {
            return Err(last_os("ioctl(VDUSE_VQ_SETUP)"));
        }
    }
    Ok(())
}

impl Shared {
    fn device_error(&self, syscall: &'static str) -> Error {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            Error::Broken {
                name: self.life.name.clone(),
            }
        } else {
            Error::sys(syscall, err)
        }
    }

    fn read_features(&self) -> Result<u64> {
        let mut features = 0u64;
        // SAFETY: VDUSE_DEV_GET_FEATURES writes one u64 through the pointer.
        let ret =
            unsafe { ioctl_with_mut_ref(self.dev.as_ref(), uapi::VDUSE_DEV_GET_FEATURES(), &mut features) };
        if ret < 0 {
            return Err(self.device_error("ioctl(VDUSE_DEV_GET_FEATURES)"));
        }
        Ok(features)
    }

    fn register_kicks(&self) -> Result<()> {
        for (q, kick) in self.life.queues.iter().zip(&self.life.kicks) {
            let kickfd = uapi::vduse_vq_eventfd {
                index: u32::from(q.index),
                fd: kick.as_raw_fd(),
            };
            // SAFETY: VDUSE_VQ_SETUP_KICKFD reads one vduse_vq_eventfd from the pointer.
            let ret = unsafe { ioctl_with_ref(self.dev.as_ref(), uapi::VDUSE_VQ_SETUP_KICKFD(), &kickfd) };
            if ret < 0 {
                return Err(self.device_error("ioctl(VDUSE_VQ_SETUP_KICKFD)"));
            }
        }
        Ok(())
    }

    /// DRIVER_OK: register kicks and arm the queues; whoever serves them sets the rings up right away.
    fn start(&self) -> Result<()> {
        let features = self.read_features()?;
        self.features.store(features, Ordering::Release);
        if let Some(state) = &self.state {
            state.set_driver_features(features);
        }
        self.life.memory.invalidate();
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        if let Some(model) = &self.model {
            model.started(features);
        }
        for q in &self.life.queues {
            q.set_event_idx(event_idx);
            q.set_features(features);
            q.arm();
        }
        self.register_kicks()?;
        // Serve now, not at the first kick: the queues may hold requests already (and the kernel's
        // virtio-blk probe waits for its first reads inside `vdpa dev add`).
        for kick in &self.life.kicks {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// A taken-over device whose driver is running: check every queue's log against its rings, then repair
    /// the logs and resume every queue the driver enabled, the dead server's requests first. Nothing is
    /// changed unless every queue checks out: a log that does not describe these rings (a state file left
    /// by another instance of the device) would replay requests the driver finished long ago.
    fn resume(&self) -> Result<()> {
        let features = self.read_features()?;
        let state = self.state.as_ref().expect("resume needs a state file");
        let refuse = |reason: String| Error::NotRecoverable {
            name: self.life.name.clone(),
            reason,
        };
        let recorded = state.driver_features();
        if recorded != 0 && recorded != features {
            return Err(refuse(format!(
                "the driver's features are {features:#x}, the state file recorded {recorded:#x}"
            )));
        }
        self.features.store(features, Ordering::Release);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.life.memory.invalidate();
        self.life
            .memory
            .reload()
            .map_err(|e| Error::sys("ioctl(VDUSE_IOTLB_GET_FD)", e))?;
        let map = self.life.memory.peek();
        let kernel = Kernel {
            dev: self.dev.clone(),
        };

        let mut plans = Vec::new();
        for q in &self.life.queues {
            let Some(log) = state.queue(q.index) else { continue };
            let info = kernel
                .ring_info(q.index)
                .map_err(|e| Error::sys("ioctl(VDUSE_VQ_GET_INFO)", e))?;
            if !info.ready || info.size == 0 {
                // Never enabled: it starts fresh when it is (activation clears its log).
                continue;
            }
            let plan = ResumePlan::check(&log, &info, &map, self.spec.queue_size)
                .map_err(|reason| refuse(format!("queue {}: {reason}", q.index)))?;
            plans.push((q, log, plan));
        }
        drop(map);
        if let Some(model) = &self.model {
            model.started(features);
        }
        for q in &self.life.queues {
            q.set_event_idx(event_idx);
            q.set_features(features);
        }
        for (q, log, plan) in plans {
            let (next_avail, in_flight) = plan.apply(&log);
            log::info!(
                "queue {}: taking over with {} request(s) in flight (next avail {next_avail})",
                q.index,
                in_flight.len(),
            );
            self.resubmitted
                .fetch_add(in_flight.len() as u64, Ordering::Relaxed);
            q.arm_resumed(next_avail, in_flight);
            // The dead server may have published completions without raising their interrupt, and a
            // driver waiting for them would wait forever; a spurious interrupt costs nothing.
            kernel.notify(q.index);
        }
        // Queues not resumed (never enabled) start fresh when the driver enables them.
        for q in &self.life.queues {
            q.arm();
        }
        self.register_kicks()?;
        for kick in &self.life.kicks {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// The answer to one message; `None`: no answer at all (a reset whose memory could not be made safe —
    /// the kernel then marks the device broken instead of handing pages we may still touch to others).
    fn handle_message(&self, req: &vduse_dev_request) -> Option<vduse_dev_response> {
        let started = Instant::now();
        match req.type_ {
            uapi::VDUSE_SET_STATUS => {
                let status = req.status();
                let before = self.status.load(Ordering::Acquire);
                let mut ok = true;
                let resets =
                    status == 0 || (before & STATUS_DRIVER_OK != 0 && status & STATUS_DRIVER_OK == 0);
                if resets && !self.life.stop_queues(started, |_| true, Stop::Reset) {
                    log::error!(
                        "device {:?}: the reset is not answered: fenced memory may still be touched",
                        self.life.name
                    );
                    return None;
                }
                if status & STATUS_DRIVER_OK != 0 && before & STATUS_DRIVER_OK == 0 {
                    if let Err(e) = self.start() {
                        log::error!("device {:?}: cannot start serving: {e}", self.life.name);
                        if !self.life.stop_queues(started, |_| true, Stop::Reset) {
                            return None;
                        }
                        ok = false;
                    }
                }
                if ok {
                    self.status.store(status, Ordering::Release);
                    if let Some(state) = &self.state {
                        state.set_status(status);
                    }
                    self.life.emit(DeviceEvent::Status {
                        status,
                        features: self.features.load(Ordering::Acquire),
                    });
                }
                Some(vduse_dev_response::new(req.request_id, ok))
            }
            uapi::VDUSE_GET_VQ_STATE => {
                let index = req.vq_index();
                let mut resp = vduse_dev_response::new(req.request_id, true);
                let next = self
                    .life
                    .queues
                    .get(index as usize)
                    .and_then(|q| q.next_avail())
                    .or_else(|| {
                        let kernel = Kernel {
                            dev: self.dev.clone(),
                        };
                        kernel.ring_info(index as u16).ok().map(|i| i.avail_idx)
                    })
                    .unwrap_or(0);
                resp.set_split_vq_state(index, next);
                Some(resp)
            }
            uapi::VDUSE_UPDATE_IOTLB => {
                let ok = self.life.memory_changed(started);
                Some(vduse_dev_response::new(req.request_id, ok))
            }
            other => {
                log::debug!("device {:?}: unsupported message type {other}", self.life.name);
                Some(vduse_dev_response::new(req.request_id, false))
            }
        }
    }

    /// Reads and answers one message if one is waiting. `Ok(false)`: nothing waiting.
    fn answer_one(&self) -> std::io::Result<bool> {
        let mut req = vduse_dev_request::default();
        let buf = req.as_mut_bytes();
        match (&*self.dev).read(buf) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => {
                log::warn!("device {:?}: short message ({n} bytes)", self.life.name);
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        }
        let Some(resp) = self.handle_message(&req) else {
            return Ok(true);
        };
        if let Err(e) = (&*self.dev).write_all(resp.as_bytes()) {
            log::error!(
                "device {:?}: reply to message {}: {e}",
                self.life.name,
                req.request_id
            );
        }
        Ok(true)
    }

    /// Answers every message already waiting (a take-over: the kernel requeues unanswered ones).
    fn answer_pending(&self) {
        while let Ok(true) = self.answer_one() {}
    }

    fn message_loop(&self, stop: &EventFd) {
        loop {
            match crate::wait_readable(self.dev.as_raw_fd(), stop.as_raw_fd()) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    // POLLERR: the kernel broke the device; nothing more will come.
                    if !self.broken.swap(true, Ordering::AcqRel) {
                        log::error!(
                            "device {:?}: the kernel marked the device broken (a message timed out); \
                             detach, destroy and recreate it",
                            self.life.name
                        );
                        self.life.emit(DeviceEvent::Broken);
                    }
                    let _ = crate::wait_readable(stop.as_raw_fd(), stop.as_raw_fd());
                    return;
                }
                Err(e) => {
                    log::error!("device {:?}: poll: {e}", self.life.name);
                    return;
                }
            }
            if let Err(e) = self.answer_one() {
                log::error!("device {:?}: read: {e}", self.life.name);
                return;
            }
        }
    }
}

/// The memory map the kernel has now, for tests and tools (mmaps: not for the message loop).
pub fn load_map(dev: &File) -> std::io::Result<IotlbMap> {
    IotlbMap::load(dev, &IotlbMap::empty())
}

#[cfg(test)]
mod tests {
    //! The message loop's answers, without a kernel: a device's control side over memory whose IOTLB a
    //! test controls (`/dev/null` stands in for the device node: interrupts and ring queries just fail).
    use super::*;
    use crate::memory::{IotlbSource, Janitor, Pins};
    use crate::queue::{Budget, Owner, Part, RequestBatch};
    use crate::rig::{desc, offer, MemfdIotlb, Rig};
    use crate::uapi::{vduse_iotlb_entry, VDUSE_ACCESS_RW};

    /// An IOTLB whose reads can be made to fail (fd exhaustion, a broken device).
    struct Flaky {
        inner: MemfdIotlb,
        fail: AtomicBool,
    }

    impl IotlbSource for Flaky {
        fn entry(&self, first: u64, last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
            }
            self.inner.entry(first, last)
        }
    }

    struct Control {
        shared: Shared,
        source: Arc<Flaky>,
        rig: Rig,
        ring: crate::rig::DriverRing,
    }

    /// A control side over one queue with a request in flight whose data buffer is at 0x8000.
    fn control(drain: Duration) -> (Control, crate::queue::Ticket) {
        let file = crate::rig::memfd(1 << 20);
        let source = Arc::new(Flaky {
            inner: MemfdIotlb::default(),
            fail: AtomicBool::new(false),
        });
        source
            .inner
            .entries
            .lock()
            .unwrap()
            .push((0, 1 << 20, VDUSE_ACCESS_RW, file));
        let memory = Arc::new(Memory::new(source.clone()));
        memory.invalidate();
        let rig = Rig {
            map: memory.snapshot(),
            ..Rig::with_memory(memory.clone())
        };
        let (ring, q) = rig.queue(16, false);
        rig.header(0x4000, crate::ram_blk::VIRTIO_BLK_T_IN, 0);
        offer(
            &ring,
            &[
                (0, desc(0x4000, 16, 1, 1)),
                (1, desc(0x8000, 4096, 3, 2)),
                (2, desc(0x4100, 1, 2, 0)),
            ],
            &[0],
        );
        let mut batch = RequestBatch::default();
        q.pop(Budget::default(), &mut batch);
        let ticket = batch.get(0).expect("popped").ticket;
        let dev = Arc::new(File::open("/dev/null").unwrap());
        let spec = DeviceSpec {
            device_id: 2,
            features: 0,
            config: Vec::new(),
            num_queues: 1,
            queue_size: 16,
            max_segments: 16,
            kind: "blk".into(),
            held_queues: 0,
        };
        let shared = Shared {
            life: Lifecycle {
                name: "test".into(),
                memory,
                queues: vec![q],
                kicks: Vec::new(),
                inflight: rig.inflight.clone(),
                drain_timeout: drain,
                answer_budget: ANSWER_BUDGET,
                janitor: Janitor::new("test").unwrap(),
                events: None,
                drains: AtomicU64::new(0),
                max_drain_us: AtomicU64::new(0),
            },
            dev,
            spec,
            status: AtomicU8::new(STATUS_DRIVER_OK),
            features: AtomicU64::new(0),
            model: None,
            state: None,
            broken: AtomicBool::new(false),
            resubmitted: AtomicU64::new(0),
        };
        (
            Control {
                shared,
                source,
                rig,
                ring,
            },
            ticket,
        )
    }

    /// Native I/O takes the request over and pins its data buffer: a zero-copy read in its system call.
    fn native_read(q: &Virtqueue, ticket: crate::queue::Ticket) -> Pins {
        q.begin_native(ticket).unwrap();
        let mut pins = Pins::new();
        assert_eq!(
            q.pin(ticket, Owner::Native, Part::Writable, 0, 4096, &mut pins),
            Ok(true)
        );
        pins
    }

    fn message(type_: u32, status: u8) -> vduse_dev_request {
        let mut req = vduse_dev_request {
            type_,
            request_id: 7,
            ..Default::default()
        };
        req.payload[0] = u32::from(status);
        req
    }

    fn answered_ok(resp: Option<vduse_dev_response>) -> Option<bool> {
        resp.map(|r| r.result == uapi::VDUSE_REQ_RESULT_OK)
    }

    /// A model's pinned system call (a virtio-fs read or write straight through the driver's buffers) on
    /// a ring that stops alone (vhost-user GET_VRING_BASE): the memory stays mapped for the other rings,
    /// so the stop is quiet only once the pin is released — else the caller must stop everything.
    #[test]
    fn a_ring_stops_quietly_only_once_a_model_pin_on_it_is_released() {
        use crate::lifecycle::Stop;
        let (c, ticket) = control(Duration::from_millis(30));
        let q = c.shared.life.queues[0].clone();
        let mut pins = Pins::new();
        assert_eq!(
            q.pin(ticket, Owner::Model, Part::Writable, 0, 4096, &mut pins),
            Ok(true)
        );
        assert_eq!(q.pinned_now(), 1);
        assert!(
            !c.shared.life.stop_queues(Instant::now(), |_| true, Stop::Ring),
            "the pinned call may still move data through the fenced request's buffers"
        );
        assert!(!q.is_live(ticket), "fenced all the same");
        pins.release();
        assert_eq!(q.pinned_now(), 0);

        let (c, ticket) = control(Duration::from_millis(100));
        let q = c.shared.life.queues[0].clone();
        let mut pins = Pins::new();
        assert_eq!(
            q.pin(ticket, Owner::Model, Part::Writable, 0, 4096, &mut pins),
            Ok(true)
        );
        // The request is never completed (fenced at the drain deadline); its call ends right after the
        // fence, within the brief wait the stop still gives pins.
        let released = Arc::new(AtomicBool::new(false));
        let call = {
            let (q, released) = (q.clone(), released.clone());
            std::thread::spawn(move || {
                while q.is_live(ticket) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                released.store(true, Ordering::SeqCst);
                drop(pins);
            })
        };
        assert!(c.shared.life.stop_queues(Instant::now(), |_| true, Stop::Ring));
        assert!(released.load(Ordering::SeqCst), "quiet only after the pin went");
        call.join().unwrap();
    }

    #[test]
    fn an_iotlb_update_whose_new_map_cannot_be_read_takes_all_memory_for_gone() {
        let (c, ticket) = control(Duration::from_millis(100));
        c.source.fail.store(true, Ordering::SeqCst);
        let resp = c.shared.handle_message(&message(uapi::VDUSE_UPDATE_IOTLB, 0));
        assert_eq!(
            answered_ok(resp),
            Some(true),
            "nothing of ours can touch it any more"
        );
        assert!(
            !c.shared.life.queues[0].is_live(ticket),
            "which request lost its memory cannot be told: all of them did (never \"none\")"
        );
        c.source.fail.store(false, Ordering::SeqCst);
        assert_eq!(
            answered_ok(c.shared.handle_message(&message(uapi::VDUSE_UPDATE_IOTLB, 0))),
            Some(true)
        );
    }

    #[test]
    fn an_update_fences_what_lost_its_memory_even_when_a_serving_thread_reloaded_the_map_first() {
        let (c, ticket) = control(Duration::from_millis(20));
        // The driver unmaps the request's memory; before the loop reads the message, a serving thread
        // (a completion, an IOTLB miss) already loads the new, empty map.
        c.source.inner.entries.lock().unwrap().clear();
        c.shared.life.memory.invalidate();
        let fresh = c.shared.life.memory.snapshot();
        assert_eq!(fresh.regions(), 0);
        let resp = c.shared.handle_message(&message(uapi::VDUSE_UPDATE_IOTLB, 0));
        assert_eq!(answered_ok(resp), Some(true));
        assert!(
            !c.shared.life.queues[0].is_live(ticket),
            "the request still used the removed memory through the map it was popped with"
        );
    }

    #[test]
    fn memory_a_native_read_still_uses_is_revoked_before_the_answer() {
        let (c, ticket) = control(Duration::from_millis(50));
        let q = c.shared.life.queues[0].clone();
        let mut pins = native_read(&q, ticket);
        // The driver unmaps the buffer's memory while the read is in its system call.
        c.source.inner.entries.lock().unwrap().clear();
        let started = Instant::now();
        let resp = c.shared.handle_message(&message(uapi::VDUSE_UPDATE_IOTLB, 0));
        assert_eq!(answered_ok(resp), Some(true));
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "it waited for the pin first"
        );
        assert!(!q.is_live(ticket), "fenced");
        let mappings = c.rig.map.mappings();
        assert!(
            mappings.iter().all(|m| m.is_revoked()),
            "a late read lands in memory the device owns"
        );
        pins.release();
        assert_eq!(c.shared.life.drains.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn memory_that_cannot_be_revoked_fails_the_answer_closed() {
        // An IOTLB update: refused.
        let (c, ticket) = control(Duration::from_millis(20));
        let q = c.shared.life.queues[0].clone();
        let mut pins = native_read(&q, ticket);
        c.rig.map.mappings()[0].fail_next_revoke();
        c.source.inner.entries.lock().unwrap().clear();
        let resp = c.shared.handle_message(&message(uapi::VDUSE_UPDATE_IOTLB, 0));
        assert_eq!(answered_ok(resp), Some(false), "never 'done' when it is not");
        assert!(c.rig.map.mappings()[0].is_lost());
        pins.release();
        // A reset — which the kernel carries out whatever the answer — is not answered at all.
        let (c, ticket) = control(Duration::from_millis(20));
        let q = c.shared.life.queues[0].clone();
        let mut pins = native_read(&q, ticket);
        c.rig.map.mappings()[0].fail_next_revoke();
        assert!(
            c.shared
                .handle_message(&message(uapi::VDUSE_SET_STATUS, 0))
                .is_none(),
            "no answer: the kernel must not hand the pages on while a read may still write them"
        );
        pins.release();
        // Without pins a reset is answered at once, revoking nothing.
        let (c, _) = control(Duration::from_millis(20));
        assert_eq!(
            answered_ok(c.shared.handle_message(&message(uapi::VDUSE_SET_STATUS, 0))),
            Some(true)
        );
        assert!(c.rig.map.mappings().iter().all(|m| !m.is_revoked()));
        let _ = c.ring;
    }

    #[test]
    fn get_vq_state_of_a_taken_over_queue_is_its_logged_progress() {
        let (c, _) = control(Duration::from_millis(20));
        let q = c.shared.life.queues[0].clone();
        q.stop();
        q.arm_resumed(41, Vec::new());
        let mut req = message(uapi::VDUSE_GET_VQ_STATE, 0);
        req.payload[0] = 0;
        let resp = c.shared.handle_message(&req).unwrap();
        assert_eq!(resp.payload[1], 41, "not the ring setup's index (0)");
    }
}
