//! `/dev/vduse/control`: API version negotiation, device creation and destruction.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use crate::error::{last_os, Error, Result};
use crate::uapi;

/// An open handle on the VDUSE control node.
#[derive(Debug)]
pub struct Control {
    fd: File,
}

impl Control {
    /// Opens `/dev/vduse/control`.
    pub fn open() -> Result<Self> {
        Self::open_path(uapi::CONTROL_PATH)
    }

    /// Opens a control node at another path (tests, containers with a bind-mounted /dev).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::open(path, e))?;
        Ok(Self { fd })
    }

    /// The API version of this control fd. Caution: on Linux 7.0+ the first query on a fresh fd
    /// switches it to version 1; callers that create devices set the version explicitly instead.
    pub fn api_version(&self) -> Result<u64> {
        let mut version = 0u64;
        // SAFETY: VDUSE_GET_API_VERSION writes one u64 through the pointer, which outlives the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, uapi::VDUSE_GET_API_VERSION(), &mut version) };
        if ret < 0 {
            return Err(last_os("ioctl(VDUSE_GET_API_VERSION)"));
        }
        Ok(version)
    }

    /// Selects the API version for devices created from this fd afterwards.
    pub fn set_api_version(&self, version: u64) -> Result<()> {
        // SAFETY: VDUSE_SET_API_VERSION reads one u64 from the pointer, which outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, uapi::VDUSE_SET_API_VERSION(), &version) };
        if ret < 0 {
            return Err(last_os("ioctl(VDUSE_SET_API_VERSION)"));
        }
        Ok(())
    }

    /// The VDUSE feature mask (Linux 7.3+), or `None` on kernels without `VDUSE_GET_FEATURES`.
    pub fn vduse_features(&self) -> Option<u64> {
        let mut features = 0u64;
        // SAFETY: VDUSE_GET_FEATURES writes one u64 through the pointer; older kernels reject it (EINVAL).
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, uapi::VDUSE_GET_FEATURES(), &mut features) };
        (ret == 0).then_some(features)
    }

    pub(crate) fn file(&self) -> &File {
        &self.fd
    }
}
