//! `vduse-core`: everything a VDUSE (vDPA Device in Userspace) device needs except its semantics.
//!
//! Layers, each using only the ones before it:
//! - [`uapi`]: the kernel's structs and ioctl numbers, layouts checked at compile time;
//! - [`control`]: `/dev/vduse/control` (API version);
//! - [`memory`]: the IOTLB as `vm-memory` regions keyed by IOVA, swapped atomically;
//! - [`chain`]: descriptor-chain validation against a hostile driver;
//! - [`queue`]: one virtqueue, its worker, batched completions and interrupts;
//! - [`model`]: the transport-free device-model trait;
//! - [`device`]: a VDUSE device — creation, the message loop, queue lifecycle, teardown;
//! - [`ram_blk`]: the native reference model, a RAM-backed virtio-blk;
//! - [`loopback`]: a kernel-free driver for one queue, for benchmarks of everything above the kernel.

pub mod chain;
pub mod control;
pub mod device;
pub mod error;
pub mod loopback;
pub mod memory;
pub mod model;
pub mod queue;
pub mod ram_blk;
pub mod uapi;

pub use control::Control;
pub use device::{destroy_device, list_devices, DeviceOptions, DeviceStats, Reclaim, VduseDevice};
pub use error::{Error, Result};
pub use model::{Completer, DeviceModel, Request, RequestBatch};
