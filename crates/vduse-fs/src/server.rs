//! The FUSE server: parses one request (checked against what the driver really gave), runs it on the
//! [`PassthroughFs`], and writes the reply. It sees a request only through [`ReqIo`], so the same code
//! serves virtqueues (ticket-checked copies that end at a fence) and plain buffers in tests.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use vduse_core::queue::Gone;

use crate::abi::{self, fattr, init, op, InHeader, Malformed, Reader, Writer, IN_HEADER, OUT_HEADER};
use crate::passthrough::{CachePolicy, Caller, PassthroughFs, SetAttr};
use crate::sys::{self, Errno};

/// One request's buffers, as the server reaches them.
pub trait ReqIo {
    /// Bytes the driver gave to read (header, arguments, a write's data).
    fn readable(&self) -> usize;
    /// Room for the reply.
    fn writable(&self) -> usize;
    /// Copies readable bytes from `offset` into `dst`; fewer if the request has fewer.
    fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<usize, Gone>;
    /// Copies `src` into the reply from `offset`; fewer if there is less room.
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<usize, Gone>;
    /// Reads up to `len` bytes of the file `fd` from `pos` straight into the reply at `offset`: called
    /// only for regular files on page-cache file systems, whose reads copy page by page (so the call
    /// is short, and a revoked mapping stops it). `Ok(None)`: not possible for these buffers (the
    /// server copies through its own).
    fn read_file(
        &mut self,
        _fd: RawFd,
        _pos: u64,
        _offset: usize,
        _len: usize,
    ) -> Result<Option<usize>, Gone> {
        Ok(None)
    }
    /// Whether the request is still in flight (not fenced since it was popped).
    fn live(&self) -> bool {
        true
    }
    /// Writes up to `len` readable bytes from `offset` straight to the file `fd` at `pos`: called only
    /// for regular files on page-cache file systems opened without O_DIRECT, O_SYNC or O_DSYNC, whose
    /// writes copy into the page cache before they return (so the call ends before the driver's memory may be reused, and a
    /// revoked mapping stops it). `Ok(None)`: not possible, or failed (the server stages the write and
    /// reports its own error).
    fn write_file(
        &mut self,
        _fd: RawFd,
        _pos: u64,
        _offset: usize,
        _len: usize,
    ) -> Result<Option<usize>, Gone> {
        Ok(None)
    }
}

/// Answers `errno` to the request `unique`: the bytes written (0 if the driver left no room for it).
pub fn reply_errno(io: &mut dyn ReqIo, unique: u64, errno: i32) -> Result<u32, Gone> {
    if io.writable() < OUT_HEADER {
        // No room for an answer: the buffers go back empty.
        return Ok(0);
    }
    let mut b = [0u8; OUT_HEADER];
    b[..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    b[4..8].copy_from_slice(&(-errno).to_le_bytes());
    b[8..].copy_from_slice(&unique.to_le_bytes());
    if io.write(0, &b)? < OUT_HEADER {
        return Ok(0);
    }
    Ok(OUT_HEADER as u32)
}

/// What the server did, for `stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
    pub unsupported: AtomicU64,
    pub sessions: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// FSYNC, FSYNCDIR and SYNCFS done on the host.
    pub syncs: AtomicU64,
}

/// Buffers one worker thread reuses for every request (no allocation per request once warm).
#[derive(Default)]
pub struct Scratch {
    pub(crate) args: Vec<u8>,
    out: Writer,
    data: Vec<u8>,
    list: Vec<u8>,
    dents: Vec<u8>,
    /// Reply bytes already written into the request after the header (a READ's data).
    extra: usize,
}

/// A request's reply: a payload in `Scratch::out` after the header, or an errno.
enum Fail {
    Errno(Errno),
    Malformed,
    Gone,
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail::Errno(e)
    }
}
impl From<Malformed> for Fail {
    fn from(_: Malformed) -> Self {
        Fail::Malformed
    }
}
impl From<Gone> for Fail {
    fn from(_: Gone) -> Self {
        Fail::Gone
    }
}

type Outcome = Result<(), Fail>;

/// Staging chunk for data that cannot move straight between the file and the driver's buffers.
const STAGE: usize = 256 * 1024;

pub struct Server {
    fs: PassthroughFs,
    max_write: u32,
    counters: Counters,
    /// Bumped by each new driver session (a reset): the first request after it forgets the old one.
    generation: AtomicU64,
    seen: AtomicU64,
    session: Mutex<()>,
    /// INIT answered, no DESTROY or reset since.
    up: AtomicBool,
}

impl Server {
    /// `max_write`: the largest read or write the driver may send (a multiple of 4096, up to 1 MiB).
    pub fn new(fs: PassthroughFs, max_write: u32) -> Self {
        Self {
            fs,
            max_write: max_write.clamp(4096, 1 << 20) & !4095,
            counters: Counters::default(),
            generation: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            session: Mutex::new(()),
            up: AtomicBool::new(false),
        }
    }

    pub fn fs(&self) -> &PassthroughFs {
        &self.fs
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn max_write(&self) -> u32 {
        self.max_write
    }

    /// A new driver session began (DRIVER_OK after a reset): what the old one knew is forgotten by the
    /// next request, on a worker thread. Cheap: safe on the message loop.
    pub fn new_driver_session(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.up.store(false, Ordering::Release);
    }

    /// A session begins that another server negotiated (this one serves a subtree of its tree, see
    /// `router`): what the driver knew is forgotten, and requests are served from now on. On a worker
    /// thread (the fds close here).
    pub fn begin_session(&self) {
        let _s = self.session.lock();
        self.seen
            .store(self.generation.load(Ordering::Acquire), Ordering::Release);
        self.fs.forget_all();
        self.up.store(true, Ordering::Release);
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// The session ended (DESTROY forwarded to the server that negotiated it): every node is forgotten
    /// and requests fail with EIO until the next one. On a worker thread.
    pub fn end_session(&self) {
        let _s = self.session.lock();
        self.up.store(false, Ordering::Release);
        self.fs.forget_all();
    }

    /// Answers a LOOKUP another server was asked (of the name this subtree is mounted at) with this
    /// tree's root, marked as a submount; the name stays valid for `entry_valid` (the other tree's
    /// choice: it owns the name). Returns the bytes written, as `handle`. Cheap (one `fstat`): it runs
    /// on the other server's thread.
    pub fn answer_mount(
        &self,
        io: &mut dyn ReqIo,
        head: &[u8],
        entry_valid: (u64, u32),
    ) -> Result<u32, Gone> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let Some(h) = InHeader::parse(head).filter(|h| h.opcode == op::LOOKUP) else {
            let unique = InHeader::parse(head).map_or(0, |h| h.unique);
            return self.reply_error(io, unique, libc::EINVAL);
        };
        // A reset since the session began (the workers forget the old one at their next request) or no
        // session: not up.
        if !self.up.load(Ordering::Acquire)
            || self.seen.load(Ordering::Acquire) != self.generation.load(Ordering::Acquire)
        {
            return self.reply_error(io, h.unique, libc::EIO);
        }
        if io.writable() < OUT_HEADER + abi::ENTRY_OUT {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return self.reply_error(io, h.unique, libc::EINVAL);
        }
        let root = self.fs.root_id();
        let st = match self.fs.getattr(root) {
            Ok(st) => st,
            Err(e) => return self.reply_error(io, h.unique, e.0),
        };
        let mut valid = self.fs.validity();
        valid.entry = entry_valid;
        let mut out = Writer::default();
        out.u32((OUT_HEADER + abi::ENTRY_OUT) as u32)
            .u32(0)
            .u64(h.unique)
            .entry(root, &st, valid);
        let n = out.buf.len();
        out.buf[n - 4..].copy_from_slice(&abi::ATTR_SUBMOUNT.to_le_bytes());
        if io.write(0, &out.buf)? < n {
            return Ok(0);
        }
        Ok(n as u32)
    }

    fn sync_session(&self) {
        let g = self.generation.load(Ordering::Acquire);
        if self.seen.load(Ordering::Acquire) == g {
            return;
        }
        let _s = self.session.lock();
        if self.seen.load(Ordering::Acquire) != g {
            self.up.store(false, Ordering::Release);
            self.fs.forget_all();
            self.seen.store(g, Ordering::Release);
        }
    }

    /// Serves one request whose first readable bytes are `head`. Returns the bytes written into its
    /// buffers (what to complete it with), or `Gone` if it was fenced meanwhile (answer nothing).
    pub fn handle(&self, io: &mut dyn ReqIo, head: &[u8], s: &mut Scratch) -> Result<u32, Gone> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.sync_session();
        let Some(h) =
            InHeader::parse(head).filter(|h| h.len as usize == io.readable() && h.total_extlen == 0)
        else {
            // The driver's stated length must be what it gave; extensions were never granted.
            let unique = InHeader::parse(head).map_or(0, |h| h.unique);
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return self.reply_error(io, unique, libc::EINVAL);
        };
        s.out.buf.clear();
        s.out.zeros(OUT_HEADER);
        s.extra = 0;
        let r = self.dispatch(io, &h, s);
        match r {
            Ok(()) if h.opcode == op::FORGET || h.opcode == op::BATCH_FORGET || h.opcode == op::INTERRUPT => {
                Ok(0)
            }
            Ok(()) => {
                let len = s.out.buf.len() + s.extra;
                if len > io.writable() {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    return self.reply_error(io, h.unique, libc::EINVAL);
                }
                s.out.buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
                s.out.buf[4..8].copy_from_slice(&0i32.to_le_bytes());
                s.out.buf[8..16].copy_from_slice(&h.unique.to_le_bytes());
                if io.write(0, &s.out.buf)? < s.out.buf.len() {
                    // The reply did not fit where the driver said it would: no answer is a true one.
                    return Ok(0);
                }
                Ok(len as u32)
            }
            Err(Fail::Gone) => Err(Gone),
            Err(Fail::Malformed) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.reply_error(io, h.unique, libc::EINVAL)
            }
            Err(Fail::Errno(e)) => {
                if e.0 == libc::ENOSYS {
                    self.counters.unsupported.fetch_add(1, Ordering::Relaxed);
                }
                // Inside another tree (see `router`) a host call's ENOSYS (a seccomp filter, an old
                // kernel) must not turn the operation off for every tree of the connection.
                let shared = self.fs.config().id_base != 0;
                let errno = match h.opcode {
                    op::COPY_FILE_RANGE | op::FALLOCATE if shared && e.0 == libc::ENOSYS => libc::EOPNOTSUPP,
                    _ => e.0,
                };
                self.reply_error(io, h.unique, errno)
            }
        }
    }

    /// Answers `errno` (counted as an error); the bytes written, as `handle`.
    pub fn reply_error(&self, io: &mut dyn ReqIo, unique: u64, errno: i32) -> Result<u32, Gone> {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        reply_errno(io, unique, errno)
    }

    /// Reads the request's arguments (after the header) into `s.args`.
    fn args<'s>(&self, io: &mut dyn ReqIo, args: &'s mut Vec<u8>) -> Result<&'s [u8], Fail> {
        let n = io.readable() - IN_HEADER;
        if n > abi::ARGS_MAX {
            return Err(Fail::Malformed);
        }
        args.resize(n, 0);
        if io.read(IN_HEADER, args)? != n {
            // Live, but not all of it could be read (memory the device may not read): an error.
            return Err(Errno(libc::EIO).into());
        }
        Ok(args)
    }

    /// The reply must fit in what the driver gave: checked before anything is done on the host.
    fn room(&self, io: &dyn ReqIo, payload: usize) -> Outcome {
        if io.writable() < OUT_HEADER + payload {
            return Err(Fail::Malformed);
        }
        Ok(())
    }

    fn dispatch(&self, io: &mut dyn ReqIo, h: &InHeader, s: &mut Scratch) -> Outcome {
        match h.opcode {
            op::FORGET => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                self.fs.forget(h.nodeid, r.u64()?);
                return Ok(());
            }
            op::BATCH_FORGET => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let count = r.u32()?;
                r.skip(4)?;
                for _ in 0..count {
                    let (id, n) = (r.u64()?, r.u64()?);
                    self.fs.forget(id, n);
                }
                return Ok(());
            }
            // Operations are synchronous: there is nothing to interrupt.
            op::INTERRUPT => return Ok(()),
            op::INIT => return self.init(io, s),
            _ => {}
        }
        if !self.up.load(Ordering::Acquire) {
            return Err(Errno(libc::EIO).into());
        }
        let who = Caller {
            uid: h.uid,
            gid: h.gid,
        };
        let valid = self.fs.validity();
        let fs = &self.fs;
        match h.opcode {
            op::DESTROY => {
                let _s = self.session.lock();
                self.up.store(false, Ordering::Release);
                self.fs.forget_all();
                Ok(())
            }
            op::WRITE => self.write(io, s),
            op::READ => self.read(io, s),
            op::READDIR | op::READDIRPLUS => self.readdir(io, s, h.opcode == op::READDIRPLUS),
            op::LOOKUP => {
                self.room(io, abi::ENTRY_OUT)?;
                let name = entry_name(&mut Reader::new(self.args(io, &mut s.args)?))?;
                let (id, st) = fs.lookup(h.nodeid, name)?;
                s.out.entry(id, &st, valid);
                Ok(())
            }
            op::GETATTR => {
                self.room(io, abi::ATTR_OUT)?;
                let st = fs.getattr(h.nodeid)?;
                self.attr_out(s, &st);
                Ok(())
            }
            op::SETATTR => {
                self.room(io, abi::ATTR_OUT)?;
                let a = decode_setattr(self.args(io, &mut s.args)?)?;
                let st = fs.setattr(h.nodeid, &a)?;
                self.attr_out(s, &st);
                Ok(())
            }
            op::READLINK => {
                let room = io.writable().saturating_sub(OUT_HEADER).min(abi::PATH_MAX);
                s.data.resize(abi::PATH_MAX, 0);
                let n = fs.readlink(h.nodeid, &mut s.data)?;
                if n > room {
                    return Err(Errno(libc::ENAMETOOLONG).into());
                }
                s.out.bytes(&s.data[..n]);
                Ok(())
            }
            op::SYMLINK => {
                self.room(io, abi::ENTRY_OUT)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let name = entry_name(&mut r)?;
                let target = r.cstr()?;
                if target.is_empty() || target.len() > abi::PATH_MAX {
                    return Err(Fail::Malformed);
                }
                let (id, st) = fs.symlink(h.nodeid, name, target, who)?;
                s.out.entry(id, &st, valid);
                Ok(())
            }
            op::MKNOD => {
                self.room(io, abi::ENTRY_OUT)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (mode, rdev) = (r.u32()?, r.u32()?);
                r.skip(8)?;
                let name = entry_name(&mut r)?;
                let (id, st) = fs.mknod(h.nodeid, name, mode, rdev, who)?;
                s.out.entry(id, &st, valid);
                Ok(())
            }
            op::MKDIR => {
                self.room(io, abi::ENTRY_OUT)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let mode = r.u32()?;
                r.skip(4)?;
                let name = entry_name(&mut r)?;
                let (id, st) = fs.mkdir(h.nodeid, name, mode, who)?;
                s.out.entry(id, &st, valid);
                Ok(())
            }
            op::UNLINK | op::RMDIR => {
                let name = entry_name(&mut Reader::new(self.args(io, &mut s.args)?))?;
                fs.unlink(h.nodeid, name, h.opcode == op::RMDIR)?;
                Ok(())
            }
            op::RENAME | op::RENAME2 => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let new_dir = r.u64()?;
                let flags = if h.opcode == op::RENAME2 {
                    let f = r.u32()?;
                    r.skip(4)?;
                    f
                } else {
                    0
                };
                let (old, new) = (entry_name(&mut r)?, entry_name(&mut r)?);
                fs.rename(h.nodeid, old, new_dir, new, flags)?;
                Ok(())
            }
            op::LINK => {
                self.room(io, abi::ENTRY_OUT)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let old = r.u64()?;
                let name = entry_name(&mut r)?;
                let (id, st) = fs.link(old, h.nodeid, name)?;
                s.out.entry(id, &st, valid);
                Ok(())
            }
            op::OPEN | op::OPENDIR => {
                self.room(io, abi::OPEN_OUT)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (flags, open_flags) = (r.u32()?, r.u32()?);
                let dir = h.opcode == op::OPENDIR;
                let kill = open_flags & abi::OPEN_KILL_SUIDGID != 0;
                let fh = fs.open(h.nodeid, flags, dir, kill)?;
                s.out.u64(fh).u32(fs.open_flags(dir)).u32(0);
                Ok(())
            }
            op::CREATE => {
                self.room(io, abi::ENTRY_OUT + abi::OPEN_OUT)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (flags, mode, _umask, open_flags) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
                let name = entry_name(&mut r)?;
                if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(Fail::Malformed);
                }
                let kill = open_flags & abi::OPEN_KILL_SUIDGID != 0;
                let (id, st, fh) = fs.create(h.nodeid, name, flags, mode, who, kill)?;
                s.out
                    .entry(id, &st, valid)
                    .u64(fh)
                    .u32(fs.open_flags(false))
                    .u32(0);
                Ok(())
            }
            op::STATFS => {
                self.room(io, abi::STATFS_OUT)?;
                let st = fs.statfs()?;
                s.out
                    .u64(st.f_blocks)
                    .u64(st.f_bfree)
                    .u64(st.f_bavail)
                    .u64(st.f_files)
                    .u64(st.f_ffree)
                    .u32(st.f_bsize as u32)
                    .u32(st.f_namelen as u32)
                    .u32(st.f_frsize as u32)
                    .zeros(4 + 24);
                Ok(())
            }
            op::RELEASE | op::RELEASEDIR => {
                let fh = Reader::new(self.args(io, &mut s.args)?).u64()?;
                fs.release(fh);
                Ok(())
            }
            op::FLUSH => {
                let fh = Reader::new(self.args(io, &mut s.args)?).u64()?;
                fs.flush(fh)?;
                Ok(())
            }
            op::FSYNC | op::FSYNCDIR => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (fh, flags) = (r.u64()?, r.u32()?);
                fs.fsync(fh, flags & abi::FSYNC_FDATASYNC != 0)?;
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            op::SYNCFS => {
                fs.syncfs()?;
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            op::FALLOCATE => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (fh, offset, len, mode) = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
                fs.fallocate(fh, mode, offset, len, who)?;
                Ok(())
            }
            op::LSEEK => {
                self.room(io, 8)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (fh, offset, whence) = (r.u64()?, r.u64()?, r.u32()?);
                let at = fs.lseek(fh, offset, whence)?;
                s.out.u64(at);
                Ok(())
            }
            op::COPY_FILE_RANGE => {
                self.room(io, 8)?;
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (fh_in, off_in, _node_out, fh_out, off_out, len) =
                    (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let n = fs.copy_file_range(fh_in, off_in, fh_out, off_out, len, who)?;
                s.out.u32(n as u32).u32(0);
                Ok(())
            }
            op::GETXATTR | op::LISTXATTR | op::SETXATTR | op::REMOVEXATTR if !fs.xattrs_on() => {
                // ENOSYS turns xattrs off for the whole FUSE connection: a mount inside another tree
                // (see `router`) says EOPNOTSUPP, which the driver's callers see anyway.
                let e = if fs.config().id_base != 0 {
                    libc::EOPNOTSUPP
                } else {
                    libc::ENOSYS
                };
                Err(Errno(e).into())
            }
            op::GETXATTR => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let size = r.u32()? as usize;
                r.skip(4)?;
                let name = r.cstr()?;
                s.data.resize(abi::XATTR_SIZE_MAX, 0);
                let n = fs.getxattr(h.nodeid, name, &mut s.data)?;
                self.sized_reply(io, s, size, n, SizedFrom::Data)
            }
            op::LISTXATTR => {
                let size = Reader::new(self.args(io, &mut s.args)?).u32()? as usize;
                fs.listxattr(h.nodeid, &mut s.list)?;
                let n = s.list.len();
                self.sized_reply(io, s, size, n, SizedFrom::List)
            }
            op::SETXATTR => {
                let mut r = Reader::new(self.args(io, &mut s.args)?);
                let (size, flags) = (r.u32()? as usize, r.u32()?);
                let name = r.cstr()?;
                let value = r.bytes(size)?;
                if name.is_empty() || name.len() > 255 || size > abi::XATTR_SIZE_MAX {
                    return Err(Fail::Malformed);
                }
                fs.setxattr(h.nodeid, name, value, flags)?;
                Ok(())
            }
            op::REMOVEXATTR => {
                let name = Reader::new(self.args(io, &mut s.args)?).cstr()?;
                fs.removexattr(h.nodeid, name)?;
                Ok(())
            }
            // ACCESS (the driver mounts with default_permissions and checks itself), locks (the driver
            // keeps them locally), ioctl, poll, bmap, DAX mappings, statx, tmpfile.
            _ => Err(Errno(libc::ENOSYS).into()),
        }
    }

    fn attr_out(&self, s: &mut Scratch, st: &libc::stat) {
        let v = self.fs.validity();
        s.out.u64(v.attr.0).u32(v.attr.1).u32(0).attr(st);
    }

    /// An xattr reply: the size when the driver asked with 0, the bytes if they fit in `size`, or ERANGE.
    fn sized_reply(
        &self,
        io: &dyn ReqIo,
        s: &mut Scratch,
        size: usize,
        n: usize,
        from: SizedFrom,
    ) -> Outcome {
        if size == 0 {
            self.room(io, 8)?;
            s.out.u32(n as u32).u32(0);
            return Ok(());
        }
        if n > size {
            return Err(Errno(libc::ERANGE).into());
        }
        self.room(io, n)?;
        match from {
            SizedFrom::Data => s.out.bytes(&s.data[..n]),
            SizedFrom::List => s.out.bytes(&s.list[..n]),
        };
        Ok(())
    }

    fn init(&self, io: &mut dyn ReqIo, s: &mut Scratch) -> Outcome {
        self.room(io, abi::INIT_OUT)?;
        let args = self.args(io, &mut s.args)?;
        let mut r = Reader::new(args);
        let (major, minor, readahead, offered) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        if major != abi::KERNEL_VERSION {
            // Older majors are not spoken; a newer one is told ours (and must come back with it).
            if major < abi::KERNEL_VERSION {
                return Err(Errno(libc::EPROTO).into());
            }
            s.out
                .u32(abi::KERNEL_VERSION)
                .u32(abi::KERNEL_MINOR_VERSION)
                .zeros(abi::INIT_OUT - 8);
            return Ok(());
        }
        let cfg = self.fs.config();
        let mut want = init::ASYNC_READ
            | init::BIG_WRITES
            | init::DO_READDIRPLUS
            | init::READDIRPLUS_AUTO
            | init::PARALLEL_DIROPS
            | init::MAX_PAGES
            | init::CACHE_SYMLINKS
            | init::ATOMIC_O_TRUNC
            // O_DIRECT requests of one file may be in flight together (libaio at a queue depth), not
            // one at a time.
            | init::ASYNC_DIO
            // We clear setuid bits ourselves when told: without it the driver asks for
            // security.capability before every write (a round trip per write).
            | init::HANDLE_KILLPRIV_V2;
        if cfg.cache == CachePolicy::Auto {
            want |= init::AUTO_INVAL_DATA;
        }
        if cfg.writeback && !cfg.read_only {
            want |= init::WRITEBACK_CACHE;
        }
        let flags = offered & want;
        {
            // A new session: whatever the driver knew of the last one is gone.
            let _s = self.session.lock();
            self.seen
                .store(self.generation.load(Ordering::Acquire), Ordering::Release);
            self.fs.forget_all();
            self.up.store(true, Ordering::Release);
        }
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        log::debug!("virtio-fs session: FUSE {major}.{minor}, flags {flags:#x}");
        let max_pages = if flags & init::MAX_PAGES != 0 {
            (self.max_write / 4096) as u16
        } else {
            0
        };
        s.out
            .u32(abi::KERNEL_VERSION)
            .u32(abi::KERNEL_MINOR_VERSION)
            .u32(readahead)
            .u32(flags)
            .u16(64) // max_background
            .u16(48) // congestion_threshold
            .u32(self.max_write)
            .u32(1) // time_gran: nanoseconds
            .u16(max_pages)
            .zeros(abi::INIT_OUT - 30);
        Ok(())
    }

    fn read(&self, io: &mut dyn ReqIo, s: &mut Scratch) -> Outcome {
        let mut r = Reader::new(self.args(io, &mut s.args)?);
        let (fh, pos, size) = (r.u64()?, r.u64()?, r.u32()?);
        let room = io.writable().saturating_sub(OUT_HEADER);
        let want = (size.min(self.max_write) as usize).min(room);
        let h = self.fs.handle(fh)?;
        if h.node.is_dir() {
            return Err(Errno(libc::EISDIR).into());
        }
        // Straight into the driver's buffers only from a regular file on a page-cache file system
        // (decided once per open file): anything else could stall with them pinned.
        let direct = if h.zero_copy() {
            io.read_file(h.fd(), pos, OUT_HEADER, want)?
        } else {
            None
        };
        let got = match direct {
            Some(n) if n == want => n,
            // Short, or not possible: the rest through our buffer (at the end of the file that is one
            // pread of 0; after an error, that error).
            started => {
                let mut done = started.unwrap_or(0);
                s.data.resize(STAGE.min(want.max(1)), 0);
                while done < want {
                    let n = (want - done).min(STAGE);
                    // An error is the driver's error even after some data: a short read would read as
                    // the end of the file.
                    let got = sys::pread(h.fd(), &mut s.data[..n], pos + done as u64)?;
                    if got == 0 {
                        break;
                    }
                    if io.write(OUT_HEADER + done, &s.data[..got])? < got {
                        return Err(Errno(libc::EIO).into());
                    }
                    // A short count is not the end of the file: only a read of 0 is.
                    done += got;
                }
                done
            }
        };
        self.counters.bytes_read.fetch_add(got as u64, Ordering::Relaxed);
        // The data is in place after the header; the header (written last) counts it.
        s.extra = got;
        Ok(())
    }

    fn write(&self, io: &mut dyn ReqIo, s: &mut Scratch) -> Outcome {
        const WRITE_IN: usize = 40;
        let mut head = [0u8; WRITE_IN];
        if io.readable() < IN_HEADER + WRITE_IN {
            return Err(Fail::Malformed);
        }
        if io.read(IN_HEADER, &mut head)? != WRITE_IN {
            return Err(Errno(libc::EIO).into());
        }
        let mut r = Reader::new(&head);
        let (fh, pos, size, flags) = (r.u64()?, r.u64()?, r.u32()? as usize, r.u32()?);
        if IN_HEADER + WRITE_IN + size != io.readable() || size > self.max_write as usize {
            return Err(Fail::Malformed);
        }
        self.room(io, 8)?;
        let h = self.fs.write_handle(fh)?;
        if flags & abi::WRITE_KILL_SUIDGID != 0 {
            // Before the data, as the kernel does: never new content under a setuid bit.
            self.fs.kill_suidgid(h.fd())?;
        }
        // Straight from the driver's buffers into the page cache where that is a copy (see `write_file`);
        // whatever that did not write, staged.
        let mut done = if h.zero_copy_writes() {
            io.write_file(h.fd(), pos, IN_HEADER + WRITE_IN, size)?
                .unwrap_or(0)
        } else {
            0
        };
        s.data.resize(STAGE.min((size - done).max(1)), 0);
        // Staged by chunks, each copied under the ticket's check: a fence stops the write at the next
        // chunk, and nothing of the driver's memory is read after it.
        while done < size {
            let n = (size - done).min(STAGE);
            if io.read(IN_HEADER + WRITE_IN + done, &mut s.data[..n])? != n {
                return Err(Errno(libc::EIO).into());
            }
            let mut at = 0;
            while at < n {
                // An error is the driver's even after some data (ENOSPC stays ENOSPC: the driver's
                // direct I/O would make any short count EIO).
                match sys::pwrite(h.fd(), &s.data[at..n], pos + (done + at) as u64) {
                    Ok(0) => return Err(Errno(libc::EIO).into()),
                    Ok(k) => at += k,
                    Err(e) => return Err(e.into()),
                }
            }
            done += at;
            if at < n {
                break;
            }
        }
        self.counters
            .bytes_written
            .fetch_add(done as u64, Ordering::Relaxed);
        s.out.u32(done as u32).u32(0);
        Ok(())
    }

    fn readdir(&self, io: &mut dyn ReqIo, s: &mut Scratch, plus: bool) -> Outcome {
        let mut r = Reader::new(self.args(io, &mut s.args)?);
        let (fh, offset, size) = (r.u64()?, r.u64()?, r.u32()? as usize);
        let room = io.writable().saturating_sub(OUT_HEADER).min(size).min(1 << 20);
        let h = self.fs.handle(fh)?;
        let dir = h.node.clone();
        let valid = self.fs.validity();
        let fs = &self.fs;
        let out = &mut s.out;
        let mut dents = std::mem::take(&mut s.dents);
        let r = fs.read_dir(fh, offset, &mut dents, |name, ino, kind, next| {
            let len = abi::dirent_size(name.len(), plus);
            if out.buf.len() - OUT_HEADER + len > room {
                return false;
            }
            if plus {
                let dot = name == b"." || name == b"..";
                match (!dot).then(|| fs.lookup_in(&dir, name)) {
                    Some(Ok((id, st))) => {
                        out.entry(id, &st, valid);
                    }
                    // "." and "..", or an entry gone meanwhile: no node (the driver looks it up itself).
                    _ => {
                        out.zeros(abi::ENTRY_OUT);
                    }
                }
            }
            out.u64(ino)
                .u64(next)
                .u32(name.len() as u32)
                .u32(u32::from(kind))
                .bytes(name)
                .align8();
            true
        });
        s.dents = dents;
        r?;
        Ok(())
    }
}

enum SizedFrom {
    Data,
    List,
}

/// A directory entry name from the arguments: longer than NAME_MAX is the caller's ENAMETOOLONG (the
/// driver passes names through unchecked); empty, `.`, `..` or with a `/` is malformed.
fn entry_name<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], Fail> {
    let n = r.cstr()?;
    if n.len() > abi::NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG).into());
    }
    if !abi::valid_name(n) {
        return Err(Fail::Malformed);
    }
    Ok(n)
}

fn decode_setattr(args: &[u8]) -> Result<SetAttr, Malformed> {
    let mut r = Reader::new(args);
    let valid = r.u32()?;
    r.skip(4)?;
    let fh = r.u64()?;
    let size = r.u64()?;
    r.skip(8)?; // lock_owner
    let (atime, mtime) = (r.u64()?, r.u64()?);
    r.skip(8)?; // ctime
    let (atimensec, mtimensec) = (r.u32()?, r.u32()?);
    r.skip(4)?;
    let mode = r.u32()?;
    r.skip(4)?;
    let (uid, gid) = (r.u32()?, r.u32()?);
    let time = |set: u32, now: u32, sec: u64, nsec: u32| {
        if valid & now != 0 {
            Some(libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            })
        } else if valid & set != 0 {
            Some(libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: i64::from(nsec.min(999_999_999)) as _,
            })
        } else {
            None
        }
    };
    let on = |bit: u32| valid & bit != 0;
    Ok(SetAttr {
        kill_suidgid: on(fattr::KILL_SUIDGID),
        fh: on(fattr::FH).then_some(fh),
        mode: on(fattr::MODE).then_some(mode),
        uid: on(fattr::UID).then_some(uid),
        gid: on(fattr::GID).then_some(gid),
        size: on(fattr::SIZE).then_some(size),
        atime: time(fattr::ATIME, fattr::ATIME_NOW, atime, atimensec),
        mtime: time(fattr::MTIME, fattr::MTIME_NOW, mtime, mtimensec),
    })
}
