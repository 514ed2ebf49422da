//! `FsModel`: the virtio-fs device model over a [`Server`]. One worker thread per queue (queue 0 is the
//! high-priority queue: FORGET and the like; the others carry requests) serves each request inline:
//! parse, run the system calls, reply, complete. Replies and staged data move only through the queue's
//! ticket-checked copies; a file read goes straight into the driver's buffers while they are pinned, and
//! only for files whose reads copy page by page (so nothing can reach a buffer after a fence).

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::Arc;

use vduse_core::memory::Pins;
use vduse_core::queue::{Gone, Owner, Part, Ticket};
use vduse_core::{Completer, DeviceModel, DeviceSpec, Request, RequestBatch, Virtqueue};

use crate::server::{ReqIo, Scratch, Server};
use crate::sys;

/// virtio device id of a file-system device.
pub const VIRTIO_ID_FS: u32 = 26;
const TAG_BYTES: usize = 36;

pub struct FsModel {
    server: Arc<Server>,
}

impl FsModel {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The device a driver sees: `tag` (1–36 bytes) and `request_queues` besides the high-priority one.
    pub fn spec(&self, tag: &str, request_queues: u16, queue_size: u16) -> DeviceSpec {
        let mut config = vec![0u8; TAG_BYTES + 4];
        let t = tag.as_bytes();
        config[..t.len().min(TAG_BYTES)].copy_from_slice(&t[..t.len().min(TAG_BYTES)]);
        config[TAG_BYTES..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
        DeviceSpec {
            device_id: VIRTIO_ID_FS,
            features: 0,
            config,
            num_queues: 1 + request_queues,
            queue_size,
            // Headers and arguments, then a page per 4 KiB of data, then the reply's header and struct.
            max_segments: self.server.max_write() as usize / 4096 + 8,
            kind: "fs".into(),
            held_queues: 0,
        }
    }
}

pub(crate) struct Local {
    pub(crate) scratch: Scratch,
    pins: Pins,
    iov: Vec<libc::iovec>,
    /// This thread has its own umask (0); false if it could not get one (logged: new files are then
    /// masked by the process umask too).
    umask_private: Option<bool>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        scratch: Scratch::default(),
        pins: Pins::new(),
        iov: Vec::new(),
        umask_private: None,
    });
}

/// Runs `f` with this worker thread's buffers, and a [`QueueIo`] maker for a request of `vq`.
pub(crate) fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> R {
    LOCAL.with(|l| {
        let l = &mut *l.borrow_mut();
        if l.umask_private.is_none() {
            let ok = sys::private_umask_zero().is_ok();
            if !ok {
                log::error!("virtio-fs: unshare(CLONE_FS) failed: new files get this process's umask");
            }
            l.umask_private = Some(ok);
        }
        f(l)
    })
}

impl Local {
    /// A request's buffers, and the scratch space to serve it with.
    pub(crate) fn io<'a>(
        &'a mut self,
        vq: &'a Arc<Virtqueue>,
        req: &Request<'_>,
    ) -> (QueueIo<'a>, &'a mut Scratch) {
        (
            QueueIo {
                vq,
                ticket: req.ticket,
                readable: req.shape.readable_bytes as usize,
                writable: req.shape.writable_bytes as usize,
                pins: &mut self.pins,
                iov: &mut self.iov,
            },
            &mut self.scratch,
        )
    }
}

impl DeviceModel for FsModel {
    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        with_local(|l| {
            let vq = completer.queue();
            for req in batch.iter() {
                let (mut io, scratch) = l.io(vq, &req);
                // Gone: fenced meanwhile (a reset, a remap): there is no one to answer.
                if let Ok(used) = self.server.handle(&mut io, req.header, scratch) {
                    completer.complete(req.ticket, used, None);
                }
            }
        });
        completer.flush();
    }

    fn started(&self, _features: u64) {
        self.server.new_driver_session();
    }
}

/// A request of a virtqueue, reached through its ticket.
pub(crate) struct QueueIo<'a> {
    vq: &'a Arc<Virtqueue>,
    ticket: Ticket,
    readable: usize,
    writable: usize,
    pins: &'a mut Pins,
    iov: &'a mut Vec<libc::iovec>,
}

impl QueueIo<'_> {
    /// Pins `len` bytes of the request's `part` from `offset` and fills `iov` with them; false if that
    /// is not possible (nothing pinned).
    fn pin(&mut self, part: Part, offset: usize, len: usize) -> Result<bool, Gone> {
        if len == 0
            || !self.vq.pin(
                self.ticket,
                Owner::Model,
                part,
                offset as u64,
                len as u64,
                self.pins,
            )?
        {
            return Ok(false);
        }
        self.iov.clear();
        self.iov
            .extend(self.pins.ranges().iter().map(|&(p, n)| libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            }));
        Ok(true)
    }
}

impl ReqIo for QueueIo<'_> {
    fn readable(&self) -> usize {
        self.readable
    }
    fn writable(&self) -> usize {
        self.writable
    }
    fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<usize, Gone> {
        self.vq
            .read_request(self.ticket, Owner::Model, offset as u64, dst)
    }
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<usize, Gone> {
        self.vq
            .write_request(self.ticket, Owner::Model, offset as u64, src)
    }
    fn live(&self) -> bool {
        self.vq.is_live(self.ticket)
    }
    fn read_file(&mut self, fd: RawFd, pos: u64, offset: usize, len: usize) -> Result<Option<usize>, Gone> {
        // The server calls this only for regular files on page-cache file systems.
        if !self.pin(Part::Writable, offset, len)? {
            return Ok(None);
        }
        // SAFETY: the iovecs point into mappings pinned (kept mapped, not given back to the kernel) until
        // the pins are released below, writable by the device; the file is on a page-cache file system,
        // so the copy is done by the time the call returns.
        let r = unsafe { sys::preadv(fd, self.iov, pos) };
        self.pins.release();
        // An error: let the staged path try, and report its own.
        Ok(r.ok())
    }
    fn write_file(&mut self, fd: RawFd, pos: u64, offset: usize, len: usize) -> Result<Option<usize>, Gone> {
        // The server calls this only for regular files on page-cache file systems, never O_DIRECT,
        // O_SYNC or O_DSYNC (a write that waits for the disk must not hold the pins meanwhile).
        if !self.pin(Part::Readable, offset, len)? {
            return Ok(None);
        }
        // SAFETY: as in `read_file`, for readable pinned mappings: a buffered write copies into the page
        // cache before it returns, so nothing reads the driver's memory once the pins are released.
        let r = unsafe { sys::pwritev(fd, self.iov, pos) };
        self.pins.release();
        Ok(r.ok())
    }
}
