//! Native block I/O between a file (or a block device) and requests' buffers, on worker threads: the
//! data never passes through JavaScript. The model decides (parses, validates, picks the file offset);
//! this pool moves the bytes, writes the virtio-blk status byte and completes the request, raising one
//! interrupt per queue per batch of operations.
//!
//! Once started, a request belongs to its I/O: nothing else can complete it. What a fence (reset, IOTLB
//! change, handover) may find running, and why it is safe:
//!
//! - **Writes are staged**: the data is copied out of the driver's buffers into a buffer of this thread,
//!   a chunk at a time, each copy checked against the request's ticket — then written. A write fenced
//!   mid-way stops at the next chunk: the file holds a prefix of what the driver wrote, never bytes of
//!   memory the driver no longer owns (zeros of a revoked mapping, another request's data).
//! - **Buffered reads from the page cache are zero-copy**: `preadv` straight into the driver's buffers,
//!   with the mappings pinned for the call; the message loop does not answer the kernel while they are
//!   pinned (at its deadline it revokes them: a late read then fails instead of reaching the driver).
//! - **Everything else goes through the aligned staging buffer both ways**: O_DIRECT (the kernel pins
//!   pages for DMA at submission, which no revocation stops), and files on file systems that may pin the
//!   reader's pages too (FUSE with `direct_io`, 9p, network file systems: only block devices and local
//!   page-cache file systems are read zero-copy). Guest memory is then touched only by ticket-checked
//!   copies.
//! - **A write still running when its request was fenced (a ghost) never lands after a newer write to
//!   the same bytes**: every transfer is registered with its range before its first byte moves, and a
//!   transfer overlapping a ghost waits until the ghost's system call returns.
//!
//! Memory per thread is one staging buffer of [`STAGE`] bytes, whatever the request's size.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vduse_core::chain::Shape;
use vduse_core::memory::Pins;
use vduse_core::queue::{Owner, Part, Ticket, Virtqueue};
use vduse_core::ram_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;

/// Bytes one staging copy moves (and the size of each thread's staging buffer, aligned for O_DIRECT).
pub const STAGE: usize = 1 << 20;
const ALIGN: usize = 4096;
/// Operations one thread takes from the queue at a time (a fair share of a large batch, at most this).
const TAKE: usize = 64;

/// One block operation on a request: where in which file, and how many header bytes to skip.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub ticket: Ticket,
    pub fd: i32,
    pub kind: u8,
    pub position: u64,
    /// Bytes of the readable buffers to skip before the data (the virtio-blk header of a write).
    pub skip: u32,
}

/// The system calls the pool makes: the real ones, or a test's (to make I/O slow at a chosen moment).
pub trait Syscalls: Send + Sync + 'static {
    fn pread(&self, fd: i32, buf: &mut [u8], position: u64) -> std::io::Result<usize> {
        // SAFETY: reading into a buffer we own, of its length.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), position as libc::off_t) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    /// # Safety
    /// Every iovec points at memory valid for writing for the duration of the call.
    unsafe fn preadv(&self, fd: i32, iov: &[libc::iovec], position: u64) -> std::io::Result<usize> {
        // SAFETY: forwarded from the caller.
        let n = unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as i32, position as libc::off_t) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn pwrite(&self, fd: i32, buf: &[u8], position: u64) -> std::io::Result<usize> {
        // SAFETY: writing from a buffer we own, of its length.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), position as libc::off_t) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn fdatasync(&self, fd: i32) -> std::io::Result<()> {
        // SAFETY: fdatasync on a caller-provided fd; a bad fd just fails.
        if unsafe { libc::fdatasync(fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The kernel's system calls.
pub struct Kernel;

impl Syscalls for Kernel {}

/// Whether `fd` was opened with O_DIRECT: the kernel then pins the pages it transfers at submission, so
/// neither a fence nor a revocation could stop a transfer in flight. Asked per operation, so a backend
/// cannot get it wrong.
fn is_direct(fd: i32) -> bool {
    // SAFETY: F_GETFL on a caller-provided fd; a bad fd just fails.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

/// Whether a buffered read of `fd` copies from the page cache into the reader's memory page by page (so a
/// revocation stops it at the next page): a block device, or a regular file on a local page-cache file
/// system. Others — FUSE (`direct_io` pins the reader's pages), 9p, NFS, CIFS, overlays of unknown
/// lower layers — are read through the staging buffer.
pub fn zero_copy_reads(fd: i32) -> bool {
    // SAFETY: fstat into a zeroed struct we own; a bad fd just fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFBLK => true,
        libc::S_IFREG => {
            // SAFETY: fstatfs into a zeroed struct we own.
            let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
                return false;
            }
            // ext2/3/4, XFS, Btrfs, tmpfs, F2FS, bcachefs.
            const PAGE_CACHE: [i64; 6] = [
                0xEF53,
                0x5846_5342,
                0x9123_683E,
                0x0102_1994,
                0xF2F5_2010,
                0xCA45_1A4E,
            ];
            PAGE_CACHE.contains(&(fs.f_type as i64))
        }
        _ => false,
    }
}

#[derive(Default)]
pub struct IoStats {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    /// Operations whose request was fenced before they started.
    pub skipped: AtomicU64,
    /// Operations whose request was fenced while they ran (their data stopped where it was).
    pub fenced: AtomicU64,
    /// Operations that waited for a fenced write still running on the same bytes.
    pub ordered: AtomicU64,
}

/// An operation, and its request's shape once it was taken over (`begin_native`).
#[derive(Clone, Copy)]
struct Job {
    op: Op,
    shape: Option<Shape>,
}

/// A transfer that may be moving bytes: registered before its first byte moves, until its last
/// system call returned.
struct Running {
    id: u64,
    ticket: Ticket,
    fd: i32,
    start: u64,
    end: u64,
}

impl Running {
    fn overlaps(&self, fd: i32, start: u64, end: u64) -> bool {
        self.fd == fd && self.start < end && start < self.end
    }
}

#[derive(Default)]
struct State {
    ready: VecDeque<Job>,
    /// Waiting for a ghost on their bytes to end.
    waiting: Vec<(Job, u64, u64)>,
    running: Vec<Running>,
    next_id: u64,
    /// Threads working through a batch.
    busy: usize,
    stop: bool,
}

impl State {
    fn idle(&self) -> bool {
        self.ready.is_empty() && self.waiting.is_empty() && self.busy == 0
    }
}

struct Shared {
    state: Mutex<State>,
    /// Work is ready (or the pool stops).
    work: Condvar,
    /// A transfer ended or a thread went idle.
    changed: Condvar,
    queues: Vec<Arc<Virtqueue>>,
    syscalls: Arc<dyn Syscalls>,
    stats: IoStats,
    alive: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ticket`'s request is still in flight (neither completed nor fenced).
    fn is_live(&self, ticket: Ticket) -> bool {
        self.queues
            .get(usize::from(ticket.queue()))
            .is_some_and(|q| q.is_live(ticket))
    }

    /// Whether a registered transfer on `[start, end)` of `fd` belongs to a request no longer in flight:
    /// a ghost whose write may still land.
    fn ghost_overlaps(&self, state: &State, fd: i32, start: u64, end: u64) -> bool {
        state
            .running
            .iter()
            .any(|r| r.overlaps(fd, start, end) && !self.is_live(r.ticket))
    }

    /// A transfer ended: operations that waited for it (or for the ghost it was) may go.
    fn unregister(&self, id: u64) {
        let mut s = self.lock();
        s.running.retain(|r| r.id != id);
        let waiting = std::mem::take(&mut s.waiting);
        let mut woke = false;
        for (job, start, end) in waiting {
            let fd = job.op.fd;
            if !self.is_live(job.op.ticket) {
                // Fenced while it waited: nothing of it ever ran.
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            } else if self.ghost_overlaps(&s, fd, start, end) {
                s.waiting.push((job, start, end));
            } else {
                s.ready.push_front(job);
                woke = true;
            }
        }
        // Stopping, and nothing left to wait for: the threads parked on `work` must see it and exit.
        let done = s.stop && s.waiting.is_empty();
        drop(s);
        if done {
            self.work.notify_all();
        } else if woke {
            self.work.notify_one();
        }
        self.changed.notify_all();
    }
}

pub struct IoPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    pub fn new(threads: usize, queues: Vec<Arc<Virtqueue>>) -> std::io::Result<Self> {
        Self::with_syscalls(threads, queues, Arc::new(Kernel))
    }

    pub fn with_syscalls(
        threads: usize,
        queues: Vec<Arc<Virtqueue>>,
        syscalls: Arc<dyn Syscalls>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            changed: Condvar::new(),
            queues,
            syscalls,
            stats: IoStats::default(),
            alive: std::sync::atomic::AtomicUsize::new(threads.max(1)),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vduse-io-{i}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        Ok(Self {
            shared,
            threads: Mutex::new(handles),
        })
    }

    pub fn stats(&self) -> &IoStats {
        &self.shared.stats
    }

    /// Queues operations (ignored once the pool is stopping: their requests stay in flight).
    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) {
        let mut s = self.shared.lock();
        if s.stop {
            return;
        }
        let before = s.ready.len();
        s.ready.extend(ops.into_iter().map(|op| Job { op, shape: None }));
        let added = s.ready.len() - before;
        drop(s);
        if added > 1 {
            self.shared.work.notify_all();
        } else if added == 1 {
            self.shared.work.notify_one();
        }
    }

    /// Waits until nothing is queued, waiting or running — or `deadline`; true if so. What runs then may
    /// still be a ghost write of a fenced request: false means "not known to be over", never "done".
    pub fn quiet(&self, deadline: Instant) -> bool {
        self.wait(deadline, |s| s.idle() && s.running.is_empty())
    }

    /// Waits until no transfer overlaps `[start, end)` of `fd` (running or waiting its turn), or
    /// `deadline`; true if none does.
    pub fn quiet_range(&self, fd: i32, start: u64, end: u64, deadline: Instant) -> bool {
        self.wait(deadline, |s| {
            !s.running.iter().any(|r| r.overlaps(fd, start, end))
                && !s
                    .waiting
                    .iter()
                    .any(|(j, a, b)| j.op.fd == fd && *a < end && start < *b)
        })
    }

    /// Whether no transfer overlaps `[start, end)` of `fd` right now (running, or waiting its turn).
    pub fn range_is_quiet(&self, fd: i32, start: u64, end: u64) -> bool {
        self.quiet_range(fd, start, end, Instant::now())
    }

    /// Worker threads still running (they exit once the pool is stopped and nothing is left).
    pub fn threads_alive(&self) -> usize {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Transfers running for requests that are no longer in flight.
    pub fn ghosts(&self) -> usize {
        let s = self.shared.lock();
        s.running
            .iter()
            .filter(|r| !self.shared.is_live(r.ticket))
            .count()
    }

    fn wait(&self, deadline: Instant, mut done: impl FnMut(&State) -> bool) -> bool {
        let mut s = self.shared.lock();
        loop {
            if done(&s) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether nothing is queued, waiting or running right now.
    pub fn is_quiet(&self) -> bool {
        self.quiet(Instant::now())
    }

    /// Finishes what was queued and stops the threads, waiting until `deadline`; false if they were not
    /// done by then (they finish and exit on their own; nothing new starts).
    pub fn stop(&self, deadline: Instant) -> bool {
        let quiet = self.quiet(deadline);
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        if !quiet {
            return false;
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        true
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        let running = !self.threads.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        if running && !self.stop(Instant::now() + std::time::Duration::from_secs(5)) {
            log::warn!("native I/O still running at close: its threads finish in the background");
        }
    }
}

/// A `STAGE`-byte buffer aligned for O_DIRECT, owned by one thread.
struct Stage {
    ptr: std::ptr::NonNull<u8>,
}

impl Stage {
    fn layout() -> std::alloc::Layout {
        // STAGE and ALIGN are non-zero powers of two.
        std::alloc::Layout::from_size_align(STAGE, ALIGN).expect("a valid layout")
    }

    fn new() -> Option<Self> {
        // SAFETY: a non-zero-sized layout.
        let ptr = unsafe { std::alloc::alloc(Self::layout()) };
        std::ptr::NonNull::new(ptr).map(|ptr| Self { ptr })
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` owns STAGE bytes (len is clamped to it), borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len.min(STAGE)) }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout()) };
    }
}

/// Per-thread scratch: the staging buffer, the pins and iovecs of a zero-copy read, and which files may
/// be read zero-copy (a backend's fd stays open as long as the device that submits its operations).
struct Scratch {
    stage: Stage,
    iov: Vec<libc::iovec>,
    pins: Pins,
    zero_copy: Vec<(i32, bool)>,
}

impl Scratch {
    fn zero_copy(&mut self, fd: i32) -> bool {
        if let Some(&(_, z)) = self.zero_copy.iter().find(|(f, _)| *f == fd) {
            return z;
        }
        let z = zero_copy_reads(fd);
        self.zero_copy.push((fd, z));
        z
    }
}

fn worker(shared: &Shared) {
    /// Counts the thread out however it ends.
    struct Alive<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Alive<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _alive = Alive(&shared.alive);
    let Some(stage) = Stage::new() else {
        log::error!("native I/O: cannot allocate a staging buffer; this thread serves nothing");
        return;
    };
    let mut scratch = Scratch {
        stage,
        iov: Vec::new(),
        pins: Pins::new(),
        zero_copy: Vec::new(),
    };
    let mut batch = Vec::new();
    let mut touched = vec![false; shared.queues.len()];
    loop {
        {
            let mut s = shared.lock();
            while s.ready.is_empty() && !(s.stop && s.waiting.is_empty()) {
                s = shared.work.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.ready.is_empty() {
                return; // stopping, and nothing left
            }
            let n = s.ready.len().div_ceil(2).clamp(1, TAKE);
            batch.extend(s.ready.drain(..n));
            s.busy += 1;
        }
        for job in batch.drain(..) {
            if let Some(q) = run(shared, job, &mut scratch) {
                touched[q] = true;
            }
        }
        for (q, t) in touched.iter_mut().enumerate() {
            if std::mem::take(t) {
                shared.queues[q].notify();
            }
        }
        let mut s = shared.lock();
        s.busy -= 1;
        drop(s);
        shared.changed.notify_all();
    }
}

/// Runs one job; returns the queue it completed a request of.
fn run(shared: &Shared, job: Job, scratch: &mut Scratch) -> Option<usize> {
    let op = job.op;
    let q = usize::from(op.ticket.queue());
    let vq = shared.queues.get(q)?;
    let shape = match job.shape {
        Some(shape) => shape,
        None => {
            // Take the request over: from here on only this operation completes it.
            let Some(shape) = vq.begin_native(op.ticket) else {
                shared.stats.skipped.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            shared.stats.ops.fetch_add(1, Ordering::Relaxed);
            shape
        }
    };
    let range = data_len(&op, shape).map(|len| (op.position, op.position.saturating_add(len)));
    let mut id = None;
    if let Some((start, end)) = range.filter(|(a, b)| a < b) {
        let mut s = shared.lock();
        if shared.ghost_overlaps(&s, op.fd, start, end) {
            // A fenced write may still land on these bytes: go after it, never before.
            shared.stats.ordered.fetch_add(1, Ordering::Relaxed);
            s.waiting.push((
                Job {
                    op,
                    shape: Some(shape),
                },
                start,
                end,
            ));
            return None;
        }
        s.next_id += 1;
        let n = s.next_id;
        s.running.push(Running {
            id: n,
            ticket: op.ticket,
            fd: op.fd,
            start,
            end,
        });
        id = Some(n);
    }
    let outcome = execute(shared, vq, op, shape, scratch);
    if let Some(id) = id {
        shared.unregister(id);
    }
    let Some((status, used)) = outcome else {
        // Fenced mid-way: nothing to answer, and nothing more was moved.
        shared.stats.fenced.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    if status != VIRTIO_BLK_S_OK {
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    vq.complete_native(op.ticket, used, Some(status));
    Some(q)
}

/// How many bytes of data a read or write moves (a read's last writable byte is its status); `None`
/// for operations that move none.
fn data_len(op: &Op, shape: Shape) -> Option<u64> {
    match op.kind {
        OP_READ => Some(u64::from(shape.writable_bytes).saturating_sub(1)),
        OP_WRITE => Some(u64::from(shape.readable_bytes).saturating_sub(u64::from(op.skip))),
        _ => None,
    }
}

/// Moves the data; `(status, used length)`, or `None` if the request was fenced on the way.
fn execute(
    shared: &Shared,
    vq: &Virtqueue,
    op: Op,
    shape: Shape,
    scratch: &mut Scratch,
) -> Option<(u8, u32)> {
    let sys = shared.syscalls.as_ref();
    if shape.writable == 0 {
        return Some((VIRTIO_BLK_S_IOERR, 0)); // no status byte: nothing meaningful can be said
    }
    match op.kind {
        OP_FLUSH => Some(match sys.fdatasync(op.fd) {
            Ok(()) => (VIRTIO_BLK_S_OK, 1),
            Err(_) => (VIRTIO_BLK_S_IOERR, 1),
        }),
        OP_READ => {
            let len = data_len(&op, shape).unwrap_or(0);
            let ok = if len == 0 {
                true
            } else if is_direct(op.fd) || !scratch.zero_copy(op.fd) {
                read_staged(sys, vq, op, len, &mut scratch.stage)?
            } else {
                read_pinned(sys, vq, op, len, scratch)?
            };
            Some(if ok {
                (VIRTIO_BLK_S_OK, 1 + len as u32)
            } else {
                (VIRTIO_BLK_S_IOERR, 1)
            })
        }
        OP_WRITE => {
            let len = data_len(&op, shape).unwrap_or(0);
            let ok = write_staged(sys, vq, op, len, &mut scratch.stage)?;
            Some(if ok {
                (VIRTIO_BLK_S_OK, 1)
            } else {
                (VIRTIO_BLK_S_IOERR, 1)
            })
        }
        _ => Some((VIRTIO_BLK_S_IOERR, 1)),
    }
}

/// Copies the data out of the driver's buffers a chunk at a time (ticket-checked), writing each chunk
/// before the next is copied. `None`: fenced (what was written is a prefix of the driver's data).
fn write_staged(sys: &dyn Syscalls, vq: &Virtqueue, op: Op, len: u64, stage: &mut Stage) -> Option<bool> {
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(STAGE);
        let buf = stage.get(n);
        match vq.read_request(op.ticket, Owner::Native, u64::from(op.skip) + at, buf) {
            Err(_) => return None,
            Ok(k) if k != n => return Some(false),
            Ok(_) => {}
        }
        if !write_all(sys, op.fd, buf, op.position + at) {
            return Some(false);
        }
        at += n as u64;
    }
    Some(true)
}

/// Reads into the staging buffer a chunk at a time and copies each into the driver's buffers
/// (ticket-checked). `None`: fenced.
fn read_staged(sys: &dyn Syscalls, vq: &Virtqueue, op: Op, len: u64, stage: &mut Stage) -> Option<bool> {
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(STAGE);
        let buf = stage.get(n);
        if !read_all(sys, op.fd, buf, op.position + at) {
            return Some(false);
        }
        match vq.write_request(op.ticket, Owner::Native, at, buf) {
            Err(_) => return None,
            Ok(k) if k != n => return Some(false),
            Ok(_) => {}
        }
        at += n as u64;
    }
    Some(true)
}

/// `preadv` straight into the driver's buffers, their mappings pinned for the call. `None`: fenced
/// before it started.
fn read_pinned(sys: &dyn Syscalls, vq: &Virtqueue, op: Op, len: u64, scratch: &mut Scratch) -> Option<bool> {
    let pinned = vq.pin(
        op.ticket,
        Owner::Native,
        Part::Writable,
        0,
        len,
        &mut scratch.pins,
    );
    let ok = match pinned {
        Err(_) => {
            scratch.pins.release();
            return None;
        }
        Ok(false) => false,
        Ok(true) => {
            scratch.iov.clear();
            scratch
                .iov
                .extend(scratch.pins.ranges().iter().map(|&(p, n)| libc::iovec {
                    iov_base: p.cast(),
                    iov_len: n,
                }));
            // SAFETY: the iovecs point into mappings pinned (kept mapped, and not given back to the
            // kernel by the message loop) until the pins are released below.
            unsafe { readv_all(sys, op.fd, &mut scratch.iov, op.position) }
        }
    };
    scratch.pins.release();
    Some(ok)
}

fn write_all(sys: &dyn Syscalls, fd: i32, mut buf: &[u8], mut position: u64) -> bool {
    while !buf.is_empty() {
        match sys.pwrite(fd, buf, position) {
            Ok(0) => return false,
            Ok(n) => {
                buf = &buf[n.min(buf.len())..];
                position += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads `buf` whole; past the end of the file the rest reads as zeroes.
fn read_all(sys: &dyn Syscalls, fd: i32, buf: &mut [u8], mut position: u64) -> bool {
    let mut at = 0;
    while at < buf.len() {
        match sys.pread(fd, &mut buf[at..], position) {
            Ok(0) => {
                buf[at..].fill(0);
                return true;
            }
            Ok(n) => {
                at += n.min(buf.len() - at);
                position += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads all of `iov` at `position`, retrying partial transfers; past the end of the file the rest
/// reads as zeroes.
///
/// # Safety
/// Every iovec points at memory valid for writing until this returns.
unsafe fn readv_all(sys: &dyn Syscalls, fd: i32, iov: &mut [libc::iovec], mut position: u64) -> bool {
    let mut start = 0usize;
    while start < iov.len() {
        let chunk = &iov[start..(start + 1024).min(iov.len())];
        // SAFETY: forwarded from the caller.
        let n = match unsafe { sys.preadv(fd, chunk, position) } {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        if n == 0 {
            for v in &iov[start..] {
                // SAFETY: as above; zeroing the remaining destination bytes.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return true;
        }
        position += n as u64;
        let mut n = n;
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
