//! A native virtio-fs device for vduse: a host directory shared with the driver (a container's
//! `mount -t virtiofs`, or a VM), served on the queues' worker threads with no JavaScript per request.
//!
//! - [`abi`]: the FUSE wire format, read with bounds checks.
//! - [`passthrough`]: the host side — nodes as `O_PATH` fds, every name resolved beneath its parent.
//! - [`server`]: one request in, one reply out, over any [`server::ReqIo`].
//! - [`model`]: the [`vduse_core::DeviceModel`] serving virtqueues with it.
//! - [`router`]: host directories mounted inside another server's tree (a TypeScript file system).

pub mod abi;
pub mod model;
pub mod passthrough;
pub mod router;
pub mod server;
pub mod sys;

pub use model::FsModel;
pub use passthrough::{CachePolicy, Config, PassthroughFs, SetupError, XattrPolicy};
pub use router::FsRouter;
pub use server::{Counters, ReqIo, Scratch, Server};
