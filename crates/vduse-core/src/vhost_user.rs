//! The vhost-user transport: the same queues, memory and request life as a VDUSE device, reached by a
//! VMM (QEMU, cloud-hypervisor, libblkio) over a UNIX socket instead of through the kernel. No VDUSE
//! module is needed.
//!
//! - The socket protocol is rust-vmm's `vhost` crate ([`BackendReqHandler`]); this file answers its
//!   messages. One client at a time; the next one is accepted when it leaves.
//! - Driver memory is the client's memory table: each region's fd is mapped once, permission-checked
//!   and revocable, exactly like a VDUSE IOTLB entry ([`MemTable`] is an [`IotlbSource`]), so a memory
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

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandler,
    VhostUserFrontendReqHandler,
};
use vhost::VhostUserMemoryRegionBase;
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
use crate::memory::{IotlbSource, Memory};
use crate::model::{DeviceModel, DeviceSpec};
use crate::queue::{RingInfo, Transport, Virtqueue};
use crate::uapi::{vduse_iotlb_entry, VDUSE_ACCESS_RW};
use crate::worker::Worker;

/// How an inflight region is named in messages (never a path anything could remove).
const INFLIGHT_LABEL: &str = "/dev/null/vduse-inflight-region";
/// How long a client may leave a message half-sent (or our reply unread) before it is dropped: the control
/// thread serves every ring's kicks and must not wait on one client for long.
const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// virtio-blk's device id.
const VIRTIO_ID_BLOCK: u32 = 2;
/// Memory regions a client may register (what `GET_MAX_MEM_SLOTS` answers; QEMU uses up to 32).
pub const MAX_MEM_SLOTS: usize = 32;
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

/// One region of the client's memory table.
struct TableRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    mmap_offset: u64,
    file: File,
}

impl TableRegion {
    /// Region `r` backed by `file`, once it fits its file and overlaps none of `table`.
    fn admit(table: &[TableRegion], r: &VhostUserMemoryRegion, file: File) -> VuResult<Self> {
        MemTable::admit(table, r)?;
        region_fits(r, &file)?;
        Ok(Self {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            file,
        })
    }
}

/// The client's memory table, read by [`Memory`] like a VDUSE IOTLB (keyed by guest-physical address).
#[derive(Default)]
pub struct MemTable {
    regions: Mutex<Vec<TableRegion>>,
}

impl MemTable {
    /// Guest-physical address of the client's virtual address `va` (ring addresses come that way).
    fn gpa_of(&self, va: u64) -> Option<u64> {
        self.regions
            .lock()
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
    }

    /// Checks a region against the others (and the limits) before it joins the table.
    fn admit(regions: &[TableRegion], r: &VhostUserMemoryRegion) -> VuResult<()> {
        let overflows = |a: u64, len: u64| len == 0 || a.checked_add(len - 1).is_none();
        if overflows(r.guest_phys_addr, r.memory_size)
            || overflows(r.user_addr, r.memory_size)
            || r.mmap_offset.checked_add(r.memory_size).is_none()
            || r.memory_size > isize::MAX as u64
        {
            return Err(VuError::InvalidParam);
        }
        let overlaps = |a: u64, b: u64, len_a: u64, len_b: u64| {
            a < b.saturating_add(len_b) && b < a.saturating_add(len_a)
        };
        if regions.len() >= MAX_MEM_SLOTS
            || regions.iter().any(|o| {
                overlaps(o.gpa, r.guest_phys_addr, o.size, r.memory_size)
                    || overlaps(o.user_addr, r.user_addr, o.size, r.memory_size)
            })
        {
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }
}

/// Checks that `file` holds the whole region (an access past its end would be a SIGBUS, not an error).
fn region_fits(r: &VhostUserMemoryRegion, file: &File) -> VuResult<()> {
    let len = file.metadata().map_err(|_| VuError::InvalidParam)?.len();
    match r.mmap_offset.checked_add(r.memory_size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(VuError::InvalidParam),
    }
}

/// Whether `file` is an eventfd: kick and call fds must be (a regular file is always readable and
/// never blocks as a non-blocking fd would; a FIFO or FUSE file could block).
fn is_eventfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// Checks that a client's fd is an eventfd and makes it non-blocking: the control thread and the serving
/// threads must never wait on it (a full counter, a client that drains it itself).
fn set_nonblocking(file: &File) -> VuResult<()> {
    if !is_eventfd(file) {
        return Err(VuError::InvalidParam);
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own only change its status flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(VuError::InvalidParam)
    }
}

impl IotlbSource for MemTable {
    fn entry(&self, first: u64, last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>> {
        let regions = self.regions.lock();
        let found = regions
            .iter()
            .filter(|r| r.gpa <= last && r.gpa + (r.size - 1) >= first)
            .min_by_key(|r| r.gpa);
        let Some(r) = found else { return Ok(None) };
        let entry = vduse_iotlb_entry {
            offset: r.mmap_offset,
            start: r.gpa,
            last: r.gpa + (r.size - 1),
            perm: VDUSE_ACCESS_RW,
        };
        Ok(Some((entry, r.file.try_clone()?)))
    }
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
                    self.rings.table.regions.lock().clear();
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

/// The handler of one client's messages.
struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Runs a handler answered with an ack: its refusal leaves the session in step.
    fn acked<T>(&self, handle: impl FnOnce() -> VuResult<T>) -> VuResult<T> {
        let result = handle();
        if result.is_err() {
            self.shared.refused_with_ack.store(true, Ordering::Release);
        }
        result
    }

    /// Runs a handler whose refusal cannot be undone or answered (the protocol crate recorded the
    /// features before asking us; an inflight region refused would leave the rings without their log):
    /// the client must go.
    fn final_say<T>(&self, handle: impl FnOnce() -> VuResult<T>) -> VuResult<T> {
        let result = handle();
        if result.is_err() {
            self.shared.drop_client.store(true, Ordering::Release);
        }
        result
    }
}

impl VhostUserBackendReqHandler for Session {
    fn set_owner(&self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&self) -> VuResult<()> {
        self.reset_device()
    }

    fn reset_device(&self) -> VuResult<()> {
        if self.shared.reset(Stop::Reset) {
            Ok(())
        } else {
            Err(VuError::BackendInternalError)
        }
    }

    fn get_features(&self) -> VuResult<u64> {
        Ok(self.shared.spec.features | TRANSPORT_FEATURES)
    }

    fn set_features(&self, features: u64) -> VuResult<()> {
        self.final_say(|| {
            log::debug!("device {:?}: features {features:#x}", self.shared.life.name);
            if features & !(self.shared.spec.features | TRANSPORT_FEATURES) != 0 {
                return Err(VuError::InvalidParam);
            }
            if features & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err(VuError::InvalidParam); // legacy (pre-1.0) rings are not served
            }
            if self.shared.rings.setups.iter().any(|s| s.lock().started) {
                return Err(VuError::InvalidOperation("features change while rings run"));
            }
            self.shared.features.store(features, Ordering::Release);
            Ok(())
        })
    }

    fn set_mem_table(
        &self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.acked(|| {
            let mut table = Vec::with_capacity(regions.len());
            for (r, file) in regions.iter().zip(files) {
                table.push(TableRegion::admit(&table, r, file)?);
            }
            *self.shared.rings.table.regions.lock() = table;
            self.shared.memory_changed()?;
            Ok(None)
        })
    }

    fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        self.acked(|| {
            let max = u32::from(self.shared.spec.queue_size);
            if num == 0 || num > max || !num.is_power_of_two() {
                return Err(VuError::InvalidParam);
            }
            let mut s = self.shared.setup(index)?;
            if s.started {
                return Err(VuError::InvalidOperation("the ring is running"));
            }
            s.num = num as u16;
            Ok(())
        })
    }

    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.acked(|| {
            let mut s = self.shared.setup(index)?;
            if s.started {
                return Err(VuError::InvalidOperation("the ring is running"));
            }
            s.desc = descriptor;
            s.used = used;
            s.avail = available;
            Ok(())
        })
    }

    fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        self.acked(|| {
            let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
            let mut s = self.shared.setup(index)?;
            if s.started {
                return Err(VuError::InvalidOperation("the ring is running"));
            }
            s.base = base;
            Ok(())
        })
    }

    fn get_vring_base(&self, index: u32) -> VuResult<VhostUserVringState> {
        let base = self.shared.stop_ring(index)?;
        // The ring stays stopped until the client starts it again with a new kick fd.
        self.shared.setup(index)?.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.acked(|| {
            let index = u32::from(index);
            // No fd: the client would have us poll the ring, which this back-end does not do.
            let fd = fd.ok_or(VuError::InvalidOperation(
                "rings without a kick fd (polling) are not served",
            ))?;
            set_nonblocking(&fd)?;
            log::debug!("device {:?}: queue {index}: kick fd", self.shared.life.name);
            {
                let mut s = self.shared.setup(index)?;
                let running = s.started;
                s.kick = Some(fd);
                if running {
                    // A new kick fd for a running ring: a kick sent to the old one may be lost; serve now.
                    drop(s);
                    let _ = self.shared.life.kicks[index as usize].write(1);
                    return Ok(());
                }
            }
            self.shared.maybe_start(index)
        })
    }

    fn set_vring_call(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.acked(|| {
            let call = self
                .shared
                .rings
                .calls
                .get(usize::from(index))
                .ok_or(VuError::InvalidParam)?;
            if let Some(fd) = &fd {
                set_nonblocking(fd)?;
            }
            *call.lock() = fd;
            // A completion published while no call fd was set raised no interrupt: a spurious one costs nothing.
            self.shared.rings.notify(u16::from(index));
            Ok(())
        })
    }

    fn set_vring_err(&self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.acked(|| self.shared.setup(u32::from(index)).map(|_| ()))
    }

    fn get_protocol_features(&self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features(self.shared.spec.device_id))
    }

    fn set_protocol_features(&self, features: u64) -> VuResult<()> {
        self.final_say(|| {
            if features & !protocol_features(self.shared.spec.device_id).bits() != 0 {
                return Err(VuError::InvalidParam);
            }
            self.shared.protocol.store(features, Ordering::Release);
            Ok(())
        })
    }

    fn get_queue_num(&self) -> VuResult<u64> {
        Ok(u64::from(self.shared.spec.num_queues))
    }

    fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        self.acked(|| {
            log::debug!(
                "device {:?}: queue {index}: enable {enable}",
                self.shared.life.name
            );
            if enable {
                self.shared.setup(index)?.enabled = Some(true);
                self.shared.maybe_start(index)
            } else {
                let base = self.shared.stop_ring(index)?;
                let mut s = self.shared.setup(index)?;
                s.enabled = Some(false);
                s.base = base;
                Ok(())
            }
        })
    }

    fn get_config(&self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let config = self.shared.config.lock();
        let end = offset.checked_add(size).ok_or(VuError::InvalidParam)? as usize;
        config
            .get(offset as usize..end)
            .map(<[u8]>::to_vec)
            .ok_or(VuError::InvalidParam)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        self.acked(|| {
            // As over VDUSE, the driver cannot write the config space.
            Err(VuError::InvalidOperation("the config space is read-only"))
        })
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        log::debug!(
            "device {:?}: the client opened its backend channel",
            self.shared.life.name
        );
        *self.shared.backend_req.lock() = Some(backend);
    }

    fn set_gpu_socket(&self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        self.final_say(|| {
            let spec = &self.shared.spec;
            if inflight.num_queues > spec.num_queues || inflight.queue_size > spec.queue_size {
                return Err(VuError::InvalidParam);
            }
            let (region, file) = new_inflight_region(spec).map_err(|e| {
                log::error!(
                    "device {:?}: cannot create the inflight region: {e}",
                    self.shared.life.name
                );
                VuError::BackendInternalError
            })?;
            self.shared.install_inflight(region)?;
            log::debug!("device {:?}: inflight region created", self.shared.life.name);
            let mmap_size = file.metadata().map_err(|_| VuError::BackendInternalError)?.len();
            let reply = VhostUserInflight {
                mmap_size,
                mmap_offset: 0,
                num_queues: inflight.num_queues,
                queue_size: inflight.queue_size,
            };
            Ok((reply, file))
        })
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        self.final_say(|| {
            log::debug!(
                "device {:?}: inflight region from the client",
                self.shared.life.name
            );
            if inflight.mmap_offset != 0 {
                return Err(VuError::InvalidParam);
            }
            let identity = |f: &File| f.metadata().ok().map(|m| (m.dev(), m.ino()));
            // Ours already (the client hands back what GET_INFLIGHT_FD gave it): nothing to do.
            if let Some(current) = self.shared.inflight_region.lock().as_ref() {
                if identity(current.file()).is_some() && identity(current.file()) == identity(&file) {
                    return Ok(());
                }
            }
            // A region we map must not shrink under us (a store past its end would be a SIGBUS).
            // SAFETY: F_GET_SEALS only reads the seals of an fd we own.
            let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
            if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
                log::error!(
                    "device {:?}: refusing an inflight region that is not sealed against shrinking",
                    self.shared.life.name
                );
                return Err(VuError::InvalidParam);
            }
            let region = StateFile::open_in(file, Path::new(INFLIGHT_LABEL)).map_err(|e| {
                log::error!(
                    "device {:?}: the client's inflight region is unusable: {e}",
                    self.shared.life.name
                );
                VuError::InvalidParam
            })?;
            let info = region.info();
            let spec = &self.shared.spec;
            if info.device_id != spec.device_id
                || info.num_queues != spec.num_queues
                || info.queue_size != spec.queue_size
            {
                log::error!(
                    "device {:?}: the client's inflight region describes another device ({} queues of {}); refused",
                    self.shared.life.name,
                    info.num_queues,
                    info.queue_size
                );
                return Err(VuError::InvalidParam);
            }
            self.shared.install_inflight(region)
        })
    }

    fn get_max_mem_slots(&self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.acked(|| {
            {
                let mut table = self.shared.rings.table.regions.lock();
                let admitted = TableRegion::admit(&table, region, fd)?;
                table.push(admitted);
            }
            self.shared.memory_changed()?;
            Ok(None)
        })
    }

    fn remove_mem_region(&self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.acked(|| {
            {
                let mut table = self.shared.rings.table.regions.lock();
                let before = table.len();
                table.retain(|r| !(r.gpa == region.guest_phys_addr && r.size == region.memory_size));
                if table.len() == before {
                    return Err(VuError::InvalidParam);
                }
            }
            self.shared.memory_changed()
        })
    }

    fn set_device_state_fd(
        &self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("no migration"))
    }

    fn check_device_state(&self) -> VuResult<()> {
        Err(VuError::InvalidOperation("no migration"))
    }

    fn get_shmem_config(&self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("no dirty logging"))
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

/// Binds the device's socket at `path`. A stale socket file there (its server gone) is replaced; a live
/// server's socket, or anything that is not a socket, is refused. Returns the listener and the socket
/// file's identity.
fn bind_socket(name: &str, path: &Path) -> Result<(UnixListener, (u64, u64))> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Busy {
                    name: name.into(),
                    reason: "another server listens on its vhost-user socket",
                });
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(Error::InvalidConfig(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::sys("stat(vhost-user socket)", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::sys("bind(vhost-user socket)", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::sys("fcntl(vhost-user socket)", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| Error::sys("stat(vhost-user socket)", e))?;
    Ok((listener, (m.dev(), m.ino())))
}

/// Polls `fds` for reading; returns each one's `revents` (EINTR retries).
fn poll_in(fds: &[RawFd]) -> std::io::Result<Vec<i16>> {
    poll_in_for(fds, -1)
}

/// [`poll_in`] for at most `timeout_ms` (-1: no limit).
fn poll_in_for(fds: &[RawFd], timeout_ms: i32) -> std::io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents).collect());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

const BROKEN: i16 = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;

/// Where clients come from: our listening socket, or a VMM's that we connect to.
enum Endpoint {
    Listen(UnixListener),
    Connect(PathBuf),
}

/// How often connect mode tries again while the VMM's socket is not there (or refuses).
pub const RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Endpoint {
    /// The next client, or None once `stop` is readable.
    fn next(&self, name: &str, stop: &EventFd) -> Option<UnixStream> {
        loop {
            match self {
                Endpoint::Listen(listener) => {
                    match poll_in(&[stop.as_raw_fd(), listener.as_raw_fd()]) {
                        Ok(r) if r[0] != 0 => return None,
                        Ok(_) => {}
                        Err(e) => {
                            log::error!("device {name:?}: poll: {e}");
                            return None;
                        }
                    }
                    match listener.accept() {
                        Ok((s, _)) => return Some(s),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            // EMFILE and the like: do not spin on them.
                            log::warn!("device {name:?}: accept: {e}");
                            if !wait_stop(stop, 100) {
                                return None;
                            }
                        }
                    }
                }
                Endpoint::Connect(path) => match connect_nonblocking(path) {
                    Ok(s) => return Some(s),
                    Err(e) => {
                        log::debug!("device {name:?}: connect to {}: {e}", path.display());
                        if !wait_stop(stop, RECONNECT_EVERY.as_millis() as i32) {
                            return None;
                        }
                    }
                },
            }
        }
    }
}

/// Connects to the UNIX socket at `path` without blocking: a VMM whose backlog is full (QEMU listens with
/// a backlog of one and stops accepting while it has a back-end) is EAGAIN, tried again later, never a
/// wait that close() could not cut. The stream is left blocking.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: a new socket; the fd is owned by the UnixStream right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes, alive for the call.
    let ret = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Waits up to `ms` for `stop`; false if it came (or the wait failed: then stop too).
fn wait_stop(stop: &EventFd, ms: i32) -> bool {
    matches!(poll_in_for(&[stop.as_raw_fd()], ms), Ok(r) if r[0] == 0)
}

fn control_loop(shared: &Arc<Shared>, endpoint: Endpoint, stop: &EventFd) {
    let name = shared.life.name.clone();
    loop {
        let Some(stream) = endpoint.next(&name, stop) else {
            return;
        };
        // Blocking reads, bounded: a message is read whole once its first byte is there, and a client
        // that stops half-way is dropped rather than waited for.
        let bounded = stream.set_nonblocking(false).is_ok()
            && stream.set_read_timeout(Some(MESSAGE_TIMEOUT)).is_ok()
            && stream.set_write_timeout(Some(MESSAGE_TIMEOUT)).is_ok();
        if !bounded {
            log::warn!("device {name:?}: cannot set up the client's socket; dropped");
            continue;
        }
        *shared.connection.lock() = stream.try_clone().ok();
        shared.drop_client.store(false, Ordering::Release);
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Release);
        log::info!("device {name:?}: a vhost-user client connected");
        let began = Instant::now();
        let stopped = serve_client(shared, stream, stop);
        *shared.connection.lock() = None;
        shared.connected.store(false, Ordering::Release);
        // Stopped by close(), the client is still there and sees what completes; otherwise it is gone.
        shared.reset(if stopped { Stop::Leave } else { Stop::Gone });
        log::info!("device {name:?}: the vhost-user client left");
        if shared.poisoned.load(Ordering::Acquire) {
            // Fail closed: a new client could be handed pages this process may still write.
            log::error!(
                "device {name:?}: not serving further vhost-user clients (memory could not be made safe)"
            );
            shared.life.emit(DeviceEvent::Broken);
            return;
        }
        if stopped {
            return;
        }
        // A VMM that hangs up at once must not make this a busy loop of dial, reset, dial.
        if matches!(endpoint, Endpoint::Connect(_))
            && began.elapsed() < RECONNECT_EVERY
            && !wait_stop(stop, RECONNECT_EVERY.as_millis() as i32)
        {
            return;
        }
    }
}

/// Serves one client until it leaves, breaks the protocol, or `stop`. True if stopped.
fn serve_client(shared: &Arc<Shared>, stream: UnixStream, stop: &EventFd) -> bool {
    let name = &shared.life.name;
    let mut handler = BackendReqHandler::from_stream(
        stream,
        Arc::new(Session {
            shared: shared.clone(),
        }),
    );
    loop {
        // The stop fd, the socket, then the kick fd of every running ring.
        let mut fds = vec![stop.as_raw_fd(), handler.as_raw_fd()];
        let mut rings = Vec::new();
        for (i, s) in shared.rings.setups.iter().enumerate() {
            let s = s.lock();
            if let (true, Some(kick)) = (s.started, s.kick.as_ref()) {
                fds.push(kick.as_raw_fd());
                rings.push(i);
            }
        }
        let ready = match poll_in(&fds) {
            Ok(r) => r,
            Err(e) => {
                log::error!("device {name:?}: poll: {e}");
                return true;
            }
        };
        if ready[0] != 0 {
            return true;
        }
        for (k, &i) in rings.iter().enumerate() {
            let revents = ready[2 + k];
            if revents & BROKEN != 0 {
                log::warn!(
                    "device {name:?}: queue {i}: the client's kick fd is unusable; dropping the client"
                );
                return false;
            }
            if revents != 0 {
                relay_kick(shared, i);
            }
        }
        if ready[1] != 0 {
            shared.refused_with_ack.store(false, Ordering::Release);
            match handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected | VuError::PartialMessage) => return false,
                // Refused whole by a handler whose answer is an ack: nothing changed, the message was
                // read whole and (when asked for) answered, so the session is in step.
                Err(e @ (VuError::InvalidParam | VuError::InvalidOperation(_)))
                    if shared.refused_with_ack.load(Ordering::Acquire) =>
                {
                    log::debug!("device {name:?}: vhost-user request refused: {e}");
                }
                // SET_VRING_ENABLE before SET_FEATURES (QEMU's virtio-net does that): the crate ignores
                // it, unanswered, as no answer is owed.
                Err(e @ VuError::InactiveFeature(_)) => {
                    log::debug!("device {name:?}: vhost-user request ignored: {e}");
                }
                // Anything else may owe the client a reply nobody will send: it must not wait for ever.
                Err(e) => {
                    log::warn!("device {name:?}: vhost-user client dropped: {e}");
                    return false;
                }
            }
            if shared.drop_client.load(Ordering::Acquire) {
                return false;
            }
        }
    }
}

/// Moves one kick of the client's ring `i` to the queue's own eventfd.
fn relay_kick(shared: &Shared, i: usize) {
    let s = shared.rings.setups[i].lock();
    if let Some(kick) = s.kick.as_ref() {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`, which outlives the call; the fd is an eventfd made
        // non-blocking when the client gave it (EAGAIN: someone else drained it; the relay is harmless).
        let _ = unsafe { libc::read(kick.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
    drop(s);
    let _ = shared.life.kicks[i].write(1);
}
