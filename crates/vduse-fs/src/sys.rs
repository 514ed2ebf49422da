//! Thin, checked wrappers of the system calls the passthrough makes, all relative to file descriptors.
//! Names are NUL-terminated on the stack (no allocation per request). Errors are the raw errno, which
//! is what the driver is answered with.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// An errno to answer the driver with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn last() -> Self {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type SysResult<T> = Result<T, Errno>;

fn check(rc: libc::c_int) -> SysResult<libc::c_int> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

fn check_long(rc: libc::c_long) -> SysResult<libc::c_long> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

/// Calls `f` with `s` as a NUL-terminated C string built on the stack; a NUL inside `s` is EINVAL.
pub fn with_cstr<T>(s: &[u8], f: impl FnOnce(*const libc::c_char) -> SysResult<T>) -> SysResult<T> {
    let mut buf = [0u8; crate::abi::PATH_MAX + 1];
    if s.len() > crate::abi::PATH_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    if s.contains(&0) {
        return Err(Errno(libc::EINVAL));
    }
    buf[..s.len()].copy_from_slice(s);
    f(buf.as_ptr().cast())
}

/// The decimal name of `fd` under `/proc/self/fd`, on the stack.
pub struct FdName([u8; 12]);

impl FdName {
    pub fn new(fd: RawFd) -> Self {
        let mut b = [0u8; 12];
        let s = fd.to_string();
        b[..s.len()].copy_from_slice(s.as_bytes());
        FdName(b)
    }
    pub fn as_ptr(&self) -> *const libc::c_char {
        self.0.as_ptr().cast()
    }
    pub fn as_cstr(&self) -> &std::ffi::CStr {
        // At most 11 digits in 12 zeroed bytes: there is always a NUL.
        std::ffi::CStr::from_bytes_until_nul(&self.0).unwrap_or(c"")
    }
}

const EMPTY: *const libc::c_char = c"".as_ptr();

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_XDEV: u64 = 0x01;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens `name` (one validated component) under the directory `dir`, never leaving it: `openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` where the kernel has it (probed once: `beneath` goes false
/// on ENOSYS), else `openat` — equivalent for a single component without `..`, with O_NOFOLLOW in `flags`.
pub fn open_beneath(
    dir: RawFd,
    name: &[u8],
    flags: i32,
    mode: u32,
    beneath: &std::sync::atomic::AtomicBool,
) -> SysResult<OwnedFd> {
    open_beneath_x(dir, name, flags, mode, beneath, false)
}

/// [`open_beneath`]; with `stay`, never into another mount either (`RESOLVE_NO_XDEV`: EXDEV; the
/// `openat` fallback cannot tell, the caller compares devices).
pub fn open_beneath_x(
    dir: RawFd,
    name: &[u8],
    flags: i32,
    mode: u32,
    beneath: &std::sync::atomic::AtomicBool,
    stay: bool,
) -> SysResult<OwnedFd> {
    use std::sync::atomic::Ordering;
    // Never a controlling terminal (openat2 refuses O_NOCTTY beside O_PATH, where it means nothing).
    let flags = if flags & libc::O_PATH == 0 {
        flags | libc::O_NOCTTY
    } else {
        flags
    };
    with_cstr(name, |p| {
        if beneath.load(Ordering::Relaxed) {
            let how = OpenHow {
                flags: (flags | libc::O_CLOEXEC) as u64,
                mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
                    u64::from(mode)
                } else {
                    0
                },
                resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | if stay { RESOLVE_NO_XDEV } else { 0 },
            };
            // SAFETY: `p` is a NUL-terminated string and `how` a valid open_how of the size passed.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir,
                    p,
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if rc >= 0 {
                // SAFETY: the kernel returned a new fd that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
            }
            let e = Errno::last();
            if e.0 != libc::ENOSYS {
                return Err(e);
            }
            beneath.store(false, Ordering::Relaxed);
        }
        // SAFETY: `p` is NUL-terminated; the fd returned is new.
        let fd = check(unsafe { libc::openat(dir, p, flags | libc::O_CLOEXEC, mode) })?;
        // SAFETY: as above.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// `openat(dir, name, flags)` for a name we made ourselves (a `/proc/self/fd` entry, ".").
pub fn open_at(dir: RawFd, name: &std::ffi::CStr, flags: i32) -> SysResult<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the fd returned is new.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) })?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The attributes of what `fd` refers to (an O_PATH fd included; a symlink itself, not its target).
pub fn stat_fd(fd: RawFd) -> SysResult<libc::stat> {
    // SAFETY: a zeroed stat is valid; fstatat writes into our struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: "" with AT_EMPTY_PATH names `fd` itself.
    check(unsafe {
        libc::fstatat(
            fd,
            EMPTY,
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn statfs(fd: RawFd) -> SysResult<libc::statfs> {
    // SAFETY: a zeroed statfs is valid; fstatfs writes into it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::fstatfs(fd, &mut st) })?;
    Ok(st)
}

/// The mount flags (`ST_NOSUID`, `ST_NODEV`, …) of the file system `fd` is on.
pub fn mount_flags(fd: RawFd) -> SysResult<libc::c_ulong> {
    // SAFETY: a zeroed statvfs is valid; fstatvfs writes into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(st.f_flag)
}

pub fn readlink(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf; "" names the O_PATH symlink fd itself.
    let n = unsafe { libc::readlinkat(fd, EMPTY, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

pub fn mkdir_at(dir: RawFd, name: &[u8], mode: u32) -> SysResult<()> {
    // SAFETY: NUL-terminated name.
    with_cstr(name, |p| check(unsafe { libc::mkdirat(dir, p, mode) }).map(drop))
}

pub fn mknod_at(dir: RawFd, name: &[u8], mode: u32, dev: libc::dev_t) -> SysResult<()> {
    with_cstr(name, |p| {
        // SAFETY: NUL-terminated name.
        check(unsafe { libc::mknodat(dir, p, mode, dev) }).map(drop)
    })
}

pub fn symlink_at(target: &[u8], dir: RawFd, name: &[u8]) -> SysResult<()> {
    with_cstr(target, |t| {
        // SAFETY: both strings are NUL-terminated.
        with_cstr(name, |p| check(unsafe { libc::symlinkat(t, dir, p) }).map(drop))
    })
}

pub fn unlink_at(dir: RawFd, name: &[u8], flags: i32) -> SysResult<()> {
    with_cstr(name, |p| {
        // SAFETY: NUL-terminated name.
        check(unsafe { libc::unlinkat(dir, p, flags) }).map(drop)
    })
}

pub fn rename_at(old_dir: RawFd, old: &[u8], new_dir: RawFd, new: &[u8], flags: u32) -> SysResult<()> {
    with_cstr(old, |o| {
        with_cstr(new, |n| {
            // SAFETY: both names are NUL-terminated; renameat2 through the raw system call (musl too).
            check_long(unsafe { libc::syscall(libc::SYS_renameat2, old_dir, o, new_dir, n, flags) }).map(drop)
        })
    })
}

/// A hard link to what the O_PATH fd `fd` is, named `name` in `dir`.
pub fn link_fd(fd: RawFd, proc_fd: RawFd, dir: RawFd, name: &[u8]) -> SysResult<()> {
    with_cstr(name, |p| {
        // SAFETY: "" with AT_EMPTY_PATH names `fd` (needs CAP_DAC_READ_SEARCH); `p` is NUL-terminated.
        let rc = unsafe { libc::linkat(fd, EMPTY, dir, p, libc::AT_EMPTY_PATH) };
        if rc == 0 {
            return Ok(());
        }
        let e = Errno::last();
        if e.0 != libc::ENOENT && e.0 != libc::EPERM {
            return Err(e);
        }
        // Without the capability: through the fd's /proc entry, following that magic link only.
        let fd_name = FdName::new(fd);
        // SAFETY: both names are NUL-terminated.
        check(unsafe { libc::linkat(proc_fd, fd_name.as_ptr(), dir, p, libc::AT_SYMLINK_FOLLOW) }).map(drop)
    })
}

pub fn chown_fd(fd: RawFd, uid: u32, gid: u32) -> SysResult<()> {
    // SAFETY: "" with AT_EMPTY_PATH names `fd` itself (never a symlink's target).
    check(unsafe {
        libc::fchownat(
            fd,
            EMPTY,
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of what the O_PATH fd `fd` is, through its /proc entry.
pub fn chmod_fd(proc_fd: RawFd, fd: RawFd, mode: u32) -> SysResult<()> {
    let n = FdName::new(fd);
    // SAFETY: NUL-terminated name.
    check(unsafe { libc::fchmodat(proc_fd, n.as_ptr(), mode, 0) }).map(drop)
}

pub fn fchmod(fd: RawFd, mode: u32) -> SysResult<()> {
    // SAFETY: a plain system call on an fd we own.
    check(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

pub fn utimes_fd(proc_fd: RawFd, fd: RawFd, times: &[libc::timespec; 2]) -> SysResult<()> {
    let n = FdName::new(fd);
    // SAFETY: NUL-terminated name and two timespecs.
    check(unsafe { libc::utimensat(proc_fd, n.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn truncate(fd: RawFd, size: u64) -> SysResult<()> {
    let size = i64::try_from(size).map_err(|_| Errno(libc::EFBIG))?;
    // SAFETY: ftruncate on an fd; a bad fd fails.
    check(unsafe { libc::ftruncate(fd, size) }).map(drop)
}

/// Runs a read/write-style system call again while a signal interrupts it.
fn retry_eintr(mut call: impl FnMut() -> isize) -> SysResult<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = Errno::last();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}

pub fn pread(fd: RawFd, buf: &mut [u8], pos: u64) -> SysResult<usize> {
    let pos = i64::try_from(pos).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    retry_eintr(|| unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), pos) })
}

pub fn pwrite(fd: RawFd, buf: &[u8], pos: u64) -> SysResult<usize> {
    let pos = i64::try_from(pos).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the kernel reads at most buf.len() bytes from buf.
    retry_eintr(|| unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), pos) })
}

/// `preadv` into raw ranges.
///
/// # Safety
/// Every iovec must point to memory valid for writes of its length for the whole call.
pub unsafe fn preadv(fd: RawFd, iov: &[libc::iovec], pos: u64) -> SysResult<usize> {
    let pos = i64::try_from(pos).map_err(|_| Errno(libc::EINVAL))?;
    let cnt = i32::try_from(iov.len()).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the caller guarantees the iovecs.
    retry_eintr(|| unsafe { libc::preadv(fd, iov.as_ptr(), cnt, pos) })
}

/// `pwritev(2)` (EINTR retried).
///
/// # Safety
/// Every iovec points to `iov_len` readable bytes that stay valid for the call.
pub unsafe fn pwritev(fd: RawFd, iov: &[libc::iovec], pos: u64) -> SysResult<usize> {
    let pos = i64::try_from(pos).map_err(|_| Errno(libc::EFBIG))?;
    let cnt = i32::try_from(iov.len()).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the caller guarantees the iovecs.
    retry_eintr(|| unsafe { libc::pwritev(fd, iov.as_ptr(), cnt, pos) })
}

pub fn fsync(fd: RawFd, data_only: bool) -> SysResult<()> {
    // SAFETY: plain system calls on an fd.
    check(unsafe {
        if data_only {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn fallocate(fd: RawFd, mode: u32, offset: u64, len: u64) -> SysResult<()> {
    let off = i64::try_from(offset).map_err(|_| Errno(libc::EFBIG))?;
    let len = i64::try_from(len).map_err(|_| Errno(libc::EFBIG))?;
    // SAFETY: a plain system call on an fd.
    check(unsafe { libc::fallocate(fd, mode as i32, off, len) }).map(drop)
}

pub fn lseek(fd: RawFd, offset: u64, whence: u32) -> SysResult<u64> {
    let off = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: a plain system call on an fd.
    let r = unsafe { libc::lseek(fd, off, whence as i32) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as u64)
    }
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: usize,
) -> SysResult<usize> {
    let mut a = i64::try_from(off_in).map_err(|_| Errno(libc::EINVAL))?;
    let mut b = i64::try_from(off_out).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the offsets are ours; the kernel updates them. Raw system call: musl has no wrapper.
    let n = unsafe {
        libc::syscall(
            libc::SYS_copy_file_range,
            fd_in,
            &mut a as *mut i64,
            fd_out,
            &mut b as *mut i64,
            len,
            0u32,
        )
    };
    check_long(n).map(|n| n as usize)
}

pub fn syncfs(fd: RawFd) -> SysResult<()> {
    // SAFETY: a plain system call on an fd.
    check(unsafe { libc::syncfs(fd) }).map(drop)
}

/// Reads directory entries (`struct linux_dirent64`) from the position of `fd` into `buf`.
pub fn getdents(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    check_long(n).map(|n| n as usize)
}

/// The xattr system calls on an fd opened for reading.
pub fn fgetxattr(fd: RawFd, name: &[u8], buf: &mut [u8]) -> SysResult<usize> {
    with_cstr(name, |p| {
        // SAFETY: NUL-terminated name; the kernel writes at most buf.len() bytes (none when 0).
        let n = unsafe { libc::fgetxattr(fd, p, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(Errno::last())
        } else {
            Ok(n as usize)
        }
    })
}

pub fn flistxattr(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes.
    let n = unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

pub fn fsetxattr(fd: RawFd, name: &[u8], value: &[u8], flags: i32) -> SysResult<()> {
    with_cstr(name, |p| {
        // SAFETY: NUL-terminated name; the kernel reads value.len() bytes.
        check(unsafe { libc::fsetxattr(fd, p, value.as_ptr().cast(), value.len(), flags) }).map(drop)
    })
}

pub fn fremovexattr(fd: RawFd, name: &[u8]) -> SysResult<()> {
    // SAFETY: NUL-terminated name.
    with_cstr(name, |p| check(unsafe { libc::fremovexattr(fd, p) }).map(drop))
}

/// This thread's filesystem uid and gid switched to a caller's, switched back to what they were when
/// dropped. Thread-private on Linux: the raw system calls, not a libc wrapper that might broadcast to
/// every thread (and so not `Send`: it must be dropped on the thread that switched).
pub struct FsIds {
    uid: u32,
    gid: u32,
    _thread: std::marker::PhantomData<*const ()>,
}

impl FsIds {
    /// Switches, and checks the kernel took both ids (setfsuid reports no error: it keeps the old id
    /// when it refuses, e.g. an id not mapped in our user namespace). Refused: EPERM, ids as before.
    pub fn switch(uid: u32, gid: u32) -> SysResult<Self> {
        // SAFETY: plain system calls changing only this thread's credentials; -1 only queries.
        let (old_gid, g, old_uid, u) = unsafe {
            let old_gid = libc::syscall(libc::SYS_setfsgid, gid) as u32;
            let g = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
            let old_uid = libc::syscall(libc::SYS_setfsuid, uid) as u32;
            (
                old_gid,
                g,
                old_uid,
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
            )
        };
        let guard = FsIds {
            uid: old_uid,
            gid: old_gid,
            _thread: std::marker::PhantomData,
        };
        if g != gid || u != uid {
            return Err(Errno(libc::EPERM));
        }
        Ok(guard)
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        // SAFETY: as in `switch`; the uid first, which gives the filesystem capabilities back.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, self.uid);
            libc::syscall(libc::SYS_setfsgid, self.gid);
        }
    }
}

/// `close(dup(fd))`: what a close of this file would report, without closing it.
pub fn close_dup(fd: RawFd) -> SysResult<()> {
    // SAFETY: dup of an fd we own; the copy is closed right away.
    let copy = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `copy` is ours alone.
    check(unsafe { libc::close(copy) }).map(drop)
}

/// Gives this thread its own umask and cwd (`unshare(CLONE_FS)`), then sets the umask to 0: modes the
/// driver sends are already masked by the guest and must be applied as they are.
pub fn private_umask_zero() -> SysResult<()> {
    // SAFETY: unshare(CLONE_FS) affects only the calling thread's fs_struct.
    check(unsafe { libc::unshare(libc::CLONE_FS) })?;
    // SAFETY: umask on this thread's now private fs_struct.
    unsafe { libc::umask(0) };
    Ok(())
}

/// Raises the open-file limit towards `want`: the soft limit up to the hard one, and as root the hard one
/// too, up to the kernel's `fs.nr_open`. Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: a zeroed rlimit is valid; getrlimit writes into it.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur >= want {
        return r.rlim_cur;
    }
    let mut hard = r.rlim_max;
    // SAFETY: geteuid has no preconditions.
    if hard < want && unsafe { libc::geteuid() } == 0 {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(hard);
        hard = hard.max(want.min(nr_open));
    }
    // The hard limit only moves with CAP_SYS_RESOURCE: failing that, the soft one up to it.
    for hard in [hard, r.rlim_max] {
        let next = libc::rlimit {
            rlim_cur: want.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads our struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &next) } == 0 {
            return next.rlim_cur;
        }
    }
    r.rlim_cur
}
