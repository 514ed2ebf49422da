//! A virtio-fs device served natively: a host directory shared through `vduse_fs` on the queues' worker
//! threads. JavaScript configures it and reads its counters; no request reaches JavaScript. Or host
//! directories mounted inside a TypeScript file system's tree (`fsMounts`): a router on the worker
//! threads serves theirs and forwards the rest to JavaScript.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use napi_derive::napi;
use vduse_core::queue::{Done, Gone, Owner, Ticket};
use vduse_core::Virtqueue;
use vduse_fs::router::mount_id_base;
use vduse_fs::{CachePolicy, Config, FsRouter, PassthroughFs, ReqIo, Server, SetupError, XattrPolicy};

use crate::error::Failure;

/// What to share, and how (`DeviceInit.fsShare`).
#[napi(object)]
pub struct FsShareInit {
    /// The host directory.
    pub dir: String,
    /// `never`, `auto` (default) or `always`.
    pub cache: Option<String>,
    /// Let the driver cache writes (FUSE writeback cache).
    pub writeback: Option<bool>,
    pub read_only: Option<bool>,
    /// `off`, `user` (default: `user.*` only) or `all`.
    pub xattr: Option<String>,
    pub max_nodes: Option<u32>,
    pub max_handles: Option<u32>,
    /// Let the driver create character and block device nodes.
    pub allow_devices: Option<bool>,
    /// Largest read or write the driver may send (bytes, a multiple of 4096 up to 1 MiB).
    pub max_write: Option<u32>,
    /// Let lookups enter file systems mounted inside the directory (never procfs, sysfs and the like).
    pub cross_mounts: Option<bool>,
}

/// Counters of a natively served file system.
#[napi(object)]
#[derive(Clone, Default)]
pub struct FsCounters {
    pub requests: f64,
    pub errors: f64,
    pub malformed: f64,
    pub unsupported: f64,
    pub sessions: f64,
    pub nodes: f64,
    pub handles: f64,
    pub bytes_read: f64,
    pub bytes_written: f64,
    /// FSYNC, FSYNCDIR and SYNCFS done on the host.
    pub syncs: f64,
    /// The limits in force (lowered to fit the open-file limit).
    pub max_nodes: f64,
    pub max_handles: f64,
}

/// The server of a shared directory; `id_base`: 0 alone, or a router's mount's (see `router_of`).
pub fn server_of(init: &FsShareInit, id_base: u64) -> Result<Arc<Server>, Failure> {
    let bad = |m: String| Failure::new("ERR_VDUSE_INVALID_CONFIG", m, None, None, None);
    let mut cfg = Config::new(&init.dir);
    cfg.cache = match init.cache.as_deref().unwrap_or("auto") {
        "never" => CachePolicy::Never,
        "auto" => CachePolicy::Auto,
        "always" => CachePolicy::Always,
        other => return Err(bad(format!("cache must be never, auto or always, not {other:?}"))),
    };
    cfg.xattr = match init.xattr.as_deref().unwrap_or("user") {
        "off" => XattrPolicy::Off,
        "user" => XattrPolicy::User,
        "all" => XattrPolicy::All,
        other => return Err(bad(format!("xattr must be off, user or all, not {other:?}"))),
    };
    cfg.writeback = init.writeback.unwrap_or(false);
    cfg.read_only = init.read_only.unwrap_or(false);
    cfg.allow_devices = init.allow_devices.unwrap_or(false);
    cfg.cross_mounts = init.cross_mounts.unwrap_or(false);
    if let Some(n) = init.max_nodes {
        cfg.max_nodes = n as usize;
    }
    if let Some(n) = init.max_handles {
        cfg.max_handles = n as usize;
    }
    cfg.id_base = id_base;
    let max_write = init.max_write.unwrap_or(1 << 20);
    let fs = PassthroughFs::new(cfg).map_err(|e| {
        let message = e.to_string();
        match e {
            SetupError::Root(_, io) => {
                let errno = io.raw_os_error();
                let (code, hint) = match errno {
                    Some(libc::ENOENT | libc::ENOTDIR) => {
                        ("ERR_VDUSE_NOT_FOUND", "sharedDir must be an existing directory")
                    }
                    Some(libc::EACCES | libc::EPERM) => (
                        "ERR_VDUSE_PERMISSION",
                        "the server must be able to open the directory",
                    ),
                    _ => ("ERR_VDUSE_SYSCALL", "see the errno"),
                };
                Failure::new(code, message, errno, Some("open"), Some(hint))
            }
            SetupError::Proc(io) => Failure::new(
                "ERR_VDUSE_UNAVAILABLE",
                message,
                io.raw_os_error(),
                Some("open"),
                Some("mount procfs on /proc"),
            ),
            SetupError::Invalid(_) => bad(message),
            SetupError::FdLimit { .. } => Failure::new(
                "ERR_VDUSE_INVALID_CONFIG",
                message,
                None,
                None,
                Some("raise the open-file limit (ulimit -n)"),
            ),
        }
    })?;
    Ok(Arc::new(Server::new(fs, max_write)))
}

pub fn counters(server: &Server) -> FsCounters {
    let c = server.counters();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let (nodes, handles) = server.fs().counts();
    let (max_nodes, max_handles) = server.fs().limits();
    FsCounters {
        requests: get(&c.requests),
        errors: get(&c.errors),
        malformed: get(&c.malformed),
        unsupported: get(&c.unsupported),
        sessions: get(&c.sessions),
        nodes: nodes as f64,
        handles: handles as f64,
        bytes_read: get(&c.bytes_read),
        bytes_written: get(&c.bytes_written),
        syncs: get(&c.syncs),
        max_nodes: max_nodes as f64,
        max_handles: max_handles as f64,
    }
}

/// A router for host directories mounted in a TypeScript file system's tree (`DeviceInit.fsMounts`).
pub fn router_of(mounts: &[FsShareInit], queues: usize) -> Result<Arc<FsRouter>, Failure> {
    let servers = mounts
        .iter()
        .enumerate()
        .map(|(i, m)| server_of(m, mount_id_base(i)))
        .collect::<Result<Vec<_>, _>>()?;
    FsRouter::new(servers, queues)
        .map(Arc::new)
        .map_err(|e| Failure::new("ERR_VDUSE_INVALID_CONFIG", e.to_string(), None, None, None))
}

/// Answers request `ticket` (a LOOKUP JavaScript was asked, of a mount point) with mount `mount`'s
/// root, the name valid for `entry_seconds`, and completes it. False if the request is no longer in
/// flight, or could hold no answer (completed empty).
pub fn answer_mount(
    router: &FsRouter,
    vq: &Virtqueue,
    ticket: Ticket,
    writable: u32,
    mount: u32,
    entry_seconds: f64,
) -> bool {
    let mut head = [0u8; vduse_core::queue::HEAD_BYTES];
    let Ok(n) = vq.read_request(ticket, Owner::Model, 0, &mut head) else {
        return false;
    };
    let mut io = TicketIo {
        vq,
        ticket,
        writable: writable as usize,
    };
    let secs = if entry_seconds.is_finite() {
        entry_seconds.clamp(0.0, 1e12)
    } else {
        0.0
    };
    let valid = (secs as u64, ((secs.fract() * 1e9) as u32).min(999_999_999));
    match router.answer_mount(mount as usize, &mut io, &head[..n], valid) {
        Ok(used) => {
            vq.complete_all([Done::new(ticket, used, None)]);
            used > 0
        }
        Err(Gone) => false,
    }
}

/// A request JavaScript holds, reached through its ticket (the answer of a mount point's LOOKUP).
struct TicketIo<'a> {
    vq: &'a Virtqueue,
    ticket: Ticket,
    writable: usize,
}

impl ReqIo for TicketIo<'_> {
    fn readable(&self) -> usize {
        0
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
}
