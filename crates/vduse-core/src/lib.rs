//! `vduse-core`: everything a VDUSE (vDPA Device in Userspace) device needs except its semantics.
//!
//! Layers, each using only the ones above it in this list:
//! - [`uapi`]: the kernel's structs and ioctl numbers;
//! - [`control`]: `/dev/vduse/control` (API version, create/destroy);
//! - [`error`]: typed errors with stable codes.

pub mod control;
pub mod error;
pub mod uapi;

pub use control::Control;
pub use error::{Error, Result};
