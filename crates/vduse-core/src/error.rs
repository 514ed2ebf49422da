//! Typed errors with stable codes, errno and the failing syscall, so every layer above (the Node
//! binding, the CLI) can tell the user what went wrong and how to fix it.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VDUSE node does not exist: module not loaded, or a kernel without VDUSE.
    #[error("VDUSE is not available: cannot open {}: {source}", path.display())]
    Unavailable { path: PathBuf, source: io::Error },
    /// The node exists but this process may not open it.
    #[error("permission denied: cannot open {}: {source}", path.display())]
    PermissionDenied { path: PathBuf, source: io::Error },
    /// `VDUSE_CREATE_DEV` found a device of the same name.
    #[error("a VDUSE device named {name:?} already exists")]
    Exists { name: String },
    /// No VDUSE device of that name.
    #[error("no VDUSE device named {name:?}")]
    NotFound { name: String },
    /// The device is still attached to the vDPA bus or opened by another process.
    #[error("VDUSE device {name:?} is busy: {reason}")]
    Busy { name: String, reason: &'static str },
    /// Options the kernel would reject (or that make no sense), caught before any syscall.
    #[error("invalid device configuration: {0}")]
    InvalidConfig(String),
    /// The kernel marked the device broken (a message went unanswered past `msg_timeout`).
    #[error("VDUSE device {name:?} is broken (a control message timed out); destroy and recreate it")]
    Broken { name: String },
    /// A device cannot be taken over: no usable state file.
    #[error("VDUSE device {name:?} cannot be taken over: {reason}")]
    NotRecoverable { name: String, reason: String },
    /// A device to take over does not match what the new server would serve.
    #[error("VDUSE device {name:?} does not match: {what} is {found}, expected {expected}")]
    Mismatch {
        name: String,
        what: String,
        expected: String,
        found: String,
    },
    /// Any other failed system call.
    #[error("{syscall} failed: {source}")]
    Sys {
        syscall: &'static str,
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn sys(syscall: &'static str, source: io::Error) -> Self {
        Error::Sys { syscall, source }
    }

    /// Maps the error of opening a VDUSE node to the typed variants users can act on.
    pub(crate) fn open(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => Error::Unavailable { path, source },
            Some(libc::EACCES | libc::EPERM) => Error::PermissionDenied { path, source },
            _ => Error::Sys {
                syscall: "open",
                source,
            },
        }
    }

    /// Stable, documented code (`ERR_VDUSE_*`); never parse the message.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Unavailable { .. } => "ERR_VDUSE_UNAVAILABLE",
            Error::PermissionDenied { .. } => "ERR_VDUSE_PERMISSION",
            Error::Exists { .. } => "ERR_VDUSE_EXISTS",
            Error::NotFound { .. } => "ERR_VDUSE_NOT_FOUND",
            Error::Busy { .. } => "ERR_VDUSE_BUSY",
            Error::InvalidConfig(_) => "ERR_VDUSE_INVALID_CONFIG",
            Error::Broken { .. } => "ERR_VDUSE_BROKEN",
            Error::NotRecoverable { .. } => "ERR_VDUSE_NOT_RECOVERABLE",
            Error::Mismatch { .. } => "ERR_VDUSE_MISMATCH",
            Error::Sys { .. } => "ERR_VDUSE_SYSCALL",
        }
    }

    /// The OS error number, where a system call failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Unavailable { source, .. }
            | Error::PermissionDenied { source, .. }
            | Error::Sys { source, .. } => source.raw_os_error(),
            Error::Exists { .. } => Some(libc::EEXIST),
            Error::NotFound { .. } => Some(libc::ENOENT),
            Error::Busy { .. } => Some(libc::EBUSY),
            Error::Broken { .. } => Some(libc::EPERM),
            Error::InvalidConfig(_) | Error::NotRecoverable { .. } | Error::Mismatch { .. } => None,
        }
    }

    /// The system call that failed, in Node's `syscall` style.
    pub fn syscall(&self) -> Option<&'static str> {
        match self {
            Error::Unavailable { .. } | Error::PermissionDenied { .. } => Some("open"),
            Error::Sys { syscall, .. } => Some(syscall),
            Error::Exists { .. } => Some("ioctl(VDUSE_CREATE_DEV)"),
            Error::NotFound { .. } | Error::Busy { .. } => Some("ioctl(VDUSE_DESTROY_DEV)"),
            Error::Broken { .. }
            | Error::InvalidConfig(_)
            | Error::NotRecoverable { .. }
            | Error::Mismatch { .. } => None,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Unavailable { .. } => Some(
                "load the module with `modprobe vduse` (Linux >= 5.15 built with CONFIG_VDPA_USER), \
                 and `modprobe virtio_vdpa` or `modprobe vhost_vdpa` to attach devices",
            ),
            Error::PermissionDenied { .. } => Some(
                "run as root, or give this user read/write access to /dev/vduse/control (e.g. a udev rule)",
            ),
            Error::Exists { .. } => {
                Some("pick another name, or remove the stale device with `vduse destroy NAME`")
            }
            Error::Busy { .. } => {
                Some("detach it first (`vdpa dev del NAME`) and stop the process that serves it")
            }
            Error::Broken { .. } => {
                Some("detach it (`vdpa dev del NAME`), then destroy and recreate the device")
            }
            Error::NotRecoverable { .. } => Some(
                "its server kept no usable state, or its data did not outlive it (a memory backend); \
                 destroy the device (`vduse destroy NAME`) and create it again",
            ),
            Error::Mismatch { .. } => Some(
                "serve it with the same backend, size and options as before, or destroy it (`vduse destroy NAME`)",
            ),
            Error::NotFound { .. } | Error::InvalidConfig(_) | Error::Sys { .. } => None,
        }
    }
}

/// Shorthand for the error of the last failed libc call.
pub(crate) fn last_os(syscall: &'static str) -> Error {
    Error::sys(syscall, io::Error::last_os_error())
}
