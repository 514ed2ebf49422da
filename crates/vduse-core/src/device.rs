//! A VDUSE device: created on `/dev/vduse/control`, served through `/dev/vduse/$NAME` by a message-loop
//! thread (status, IOTLB and vq-state messages, answered at once) and one worker thread per virtqueue.
//! Nothing the message loop does waits on the device model for longer than a bounded drain, well inside
//! the kernel's 30 s message timeout that would otherwise break the device for good.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};

use crate::control::Control;
use crate::error::{last_os, Error, Result};
use crate::memory::{IotlbMap, Memory};
use crate::model::DeviceModel;
use crate::queue::{run_worker, QueueShared, Transport};
use crate::uapi::{self, vduse_dev_config, vduse_dev_request, vduse_dev_response, vduse_vq_info};

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;

/// Ring and platform features the transport implements for every model.
pub const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_ACCESS_PLATFORM)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC);

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_FS: u32 = 26;
const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;

/// How to create a device (the model supplies id, features, config and queues).
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Device name: `/dev/vduse/NAME` and the name given to `vdpa dev add`.
    pub name: String,
    pub vendor_id: u32,
    /// Destroy a leftover device of the same name (from a process that died) instead of failing.
    pub replace_stale: bool,
    /// Longest the message loop waits for in-flight requests on reset or IOTLB change.
    pub drain_timeout: Duration,
}

impl DeviceOptions {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            vendor_id: 0,
            replace_stale: false,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Checks what the kernel would reject, with a message that says which option is wrong.
pub fn validate(name: &str, model: &dyn DeviceModel) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if name.is_empty() || name.len() >= uapi::VDUSE_NAME_MAX {
        return bad(format!("name must be 1 to {} bytes", uapi::VDUSE_NAME_MAX - 1));
    }
    if name == "control" || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return bad(format!("name {name:?} is not usable as /dev/vduse/NAME"));
    }
    let queues = u32::from(model.num_queues());
    if queues == 0 || queues > uapi::VDUSE_MAX_VQ_NUM {
        return bad(format!(
            "queue count {queues} must be 1..={}",
            uapi::VDUSE_MAX_VQ_NUM
        ));
    }
    let size = model.queue_size();
    if !size.is_power_of_two() || size > uapi::VDUSE_MAX_VQ_SIZE {
        return bad(format!(
            "queue size {size} must be a power of two up to {}",
            uapi::VDUSE_MAX_VQ_SIZE
        ));
    }
    if model.config_space().len() > uapi::VDUSE_MAX_CONFIG_SIZE {
        return bad(format!(
            "config space is larger than {} bytes",
            uapi::VDUSE_MAX_CONFIG_SIZE
        ));
    }
    let features = model.device_features();
    match model.device_id() {
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

struct VduseTransport {
    dev: Arc<File>,
    memory: Arc<Memory>,
}

impl Transport for VduseTransport {
    fn notify(&self, queue: u16) {
        let index = u32::from(queue);
        // SAFETY: VDUSE_VQ_INJECT_IRQ reads one u32 from the pointer.
        let ret = unsafe { ioctl_with_ref(self.dev.as_ref(), uapi::VDUSE_VQ_INJECT_IRQ(), &index) };
        if ret < 0 {
            log::debug!("queue {queue}: inject irq: {}", std::io::Error::last_os_error());
        }
    }

    fn refresh_memory(&self) -> bool {
        let before = self.memory.snapshot();
        match IotlbMap::load(&self.dev) {
            Ok(map) if map.regions() != before.regions() || map.regions() > 0 => {
                let changed = map.regions() != before.regions();
                self.memory.replace(map);
                changed
            }
            Ok(_) => false,
            Err(e) => {
                log::warn!("cannot read the IOTLB: {e}");
                false
            }
        }
    }
}

struct Worker {
    thread: JoinHandle<()>,
    stop: Arc<EventFd>,
}

struct Shared {
    name: String,
    dev: Arc<File>,
    model: Arc<dyn DeviceModel>,
    memory: Arc<Memory>,
    queues: Vec<Arc<QueueShared>>,
    status: AtomicU8,
    features: AtomicU64,
    workers: Mutex<Vec<Worker>>,
    drain_timeout: Duration,
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
    pub stale_completions: u64,
}

/// A created VDUSE device being served. Dropping it stops serving and destroys the device.
pub struct VduseDevice {
    shared: Arc<Shared>,
    /// The device name, kept for destroying after `shared` (and the device fd) is gone.
    name: String,
    stop: Arc<EventFd>,
    message_loop: Option<JoinHandle<()>>,
    destroyed: bool,
}

impl VduseDevice {
    /// Creates the device in the kernel and starts serving it. Attach it afterwards with
    /// `vdpa dev add name NAME mgmtdev vduse` (from another thread or process: the kernel's probe
    /// sends messages and I/O that this device must answer while the attach waits).
    pub fn create(options: DeviceOptions, model: Arc<dyn DeviceModel>) -> Result<Self> {
        validate(&options.name, model.as_ref())?;
        let control = Control::open()?;
        control.set_api_version(uapi::VDUSE_API_VERSION_0)?;
        match create_in_kernel(&control, &options, model.as_ref()) {
            Err(Error::Exists { .. }) if options.replace_stale => {
                destroy_device(&control, &options.name).map_err(|e| match e {
                    Error::Busy { .. } => Error::Exists {
                        name: options.name.clone(),
                    },
                    e => e,
                })?;
                log::info!("replaced a stale VDUSE device named {:?}", options.name);
                create_in_kernel(&control, &options, model.as_ref())?;
            }
            other => other?,
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(format!("{}/{}", uapi::DEV_DIR, options.name))
            .map_err(|e| Error::sys("open(/dev/vduse/NAME)", e))
            .and_then(|dev| setup_queues(&dev, model.as_ref()).map(|_| dev));
        let dev = match opened {
            Ok(dev) => Arc::new(dev),
            Err(e) => {
                let _ = destroy_device(&control, &options.name);
                return Err(e);
            }
        };
        let memory = Arc::new(Memory::default());
        let transport: Arc<dyn Transport> = Arc::new(VduseTransport {
            dev: dev.clone(),
            memory: memory.clone(),
        });
        let queues = (0..model.num_queues())
            .map(|i| QueueShared::new(i, memory.clone(), transport.clone()))
            .collect();
        let shared = Arc::new(Shared {
            name: options.name.clone(),
            dev,
            model,
            memory,
            queues,
            status: AtomicU8::new(0),
            features: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
            drain_timeout: options.drain_timeout,
        });
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
        let loop_shared = shared.clone();
        let loop_stop = stop.clone();
        let message_loop = std::thread::Builder::new()
            .name(format!("vduse-msg-{}", options.name))
            .spawn(move || message_loop(&loop_shared, &loop_stop))
            .map_err(|e| Error::sys("spawn", e))?;
        Ok(Self {
            shared,
            name: options.name,
            stop,
            message_loop: Some(message_loop),
            destroyed: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The last device status the driver set (virtio status bits).
    pub fn status(&self) -> u8 {
        self.shared.status.load(Ordering::Acquire)
    }

    /// Features the driver accepted (meaningful after FEATURES_OK).
    pub fn negotiated_features(&self) -> u64 {
        self.shared.features.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> DeviceStats {
        let mut s = DeviceStats::default();
        for q in &self.shared.queues {
            let st = &q.stats;
            s.kicks += st.kicks.load(Ordering::Relaxed);
            s.batches += st.batches.load(Ordering::Relaxed);
            s.requests += st.requests.load(Ordering::Relaxed);
            s.completions += st.completions.load(Ordering::Relaxed);
            s.interrupts += st.interrupts.load(Ordering::Relaxed);
            s.bad_chains += st.bad_chains_total();
            s.stale_completions += st.stale_completions.load(Ordering::Relaxed);
        }
        s
    }

    /// Rewrites part of the config space and, once the driver is running, tells it with a config interrupt.
    pub fn update_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        let mut buf = vec![0u8; 8 + data.len()];
        buf[..4].copy_from_slice(&offset.to_ne_bytes());
        buf[4..8].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        buf[8..].copy_from_slice(data);
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

    /// Stops serving, closes the device node and destroys the device. Fails with `Busy` while it is still
    /// attached to the vDPA bus (detach first: `vdpa dev del NAME`).
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.destroyed {
            return Ok(());
        }
        self.destroyed = true;
        let _ = self.stop.write(1);
        if let Some(t) = self.message_loop.take() {
            let _ = t.join();
        }
        self.shared.stop_queues();
        // DESTROY_DEV fails while the device node is open: close it now (the threads have let go of it).
        // SAFETY: dup2 atomically replaces the fd with one on /dev/null, so later uses of `shared.dev`
        // (a late completion's interrupt) fail harmlessly instead of reaching a recycled fd number.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, self.shared.dev.as_raw_fd());
                libc::close(null);
            }
        }
        let control = Control::open()?;
        destroy_device(&control, &self.name)
    }
}

impl Drop for VduseDevice {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("VDUSE device {:?} not destroyed: {e}", self.name);
        }
    }
}

fn create_in_kernel(control: &Control, options: &DeviceOptions, model: &dyn DeviceModel) -> Result<()> {
    let config = model.config_space();
    let mut header = vduse_dev_config {
        name: [0; uapi::VDUSE_NAME_MAX],
        vendor_id: options.vendor_id,
        device_id: model.device_id(),
        features: model.device_features() | TRANSPORT_FEATURES,
        vq_num: u32::from(model.num_queues()),
        vq_align: 4096,
        reserved: [0; 13],
        config_size: config.len() as u32,
    };
    header.name[..options.name.len()].copy_from_slice(options.name.as_bytes());
    let mut buf = vec![0u8; std::mem::size_of::<vduse_dev_config>() + config.len()];
    // SAFETY: vduse_dev_config is plain old data; copying its bytes into a buffer of at least its size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&header as *const vduse_dev_config).cast::<u8>(),
            buf.as_mut_ptr(),
            std::mem::size_of::<vduse_dev_config>(),
        )
    };
    buf[std::mem::size_of::<vduse_dev_config>()..].copy_from_slice(&config);
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
fn setup_queues(dev: &File, model: &dyn DeviceModel) -> Result<()> {
    for index in 0..u32::from(model.num_queues()) {
        let cfg = uapi::vduse_vq_config {
            index,
            max_size: model.queue_size(),
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
                name: self.name.clone(),
            }
        } else {
            Error::sys(syscall, err)
        }
    }

    /// DRIVER_OK: read the negotiated features and rings, map the IOTLB, register kicks, start workers.
    fn start_queues(&self) -> Result<()> {
        let mut features = 0u64;
        // SAFETY: VDUSE_DEV_GET_FEATURES writes one u64 through the pointer.
        let ret =
            unsafe { ioctl_with_mut_ref(self.dev.as_ref(), uapi::VDUSE_DEV_GET_FEATURES(), &mut features) };
        if ret < 0 {
            return Err(self.device_error("ioctl(VDUSE_DEV_GET_FEATURES)"));
        }
        self.features.store(features, Ordering::Release);
        let map = IotlbMap::load(&self.dev).map_err(|e| Error::sys("ioctl(VDUSE_IOTLB_GET_FD)", e))?;
        let map = self.memory.replace(map);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for q in &self.queues {
            let mut info = vduse_vq_info {
                index: u32::from(q.index),
                ..Default::default()
            };
            // SAFETY: VDUSE_VQ_GET_INFO reads the index and fills one vduse_vq_info.
            let ret = unsafe { ioctl_with_mut_ref(self.dev.as_ref(), uapi::VDUSE_VQ_GET_INFO(), &mut info) };
            if ret < 0 {
                return Err(self.device_error("ioctl(VDUSE_VQ_GET_INFO)"));
            }
            if info.ready == 0 {
                continue;
            }
            let queue = build_queue(self.model.queue_size(), &info, event_idx, &map).map_err(|e| {
                Error::InvalidConfig(format!("queue {}: driver set up an invalid ring: {e}", q.index))
            })?;
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?;
            let kickfd = uapi::vduse_vq_eventfd {
                index: u32::from(q.index),
                fd: kick.as_raw_fd(),
            };
            // SAFETY: VDUSE_VQ_SETUP_KICKFD reads one vduse_vq_eventfd from the pointer.
            let ret = unsafe { ioctl_with_ref(self.dev.as_ref(), uapi::VDUSE_VQ_SETUP_KICKFD(), &kickfd) };
            if ret < 0 {
                return Err(self.device_error("ioctl(VDUSE_VQ_SETUP_KICKFD)"));
            }
            q.activate(queue);
            let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
            let (shared, model, worker_stop) = (q.clone(), self.model.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vduse-vq{}-{}", q.index, self.name))
                .spawn(move || run_worker(shared, model, kick, worker_stop))
                .map_err(|e| Error::sys("spawn", e))?;
            workers.push(Worker { thread, stop });
        }
        Ok(())
    }

    /// Reset or teardown: stop the workers, give in-flight requests a bounded time, forget the rings and map.
    fn stop_queues(&self) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in &workers {
            let _ = w.stop.write(1);
        }
        for w in workers {
            let _ = w.thread.join();
        }
        for q in &self.queues {
            if !q.wait_idle(self.drain_timeout) {
                log::warn!(
                    "queue {}: {} requests still in flight at reset; dropping them",
                    q.index,
                    q.inflight()
                );
            }
            q.deactivate();
        }
        self.memory.clear();
    }

    fn handle_message(&self, req: &vduse_dev_request) -> vduse_dev_response {
        match req.type_ {
            uapi::VDUSE_SET_STATUS => {
                let status = req.status();
                let before = self.status.load(Ordering::Acquire);
                let mut ok = true;
                if status & STATUS_DRIVER_OK == 0 && before & STATUS_DRIVER_OK != 0 || status == 0 {
                    self.stop_queues();
                }
                if status & STATUS_DRIVER_OK != 0 && before & STATUS_DRIVER_OK == 0 {
                    if let Err(e) = self.start_queues() {
                        log::error!("device {:?}: cannot start serving: {e}", self.name);
                        self.stop_queues();
                        ok = false;
                    }
                }
                if ok {
                    self.status.store(status, Ordering::Release);
                    self.model
                        .status_changed(status, self.features.load(Ordering::Acquire));
                }
                vduse_dev_response::new(req.request_id, ok)
            }
            uapi::VDUSE_GET_VQ_STATE => {
                let index = req.vq_index();
                let mut resp = vduse_dev_response::new(req.request_id, true);
                let next = self
                    .queues
                    .get(index as usize)
                    .and_then(|q| q.next_avail())
                    .unwrap_or(0);
                resp.set_split_vq_state(index, next);
                resp
            }
            uapi::VDUSE_UPDATE_IOTLB => {
                // vhost-vdpa changed the driver's memory: drop the map (workers re-read the IOTLB before
                // their next batch), then let requests that still use the old one finish before the driver
                // may reuse those pages. No mmap/munmap here: see `Memory`.
                self.memory.retire(true);
                for q in &self.queues {
                    if !q.wait_idle(self.drain_timeout) {
                        log::warn!(
                            "queue {}: requests still in flight across an IOTLB update",
                            q.index
                        );
                    }
                }
                vduse_dev_response::new(req.request_id, true)
            }
            other => {
                log::debug!("device {:?}: unsupported message type {other}", self.name);
                vduse_dev_response::new(req.request_id, false)
            }
        }
    }
}

fn build_queue(
    max_size: u16,
    info: &vduse_vq_info,
    event_idx: bool,
    map: &IotlbMap,
) -> std::result::Result<Queue, virtio_queue::Error> {
    let mut q = Queue::new(max_size)?;
    let size = u16::try_from(info.num).map_err(|_| virtio_queue::Error::InvalidSize)?;
    q.try_set_size(size)?;
    q.try_set_desc_table_address(GuestAddress(info.desc_addr))?;
    q.try_set_avail_ring_address(GuestAddress(info.driver_addr))?;
    q.try_set_used_ring_address(GuestAddress(info.device_addr))?;
    q.set_event_idx(event_idx);
    q.set_next_avail(info.split_avail_index());
    q.set_ready(true);
    let used = q.used_idx(map.memory(), std::sync::atomic::Ordering::Acquire)?;
    q.set_next_used(used.0);
    Ok(q)
}

fn message_loop(shared: &Shared, stop: &EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: shared.dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut broken_logged = false;
    loop {
        fds[0].revents = 0;
        fds[1].revents = 0;
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::error!(
                "device {:?}: poll: {}",
                shared.name,
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLERR != 0 {
            if !broken_logged {
                log::error!("device {:?}: the kernel marked the device broken", shared.name);
                broken_logged = true;
            }
            // Nothing more will come; wait for the stop signal only.
            fds[0].events = 0;
            continue;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let mut req = vduse_dev_request::default();
        let buf = req.as_mut_bytes();
        match (&*shared.dev).read(buf) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => {
                log::warn!("device {:?}: short message ({n} bytes)", shared.name);
                continue;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(e) => {
                log::error!("device {:?}: read: {e}", shared.name);
                return;
            }
        }
        let resp = shared.handle_message(&req);
        let out = resp.as_bytes();
        if let Err(e) = (&*shared.dev).write_all(out) {
            log::error!(
                "device {:?}: reply to message {}: {e}",
                shared.name,
                req.request_id
            );
        }
    }
}

/// Serves the control messages of a device no process serves any more (left by a crash), so that
/// detaching it (`vdpa dev del`) is answered at once instead of waiting out the kernel's message timeout
/// — which would also mark the device broken. Close it after the detach, then destroy the device.
pub struct Reclaim {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Reclaim {
    /// Opens `/dev/vduse/NAME`; `Busy` if a live process still serves it.
    pub fn open(name: &str) -> Result<Self> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(format!("{}/{name}", uapi::DEV_DIR))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => Error::Busy {
                    name: name.into(),
                    reason: "a live process serves it",
                },
                Some(libc::ENOENT) => Error::NotFound { name: name.into() },
                _ => Error::open(format!("{}/{name}", uapi::DEV_DIR), e),
            })?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
        let loop_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vduse-reclaim-{name}"))
            .spawn(move || answer_all(&dev, &loop_stop))
            .map_err(|e| Error::sys("spawn", e))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn close(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Acknowledges status changes and IOTLB updates (the device serves no queues), refuses the rest.
fn answer_all(dev: &File, stop: &EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        fds[0].revents = 0;
        fds[1].revents = 0;
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 || fds[0].revents & libc::POLLERR != 0 {
            return;
        }
        let mut req = vduse_dev_request::default();
        let buf = req.as_mut_bytes();
        if !matches!((&*dev).read(buf), Ok(n) if n == buf.len()) {
            continue;
        }
        let ok = matches!(
            req.type_,
            uapi::VDUSE_SET_STATUS | uapi::VDUSE_UPDATE_IOTLB | uapi::VDUSE_GET_VQ_STATE
        );
        let mut resp = vduse_dev_response::new(req.request_id, ok);
        if req.type_ == uapi::VDUSE_GET_VQ_STATE {
            resp.set_split_vq_state(req.vq_index(), 0);
        }
        let out = resp.as_bytes();
        let _ = (&*dev).write_all(out);
    }
}
