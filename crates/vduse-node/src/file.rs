//! What `FileBackend` needs beyond Node's `fs`: range deallocation and zeroing (`fallocate`, and on block
//! devices `BLKDISCARD`/`BLKZEROOUT`) on the libuv pool, and QEMU-compatible image locks.

use napi::bindgen_prelude::AsyncTask;
use napi::{Env, Task};
use napi_derive::napi;

use crate::error::{Failure, OrThrow, Parked};

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range of a block device (the kernel picks the fastest way).
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// One range operation on a file descriptor.
#[derive(Clone, Copy)]
enum RangeOp {
    Fallocate(i32),
    Discard,
    ZeroOut,
}

pub struct Range {
    fd: i32,
    op: RangeOp,
    offset: u64,
    len: u64,
    failure: Parked,
}

impl Task for Range {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        let (ret, name) = match self.op {
            RangeOp::Fallocate(mode) => {
                // SAFETY: fallocate on a caller-provided fd; a bad fd or mode only fails.
                let ret = unsafe { libc::fallocate(self.fd, mode, self.offset as i64, self.len as i64) };
                (ret, "fallocate")
            }
            RangeOp::Discard | RangeOp::ZeroOut => {
                let (request, name) = match self.op {
                    RangeOp::Discard => (BLKDISCARD, "ioctl(BLKDISCARD)"),
                    _ => (BLKZEROOUT, "ioctl(BLKZEROOUT)"),
                };
                let range: [u64; 2] = [self.offset, self.len];
                // SAFETY: both ioctls read two u64s (start, length) from the pointer, which outlives the call.
                let ret = unsafe { libc::ioctl(self.fd, request as _, range.as_ptr()) };
                (ret, name)
            }
        };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            return Err(self.failure.park(crate::error::syscall(name, err)));
        }
        Ok(())
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }

    fn reject(&mut self, env: Env, err: napi::Error) -> napi::Result<()> {
        self.failure.reject(&env, err)
    }
}

fn range(fd: i32, op: RangeOp, offset: f64, len: f64) -> AsyncTask<Range> {
    AsyncTask::new(Range {
        fd,
        op,
        offset: offset as u64,
        len: len as u64,
        failure: Parked::default(),
    })
}

/// `fallocate(2)` on the libuv pool (punch holes, zero ranges) without blocking the JavaScript thread.
#[napi(ts_return_type = "Promise<void>")]
pub fn fallocate(fd: i32, mode: i32, offset: f64, len: f64) -> AsyncTask<Range> {
    range(fd, RangeOp::Fallocate(mode), offset, len)
}

/// `ioctl(BLKDISCARD)` on a block device, on the libuv pool.
#[napi(ts_return_type = "Promise<void>")]
pub fn blk_discard(fd: i32, offset: f64, len: f64) -> AsyncTask<Range> {
    range(fd, RangeOp::Discard, offset, len)
}

/// `ioctl(BLKZEROOUT)` on a block device, on the libuv pool.
#[napi(ts_return_type = "Promise<void>")]
pub fn blk_zero_out(fd: i32, offset: f64, len: f64) -> AsyncTask<Range> {
    range(fd, RangeOp::ZeroOut, offset, len)
}

// QEMU's image-locking protocol (block/file-posix.c), so that vduse and QEMU (qemu-nbd, qemu-img, a VM)
// see each other: open-file-description locks on single bytes. Holding a shared lock on byte
// PERM_BASE + i says "I use permission i"; on SHARED_BASE + i, "I do not let others use permission i".
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// Permission bits in QEMU's order: consistent read, write.
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

fn ofd_lock(fd: i32, cmd: libc::c_int, kind: libc::c_short, byte: i64) -> std::io::Result<libc::c_short> {
    // SAFETY: flock is plain data; all-zero is a valid value that we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // l_pid must be 0 for OFD locks (zeroed above).
    // SAFETY: fcntl with an OFD lock command reads (and for GETLK writes) the flock we own.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

/// Who else holds the image in a way that conflicts with ours: None, or a description.
fn conflict(fd: i32, write: bool) -> std::io::Result<Option<&'static str>> {
    // Our own locks never show here: OFD locks of one open file description do not conflict.
    let held = |byte| {
        ofd_lock(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte)
            .map(|t| t != libc::F_UNLCK as libc::c_short)
    };
    if held(PERM_BASE + PERM_WRITE)? {
        return Ok(Some("another process has it open for writing"));
    }
    if held(SHARED_BASE + PERM_CONSISTENT_READ)? {
        return Ok(Some("another process does not let others read it"));
    }
    if write && held(SHARED_BASE + PERM_WRITE)? {
        return Ok(Some("another process reads it and does not let others write it"));
    }
    Ok(None)
}

/// Locks an image the way QEMU does by default: we use "consistent read" (and "write" when writing) and
/// let nobody else write — two readers may share an image, a writer excludes everyone. Throws
/// `ERR_VDUSE_BUSY` when another process (vduse, or QEMU with its default locking) holds it in a
/// conflicting way; then no lock of ours is left. The locks belong to the open file description: they go
/// away when the file is closed or the process dies.
#[napi]
pub fn lock_image(env: Env, fd: i32, write: bool) -> napi::Result<()> {
    let reader: &[i64] = &[PERM_BASE + PERM_CONSISTENT_READ, SHARED_BASE + PERM_WRITE];
    let writer: &[i64] = &[
        PERM_BASE + PERM_CONSISTENT_READ,
        PERM_BASE + PERM_WRITE,
        SHARED_BASE + PERM_WRITE,
    ];
    let ours = if write { writer } else { reader };
    let unlock = || {
        for &byte in ours {
            let _ = ofd_lock(fd, libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short, byte);
        }
    };
    let attempt = || -> Result<(), Failure> {
        for &byte in ours {
            // Only shared locks are part of the protocol; a foreign exclusive one is a conflict too.
            ofd_lock(fd, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, byte).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EACCES) => {
                        busy(e.raw_os_error(), "another process holds a lock on it")
                    }
                    // No OFD locks here (an old kernel, some network file systems), a bad fd…: not "busy".
                    _ => crate::error::syscall("fcntl(F_OFD_SETLK)", e),
                }
            })?;
        }
        match conflict(fd, write) {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(busy(Some(libc::EAGAIN), why)),
            Err(e) => Err(crate::error::syscall("fcntl(F_OFD_GETLK)", e)),
        }
    };
    attempt().inspect_err(|_| unlock()).or_throw(&env)
}

fn busy(errno: Option<i32>, why: &'static str) -> Failure {
    Failure::new(
        "ERR_VDUSE_BUSY",
        format!("the image is in use: {why}"),
        errno,
        Some("fcntl(F_OFD_SETLK)"),
        Some(
            "stop the other user (a vduse server, qemu-nbd, a VM), or open it read-only; \
             `lock: false` (--no-lock) skips the check, at the risk of corrupting the image",
        ),
    )
}
