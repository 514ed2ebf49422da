//! `PassthroughFs`: a host directory as the driver's file system. Every node the driver knows is an
//! `O_PATH` file descriptor of its own inode, and every name is resolved relative to its parent's fd, one
//! validated component at a time (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`, and
//! `O_NOFOLLOW`), never by joining path strings: whatever names, symlinks or renames the driver sends, it
//! reaches nothing outside the shared directory. Files are opened again through `/proc/self/fd` only
//! for regular files and directories; symlinks are never followed on the host.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::abi::{self, Validity};
use crate::sys::{self, Errno, FdName, SysResult};

/// How long the driver may cache what it learns (virtiofsd's `--cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePolicy {
    /// Nothing is cached: every access asks (names and attributes valid 0 s, direct I/O). For a
    /// directory that the host changes under the driver's feet.
    Never,
    /// Names and attributes for 1 s; file data until the driver sees the file changed.
    Auto,
    /// Everything for a day, data kept across opens: only the driver changes the directory.
    Always,
}

/// Which extended attributes the driver may see and set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrPolicy {
    /// None: the operations answer ENOSYS (the driver stops asking).
    Off,
    /// `user.*` only; `security.*`, `trusted.*` and `system.*` are hidden and cannot be set.
    User,
    /// All, as the server's own privileges allow (lets the driver set `security.capability` on host
    /// files: only for a trusted driver).
    All,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The shared directory.
    pub root: PathBuf,
    pub cache: CachePolicy,
    /// Let the driver cache writes (FUSE_WRITEBACK_CACHE); not with `CachePolicy::Never`.
    pub writeback: bool,
    /// Refuse every change with EROFS, before touching the host.
    pub read_only: bool,
    pub xattr: XattrPolicy,
    /// Nodes the driver may know at once (one fd each); more lookups fail with ENFILE.
    pub max_nodes: usize,
    /// Open files and directories at once; more opens fail with EMFILE.
    pub max_handles: usize,
    /// Let the driver create character and block device nodes (off: EPERM).
    pub allow_devices: bool,
    /// Let lookups cross into file systems mounted inside the directory (off: such a mount point answers
    /// EACCES). Even then procfs, sysfs and the like are never entered.
    pub cross_mounts: bool,
    /// Added to every node id the driver is given (the root is `id_base + 1`): a share mounted inside
    /// another file system's tree gets ids of its own (see `router`). A multiple of [`ID_SPAN`].
    pub id_base: u64,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cache: CachePolicy::Auto,
            writeback: false,
            read_only: false,
            xattr: XattrPolicy::User,
            max_nodes: 1 << 20,
            max_handles: 65_536,
            allow_devices: false,
            cross_mounts: false,
            id_base: 0,
        }
    }
}

/// Why a shared directory cannot be served.
#[derive(Debug)]
pub enum SetupError {
    /// The directory cannot be opened, or is not one.
    Root(PathBuf, std::io::Error),
    /// `/proc/self/fd` is missing or not procfs (files are reopened through it).
    Proc(std::io::Error),
    /// Options that contradict each other.
    Invalid(&'static str),
    /// The open-file limit leaves too few descriptors for the nodes and handles asked for.
    FdLimit { limit: u64, needed: u64 },
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Root(p, e) => write!(f, "cannot share {}: {e}", p.display()),
            SetupError::Proc(e) => write!(f, "/proc/self/fd is not usable (mount procfs): {e}"),
            SetupError::Invalid(m) => f.write_str(m),
            SetupError::FdLimit { limit, needed } => write!(
                f,
                "the open-file limit ({limit}) leaves too few descriptors: at least {needed} needed (raise ulimit -n, or lower maxNodes/maxHandles)"
            ),
        }
    }
}

impl std::error::Error for SetupError {}

/// Descriptors all shared directories of this process hold now for nodes and handles (counted by
/// [`FdTicket`]s), and the nodes + handles all of them may hold together (each reserves its limits when
/// created, and gives them back when dropped): the open-file limit is per process, so one device's
/// driver must not starve another device — or the rest of the process — of descriptors.
static FDS_IN_USE: AtomicUsize = AtomicUsize::new(0);
static FDS_RESERVED: Mutex<u64> = Mutex::new(0);

/// One held descriptor, counted while it lives.
struct FdTicket;

impl FdTicket {
    fn take() -> Self {
        FDS_IN_USE.fetch_add(1, Ordering::AcqRel);
        FdTicket
    }
}

impl Drop for FdTicket {
    fn drop(&mut self) {
        FDS_IN_USE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An inode the driver knows.
pub struct Node {
    /// `O_PATH | O_NOFOLLOW` fd of the inode (a symlink itself, never its target).
    fd: OwnedFd,
    /// `st_mode & S_IFMT`.
    kind: u32,
    key: (u64, u64),
    /// Its share of the process's descriptor budget (none for the root).
    _budget: Option<FdTicket>,
}

impl Node {
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

struct Known {
    node: Arc<Node>,
    lookups: u64,
}

#[derive(Default)]
struct Nodes {
    by_id: HashMap<u64, Known>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

/// An open file or directory.
pub struct Handle {
    fd: OwnedFd,
    pub node: Arc<Node>,
    /// Writes allowed (opened O_WRONLY or O_RDWR).
    writable: bool,
    /// A directory's position is shared by seek and read: one reader at a time.
    dir: Option<Mutex<()>>,
    /// A regular file on a page-cache file system: reads and writes may go straight between it and pinned
    /// buffers (decided at the first one: most files created are never read through their handle).
    zero_copy: std::sync::OnceLock<bool>,
    /// Opened O_SYNC or O_DSYNC: a write waits for the disk inside the call (decided at the first write).
    sync_writes: std::sync::OnceLock<bool>,
    _budget: FdTicket,
}

impl Handle {
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    /// Whether a read of this file copies page by page from the page cache.
    pub fn zero_copy(&self) -> bool {
        *self
            .zero_copy
            .get_or_init(|| self.node.is_reg() && vduse_backends::file_io::zero_copy_reads(self.fd()))
    }
    /// Whether a write of this file is a copy into the page cache and nothing more: not when it also
    /// waits for the disk (O_SYNC, O_DSYNC, a file system mounted `sync`), which pinned buffers must not
    /// wait for. (A `chattr +S` file still would: not checked.)
    pub fn zero_copy_writes(&self) -> bool {
        self.zero_copy()
            && !*self.sync_writes.get_or_init(|| {
                // SAFETY: F_GETFL on our own open fd.
                let fl = unsafe { libc::fcntl(self.fd(), libc::F_GETFL) };
                // SAFETY: an all-zero statvfs is a valid value; fstatvfs fills it for our own fd.
                let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                let sync_mount = unsafe { libc::fstatvfs(self.fd(), &mut st) } != 0
                    || st.f_flag & libc::ST_SYNCHRONOUS != 0;
                fl < 0 || fl & (libc::O_SYNC | libc::O_DSYNC) != 0 || sync_mount
            })
    }
}

#[derive(Default)]
struct Handles {
    map: HashMap<u64, Arc<Handle>>,
    next: u64,
}

/// Node ids one instance may hand out, from `id_base + 1` (they never restart, so at a million lookups a
/// second this lasts nine years).
pub const ID_SPAN: u64 = 1 << 48;

/// Descriptors kept free for everything else in the process.
const FD_RESERVE: u64 = 1024;

pub struct PassthroughFs {
    cfg: Config,
    root: Arc<Node>,
    /// `/proc/self/fd`, to reopen an O_PATH fd with real access.
    proc_fd: OwnedFd,
    nodes: Mutex<Nodes>,
    handles: Mutex<Handles>,
    node_count: AtomicUsize,
    handle_count: AtomicUsize,
    /// `openat2` works (false after one ENOSYS).
    beneath: AtomicBool,
    /// Creations run under the caller's fsuid/fsgid (we are root).
    switch_ids: bool,
    max_nodes: usize,
    max_handles: usize,
    /// The root's node id (`id_base + 1`).
    root_id: u64,
    /// A limit was reached and logged.
    warned: AtomicBool,
}

impl PassthroughFs {
    pub fn new(cfg: Config) -> Result<Self, SetupError> {
        if cfg.writeback && cfg.cache == CachePolicy::Never {
            return Err(SetupError::Invalid(
                "a writeback cache needs a cache policy other than never",
            ));
        }
        if cfg.max_nodes < 16 || cfg.max_handles < 4 {
            return Err(SetupError::Invalid("maxNodes must be ≥ 16 and maxHandles ≥ 4"));
        }
        if !cfg.id_base.is_multiple_of(ID_SPAN) || cfg.id_base > u64::MAX - ID_SPAN {
            return Err(SetupError::Invalid(
                "id_base must be a multiple of 2^48 below 2^64 - 2^48",
            ));
        }
        let root_fd = open_path(&cfg.root).map_err(|e| SetupError::Root(cfg.root.clone(), e))?;
        let st = sys::stat_fd(root_fd.as_raw_fd())
            .map_err(|e| SetupError::Root(cfg.root.clone(), std::io::Error::from_raw_os_error(e.0)))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(SetupError::Root(
                cfg.root.clone(),
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        if kernel_fs(root_fd.as_raw_fd()) {
            return Err(SetupError::Invalid(
                "the directory is on procfs, sysfs or another of the kernel's own file systems",
            ));
        }
        let proc_fd = open_path(Path::new("/proc/self/fd")).map_err(SetupError::Proc)?;
        const PROC_SUPER_MAGIC: i64 = 0x9fa0;
        #[allow(clippy::unnecessary_cast)] // f_type is not i64 everywhere (musl)
        let is_proc = |s: &libc::statfs| s.f_type as i64 == PROC_SUPER_MAGIC;
        match sys::statfs(proc_fd.as_raw_fd()) {
            Ok(s) if is_proc(&s) => {}
            _ => return Err(SetupError::Proc(std::io::Error::other("not a procfs mount"))),
        }
        // One fd per node and per handle: what the limit allows bounds both (ENFILE / EMFILE past it),
        // with FD_RESERVE left for the rest of the process and what other shared directories reserved
        // taken off.
        let mut reserved = FDS_RESERVED.lock();
        let limit = sys::raise_nofile(*reserved + (cfg.max_nodes + cfg.max_handles) as u64 + FD_RESERVE);
        let others = open_fds().saturating_sub(FDS_IN_USE.load(Ordering::Relaxed) as u64);
        let available = limit.saturating_sub(FD_RESERVE + others + *reserved);
        if available < 1024 {
            return Err(SetupError::FdLimit {
                limit,
                needed: FD_RESERVE + others + *reserved + 1024,
            });
        }
        // At most three quarters of what is left, so the next shared directory of the process gets its
        // share too; an eighth of it at most for open files (the driver keeps nodes, not files, open).
        let share = (available / 4 * 3).max(1024);
        let max_handles = cfg.max_handles.min((share / 8) as usize);
        let max_nodes = cfg.max_nodes.min((share - max_handles as u64) as usize);
        *reserved += (max_nodes + max_handles) as u64;
        drop(reserved);
        if max_nodes < cfg.max_nodes || max_handles < cfg.max_handles {
            log::warn!(
                "virtio-fs {}: the open-file limit ({limit}) allows {max_nodes} nodes and {max_handles} open files, not {} and {}",
                cfg.root.display(),
                cfg.max_nodes,
                cfg.max_handles
            );
        }
        if let Ok(flags) = sys::mount_flags(root_fd.as_raw_fd()) {
            if flags & libc::ST_NOSUID == 0 || (cfg.allow_devices && flags & libc::ST_NODEV == 0) {
                log::warn!(
                    "virtio-fs {}: not mounted nosuid{}: the driver creates files as the uid it names (root included), so it can leave setuid{} files here for the host",
                    cfg.root.display(),
                    if cfg.allow_devices { ",nodev" } else { "" },
                    if cfg.allow_devices { " files and device nodes" } else { "" }
                );
            }
        }
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new(Node {
            fd: root_fd,
            kind: libc::S_IFDIR,
            key,
            _budget: None,
        });
        let root_id = cfg.id_base + abi::ROOT_ID;
        let fs = Self {
            cfg,
            root,
            proc_fd,
            // Ids only grow, across sessions too: a request that outlived its session never names
            // a node or handle of the next one.
            nodes: Mutex::new(Nodes {
                next: root_id + 1,
                ..Nodes::default()
            }),
            handles: Mutex::new(Handles {
                next: 1,
                ..Handles::default()
            }),
            node_count: AtomicUsize::new(0),
            handle_count: AtomicUsize::new(0),
            beneath: AtomicBool::new(true),
            // SAFETY: geteuid has no preconditions.
            switch_ids: unsafe { libc::geteuid() } == 0,
            max_nodes,
            max_handles,
            root_id,
            warned: AtomicBool::new(false),
        };
        fs.forget_all();
        Ok(fs)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The root's node id.
    pub fn root_id(&self) -> u64 {
        self.root_id
    }

    /// The node and handle limits in force (the configured ones, lowered to fit the open-file limit).
    pub fn limits(&self) -> (usize, usize) {
        (self.max_nodes, self.max_handles)
    }

    /// Nodes the driver knows now (the root not counted) and open handles.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.node_count.load(Ordering::Relaxed),
            self.handle_count.load(Ordering::Relaxed),
        )
    }

    /// What the driver may cache, and for how long.
    pub fn validity(&self) -> Validity {
        let t = match self.cfg.cache {
            CachePolicy::Never => (0, 0),
            CachePolicy::Auto => (1, 0),
            CachePolicy::Always => (86_400, 0),
        };
        Validity { entry: t, attr: t }
    }

    /// `FOPEN_*` flags for an opened file or directory.
    pub fn open_flags(&self, dir: bool) -> u32 {
        match (self.cfg.cache, dir) {
            (CachePolicy::Never, false) => abi::fopen::DIRECT_IO,
            (CachePolicy::Always, false) => abi::fopen::KEEP_CACHE,
            (CachePolicy::Always, true) => abi::fopen::CACHE_DIR,
            _ => 0,
        }
    }

    /// Forgets every node and closes every handle (a new or ended session). The fds close here, on the
    /// caller's thread (a queue worker, never the message loop).
    pub fn forget_all(&self) {
        let (old_nodes, old_handles) = {
            let mut n = self.nodes.lock();
            let mut h = self.handles.lock();
            let old = (std::mem::take(&mut n.by_id), std::mem::take(&mut h.map));
            n.by_key.clear();
            n.by_key.insert(self.root.key, self.root_id);
            self.node_count.store(0, Ordering::Relaxed);
            self.handle_count.store(0, Ordering::Relaxed);
            old
        };
        drop(old_handles);
        drop(old_nodes);
    }

    /// The node `id`, or ESTALE (an id the driver was never given, or forgot).
    pub fn node(&self, id: u64) -> SysResult<Arc<Node>> {
        if id == self.root_id {
            return Ok(self.root.clone());
        }
        self.nodes
            .lock()
            .by_id
            .get(&id)
            .map(|k| k.node.clone())
            .ok_or(Errno(libc::ESTALE))
    }

    fn dir(&self, id: u64) -> SysResult<Arc<Node>> {
        let n = self.node(id)?;
        if n.is_dir() {
            Ok(n)
        } else {
            Err(Errno(libc::ENOTDIR))
        }
    }

    fn writable(&self) -> SysResult<()> {
        if self.cfg.read_only {
            Err(Errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Counts a lookup of the inode `fd` refers to: a known inode keeps its id (hard links share one),
    /// a new one gets the next. The fd is dropped if the inode was known.
    fn remember(&self, fd: OwnedFd, st: libc::stat) -> SysResult<(u64, libc::stat)> {
        let key = (st.st_dev, st.st_ino);
        let mut n = self.nodes.lock();
        if let Some(&id) = n.by_key.get(&key) {
            if id != self.root_id {
                if let Some(k) = n.by_id.get_mut(&id) {
                    k.lookups += 1;
                }
            }
            drop(n);
            drop(fd);
            return Ok((id, st));
        }
        if n.by_id.len() >= self.max_nodes {
            self.at_limit("nodes", self.max_nodes);
            return Err(Errno(libc::ENFILE));
        }
        if n.next - self.root_id >= ID_SPAN - 1 {
            self.at_limit("node ids", (ID_SPAN - 1) as usize);
            return Err(Errno(libc::ENFILE));
        }
        let budget = FdTicket::take();
        let id = n.next;
        n.next += 1;
        n.by_key.insert(key, id);
        let node = Arc::new(Node {
            fd,
            kind: st.st_mode & libc::S_IFMT,
            key,
            _budget: Some(budget),
        });
        n.by_id.insert(id, Known { node, lookups: 1 });
        self.node_count.store(n.by_id.len(), Ordering::Relaxed);
        Ok((id, st))
    }

    /// Says once (per instance) that the driver reached a limit: its creations and lookups now fail.
    fn at_limit(&self, what: &str, limit: usize) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "virtio-fs {}: the driver holds {limit} {what}, the most allowed: further ones fail (ENFILE/EMFILE) until it forgets some; raise the open-file limit or maxNodes/maxHandles",
                self.cfg.root.display()
            );
        }
    }

    /// Drops `count` lookups of `id`; at zero the node (and its fd, once no call uses it) goes.
    pub fn forget(&self, id: u64, count: u64) {
        if id == self.root_id {
            return;
        }
        let gone = {
            let mut n = self.nodes.lock();
            let Some(k) = n.by_id.get_mut(&id) else { return };
            k.lookups = k.lookups.saturating_sub(count);
            if k.lookups > 0 {
                return;
            }
            let k = n.by_id.remove(&id);
            if let Some(k) = &k {
                if n.by_key.get(&k.node.key) == Some(&id) {
                    n.by_key.remove(&k.node.key);
                }
            }
            self.node_count.store(n.by_id.len(), Ordering::Relaxed);
            k
        };
        drop(gone);
    }

    /// `name` under `parent` as an O_PATH fd and its attributes. A file system mounted there is entered
    /// only with `cross_mounts`, and never one of the kernel's own (procfs, sysfs, …): EACCES.
    fn child(&self, parent: &Node, name: &[u8]) -> SysResult<(OwnedFd, libc::stat)> {
        let stay = !self.cfg.cross_mounts;
        let fd = match sys::open_beneath_x(
            parent.fd(),
            name,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            &self.beneath,
            stay,
        ) {
            // RESOLVE_NO_XDEV: a mount point, bind mounts of the same file system included.
            Err(Errno(libc::EXDEV)) => return Err(Errno(libc::EACCES)),
            r => r?,
        };
        let st = sys::stat_fd(fd.as_raw_fd())?;
        if st.st_dev != parent.key.0 {
            // Another file system (or, without openat2, possibly a mount): never one of the kernel's;
            // without openat2 a change of device is all there is to tell a mount by.
            let fallback = !self.beneath.load(Ordering::Relaxed);
            if kernel_fs(fd.as_raw_fd()) || (stay && fallback) {
                return Err(Errno(libc::EACCES));
            }
        }
        Ok((fd, st))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> SysResult<(u64, libc::stat)> {
        let p = self.dir(parent)?;
        let (fd, st) = self.child(&p, name)?;
        self.remember(fd, st)
    }

    /// A lookup in a directory node the caller holds (READDIRPLUS, from its open handle).
    pub fn lookup_in(&self, parent: &Node, name: &[u8]) -> SysResult<(u64, libc::stat)> {
        if !abi::valid_name(name) {
            return Err(Errno(libc::EINVAL));
        }
        let (fd, st) = self.child(parent, name)?;
        self.remember(fd, st)
    }

    pub fn getattr(&self, id: u64) -> SysResult<libc::stat> {
        sys::stat_fd(self.node(id)?.fd())
    }

    /// Applies a SETATTR; `fh` is an open handle of the node if the driver named one.
    pub fn setattr(&self, id: u64, a: &SetAttr) -> SysResult<libc::stat> {
        self.writable()?;
        let n = self.node(id)?;
        let handle =
            a.fh.and_then(|fh| self.handle(fh).ok())
                .filter(|h| Arc::ptr_eq(&h.node, &n));
        if let Some(mode) = a.mode {
            if n.kind == libc::S_IFLNK {
                return Err(Errno(libc::EOPNOTSUPP));
            }
            sys::chmod_fd(self.proc_fd.as_raw_fd(), n.fd(), mode & 0o7777)?;
        }
        if a.uid.is_some() || a.gid.is_some() {
            sys::chown_fd(n.fd(), a.uid.unwrap_or(u32::MAX), a.gid.unwrap_or(u32::MAX))?;
        }
        if let Some(size) = a.size {
            if !n.is_reg() {
                return Err(if n.is_dir() {
                    Errno(libc::EISDIR)
                } else {
                    Errno(libc::EINVAL)
                });
            }
            match handle.as_ref().filter(|h| h.writable) {
                Some(h) => {
                    if a.kill_suidgid && a.mode.is_none() {
                        self.kill_suidgid(h.fd())?;
                    }
                    sys::truncate(h.fd(), size)?;
                }
                None => {
                    let f = self.reopen(&n, libc::O_WRONLY)?;
                    if a.kill_suidgid && a.mode.is_none() {
                        self.kill_suidgid(f.as_raw_fd())?;
                    }
                    sys::truncate(f.as_raw_fd(), size)?;
                }
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let omit = libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            };
            let times = [a.atime.unwrap_or(omit), a.mtime.unwrap_or(omit)];
            sys::utimes_fd(self.proc_fd.as_raw_fd(), n.fd(), &times)?;
        }
        sys::stat_fd(n.fd())
    }

    pub fn readlink(&self, id: u64, buf: &mut [u8]) -> SysResult<usize> {
        let n = self.node(id)?;
        if n.kind != libc::S_IFLNK {
            return Err(Errno(libc::EINVAL));
        }
        sys::readlink(n.fd(), buf)
    }

    /// Runs a creation as the caller (`uid`, `gid`) so the host gives the new inode the owner and group
    /// the driver expects (setgid directories included).
    fn as_caller<T>(&self, uid: u32, gid: u32, f: impl FnOnce() -> SysResult<T>) -> SysResult<T> {
        // Root's own creations need no switch (the thread's ids are root's): six system calls saved.
        if !self.switch_ids || (uid == 0 && gid == 0) {
            return f();
        }
        // An id the kernel will not take (unmapped in our user namespace, or -1) fails the creation
        // rather than letting it run as root; the guard switches back on every path out.
        let _as = sys::FsIds::switch(uid, gid)?;
        f()
    }

    /// After a creation under `parent`: the new node, looked up by name.
    fn created(&self, parent: &Node, name: &[u8]) -> SysResult<(u64, libc::stat)> {
        let (fd, st) = self.child(parent, name)?;
        self.remember(fd, st)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, who: Caller) -> SysResult<(u64, libc::stat)> {
        self.writable()?;
        let p = self.dir(parent)?;
        self.as_caller(who.uid, who.gid, || sys::mkdir_at(p.fd(), name, mode & 0o7777))?;
        self.created(&p, name)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        who: Caller,
    ) -> SysResult<(u64, libc::stat)> {
        self.writable()?;
        let p = self.dir(parent)?;
        let kind = mode & libc::S_IFMT;
        match kind {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            libc::S_IFCHR | libc::S_IFBLK if self.cfg.allow_devices => {}
            libc::S_IFCHR | libc::S_IFBLK => return Err(Errno(libc::EPERM)),
            _ => return Err(Errno(libc::EINVAL)),
        }
        let dev = if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            abi::decode_dev(rdev)
        } else {
            0
        };
        self.as_caller(who.uid, who.gid, || sys::mknod_at(p.fd(), name, mode, dev))?;
        self.created(&p, name)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        who: Caller,
    ) -> SysResult<(u64, libc::stat)> {
        self.writable()?;
        let p = self.dir(parent)?;
        self.as_caller(who.uid, who.gid, || sys::symlink_at(target, p.fd(), name))?;
        self.created(&p, name)
    }

    pub fn link(&self, id: u64, new_parent: u64, name: &[u8]) -> SysResult<(u64, libc::stat)> {
        self.writable()?;
        let n = self.node(id)?;
        if n.is_dir() {
            return Err(Errno(libc::EPERM));
        }
        let p = self.dir(new_parent)?;
        sys::link_fd(n.fd(), self.proc_fd.as_raw_fd(), p.fd(), name)?;
        self.created(&p, name)
    }

    pub fn unlink(&self, parent: u64, name: &[u8], dir: bool) -> SysResult<()> {
        self.writable()?;
        let p = self.dir(parent)?;
        sys::unlink_at(p.fd(), name, if dir { libc::AT_REMOVEDIR } else { 0 })
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> SysResult<()> {
        self.writable()?;
        // RENAME_NOREPLACE | RENAME_EXCHANGE; RENAME_WHITEOUT (an overlay's) is refused.
        if flags & !3 != 0 {
            return Err(Errno(libc::EINVAL));
        }
        let a = self.dir(parent)?;
        let b = self.dir(new_parent)?;
        sys::rename_at(a.fd(), name, b.fd(), new_name, flags)
    }

    /// The open flags the host file is opened with: the access mode and the flags that mean something
    /// for an already created file; never O_CREAT, O_NOFOLLOW, O_DIRECT or O_NONBLOCK.
    fn host_open_flags(&self, flags: u32) -> SysResult<i32> {
        let flags = flags as i32;
        let mut acc = flags & libc::O_ACCMODE;
        if acc == libc::O_ACCMODE {
            return Err(Errno(libc::EINVAL));
        }
        let mut keep =
            flags & (libc::O_APPEND | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME);
        if self.cfg.read_only && (acc != libc::O_RDONLY || keep & libc::O_TRUNC != 0) {
            return Err(Errno(libc::EROFS));
        }
        if self.cfg.writeback {
            // The driver's cache writes whole pages, reading around them, and orders appends itself.
            if acc == libc::O_WRONLY {
                acc = libc::O_RDWR;
            }
            keep &= !libc::O_APPEND;
        }
        Ok(acc | keep)
    }

    /// A real fd of a regular file or directory node (through `/proc/self/fd`, which reopens exactly
    /// that inode); other kinds are never opened on the host (a FIFO would block a worker).
    fn reopen(&self, n: &Node, flags: i32) -> SysResult<OwnedFd> {
        if n.is_dir() {
            return sys::open_at(n.fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY);
        }
        if !n.is_reg() {
            return Err(Errno(libc::EACCES));
        }
        let name = FdName::new(n.fd());
        sys::open_at(self.proc_fd.as_raw_fd(), name.as_cstr(), flags & !libc::O_CREAT)
    }

    fn add_handle(&self, fd: OwnedFd, node: Arc<Node>, writable: bool, dir: bool) -> SysResult<u64> {
        let mut h = self.handles.lock();
        if h.map.len() >= self.max_handles {
            self.at_limit("open files", self.max_handles);
            return Err(Errno(libc::EMFILE));
        }
        let budget = FdTicket::take();
        let fh = h.next;
        h.next += 1;
        h.map.insert(
            fh,
            Arc::new(Handle {
                fd,
                node,
                writable,
                dir: dir.then(|| Mutex::new(())),
                zero_copy: std::sync::OnceLock::new(),
                sync_writes: std::sync::OnceLock::new(),
                _budget: budget,
            }),
        );
        self.handle_count.store(h.map.len(), Ordering::Relaxed);
        Ok(fh)
    }

    /// What the host kernel does when a caller without CAP_FSETID writes or truncates a file (we are
    /// root, so it does not do it for us): setuid goes, setgid too if group-executable, and
    /// `security.capability`. Done when the driver asks (HANDLE_KILLPRIV_V2).
    pub fn kill_suidgid(&self, fd: RawFd) -> SysResult<()> {
        let st = sys::stat_fd(fd)?;
        let mut mode = st.st_mode & 0o7777;
        if mode & libc::S_ISUID != 0 {
            mode &= !libc::S_ISUID;
        }
        if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode != st.st_mode & 0o7777 {
            sys::fchmod(fd, mode)?;
        }
        match sys::fremovexattr(fd, b"security.capability") {
            Err(Errno(libc::ENODATA | libc::EOPNOTSUPP)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The O_TRUNC of an open (`flags`), done after opening without it: privileges go before the
    /// data does (as in the kernel), never a moment of new content under a setuid bit.
    fn truncate_opened(&self, fd: &OwnedFd, flags: i32, kill_suidgid: bool) -> SysResult<()> {
        if flags & libc::O_TRUNC == 0 {
            return Ok(());
        }
        if kill_suidgid {
            self.kill_suidgid(fd.as_raw_fd())?;
        }
        sys::truncate(fd.as_raw_fd(), 0)
    }

    pub fn open(&self, id: u64, flags: u32, dir: bool, kill_suidgid: bool) -> SysResult<u64> {
        let n = self.node(id)?;
        if dir {
            if !n.is_dir() {
                return Err(Errno(libc::ENOTDIR));
            }
            let fd = self.reopen(&n, libc::O_RDONLY)?;
            return self.add_handle(fd, n, false, true);
        }
        if n.is_dir() {
            return Err(Errno(libc::EISDIR));
        }
        let f = self.host_open_flags(flags)?;
        let fd = self.reopen(&n, f & !libc::O_TRUNC)?;
        self.truncate_opened(&fd, f, kill_suidgid)?;
        self.add_handle(fd, n, f & libc::O_ACCMODE != libc::O_RDONLY, false)
    }

    /// Creates and opens `name` in `parent`: never through a symlink of that name (O_NOFOLLOW), never
    /// outside. Returns the node, its attributes and the handle.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        flags: u32,
        mode: u32,
        who: Caller,
        kill_suidgid: bool,
    ) -> SysResult<(u64, libc::stat, u64)> {
        self.writable()?;
        let p = self.dir(parent)?;
        let f = self.host_open_flags(flags)?;
        // Always exclusive on the host: a name that exists is opened as the node it is — a regular file
        // only — never by O_CREAT on whatever it is (a FIFO would block a worker, a device node would
        // hand the driver the host's device).
        let created = self.as_caller(who.uid, who.gid, || {
            sys::open_beneath(
                p.fd(),
                name,
                f | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                mode & 0o7777,
                &self.beneath,
            )
        });
        let (fd, path) = match created {
            Ok(fd) => {
                // The node is the inode just created, not whatever the name means by now.
                let path = sys::open_at(
                    self.proc_fd.as_raw_fd(),
                    FdName::new(fd.as_raw_fd()).as_cstr(),
                    libc::O_PATH,
                )?;
                (fd, path)
            }
            Err(Errno(libc::EEXIST)) if flags as i32 & libc::O_EXCL == 0 => {
                let (path, st) = self.child(&p, name)?;
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => {}
                    libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
                    libc::S_IFLNK => return Err(Errno(libc::ELOOP)),
                    _ => return Err(Errno(libc::EACCES)),
                }
                // As the caller: the driver's kernel checks no permission on an open that went to
                // CREATE (it takes it as a creation), so the host's check is the only one.
                let fd = self.as_caller(who.uid, who.gid, || {
                    sys::open_at(
                        self.proc_fd.as_raw_fd(),
                        FdName::new(path.as_raw_fd()).as_cstr(),
                        f & !libc::O_TRUNC,
                    )
                })?;
                self.truncate_opened(&fd, f, kill_suidgid)?;
                (fd, path)
            }
            Err(e) => return Err(e),
        };
        // What the driver caches is the file as it is now (truncated, setuid cleared).
        let st = sys::stat_fd(path.as_raw_fd())?;
        let (id, st) = self.remember(path, st)?;
        let node = self.node(id)?;
        match self.add_handle(fd, node, f & libc::O_ACCMODE != libc::O_RDONLY, false) {
            Ok(fh) => Ok((id, st, fh)),
            Err(e) => {
                self.forget(id, 1);
                Err(e)
            }
        }
    }

    pub fn handle(&self, fh: u64) -> SysResult<Arc<Handle>> {
        self.handles
            .lock()
            .map
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    /// A handle of a regular file open for writing.
    pub fn write_handle(&self, fh: u64) -> SysResult<Arc<Handle>> {
        self.writable()?;
        let h = self.handle(fh)?;
        if h.dir.is_some() || !h.writable {
            return Err(Errno(libc::EBADF));
        }
        Ok(h)
    }

    pub fn release(&self, fh: u64) {
        let h = {
            let mut hs = self.handles.lock();
            let h = hs.map.remove(&fh);
            self.handle_count.store(hs.map.len(), Ordering::Relaxed);
            h
        };
        drop(h);
    }

    /// FLUSH (a close of one of the driver's file descriptors): `close(dup(fd))`, so a file system that
    /// reports errors at close (NFS, FUSE) reports them to the driver's close.
    pub fn flush(&self, fh: u64) -> SysResult<()> {
        let h = self.handle(fh)?;
        sys::close_dup(h.fd())
    }

    pub fn statfs(&self) -> SysResult<libc::statfs> {
        sys::statfs(self.root.fd())
    }

    pub fn fsync(&self, fh: u64, data_only: bool) -> SysResult<()> {
        let h = self.handle(fh)?;
        sys::fsync(h.fd(), data_only)
    }

    pub fn syncfs(&self) -> SysResult<()> {
        let f = self.reopen(&self.root, libc::O_RDONLY)?;
        sys::syncfs(f.as_raw_fd())
    }

    /// FALLOCATE and COPY_FILE_RANGE change data with no kill flag of their own (the driver's
    /// `file_modified` leaves it to us under HANDLE_KILLPRIV_V2): a caller other than root loses
    /// setuid bits first, as a write would.
    pub fn fallocate(&self, fh: u64, mode: u32, offset: u64, len: u64, who: Caller) -> SysResult<()> {
        let h = self.write_handle(fh)?;
        if who.uid != 0 {
            self.kill_suidgid(h.fd())?;
        }
        sys::fallocate(h.fd(), mode, offset, len)
    }

    pub fn lseek(&self, fh: u64, offset: u64, whence: u32) -> SysResult<u64> {
        if whence != libc::SEEK_DATA as u32 && whence != libc::SEEK_HOLE as u32 {
            return Err(Errno(libc::EINVAL));
        }
        let h = self.handle(fh)?;
        if h.dir.is_some() {
            return Err(Errno(libc::EINVAL));
        }
        sys::lseek(h.fd(), offset, whence)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        who: Caller,
    ) -> SysResult<usize> {
        let a = self.handle(fh_in)?;
        let b = self.write_handle(fh_out)?;
        if a.dir.is_some() {
            return Err(Errno(libc::EISDIR));
        }
        if who.uid != 0 {
            self.kill_suidgid(b.fd())?;
        }
        // At most what a FUSE write may report (u32), in one call.
        let len = len.min(1 << 30) as usize;
        sys::copy_file_range(a.fd(), off_in, b.fd(), off_out, len)
    }

    /// Lists directory entries of the open directory `fh` from the position `offset` (a cookie the host
    /// gave with an earlier entry): each is given to `emit(name, ino, type, next_offset)`, which says
    /// whether it still fit. The host position is set and read under the handle's lock.
    pub fn read_dir(
        &self,
        fh: u64,
        offset: u64,
        buf: &mut Vec<u8>,
        mut emit: impl FnMut(&[u8], u64, u8, u64) -> bool,
    ) -> SysResult<()> {
        let h = self.handle(fh)?;
        let Some(lock) = &h.dir else {
            return Err(Errno(libc::ENOTDIR));
        };
        let _one = lock.lock();
        sys::lseek(h.fd(), offset, libc::SEEK_SET as u32)?;
        buf.resize(32 * 1024, 0);
        loop {
            let n = sys::getdents(h.fd(), buf)?;
            if n == 0 {
                return Ok(());
            }
            let mut at = 0;
            while at + 19 <= n {
                let ino = u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap_or_default());
                let off = u64::from_ne_bytes(buf[at + 8..at + 16].try_into().unwrap_or_default());
                let reclen = usize::from(u16::from_ne_bytes([buf[at + 16], buf[at + 17]]));
                let kind = buf[at + 18];
                if reclen < 20 || at + reclen > n {
                    return Err(Errno(libc::EIO));
                }
                let raw = &buf[at + 19..at + reclen];
                let name = &raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())];
                if !emit(name, ino, kind, off) {
                    return Ok(());
                }
                at += reclen;
            }
        }
    }

    /// Whether the xattr `name` is visible to the driver under the policy.
    fn xattr_allowed(&self, name: &[u8]) -> bool {
        match self.cfg.xattr {
            XattrPolicy::Off => false,
            XattrPolicy::User => name.starts_with(b"user."),
            XattrPolicy::All => true,
        }
    }

    pub fn xattrs_on(&self) -> bool {
        self.cfg.xattr != XattrPolicy::Off
    }

    /// An fd to read or change a node's xattrs with: only regular files and directories (no user.*
    /// xattrs elsewhere; other kinds are never opened on the host).
    fn xattr_fd(&self, id: u64) -> SysResult<Option<OwnedFd>> {
        let n = self.node(id)?;
        if !n.is_dir() && !n.is_reg() {
            return Ok(None);
        }
        self.reopen(&n, libc::O_RDONLY | libc::O_NONBLOCK).map(Some)
    }

    pub fn getxattr(&self, id: u64, name: &[u8], buf: &mut [u8]) -> SysResult<usize> {
        if !self.xattr_allowed(name) {
            return Err(Errno(libc::ENODATA));
        }
        match self.xattr_fd(id)? {
            Some(f) => sys::fgetxattr(f.as_raw_fd(), name, buf),
            None => Err(Errno(libc::ENODATA)),
        }
    }

    /// The names the policy lets through, NUL-separated, into `out`.
    pub fn listxattr(&self, id: u64, out: &mut Vec<u8>) -> SysResult<()> {
        out.clear();
        let Some(f) = self.xattr_fd(id)? else {
            return Ok(());
        };
        let mut raw = vec![0u8; sys::flistxattr(f.as_raw_fd(), &mut [])?];
        let n = sys::flistxattr(f.as_raw_fd(), &mut raw)?;
        for name in raw[..n.min(raw.len())]
            .split(|&c| c == 0)
            .filter(|s| !s.is_empty())
        {
            if self.xattr_allowed(name) {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        Ok(())
    }

    pub fn setxattr(&self, id: u64, name: &[u8], value: &[u8], flags: u32) -> SysResult<()> {
        self.writable()?;
        if !self.xattr_allowed(name) {
            return Err(Errno(libc::EPERM));
        }
        match self.xattr_fd(id)? {
            Some(f) => sys::fsetxattr(f.as_raw_fd(), name, value, flags as i32),
            None => Err(Errno(libc::EPERM)),
        }
    }

    pub fn removexattr(&self, id: u64, name: &[u8]) -> SysResult<()> {
        self.writable()?;
        if !self.xattr_allowed(name) {
            return Err(Errno(libc::EPERM));
        }
        match self.xattr_fd(id)? {
            Some(f) => sys::fremovexattr(f.as_raw_fd(), name),
            None => Err(Errno(libc::EPERM)),
        }
    }
}

impl Drop for PassthroughFs {
    fn drop(&mut self) {
        *FDS_RESERVED.lock() -= (self.max_nodes + self.max_handles) as u64;
    }
}

/// Who a request comes from (`fuse_in_header`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A SETATTR, decoded: each field present when its `valid` bit was set.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    /// Clear setuid/setgid and capabilities (a truncate by a caller without CAP_FSETID).
    pub kill_suidgid: bool,
    pub fh: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<libc::timespec>,
    pub mtime: Option<libc::timespec>,
}

fn open_path(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path; the fd returned is new.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Descriptors this process has open now.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// Whether `fd` is on one of the kernel's own file systems, which a share must never enter: procfs
/// (`/proc/PID/mem`, `/proc/sys`), sysfs, devpts, debugfs, tracefs, securityfs, cgroup, bpf, configfs,
/// efivarfs. Unknown: treated as such.
fn kernel_fs(fd: RawFd) -> bool {
    const KERNEL: [i64; 13] = [
        0x9fa0,      // proc
        0x6265_6572, // sysfs
        0x1cd1,      // devpts
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x6367_7270, // cgroup2
        0x0027_e0eb, // cgroup
        0xcafe_4a11, // bpf
        0x6265_6570, // configfs
        0xde5e_81e4, // efivarfs
        0x1980_0202, // mqueue
        0x9584_58f6, // hugetlbfs
    ];
    #[allow(clippy::unnecessary_cast)] // f_type is not i64 everywhere (musl)
    sys::statfs(fd).map_or(true, |s| KERNEL.contains(&(s.f_type as i64)))
}
