//! Native block I/O between a file and a request's buffers: `preadv`/`pwritev`/`fdatasync` on worker
//! threads, straight into guest memory — the data never passes through JavaScript. JavaScript decides
//! (parses, validates, picks the file offset); this pool moves the bytes, writes the virtio-blk status
//! byte and completes the request, raising one interrupt per queue per batch of operations.
//!
//! Once started, a request belongs to its I/O: nothing else can complete it. A request fenced meanwhile
//! (reset, IOTLB change) is skipped if it has not started; if it has, its memory was revoked, so a
//! buffered transfer lands in memory the device owns, and the completion is dropped. O_DIRECT transfers
//! (pages pinned at submission) go through a device-owned aligned buffer instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vduse_core::chain::Segment;
use vduse_core::chain::Shape;
use vduse_core::memory::{Access, IotlbMap};
use vduse_core::queue::{Ticket, Virtqueue};

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;

/// Whether `fd` was opened with O_DIRECT: the kernel then pins the pages it transfers at submission, so
/// revoking a mapping would not stop a transfer in flight. Such I/O goes through a buffer the device owns,
/// and the request's memory is touched only under its ticket. Asked per operation, so a backend cannot get
/// it wrong.
fn is_direct(fd: i32) -> bool {
    // SAFETY: F_GETFL on a caller-provided fd; a bad fd just fails.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;

#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub ticket: Ticket,
    pub fd: i32,
    pub kind: u8,
    pub position: u64,
    /// Bytes of the readable buffers to skip before the data (the virtio-blk header of a write).
    pub skip: u32,
}

struct Work {
    ops: VecDeque<Op>,
    stop: bool,
}

#[derive(Default)]
pub struct IoStats {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    /// Operations whose request was fenced before they started.
    pub skipped: AtomicU64,
}

pub struct IoPool {
    work: Arc<(Mutex<Work>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    stopped: AtomicBool,
    pub stats: Arc<IoStats>,
}

impl IoPool {
    pub fn new(threads: usize, queues: Vec<Arc<Virtqueue>>) -> std::io::Result<Self> {
        let work = Arc::new((
            Mutex::new(Work {
                ops: VecDeque::new(),
                stop: false,
            }),
            Condvar::new(),
        ));
        let stats = Arc::new(IoStats::default());
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (work, queues, stats) = (work.clone(), queues.clone(), stats.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vduse-io-{i}"))
                    .spawn(move || worker(&work, &queues, &stats))?,
            );
        }
        Ok(Self {
            work,
            threads: handles,
            stopped: AtomicBool::new(false),
            stats,
        })
    }

    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) {
        let (lock, cv) = &*self.work;
        let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
        let before = w.ops.len();
        w.ops.extend(ops);
        let added = w.ops.len() - before;
        drop(w);
        if added > 1 {
            cv.notify_all();
        } else if added == 1 {
            cv.notify_one();
        }
    }

    /// Finishes the operations already queued, then stops the threads.
    pub fn stop(&mut self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let (lock, cv) = &*self.work;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An aligned buffer for O_DIRECT transfers, grown as needed and kept for the thread's life.
struct Bounce {
    ptr: *mut u8,
    len: usize,
}

impl Bounce {
    const ALIGN: usize = 4096;

    fn new() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }

    fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.len {
            self.free();
            let size = len.div_ceil(Self::ALIGN) * Self::ALIGN;
            let layout = std::alloc::Layout::from_size_align(size, Self::ALIGN).ok()?;
            // SAFETY: a non-zero-sized layout.
            let ptr = unsafe { std::alloc::alloc(layout) };
            if ptr.is_null() {
                return None;
            }
            self.ptr = ptr;
            self.len = size;
        }
        // SAFETY: `ptr` owns `self.len >= len` bytes, borrowed mutably through `&mut self`.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in `get` with this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    std::alloc::Layout::from_size_align_unchecked(self.len, Self::ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.len = 0;
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        self.free();
    }
}

fn worker(work: &(Mutex<Work>, Condvar), queues: &[Arc<Virtqueue>], stats: &IoStats) {
    let (lock, cv) = work;
    let mut bounce = Bounce::new();
    let mut batch = Vec::new();
    let mut segments: Vec<Segment> = Vec::new();
    let mut ranges: Vec<(*mut u8, usize)> = Vec::new();
    let mut iov: Vec<libc::iovec> = Vec::new();
    let mut touched = vec![false; queues.len()];
    loop {
        {
            let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
            while w.ops.is_empty() && !w.stop {
                w = cv.wait(w).unwrap_or_else(|e| e.into_inner());
            }
            if w.ops.is_empty() && w.stop {
                return;
            }
            // A fair share, so other workers take part of a large batch too.
            let n = w.ops.len().div_ceil(2).clamp(1, 64);
            batch.extend(w.ops.drain(..n));
        }
        for op in batch.drain(..) {
            let q = usize::from(op.ticket.queue());
            let Some(vq) = queues.get(q) else { continue };
            // Take the request over, and copy what the operation needs: no lock is held during the I/O.
            let Some((map, shape)) = vq.start_native(op.ticket, |map, shape, segs| {
                segments.clear();
                segments.extend_from_slice(segs);
                (map.clone(), shape)
            }) else {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            stats.ops.fetch_add(1, Ordering::Relaxed);
            let (status, used) = if is_direct(op.fd) {
                execute_direct(&op, vq, shape, &mut bounce)
            } else {
                execute(&op, &map, shape, &segments, &mut ranges, &mut iov)
            };
            if status != STATUS_OK {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            vq.complete_native(op.ticket, used, Some(status));
            touched[q] = true;
            drop(map);
        }
        for (q, t) in touched.iter_mut().enumerate() {
            if std::mem::take(t) {
                queues[q].notify();
            }
        }
    }
}

/// Host iovecs for `len` bytes of `segments` starting `skip` bytes in.
fn iovecs_for(
    map: &IotlbMap,
    segments: &[Segment],
    mut skip: u64,
    mut len: u64,
    access: Access,
    ranges: &mut Vec<(*mut u8, usize)>,
    out: &mut Vec<libc::iovec>,
) -> bool {
    ranges.clear();
    out.clear();
    for seg in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len);
        if !map.host_ranges(seg.addr + skip, n, access, ranges) {
            return false;
        }
        len -= n;
        skip = 0;
    }
    out.extend(ranges.iter().map(|&(p, n)| libc::iovec {
        iov_base: p.cast(),
        iov_len: n,
    }));
    len == 0
}

fn execute(
    op: &Op,
    map: &IotlbMap,
    shape: Shape,
    segments: &[Segment],
    ranges: &mut Vec<(*mut u8, usize)>,
    iov: &mut Vec<libc::iovec>,
) -> (u8, u32) {
    let (ins, outs) = segments.split_at(usize::from(shape.readable));
    if outs.is_empty() {
        return (STATUS_IOERR, 0);
    }
    let data_in = u64::from(shape.writable_bytes) - 1;
    let mut used = 1u32;
    let status = match op.kind {
        OP_READ => {
            if !iovecs_for(map, outs, 0, data_in, Access::Write, ranges, iov) {
                STATUS_IOERR
            } else if transfer(op.fd, iov, op.position, false) {
                used += data_in as u32;
                STATUS_OK
            } else {
                STATUS_IOERR
            }
        }
        OP_WRITE => {
            let len = u64::from(shape.readable_bytes).saturating_sub(u64::from(op.skip));
            if !iovecs_for(map, ins, u64::from(op.skip), len, Access::Read, ranges, iov) {
                STATUS_IOERR
            } else if transfer(op.fd, iov, op.position, true) {
                STATUS_OK
            } else {
                STATUS_IOERR
            }
        }
        // SAFETY: fdatasync on a caller-provided fd; a bad fd just fails.
        OP_FLUSH => match unsafe { libc::fdatasync(op.fd) } {
            0 => STATUS_OK,
            _ => STATUS_IOERR,
        },
        _ => STATUS_IOERR,
    };
    (status, used)
}

/// O_DIRECT: the file's DMA goes to and from `bounce`; guest memory is touched only by copies made under
/// the ticket check (a request fenced meanwhile is skipped, its data dropped).
fn execute_direct(op: &Op, vq: &Virtqueue, shape: Shape, bounce: &mut Bounce) -> (u8, u32) {
    let kind = op.kind;
    if kind == OP_FLUSH {
        // SAFETY: fdatasync on a caller-provided fd; a bad fd just fails.
        return match unsafe { libc::fdatasync(op.fd) } {
            0 => (STATUS_OK, 1),
            _ => (STATUS_IOERR, 1),
        };
    }
    if shape.writable == 0 {
        return (STATUS_IOERR, 0);
    }
    let (len, skip) = match kind {
        OP_READ => (u64::from(shape.writable_bytes) - 1, 0),
        OP_WRITE => (
            u64::from(shape.readable_bytes).saturating_sub(u64::from(op.skip)),
            u64::from(op.skip),
        ),
        _ => return (STATUS_IOERR, 1),
    };
    let Some(buf) = bounce.get(len as usize) else {
        return (STATUS_IOERR, 1);
    };
    if kind == OP_WRITE {
        let copied = vq.with_native(op.ticket, |map, shape, segs| {
            copy_segments(map, &segs[..usize::from(shape.readable)], skip, buf, false)
        });
        if copied != Some(true) {
            return (STATUS_IOERR, 1);
        }
    }
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    if !transfer(op.fd, &mut iov, op.position, kind == OP_WRITE) {
        return (STATUS_IOERR, 1);
    }
    if kind == OP_READ {
        let copied = vq.with_native(op.ticket, |map, shape, segs| {
            copy_segments(map, &segs[usize::from(shape.readable)..], 0, buf, true)
        });
        if copied != Some(true) {
            return (STATUS_IOERR, 1);
        }
        return (STATUS_OK, 1 + len as u32);
    }
    (STATUS_OK, 1)
}

/// Copies between `buf` and `buf.len()` bytes of `segments` starting `skip` bytes in: into the guest if
/// `to_guest`, out of it otherwise.
fn copy_segments(
    map: &IotlbMap,
    segments: &[Segment],
    mut skip: u64,
    buf: &mut [u8],
    to_guest: bool,
) -> bool {
    let mut at = 0usize;
    for seg in segments {
        if at == buf.len() {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(buf.len() - at);
        let ok = if to_guest {
            map.write_from(seg.addr + skip, &buf[at..at + n])
        } else {
            map.read_into(seg.addr + skip, &mut buf[at..at + n])
        };
        if !ok {
            return false;
        }
        at += n;
        skip = 0;
    }
    at == buf.len()
}

/// Moves all bytes of `iov` at `position`, retrying partial transfers. Reads past the end of the file
/// leave zeroes.
fn transfer(fd: i32, iov: &mut [libc::iovec], mut position: u64, write: bool) -> bool {
    let mut start = 0usize;
    while start < iov.len() {
        let chunk = &iov[start..(start + 1024).min(iov.len())];
        // SAFETY: every iovec points into a mapping that the caller's map keeps alive (revoked at worst),
        // validated for this access.
        let n = unsafe {
            if write {
                libc::pwritev(fd, chunk.as_ptr(), chunk.len() as i32, position as libc::off_t)
            } else {
                libc::preadv(fd, chunk.as_ptr(), chunk.len() as i32, position as libc::off_t)
            }
        };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        if n == 0 {
            if write {
                return false;
            }
            // End of file: the rest reads as zeroes.
            for v in &iov[start..] {
                // SAFETY: as above; zeroing the remaining destination bytes.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return true;
        }
        position += n as u64;
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            if n >= iov[start].iov_len {
                n -= iov[start].iov_len;
                start += 1;
            } else {
                // SAFETY: advancing inside the same iovec.
                iov[start].iov_base = unsafe { iov[start].iov_base.cast::<u8>().add(n).cast() };
                iov[start].iov_len -= n;
                n = 0;
            }
        }
    }
    true
}
