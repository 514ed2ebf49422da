//! `FsRouter`: one virtio-fs device whose tree belongs to another server (a file system written in
//! TypeScript) with host directories mounted in it, each served by its own [`Server`] on the queues'
//! worker threads. The router owns every queue. It serves a request of a mounted directory inline, as
//! [`FsModel`](crate::FsModel) would, and forwards the rest to the other server (see
//! [`vduse_core::forward`]): no request of a mounted directory ever reaches JavaScript.
//!
//! Node ids tell the trees apart, from the 64-byte header alone: the other server's are below 2^53 (a
//! JavaScript number), mount `i`'s are `MOUNT_IDS + i * ID_SPAN + n`. The other server answers the
//! LOOKUP of a mount point by asking the router to answer it ([`FsRouter::answer_mount`]) with the
//! mount's root, flagged `FUSE_ATTR_SUBMOUNT`: the driver then mounts a superblock of its own there (its
//! own `st_dev`, and its VFS refuses renames and links across it with EXDEV). The session stays the
//! other server's: it answers INIT (and must grant `FUSE_SUBMOUNTS`) and DESTROY; the router starts
//! and ends the mounts' sessions as those pass through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vduse_core::forward::{Forward, Forwarded};
use vduse_core::queue::Gone;
use vduse_core::{Completer, DeviceModel, RequestBatch};

use crate::abi::{op, InHeader, IN_HEADER};
use crate::model::with_local;
use crate::passthrough::ID_SPAN;
use crate::server::{reply_errno, ReqIo, Scratch, Server};

/// Node ids below this belong to the other server (they are exact in a JavaScript number).
pub const OTHER_IDS_END: u64 = 1 << 53;
/// Mount 0's node ids start here (mount `i`'s at `MOUNT_IDS + i * ID_SPAN`).
pub const MOUNT_IDS: u64 = 1 << 62;
/// Mounts one router may have.
pub const MAX_MOUNTS: usize = ((u64::MAX - MOUNT_IDS) / ID_SPAN) as usize;

/// The `id_base` mount `index` must be configured with.
pub fn mount_id_base(index: usize) -> u64 {
    MOUNT_IDS + index as u64 * ID_SPAN
}

/// Which tree a node id belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Other,
    Mount(usize),
    /// An id no tree gives out (a hostile or confused driver).
    Nowhere,
}

/// What became of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// Answered here: complete it with this many bytes (`Err`: fenced meanwhile, answer nothing).
    Answered(Result<u32, Gone>),
    /// The other server's.
    Forward,
}

/// What the router does with a request, decided without serving it.
enum Step {
    Answered(Result<u32, Gone>),
    Forward,
    /// Mount `i`'s: served by its server.
    Serve(usize),
}

/// Requests the router answered or forwarded, for `stats`.
#[derive(Debug, Default)]
pub struct RouterCounters {
    pub forwarded: AtomicU64,
    /// Answered EXDEV (a rename, link or copy across trees) or ESTALE (an id of no tree).
    pub refused: AtomicU64,
}

pub struct FsRouter {
    mounts: Vec<Arc<Server>>,
    /// Per queue, what goes to the other server.
    forward: Vec<Arc<Forward>>,
    counters: RouterCounters,
}

thread_local! {
    static FORWARD: std::cell::RefCell<Vec<Forwarded>> = const { std::cell::RefCell::new(Vec::new()) };
    /// (index in the batch, mount) of the requests a batch's second pass serves.
    static SERVE: std::cell::RefCell<Vec<(usize, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl FsRouter {
    /// A router for a device of `queues` queues. Mount `i`'s server must have been made with
    /// `id_base` [`mount_id_base(i)`](mount_id_base).
    pub fn new(mounts: Vec<Arc<Server>>, queues: usize) -> std::io::Result<Self> {
        let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
        if mounts.is_empty() || mounts.len() > MAX_MOUNTS {
            return Err(invalid(
                "a router needs at least one mount, and at most MAX_MOUNTS",
            ));
        }
        if mounts
            .iter()
            .enumerate()
            .any(|(i, m)| m.fs().root_id() != mount_id_base(i) + crate::abi::ROOT_ID)
        {
            return Err(invalid("mount i must use the node ids of mount_id_base(i)"));
        }
        let forward = (0..queues)
            .map(|_| Forward::new().map(Arc::new))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            mounts,
            forward,
            counters: RouterCounters::default(),
        })
    }

    pub fn mounts(&self) -> &[Arc<Server>] {
        &self.mounts
    }

    /// Per queue, the requests for the other server.
    pub fn forwards(&self) -> &[Arc<Forward>] {
        &self.forward
    }

    pub fn counters(&self) -> &RouterCounters {
        &self.counters
    }

    pub fn part(&self, nodeid: u64) -> Part {
        if nodeid < OTHER_IDS_END {
            return Part::Other;
        }
        match nodeid.checked_sub(MOUNT_IDS) {
            Some(n) if ((n / ID_SPAN) as usize) < self.mounts.len() => Part::Mount((n / ID_SPAN) as usize),
            _ => Part::Nowhere,
        }
    }

    /// Answers the LOOKUP the other server was asked (of the name mount `mount` is at) with that
    /// mount's root, the name valid for `entry_valid`; the other server completes it with the bytes
    /// returned.
    pub fn answer_mount(
        &self,
        mount: usize,
        io: &mut dyn ReqIo,
        head: &[u8],
        entry_valid: (u64, u32),
    ) -> Result<u32, Gone> {
        match self.mounts.get(mount) {
            Some(m) => m.answer_mount(io, head, entry_valid),
            None => {
                let unique = InHeader::parse(head).map_or(0, |h| h.unique);
                reply_errno(io, unique, libc::ENOENT)
            }
        }
    }

    /// Serves one request whose first readable bytes (up to 64) are `head`, or says it is the other
    /// server's.
    pub fn route(&self, io: &mut dyn ReqIo, head: &[u8], s: &mut Scratch) -> Routed {
        match self.step(io, head, s) {
            Step::Answered(r) => Routed::Answered(r),
            Step::Forward => Routed::Forward,
            Step::Serve(i) => Routed::Answered(self.mounts[i].handle(io, head, s)),
        }
    }

    /// Decides what becomes of a request; answers here only what costs no host work (EXDEV, ESTALE, a
    /// BATCH_FORGET of the mounts' nodes).
    fn step(&self, io: &mut dyn ReqIo, head: &[u8], s: &mut Scratch) -> Step {
        // Malformed: the other server answers it (and counts it).
        let Some(h) = InHeader::parse(head) else {
            return Step::Forward;
        };
        // A session starts or ends only by a request still in flight: one a reset fenced after it was
        // popped must not end (or start) the session that followed.
        if matches!(h.opcode, op::INIT | op::DESTROY) && !io.live() {
            return Step::Answered(Err(Gone));
        }
        match h.opcode {
            op::INIT => {
                // Armed as INIT passes, not when the other server has answered it: the driver sends
                // nothing before that answer, so nothing reaches a mount earlier; a driver that does
                // anyway (or whose INIT is refused) reaches only the directories it was to see.
                for m in &self.mounts {
                    m.begin_session();
                }
                return Step::Forward;
            }
            op::DESTROY => {
                for m in &self.mounts {
                    m.end_session();
                }
                return Step::Forward;
            }
            op::BATCH_FORGET => return self.batch_forget(io, &h, s),
            _ => {}
        }
        let part = self.part(h.nodeid);
        // A second node id in the arguments (within the 64 bytes copied at pop): the same tree, or EXDEV.
        let other_at = match h.opcode {
            op::RENAME | op::RENAME2 | op::LINK => Some(IN_HEADER),
            op::COPY_FILE_RANGE => Some(IN_HEADER + 16),
            _ => None,
        };
        if let Some(at) = other_at {
            if let Some(b) = head.get(at..at + 8) {
                let id = u64::from_le_bytes(b.try_into().unwrap_or_default());
                if self.part(id) != part {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return Step::Answered(reply_errno(io, h.unique, libc::EXDEV));
                }
            }
        }
        match part {
            Part::Other => Step::Forward,
            Part::Mount(i) => Step::Serve(i),
            Part::Nowhere if h.opcode == op::FORGET || h.opcode == op::INTERRUPT => Step::Answered(Ok(0)),
            Part::Nowhere => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                Step::Answered(reply_errno(io, h.unique, libc::ESTALE))
            }
        }
    }

    /// BATCH_FORGET names nodes of any tree: the mounts' are forgotten here, and the request goes on to
    /// the other server if it names any of its nodes (it skips the ids it does not know).
    fn batch_forget(&self, io: &mut dyn ReqIo, h: &InHeader, s: &mut Scratch) -> Step {
        const CHUNK: usize = 4096;
        let mut head = [0u8; 8];
        let total = io.readable();
        match io.read(IN_HEADER, &mut head) {
            Ok(8) => {}
            Ok(_) => return Step::Forward,
            Err(Gone) => return Step::Answered(Err(Gone)),
        }
        let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if h.len as usize != total || total != IN_HEADER + 8 + count * 16 {
            return Step::Forward;
        }
        let mut others = false;
        let mut at = IN_HEADER + 8;
        s.args.resize(CHUNK, 0);
        while at < total {
            let n = (total - at).min(CHUNK);
            match io.read(at, &mut s.args[..n]) {
                Ok(got) if got == n => {}
                // Unreadable from here on: the other server reads what it can of it.
                Ok(_) => return Step::Forward,
                Err(Gone) => return Step::Answered(Err(Gone)),
            }
            for e in s.args[..n].chunks_exact(16) {
                let id = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
                let lookups = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
                match self.part(id) {
                    Part::Other => others = true,
                    Part::Mount(i) => self.mounts[i].fs().forget(id, lookups),
                    Part::Nowhere => {}
                }
            }
            at += n;
        }
        if others {
            Step::Forward
        } else {
            Step::Answered(Ok(0))
        }
    }
}

impl DeviceModel for FsRouter {
    /// Two passes: the other server's requests are handed over first (it works on them while the mounts'
    /// are served here), then the mounts' are served in order.
    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer) {
        let vq = completer.queue();
        FORWARD.with(|f| {
            SERVE.with(|sv| {
                let forward = &mut *f.borrow_mut();
                let serve = &mut *sv.borrow_mut();
                with_local(|l| {
                    let features = vq.features();
                    for (k, req) in batch.iter().enumerate() {
                        let step = {
                            let (mut io, scratch) = l.io(vq, &req);
                            self.step(&mut io, req.header, scratch)
                        };
                        match step {
                            Step::Answered(Ok(used)) => {
                                completer.complete(req.ticket, used, None);
                            }
                            // Fenced meanwhile (a reset, a remap): there is no one to answer.
                            Step::Answered(Err(Gone)) => {}
                            Step::Forward => forward.push(Forwarded::of(&req, features)),
                            Step::Serve(i) => serve.push((k, i)),
                        }
                    }
                    if !forward.is_empty() {
                        self.counters
                            .forwarded
                            .fetch_add(forward.len() as u64, Ordering::Relaxed);
                        match self.forward.get(usize::from(queue)) {
                            Some(to) => to.push(forward.drain(..)),
                            // A queue the router was not made for (never: one per queue): answer EIO
                            // rather than leave them in flight.
                            None => {
                                for r in forward.drain(..) {
                                    let Some(req) = batch.iter().find(|q| q.ticket == r.ticket) else {
                                        continue;
                                    };
                                    let (mut io, _) = l.io(vq, &req);
                                    let unique = InHeader::parse(req.header).map_or(0, |h| h.unique);
                                    if let Ok(used) = reply_errno(&mut io, unique, libc::EIO) {
                                        completer.complete(req.ticket, used, None);
                                    }
                                }
                            }
                        }
                    }
                    for (k, i) in serve.drain(..) {
                        let Some(req) = batch.get(k) else { continue };
                        let (mut io, scratch) = l.io(vq, &req);
                        // Gone: fenced meanwhile, no one to answer.
                        if let Ok(used) = self.mounts[i].handle(&mut io, req.header, scratch) {
                            completer.complete(req.ticket, used, None);
                        }
                    }
                });
            });
        });
        completer.flush();
    }

    fn started(&self, _features: u64) {
        for m in &self.mounts {
            m.new_driver_session();
        }
    }
}
