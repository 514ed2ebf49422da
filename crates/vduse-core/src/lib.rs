//! `vduse-core`: everything a VDUSE (vDPA Device in Userspace) device needs except its semantics.
//!
//! Layers, each using only the ones before it:
//! - [`uapi`]: the kernel's structs and ioctl numbers, layouts checked at compile time;
//! - [`control`]: `/dev/vduse/control` (API version, create, destroy);
//! - [`memory`]: the IOTLB as owned, permission-checked mappings keyed by IOVA, revocable in place;
//! - [`chain`]: descriptor-chain validation against a hostile driver;
//! - [`inflight`]: the persistent state file (in-flight log) that lets a new server take a device over;
//! - [`lifecycle`]: resets, stopped queues and memory changes with requests in flight, for every transport;
//! - [`queue`]: one virtqueue and the life of each request on it (pop, complete, fence);
//! - [`model`]: the device description and the trait of models written in Rust;
//! - [`worker`]: worker-thread serving for such models;
//! - [`forward`]: handing requests such a model took to another server (JavaScript);
//! - [`device`]: a VDUSE device — creation, take-over, the message loop, bounded drains, teardown;
//! - [`vhost_user`]: the same devices over a vhost-user socket, for any VMM, without VDUSE;
//! - [`reclaim`]: taking over a dead server's device just to detach it cleanly;
//! - [`ram_blk`]: the native reference model, a RAM-backed virtio-blk;
//! - [`loopback`]: a kernel-free driver, for tests and benchmarks of everything above the kernel.

pub mod chain;
pub mod control;
pub mod device;
pub mod error;
pub mod forward;
pub mod inflight;
pub mod lifecycle;
pub mod loopback;
pub mod memory;
pub mod model;
pub mod queue;
pub mod ram_blk;
pub mod reclaim;
#[cfg(feature = "test-rig")]
pub mod rig;
pub mod uapi;
pub mod vhost_user;
pub mod worker;

pub use control::Control;
pub use device::{
    destroy_device, is_attached, list_devices, DeviceEvent, DeviceEvents, DeviceOptions, DeviceStats,
    DrainReason, Serving, VduseDevice,
};
pub use error::{Error, Result};
pub use model::{Completer, DeviceModel, DeviceSpec};
pub use queue::{Budget, Completion, Done, Pop, Request, RequestBatch, Ticket, Virtqueue};
pub use reclaim::Reclaim;
pub use vhost_user::VhostUserDevice;

use std::os::fd::RawFd;

/// Polls `fds` for reading for at most `timeout_ms` (-1: no limit); returns each one's `revents`
/// (EINTR retries).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> std::io::Result<Vec<i16>> {
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

/// Waits until `fd` is readable (`Ok(true)`) or `stop` is (`Ok(false)`). An error condition on `fd`
/// (POLLERR/POLLHUP: a broken VDUSE device) is `EPIPE`.
pub fn wait_readable(fd: RawFd, stop: RawFd) -> std::io::Result<bool> {
    let r = poll_readable(&[stop, fd], -1)?;
    if r[0] != 0 {
        return Ok(false);
    }
    if r[1] & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
    }
    Ok(true)
}
