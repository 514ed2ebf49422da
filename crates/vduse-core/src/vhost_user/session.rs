//! The answers to one client's messages (rust-vmm's `VhostUserBackendReqHandler`): features, the memory
//! table, ring setup, starts and stops, config space, inflight regions. What a refusal costs the session is
//! decided here (see [`Session::acked`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandler,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::socket::set_nonblocking;
use super::{
    new_inflight_region, protocol_features, Shared, INFLIGHT_LABEL, MAX_MEM_SLOTS, TRANSPORT_FEATURES,
};
use crate::inflight::StateFile;
use crate::lifecycle::Stop;
use crate::queue::Transport;

/// The handler of one client's messages.
pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
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
            self.shared.rings.table.replace(regions, files)?;
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
            self.shared.rings.table.add(region, fd)?;
            self.shared.memory_changed()?;
            Ok(None)
        })
    }

    fn remove_mem_region(&self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.acked(|| {
            self.shared.rings.table.remove(region)?;
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
