//! The vhost-user transport: the same queues, memory and request life as a VDUSE device, reached by a
//! VMM (QEMU, cloud-hypervisor, libblkio) over a UNIX socket instead of through the kernel. No VDUSE
//! module is needed.
//!
//! - The socket protocol is rust-vmm's `vhost` crate ([`BackendReqHandler`](vhost::vhost_user::BackendReqHandler)); this file answers its
//!   messages. One client at a time; the next one is accepted when it leaves.
//! - Driver memory is the client's memory table: each region's fd is mapped once, permission-checked
//!   and revocable, exactly like a VDUSE IOTLB entry ([`MemTable`] is an [`IotlbSource`](crate::memory::IotlbSource)), so a memory
//!   change with requests in flight drains and fences them like an IOTLB update.
//! - Ring addresses arrive in the client's virtual addresses; they are translated into guest-physical
//!   ones through the table when a ring starts.
//! - A ring starts when it has a kick fd and is enabled; `GET_VRING_BASE` (or disabling it) stops it: its
//!   requests get the drain deadline, the rest are fenced, and only then is the index answered. A client
//!   that disconnects is a reset of every ring, and its memory is forgotten.
//! - Whoever serves the queues (the JavaScript thread, worker threads) polls one stable eventfd per queue:
//!   the control thread relays the client's kicks into them, so serving never follows fds that change
//!   with each client.
//!
//! The control thread answers each message within the drain budget; nothing in it waits on JavaScript.
//!
//! Files: this one holds the device and the state its threads share; `session.rs` answers the messages,
//! `memory_table.rs` keeps the client's memory, `socket.rs` binds or dials and runs the control thread.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, Error as VuError, Result as VuResult, VhostUserFrontendReqHandler};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    validate, DeviceEvent, DeviceEvents, DeviceOptions, DeviceStats, Serving, STATUS_ACKNOWLEDGE,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::error::{Error, Result};
use crate::inflight::{StateFile, StateInfo};
use crate::lifecycle::{Lifecycle, ResumePlan, Stop};
use crate::memory::Memory;
use crate::model::{DeviceModel, DeviceSpec};
use crate::queue::{RingInfo, Transport, Virtqueue};
use crate::worker::Worker;

mod memory_table;
mod session;
mod socket;

use session::Session;

pub use memory_table::{MemTable, MAX_MEM_SLOTS};
pub use socket::RECONNECT_EVERY;
use socket::{bind_socket, control_loop, Endpoint};

/// How an inflight region is named in messages (never a path anything could remove).
const INFLIGHT_LABEL: &str = "/dev/null/vduse-inflight-region";
/// virtio-blk's device id.
const VIRTIO_ID_BLOCK: u32 = 2;
/// How long one message may keep the client waiting, drains and revocations included.
const ANSWER_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// The features the transport offers on top of the model's.
const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The protocol features offered for a device of `device_id`. The config space goes over the socket only
/// where VMMs read it from the back-end (block devices): QEMU's virtio-net keeps its own, and QEMU 7.2
/// crashes when a vhost-user NIC offers `CONFIG`.
fn protocol_features(device_id: u32) -> VhostUserProtocolFeatures {
    let mut f = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE;
    if device_id == VIRTIO_ID_BLOCK {
        // INFLIGHT_SHMFD: QEMU's vhost-user-blk keeps our in-flight log across a restart of this server.
        f |= VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    f
}

/// What the client told us about one ring.
#[derive(Default)]
struct RingSetup {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    /// What `SET_VRING_ENABLE` last said. Unset, a ring runs once it has a kick fd: QEMU's virtio-net
    /// enables its rings before `SET_FEATURES`, which the protocol crate drops unanswered, so "never told"
    /// must not mean "disabled" (libvhost-user starts rings at their kick fd too).
    enabled: Option<bool>,
    kick: Option<File>,
    /// Armed for serving (kick fd and enabled): stopping it is a drain.
    started: bool,
    /// The index GET_VRING_BASE (or a disable) answered when the ring last stopped.
    answered: Option<u16>,
}

/// The client's side of the rings: their setup and the fds to interrupt it.
struct Rings {
    setups: Vec<Mutex<RingSetup>>,
    calls: Vec<Mutex<Option<File>>>,
    table: Arc<MemTable>,
}

impl Transport for Rings {
    fn notify(&self, queue: u16) {
        let Some(call) = self.calls.get(usize::from(queue)) else {
            return;
        };
        // Under the lock: the client may replace (and close) the fd meanwhile.
        let call = call.lock();
        if let Some(mut fd) = call.as_ref() {
            // Non-blocking: EAGAIN means the counter is full, so an interrupt is pending anyway.
            if let Err(e) = fd.write_all(&1u64.to_ne_bytes()) {
                log::debug!("queue {queue}: signal the call fd: {e}");
            }
        }
    }

    fn ring_info(&self, queue: u16) -> std::io::Result<RingInfo> {
        let s = self
            .setups
            .get(usize::from(queue))
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?
            .lock();
        let translate = |va: u64| self.table.gpa_of(va);
        let (Some(desc), Some(avail), Some(used)) =
            (translate(s.desc), translate(s.avail), translate(s.used))
        else {
            // Outside the table: the queue breaks (rings outside memory), as over VDUSE.
            return Ok(RingInfo {
                size: s.num,
                desc: u64::MAX,
                avail: u64::MAX,
                used: u64::MAX,
                avail_idx: s.base,
                ready: s.started,
            });
        };
        Ok(RingInfo {
            size: s.num,
            desc,
            avail,
            used,
            avail_idx: s.base,
            ready: s.started,
        })
    }
}

/// State shared by the control thread, the handle and whoever serves the queues.
struct Shared {
    life: Lifecycle,
    spec: DeviceSpec,
    rings: Arc<Rings>,
    config: Mutex<Vec<u8>>,
    /// The features the client acked, and the protocol features.
    features: AtomicU64,
    protocol: AtomicU64,
    status: AtomicU8,
    model: Option<Arc<dyn DeviceModel>>,
    backend_req: Mutex<Option<Backend>>,
    /// The client's inflight region: our in-flight log, which the client keeps for a restarted server.
    inflight_region: Mutex<Option<Arc<StateFile>>>,
    resubmitted: AtomicU64,
    connected: AtomicBool,
    /// The current client must go: something it asked for could not be made safe (the session's end
    /// stops every ring, which can).
    drop_client: AtomicBool,
    /// Memory of a client could not be made unreachable in time: no further client is served.
    poisoned: AtomicBool,
    /// The last request was refused by one of our handlers whose answer is an ack (sent when asked for):
    /// the client is in step and was told. Other refusals owe a reply nobody sends: the client goes.
    refused_with_ack: AtomicBool,
    /// The current client's socket, to cut a session that blocks the control thread (close()).
    connection: Mutex<Option<UnixStream>>,
    sessions: AtomicU64,
}

impl Shared {
    fn setup(&self, index: u32) -> VuResult<parking_lot::MutexGuard<'_, RingSetup>> {
        self.rings
            .setups
            .get(index as usize)
            .map(|s| s.lock())
            .ok_or(VuError::InvalidParam)
    }

    fn set_status(&self, status: u8) {
        if self.status.swap(status, Ordering::AcqRel) != status {
            self.life.emit(DeviceEvent::Status {
                status,
                features: self.features.load(Ordering::Acquire),
            });
        }
    }

    /// Arms ring `index` if it has everything (kick fd, enabled) and is not running yet.
    fn maybe_start(&self, index: u32) -> VuResult<()> {
        let mut s = self.setup(index)?;
        if s.started || s.kick.is_none() || s.enabled == Some(false) {
            return Ok(());
        }
        let features = self.features.load(Ordering::Acquire);
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            // No SET_FEATURES yet (or a legacy driver): the model cannot tell how to read the rings.
            return Err(VuError::InvalidOperation("a ring started before SET_FEATURES"));
        }
        s.started = true;
        // The client set the ring up again with another index than we answered when it stopped: it is a
        // new ring (a reset without RESET_DEVICE), and what the log kept belongs to the old one.
        let restarted_elsewhere = s.answered.take().is_some_and(|b| b != s.base);
        drop(s);
        let q = &self.life.queues[index as usize];
        if restarted_elsewhere {
            if let Some(log) = q.log() {
                log.clear();
            }
        }
        q.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        q.set_features(features);
        // Before anything is announced: a refused resume leaves the ring (and the device) not running.
        if let Err(e) = self.resume(q) {
            self.setup(index)?.started = false;
            return Err(e);
        }
        if self.status.load(Ordering::Acquire) & STATUS_DRIVER_OK == 0 {
            if let Some(model) = &self.model {
                model.started(features);
            }
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        }
        log::debug!(
            "device {:?}: queue {index} starts (features {features:#x})",
            self.life.name
        );
        q.arm();
        // Serve now: the ring may hold requests already.
        let _ = self.life.kicks[index as usize].write(1);
        Ok(())
    }

    /// A ring whose in-flight log (the client's inflight region) holds requests a previous server took and
    /// never completed: they are served again first, in their original order, once the log checks out
    /// against the rings. A log that does not fit refuses the start (replaying requests the driver already
    /// has back would corrupt its data).
    fn resume(&self, q: &Virtqueue) -> VuResult<()> {
        let Some(log) = q.log() else { return Ok(()) };
        log::debug!(
            "device {:?}: queue {}: inflight log: {} in flight, next avail {}, used {}",
            self.life.name,
            q.index,
            log.in_flight().len(),
            log.next_avail(),
            log.used_idx()
        );
        if log.in_flight().is_empty() {
            return Ok(()); // a fresh start: activation resets the log
        }
        let info = self.rings.ring_info(q.index).map_err(|_| VuError::InvalidParam)?;
        let map = self.life.memory.snapshot();
        match ResumePlan::check(&log, &info, &map, self.spec.queue_size) {
            Ok(plan) => {
                let (next_avail, in_flight) = plan.apply(&log);
                log::info!(
                    "device {:?}: queue {}: resuming {} request(s) a previous server left in flight",
                    self.life.name,
                    q.index,
                    in_flight.len()
                );
                self.resubmitted
                    .fetch_add(in_flight.len() as u64, Ordering::Relaxed);
                q.arm_resumed(next_avail, in_flight);
                // The dead server may have published completions without their interrupt.
                self.rings.notify(q.index);
                Ok(())
            }
            Err(reason) => {
                log::error!(
                    "device {:?}: queue {}: the inflight region does not fit the rings ({reason}); not starting it",
                    self.life.name,
                    q.index
                );
                Err(VuError::InvalidParam)
            }
        }
    }

    /// Attaches the client's inflight region to the queues (all stopped).
    fn install_inflight(&self, region: Arc<StateFile>) -> VuResult<()> {
        if self.rings.setups.iter().any(|s| s.lock().started) {
            return Err(VuError::InvalidOperation("rings are running"));
        }
        for q in &self.life.queues {
            if !q.set_log(region.queue(q.index)) {
                return Err(VuError::InvalidOperation("rings are running"));
            }
        }
        *self.inflight_region.lock() = Some(region);
        Ok(())
    }

    /// Stops ring `index` (drain, then fence) and returns the avail index to resume from. An error when its
    /// memory could not be made safe in time: the caller drops the client rather than answer.
    fn stop_ring(&self, index: u32) -> VuResult<u16> {
        let started = Instant::now();
        let q = self
            .life
            .queues
            .get(index as usize)
            .ok_or(VuError::InvalidParam)?;
        let was_started = std::mem::replace(&mut self.setup(index)?.started, false);
        if !was_started {
            return Ok(self.setup(index)?.base);
        }
        q.quiesce();
        let base = q.next_avail();
        if !self.life.stop_queues(started, |v| v.index == q.index, Stop::Ring) {
            // Native I/O of the ring outlived the drain: only stopping every ring can fence it (and revoke
            // its memory if need be). Never answer as if the ring were quiet.
            log::error!(
                "device {:?}: queue {index} still had native I/O in flight at the drain deadline; dropping the client",
                self.life.name
            );
            self.drop_client.store(true, Ordering::Release);
            return Err(VuError::BackendInternalError);
        }
        let mut s = self.setup(index)?;
        if let Some(base) = base {
            s.base = base;
        }
        let base = s.base;
        s.answered = Some(base);
        drop(s);
        if self.rings.setups.iter().all(|s| !s.lock().started) {
            self.set_status(0);
        }
        Ok(base)
    }

    /// Every ring stops. `Stop::Leave` (the client left, or we drop it): its memory table, fds and inflight
    /// region are forgotten, the log in the region kept for a reconnecting client. `Stop::Reset`
    /// (`RESET_DEVICE`): the rings and their logs start over; the table stays. False when memory could not
    /// be made unreachable in time: the device then serves no further client.
    fn reset(&self, kind: Stop) -> bool {
        let started = Instant::now();
        for s in &self.rings.setups {
            *s.lock() = RingSetup::default();
        }
        let leaving = kind != Stop::Reset;
        // The table goes once the rings are stopped (completions during the drain still reach the client)
        // and before the map is dropped, so that nothing maps the departed client's memory again.
        let safe = self.life.stop_queues_then(
            started,
            |_| true,
            kind,
            || {
                if leaving {
                    self.rings.table.clear();
                    self.life.memory.invalidate();
                }
            },
        );
        for c in &self.rings.calls {
            *c.lock() = None;
        }
        if leaving {
            for q in &self.life.queues {
                q.set_log(None);
            }
            *self.inflight_region.lock() = None;
            *self.backend_req.lock() = None;
            self.protocol.store(0, Ordering::Release);
        }
        self.features.store(0, Ordering::Release);
        self.set_status(0);
        if !safe {
            log::error!(
                "device {:?}: native I/O may still touch the client's memory; no further client is served",
                self.life.name
            );
            self.poisoned.store(true, Ordering::Release);
        }
        safe
    }

    /// The table changed: requests using memory that went away are drained or fenced before the answer.
    fn memory_changed(&self) -> VuResult<()> {
        if self.life.memory_changed(Instant::now()) {
            Ok(())
        } else {
            // The old memory may still be touched: the client must not go on with it.
            self.drop_client.store(true, Ordering::Release);
            Err(VuError::BackendInternalError)
        }
    }
}

/// A device served over a vhost-user socket. Close it to stop listening; a connected client sees its
/// rings stop (as on a reset) and the socket close.
pub struct VhostUserDevice {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The socket file we bound (device, inode): removed on close only if it is still ours. None: the
    /// VMM's (connect mode).
    socket_id: Option<(u64, u64)>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    workers: Vec<Worker>,
    closed: bool,
}

impl VhostUserDevice {
    /// Listens on `path` (a stale socket file there is replaced) and serves one client at a time.
    pub fn listen(
        path: &Path,
        options: DeviceOptions,
        spec: DeviceSpec,
        serving: Serving,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> Result<Self> {
        validate(&options.name, &spec)?;
        let (listener, socket_id) = bind_socket(&options.name, path)?;
        Self::serve(
            path,
            Endpoint::Listen(listener),
            Some(socket_id),
            options,
            spec,
            serving,
            events,
        )
    }

    /// Connects to a VMM listening on `path` (QEMU: `-chardev socket,…,server=on`) and serves it; when it
    /// goes away, connects again (every [`RECONNECT_EVERY`]) until closed. The socket is the VMM's: close()
    /// leaves it.
    pub fn connect(
        path: &Path,
        options: DeviceOptions,
        spec: DeviceSpec,
        serving: Serving,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> Result<Self> {
        validate(&options.name, &spec)?;
        Self::serve(
            path,
            Endpoint::Connect(path.to_owned()),
            None,
            options,
            spec,
            serving,
            events,
        )
    }

    fn serve(
        path: &Path,
        endpoint: Endpoint,
        socket_id: Option<(u64, u64)>,
        options: DeviceOptions,
        spec: DeviceSpec,
        serving: Serving,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> Result<Self> {
        let table = Arc::new(MemTable::default());
        let memory = Arc::new(Memory::new(table.clone()));
        let rings = Arc::new(Rings {
            setups: (0..spec.num_queues).map(|_| Mutex::default()).collect(),
            calls: (0..spec.num_queues).map(|_| Mutex::default()).collect(),
            table,
        });
        let life = Lifecycle::new(
            &options.name,
            &spec,
            memory,
            rings.clone(),
            |_| None,
            options.drain_timeout,
            ANSWER_BUDGET,
            events,
        )?;
        let shared = Arc::new(Shared {
            life,
            config: Mutex::new(spec.config.clone()),
            spec,
            rings,
            features: AtomicU64::new(0),
            protocol: AtomicU64::new(0),
            status: AtomicU8::new(0),
            model: match &serving {
                Serving::Workers(model) => Some(model.clone()),
                Serving::External => None,
            },
            backend_req: Mutex::new(None),
            inflight_region: Mutex::new(None),
            resubmitted: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            drop_client: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            refused_with_ack: AtomicBool::new(false),
            connection: Mutex::new(None),
            sessions: AtomicU64::new(0),
        });
        let workers = match &serving {
            Serving::Workers(model) => shared.life.spawn_workers(model, options.budget)?,
            Serving::External => Vec::new(),
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("vhost-user-{}", options.name))
                .spawn(move || control_loop(&shared, endpoint, &stop))
                .map_err(|e| Error::sys("spawn", e))?
        };
        Ok(Self {
            shared,
            socket_id,
            path: path.to_owned(),
            stop,
            thread: Some(thread),
            workers,
            closed: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.life.name
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn spec(&self) -> &DeviceSpec {
        &self.shared.spec
    }

    pub fn queues(&self) -> &[Arc<Virtqueue>] {
        &self.shared.life.queues
    }

    pub fn kick_fds(&self) -> &[Arc<EventFd>] {
        &self.shared.life.kicks
    }

    pub fn memory(&self) -> &Arc<Memory> {
        &self.shared.life.memory
    }

    /// DRIVER_OK while a client runs at least one ring; 0 otherwise (vhost-user has no status of its own).
    pub fn status(&self) -> u8 {
        self.shared.status.load(Ordering::Acquire)
    }

    pub fn negotiated_features(&self) -> u64 {
        self.shared.features.load(Ordering::Acquire)
    }

    /// Whether a client is connected now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Clients served so far.
    pub fn sessions(&self) -> u64 {
        self.shared.sessions.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            resubmitted: self.shared.resubmitted.load(Ordering::Relaxed),
            ..self.shared.life.stats()
        }
    }

    /// Rewrites part of the config space and tells a connected client (`CONFIG_CHANGE_MSG`, when it
    /// opened the backend channel).
    pub fn update_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        {
            let mut config = self.shared.config.lock();
            let end = (offset as usize)
                .checked_add(data.len())
                .filter(|&e| e <= config.len())
                .ok_or_else(|| Error::InvalidConfig("config update past the config space".into()))?;
            config[offset as usize..end].copy_from_slice(data);
        }
        // Sent from a thread of its own: the client may be slow to read its channel, and neither the
        // caller (the JavaScript thread) nor the control thread (which takes this lock) may wait for it.
        let backend = self.shared.backend_req.lock().clone();
        log::debug!(
            "device {:?}: config change at {offset} ({} bytes); channel {}",
            self.shared.life.name,
            data.len(),
            backend.is_some()
        );
        if let Some(backend) = backend {
            let name = self.shared.life.name.clone();
            let sent = std::thread::Builder::new()
                .name(format!("vhost-user-cfg-{name}"))
                .spawn(move || {
                    if let Err(e) = backend.handle_config_change() {
                        log::warn!("device {name:?}: config change not delivered: {e}");
                    }
                });
            if let Err(e) = sent {
                log::warn!(
                    "device {:?}: config change not delivered: {e}",
                    self.shared.life.name
                );
            }
        }
        Ok(())
    }

    /// Stops listening, drops the client (its rings stop as when it leaves) and removes the socket file.
    /// An error when the last client's memory could not be made unreachable in time.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let _ = self.stop.write(1);
        // A client in the middle of a message holds the control thread in a read: cut it.
        if let Some(c) = self.shared.connection.lock().as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // The control thread first: its last reset drains what the workers are still serving.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for w in &mut self.workers {
            w.stop();
        }
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| Some((m.dev(), m.ino())) == self.socket_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(Error::sys(
                "revoke",
                std::io::Error::other("native I/O may still touch the last vhost-user client's memory"),
            ));
        }
        Ok(())
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A new inflight region: a sealed memfd holding an empty in-flight log for every queue of `spec`.
fn new_inflight_region(spec: &DeviceSpec) -> std::io::Result<(Arc<StateFile>, File)> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid C string; the fd it returns is ours.
    let fd = unsafe {
        libc::memfd_create(
            c"vduse-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let info = StateInfo {
        device_id: spec.device_id,
        num_queues: spec.num_queues,
        queue_size: spec.queue_size,
        features: spec.features | TRANSPORT_FEATURES,
        config: spec.config.clone(),
    };
    let region = StateFile::create_in(file.try_clone()?, Path::new(INFLIGHT_LABEL), &info)?;
    // Neither we nor the client may resize it from now on: both map it whole.
    // SAFETY: F_ADD_SEALS on a memfd we own, created with MFD_ALLOW_SEALING.
    let sealed = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if sealed < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((region, file))
}
