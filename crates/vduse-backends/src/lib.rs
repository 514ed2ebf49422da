//! `vduse-backends`: the native backends of vduse devices, with no Node in them — every transport (the
//! kernel's VDUSE, later vhost-user) and `cargo test` use them as they are.
//!
//! - [`file_io`]: block I/O between a file (or a block device) and requests' buffers on worker threads;
//! - [`nic`]: what natively served NICs share: header rules, held receive buffers;
//! - [`tap`]: a virtio-net model bridged to a kernel tap interface;
//! - [`switch`]: virtio-net models wired to one Ethernet switch in the process.
//!
//! Both touch driver memory only the way the core allows it: copies checked against the request's
//! ticket (a fence ends them), or system calls into pinned mappings (the message loop waits for them).

pub mod file_io;
pub mod nbd;
pub mod nic;
pub mod switch;
pub mod tap;
