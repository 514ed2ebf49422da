//! Taking over a device whose server died, only to detach and destroy it cleanly.
//!
//! A dead server leaves the kernel's driver waiting: control messages (a detach resets the device) and the
//! requests that were in flight. Answering only the messages is not enough — `virtio_blk` waits for its
//! requests before it lets go of the disk, so the detach would hang. With the dead server's state file the
//! reclaimer takes the queues over too and fails every request (virtio-blk: `IOERR`), the old ones first,
//! until the device is gone. Without one it can only answer messages.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{DeviceOptions, Serving, VduseDevice};
use crate::error::{Error, Result};
use crate::model::{Completer, DeviceModel};
use crate::queue::RequestBatch;
use crate::uapi::{self, vduse_dev_request, vduse_dev_response};

/// Fails every request the way the device fails what it cannot serve (virtio-blk: IOERR; see
/// `DeviceSpec::fail_status`).
struct FailAll;

impl DeviceModel for FailAll {
    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        let queue = completer.queue();
        completer.complete_all(batch.iter().map(|req| queue.failure(req.ticket)));
    }
}

enum Inner {
    TookOver(VduseDevice),
    MessagesOnly {
        stop: Arc<EventFd>,
        thread: Option<JoinHandle<()>>,
    },
}

/// Serves a stale device until it is detached; then [`destroy`](Self::destroy) it.
pub struct Reclaim {
    name: String,
    inner: Inner,
}

impl Reclaim {
    /// Opens `/dev/vduse/NAME`; `Busy` if a live process still serves it. Takes the queues over when the
    /// device's state file is in `state_dir`.
    pub fn open(name: &str, state_dir: Option<PathBuf>) -> Result<Self> {
        let mut options = DeviceOptions::new(name);
        options.state_dir = state_dir;
        match VduseDevice::adopt(options, None, |_| Serving::Workers(Arc::new(FailAll)), None) {
            Ok(device) => {
                return Ok(Self {
                    name: name.into(),
                    inner: Inner::TookOver(device),
                })
            }
            Err(Error::NotRecoverable { reason, .. }) => {
                log::warn!(
                    "device {name:?}: {reason}; answering control messages only (requests the dead \
                     server had in flight stay unanswered)"
                );
            }
            Err(e) => return Err(e),
        }
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(format!("{}/{name}", uapi::DEV_DIR))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => Error::Busy {
                    name: name.into(),
                    reason: "a live process serves it",
                },
                Some(libc::ENOENT) => Error::NotFound { name: name.into() },
                _ => Error::open(format!("{}/{name}", uapi::DEV_DIR), e),
            })?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
        let loop_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vduse-reclaim-{name}"))
            .spawn(move || answer_messages(&dev, &loop_stop))
            .map_err(|e| Error::sys("spawn", e))?;
        Ok(Self {
            name: name.into(),
            inner: Inner::MessagesOnly {
                stop,
                thread: Some(thread),
            },
        })
    }

    /// Whether the queues were taken over (in-flight requests are being failed).
    pub fn took_over(&self) -> bool {
        matches!(self.inner, Inner::TookOver(_))
    }

    /// Stops serving and destroys the device (detach it first). `Busy` while it is still attached.
    pub fn destroy(mut self) -> Result<()> {
        match &mut self.inner {
            Inner::TookOver(device) => device.close(),
            Inner::MessagesOnly { stop, thread } => {
                if crate::device::is_attached(&self.name) {
                    return Err(Error::Busy {
                        name: self.name.clone(),
                        reason: "still attached to the vDPA bus",
                    });
                }
                let _ = stop.write(1);
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
                let control = crate::Control::open()?;
                crate::device::destroy_device_waiting(&control, &self.name, crate::device::DESTROY_WAIT)
            }
        }
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        if let Inner::MessagesOnly { stop, thread } = &mut self.inner {
            let _ = stop.write(1);
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Acknowledges status changes and IOTLB updates (the device serves no queues), refuses the rest.
fn answer_messages(dev: &File, stop: &EventFd) {
    loop {
        match crate::wait_readable(dev.as_raw_fd(), stop.as_raw_fd()) {
            Ok(true) => {}
            _ => return,
        }
        let mut req = vduse_dev_request::default();
        let buf = req.as_mut_bytes();
        if !matches!((&*dev).read(buf), Ok(n) if n == buf.len()) {
            continue;
        }
        let ok = matches!(
            req.type_,
            uapi::VDUSE_SET_STATUS | uapi::VDUSE_UPDATE_IOTLB | uapi::VDUSE_GET_VQ_STATE
        );
        let mut resp = vduse_dev_response::new(req.request_id, ok);
        if req.type_ == uapi::VDUSE_GET_VQ_STATE {
            resp.set_split_vq_state(req.vq_index(), 0);
        }
        let _ = (&*dev).write_all(resp.as_bytes());
    }
}
