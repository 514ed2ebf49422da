//! The transport a device is served through: the kernel (VDUSE) or a vhost-user socket. The binding
//! serves both the same way — the same queues, kick fds and request life — and asks this only what
//! differs.

use std::path::PathBuf;
use std::sync::Arc;

use vduse_core::queue::Virtqueue;
use vduse_core::{DeviceStats, Result, VduseDevice, VhostUserDevice};
use vmm_sys_util::eventfd::EventFd;

pub enum Served {
    Kernel(VduseDevice),
    VhostUser(VhostUserDevice),
}

impl Served {
    pub fn name(&self) -> &str {
        match self {
            Served::Kernel(d) => d.name(),
            Served::VhostUser(d) => d.name(),
        }
    }

    pub fn queues(&self) -> &[Arc<Virtqueue>] {
        match self {
            Served::Kernel(d) => d.queues(),
            Served::VhostUser(d) => d.queues(),
        }
    }

    pub fn kick_fds(&self) -> &[Arc<EventFd>] {
        match self {
            Served::Kernel(d) => d.kick_fds(),
            Served::VhostUser(d) => d.kick_fds(),
        }
    }

    pub fn status(&self) -> u8 {
        match self {
            Served::Kernel(d) => d.status(),
            Served::VhostUser(d) => d.status(),
        }
    }

    pub fn negotiated_features(&self) -> u64 {
        match self {
            Served::Kernel(d) => d.negotiated_features(),
            Served::VhostUser(d) => d.negotiated_features(),
        }
    }

    pub fn state_path(&self) -> Option<PathBuf> {
        match self {
            Served::Kernel(d) => d.state_path(),
            Served::VhostUser(_) => None,
        }
    }

    pub fn stats(&self) -> DeviceStats {
        match self {
            Served::Kernel(d) => d.stats(),
            Served::VhostUser(d) => d.stats(),
        }
    }

    pub fn update_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        match self {
            Served::Kernel(d) => d.update_config(offset, data),
            Served::VhostUser(d) => d.update_config(offset, data),
        }
    }

    /// Whether closing now would leave a driver unanswered (a VDUSE device still on the vDPA bus).
    pub fn is_attached(&self) -> bool {
        match self {
            Served::Kernel(d) => vduse_core::is_attached(d.name()),
            Served::VhostUser(_) => false,
        }
    }

    pub fn close(&mut self) -> Result<()> {
        match self {
            Served::Kernel(d) => d.close(),
            Served::VhostUser(d) => d.close(),
        }
    }

    pub fn release(&mut self) -> Result<()> {
        match self {
            Served::Kernel(d) => d.release(),
            Served::VhostUser(d) => Err(vduse_core::Error::NotRecoverable {
                name: d.name().to_string(),
                reason: "a vhost-user device keeps no state file; its client reconnects instead".into(),
            }),
        }
    }
}
