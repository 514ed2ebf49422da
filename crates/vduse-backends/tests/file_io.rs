//! Native block I/O under fences, with system calls made slow at chosen moments: a fenced write never
//! writes bytes the driver did not write for it (no zeros of revoked memory, nothing the driver put in its
//! buffers afterwards), never lands after a newer write to the same bytes, and a zero-copy read keeps the
//! memory it writes into pinned until its system call returns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vduse_backends::file_io::{IoPool, Kernel, Op, Syscalls, OP_READ, OP_WRITE, STAGE};
use vduse_core::queue::{Budget, Pop, RequestBatch, Ticket, Virtqueue};
use vduse_core::ram_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vduse_core::rig::{desc, offer, used, DriverRing, Rig};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;

/// Real system calls, except that a `pwrite`/`preadv` at a chosen file position waits at a gate until
/// the test opens it.
#[derive(Default)]
struct Gated {
    /// Positions whose transfers wait.
    closed: Mutex<Vec<u64>>,
    /// Transfers waiting at the gate right now.
    waiting: Mutex<usize>,
    changed: Condvar,
}

impl Gated {
    fn close(&self, position: u64) {
        self.closed.lock().unwrap().push(position);
    }

    fn open(&self, position: u64) {
        self.closed.lock().unwrap().retain(|&p| p != position);
        self.changed.notify_all();
    }

    fn wait_at(&self, position: u64) {
        let mut closed = self.closed.lock().unwrap();
        if !closed.contains(&position) {
            return;
        }
        *self.waiting.lock().unwrap() += 1;
        self.changed.notify_all();
        while closed.contains(&position) {
            closed = self.changed.wait(closed).unwrap();
        }
        *self.waiting.lock().unwrap() -= 1;
    }

    /// Waits until `n` transfers wait at the gate.
    fn until_waiting(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut waiting = self.waiting.lock().unwrap();
        while *waiting < n {
            assert!(Instant::now() < deadline, "a transfer reached the gate");
            waiting = self
                .changed
                .wait_timeout(waiting, Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }
}

/// `Arc<Gated>` as the pool's system calls.
struct Gate(Arc<Gated>);

impl Syscalls for Gate {
    fn pwrite(&self, fd: i32, buf: &[u8], position: u64) -> std::io::Result<usize> {
        self.0.wait_at(position);
        Kernel.pwrite(fd, buf, position)
    }

    unsafe fn preadv(&self, fd: i32, iov: &[libc::iovec], position: u64) -> std::io::Result<usize> {
        self.0.wait_at(position);
        // SAFETY: forwarded from the caller.
        unsafe { Kernel.preadv(fd, iov, position) }
    }
}

/// A disk image in a temporary file, filled with `fill`, opened with `flags` (O_DIRECT, say).
fn image_with(len: u64, fill: u8, flags: i32) -> File {
    let path = std::env::temp_dir().join(format!(
        "vduse-file-io-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&path, vec![fill; len as usize]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

struct Setup {
    rig: Rig,
    driver_mem: Arc<File>,
    ring: DriverRing,
    q: Arc<Virtqueue>,
    gate: Arc<Gated>,
    pool: IoPool,
    disk: File,
}

impl Setup {
    /// A handover of the I/O: only when nothing of the old pool can still write (else refused), the
    /// successor's pool takes over. True if it happened.
    fn handover(&mut self) -> bool {
        if !self.pool.quiet(Instant::now() + Duration::from_millis(2)) {
            return false;
        }
        assert!(self.pool.stop(Instant::now() + Duration::from_secs(5)));
        self.pool =
            IoPool::with_syscalls(2, vec![self.q.clone()], Arc::new(Gate(self.gate.clone()))).unwrap();
        true
    }
}

fn setup(disk_len: u64) -> Setup {
    setup_with(disk_len, 0)
}

fn setup_with(disk_len: u64, flags: i32) -> Setup {
    let (rig, driver_mem) = Rig::memfd_backed(8 << 20);
    let (ring, q) = rig.queue(16, false);
    let gate = Arc::new(Gated::default());
    let pool = IoPool::with_syscalls(2, vec![q.clone()], Arc::new(Gate(gate.clone()))).unwrap();
    Setup {
        rig,
        driver_mem,
        ring,
        q,
        gate,
        pool,
        disk: image_with(disk_len, 0x11, flags),
    }
}

impl Setup {
    /// A write of `len` bytes of `byte` at file offset `position`, as head `h` (descriptors 3h..3h+2),
    /// its data in the driver's memory at `data`; popped and handed to the pool.
    fn write(&self, h: u16, position: u64, len: u32, byte: u8, data: u64) -> Ticket {
        self.request(h, VIRTIO_BLK_T_OUT, position, len, data, Some(byte))
    }

    fn read(&self, h: u16, position: u64, len: u32, data: u64) -> Ticket {
        self.request(h, VIRTIO_BLK_T_IN, position, len, data, None)
    }

    fn request(&self, h: u16, kind: u32, position: u64, len: u32, data: u64, fill: Option<u8>) -> Ticket {
        let hdr = 0x10_000 + 0x100 * u64::from(h);
        self.rig.header(hdr, kind, position / 512);
        let data_flags = if fill.is_some() { N } else { W | N };
        if let Some(byte) = fill {
            self.rig
                .map
                .write_slice(&vec![byte; len as usize], GuestAddress(data))
                .unwrap();
        }
        let d = 3 * h;
        offer(
            &self.ring,
            &[
                (d, desc(hdr, 16, N, d + 1)),
                (d + 1, desc(data, len, data_flags, d + 2)),
                (d + 2, desc(hdr + 0x80, 1, W, 0)),
            ],
            &[d],
        );
        let mut batch = RequestBatch::default();
        assert_ne!(self.q.pop(Budget::default(), &mut batch), Pop::Full);
        assert_eq!(batch.len(), 1);
        let ticket = batch.get(0).unwrap().ticket;
        let kind = if fill.is_some() { OP_WRITE } else { OP_READ };
        self.pool.submit([Op {
            ticket,
            fd: self.disk.as_raw_fd(),
            kind,
            position,
            skip: if fill.is_some() { 16 } else { 0 },
        }]);
        ticket
    }

    /// Waits until the used ring holds `n` entries.
    fn completed(&self, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done = used(&self.ring, 0);
            if done.len() >= n {
                return done;
            }
            assert!(Instant::now() < deadline, "{n} completions (have {done:?})");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn disk_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.disk.read_exact_at(&mut buf, at).unwrap();
        buf
    }
}

#[test]
fn a_write_fenced_while_it_runs_writes_only_what_the_driver_wrote_for_it() {
    let s = setup(4 << 20);
    let len = 2 * STAGE as u32;
    // The first chunk's write waits at the gate…
    s.gate.close(0);
    let t = s.write(0, 0, len, 0xab, 0x10_0000);
    s.gate.until_waiting(1);
    // …while the driver resets: the request is fenced, its memory revoked, and the driver reuses it.
    let (fenced, maps) = s.q.fence_where(|_, _| true);
    assert_eq!(fenced, 1);
    for m in s.rig.memory.peek().mappings() {
        m.revoke().unwrap();
    }
    s.driver_mem
        .write_all_at(&vec![0xcd; len as usize], 0x10_0000)
        .unwrap();
    s.gate.open(0);
    assert!(s.pool.quiet(Instant::now() + Duration::from_secs(20)));
    let disk = s.disk_bytes(0, len as usize);
    let (first, rest) = disk.split_at(STAGE);
    assert!(
        first.iter().all(|&b| b == 0xab),
        "the chunk copied before the fence is the driver's data"
    );
    assert!(
        rest.iter().all(|&b| b == 0x11),
        "nothing after the fence reached the disk: no zeros of revoked memory, no bytes the driver \
         wrote later (found {:#x})",
        rest.iter().find(|&&b| b != 0x11).copied().unwrap_or(0)
    );
    // (The device's view of that memory is revoked now: the used ring is read from the driver's memfd.)
    let mut used_idx = [0u8; 2];
    s.driver_mem
        .read_exact_at(&mut used_idx, s.ring.used + 2)
        .unwrap();
    assert_eq!(used_idx, [0, 0], "a fenced request is not answered");
    assert_eq!(
        s.pool.stats().fenced.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let _ = (t, maps);
}

#[test]
fn a_fenced_write_still_running_never_lands_after_a_newer_write() {
    let s = setup(1 << 20);
    s.gate.close(0);
    s.write(0, 0, 64 << 10, 0xaa, 0x10_0000);
    s.gate.until_waiting(1);
    // The driver resets and, in its next session, writes the same bytes again.
    assert_eq!(s.q.fence_where(|_, _| true).0, 1);
    assert_eq!(s.pool.ghosts(), 1, "the fenced write is still in its system call");
    s.write(1, 0, 64 << 10, 0xbb, 0x20_0000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.pool.stats().ordered.load(std::sync::atomic::Ordering::Relaxed) == 0
        && used(&s.ring, 0).is_empty()
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        used(&s.ring, 0).is_empty(),
        "the new write waits for the ghost on its bytes"
    );
    s.gate.open(0);
    assert_eq!(s.completed(1), vec![(3, 1)]);
    assert!(
        s.disk_bytes(0, 64 << 10).iter().all(|&b| b == 0xbb),
        "the acknowledged write is what the disk holds"
    );
    assert_eq!(s.pool.ghosts(), 0);
}

#[test]
fn a_zero_copy_read_keeps_its_memory_pinned_until_its_system_call_returns() {
    let s = setup(1 << 20);
    s.disk.write_all_at(&[0x77; 4096], 8192).unwrap();
    s.gate.close(8192);
    s.read(0, 8192, 4096, 0x10_0000);
    s.gate.until_waiting(1);
    let pinned = || s.rig.memory.peek().mappings().iter().any(|m| m.is_pinned());
    assert!(pinned(), "a read into the driver's buffers pins them");
    assert_eq!(s.q.fence_where(|_, _| true).0, 1);
    assert!(
        pinned(),
        "fenced or not, the system call may still write: the loop must not answer yet"
    );
    assert!(!s.pool.quiet(Instant::now() + Duration::from_millis(50)));
    s.gate.open(8192);
    assert!(s.pool.quiet(Instant::now() + Duration::from_secs(20)));
    assert!(!pinned());
    assert!(used(&s.ring, 0).is_empty(), "fenced: not answered");
}

#[test]
fn reads_and_writes_round_trip_staged_and_zero_copy() {
    let s = setup(8 << 20);
    // Larger than a stage, so writes go in several chunks; reads go straight into guest memory.
    let len = STAGE as u32 + 8192;
    s.write(0, 4096, len, 0x5a, 0x10_0000);
    assert_eq!(s.completed(1), vec![(0, 1)]);
    s.read(1, 4096, len, 0x30_0000);
    assert_eq!(s.completed(2)[1], (3, len + 1));
    let mut back = vec![0u8; len as usize];
    s.rig.map.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(s.disk_bytes(0, 4096), vec![0x11; 4096], "nothing before it");
    // Past the end of the file a read sees zeroes, not an error.
    s.read(2, 8 << 20, 4096, 0x30_0000);
    assert_eq!(s.completed(3)[2], (6, 4097));
}

#[test]
fn o_direct_goes_through_the_stage_both_ways_in_chunks() {
    let s = setup_with(8 << 20, libc::O_DIRECT);
    let len = 2 * STAGE as u32 + 4096;
    s.write(0, 4096, len, 0x3c, 0x10_0000);
    assert_eq!(s.completed(1), vec![(0, 1)]);
    s.read(1, 4096, len, 0x40_0000);
    assert_eq!(s.completed(2)[1], (3, len + 1));
    let mut back = vec![0u8; len as usize];
    s.rig.map.read_slice(&mut back, GuestAddress(0x40_0000)).unwrap();
    assert!(back.iter().all(|&b| b == 0x3c));
}

#[test]
fn a_read_with_nothing_but_a_status_byte_is_answered_without_a_transfer() {
    for flags in [0, libc::O_DIRECT] {
        let s = setup_with(1 << 20, flags);
        let hdr = 0x10_000;
        s.rig.header(hdr, VIRTIO_BLK_T_IN, 0);
        offer(
            &s.ring,
            &[(0, desc(hdr, 16, N, 1)), (1, desc(hdr + 0x80, 1, W, 0))],
            &[0],
        );
        let mut batch = RequestBatch::default();
        s.q.pop(Budget::default(), &mut batch);
        s.pool.submit([Op {
            ticket: batch.get(0).unwrap().ticket,
            fd: s.disk.as_raw_fd(),
            kind: OP_READ,
            position: 0,
            skip: 0,
        }]);
        assert_eq!(s.completed(1), vec![(0, 1)], "flags {flags:#x}");
        assert_eq!(
            s.rig.map.read_obj::<u8>(GuestAddress(hdr + 0x80)).unwrap(),
            0,
            "OK"
        );
    }
}

#[test]
fn stop_is_bounded_while_a_system_call_hangs() {
    let s = setup(1 << 20);
    s.gate.close(0);
    s.write(0, 0, 4096, 0x42, 0x10_0000);
    s.gate.until_waiting(1);
    assert!(
        !s.pool.stop(Instant::now() + Duration::from_millis(50)),
        "not quiet: the caller must not go on as if it were"
    );
    assert!(!s.pool.quiet_range(s.disk.as_raw_fd(), 0, 4096, Instant::now()));
    assert!(s.pool.quiet_range(s.disk.as_raw_fd(), 4096, 8192, Instant::now()));
    s.gate.open(0);
    assert!(s.pool.quiet(Instant::now() + Duration::from_secs(20)));
}

/// A small xorshift generator: the property test below is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the driver knows of one write.
#[derive(Clone, Copy)]
struct Written {
    byte: u8,
    first: u64,
    blocks: u64,
    submitted: u64,
    /// When it ended: acknowledged (seen in the used ring) or fenced.
    ended: Option<(u64, bool)>,
    head: u16,
    ticket: Ticket,
}

#[test]
fn fenced_writes_never_land_on_newer_acknowledged_ones_whatever_the_timing() {
    const BLOCK: u64 = 4096;
    const BLOCKS: u64 = 32;
    let seeds: u64 = std::env::var("VDUSE_FILE_IO_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut handovers = 0;
    for seed in 1..=seeds {
        let mut s = setup(BLOCKS * BLOCK);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x1000_0001));
        let mut clock = 0u64;
        let mut writes: Vec<Written> = Vec::new();
        let mut seen = 0usize;
        let mut closed: Vec<u64> = Vec::new();
        // The driver learns of completions by reading its used ring (never earlier than they happened).
        let observe = |s: &Setup, writes: &mut Vec<Written>, seen: &mut usize, clock: &mut u64| {
            let done = used(&s.ring, 0);
            for &(head, len) in &done[*seen..] {
                *clock += 1;
                let w = writes
                    .iter_mut()
                    .find(|w| u32::from(3 * w.head) == head && w.ended.is_none())
                    .expect("a completion of a write in flight");
                assert_eq!(len, 1);
                w.ended = Some((*clock, true));
            }
            *seen = done.len();
        };
        for _ in 0..40 {
            observe(&s, &mut writes, &mut seen, &mut clock);
            match rng.below(10) {
                0..=5 => {
                    let busy: Vec<u16> = writes
                        .iter()
                        .filter(|w| w.ended.is_none())
                        .map(|w| w.head)
                        .collect();
                    let Some(head) = (0..5u16).find(|h| !busy.contains(h)) else {
                        continue;
                    };
                    let first = rng.below(BLOCKS);
                    let blocks = 1 + rng.below((BLOCKS - first).min(4));
                    let byte = 0x20 + writes.len() as u8;
                    if rng.below(3) == 0 && !closed.contains(&(first * BLOCK)) {
                        s.gate.close(first * BLOCK);
                        closed.push(first * BLOCK);
                    }
                    clock += 1;
                    let ticket = s.write(
                        head,
                        first * BLOCK,
                        (blocks * BLOCK) as u32,
                        byte,
                        0x10_0000 + u64::from(head) * 0x10_0000,
                    );
                    writes.push(Written {
                        byte,
                        first,
                        blocks,
                        submitted: clock,
                        ended: None,
                        head,
                        ticket,
                    });
                }
                6 | 7 => {
                    // A reset: everything in flight is fenced (their heads are free again). What
                    // completed before it is in the used ring: seen first.
                    s.q.fence_where(|_, _| true);
                    observe(&s, &mut writes, &mut seen, &mut clock);
                    clock += 1;
                    for w in writes.iter_mut().filter(|w| w.ended.is_none()) {
                        assert!(!s.q.is_live(w.ticket));
                        w.ended = Some((clock, false));
                    }
                }
                8 => {
                    // An upgrade: refused while a transfer of the old server could still write.
                    handovers += usize::from(s.handover());
                }
                _ => {
                    if let Some(p) = closed.pop() {
                        s.gate.open(p);
                    }
                    std::thread::sleep(Duration::from_millis(rng.below(3)));
                }
            }
        }
        for p in closed.drain(..) {
            s.gate.open(p);
        }
        assert!(
            s.pool.quiet(Instant::now() + Duration::from_secs(30)),
            "seed {seed}"
        );
        observe(&s, &mut writes, &mut seen, &mut clock);
        for block in 0..BLOCKS {
            let bytes = s.disk_bytes(block * BLOCK, BLOCK as usize);
            let c = bytes[0];
            assert!(
                bytes.iter().all(|&b| b == c),
                "seed {seed}: block {block} is torn"
            );
            let covers = |w: &&Written| w.first <= block && block < w.first + w.blocks;
            let acked: Vec<&Written> = writes
                .iter()
                .filter(covers)
                .filter(|w| matches!(w.ended, Some((_, true))))
                .collect();
            if c == 0x11 {
                assert!(
                    acked.is_empty(),
                    "seed {seed}: block {block} lost an acknowledged write"
                );
                continue;
            }
            let w = writes
                .iter()
                .filter(covers)
                .find(|w| w.byte == c)
                .unwrap_or_else(|| {
                    panic!("seed {seed}: block {block} holds {c:#x}, which no write wrote there")
                });
            let (ended, _) = w.ended.expect("every write ended");
            // Any acknowledged write the driver issued after this one ended must have won.
            for a in acked {
                assert!(
                    a.submitted < ended || a.byte == c,
                    "seed {seed}: block {block} holds {c:#x}, written before {:#x} was issued and \
                     acknowledged",
                    a.byte
                );
            }
        }
    }
    assert!(handovers > 0, "some handovers went through");
}

#[test]
fn a_stopped_pool_whose_waiting_operations_were_fenced_lets_its_threads_go() {
    let s = setup(1 << 20);
    s.gate.close(0);
    s.write(0, 0, 4096, 0xa1, 0x10_0000);
    s.gate.until_waiting(1);
    assert_eq!(s.q.fence_where(|_, _| true).0, 1);
    // A newer write on the ghost's bytes waits for it…
    s.write(1, 0, 4096, 0xb2, 0x20_0000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.pool.stats().ordered.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    // …the pool is stopped (in vain: the ghost still runs), the waiting write is fenced too, and then the
    // ghost returns: nothing is left, and every thread must notice and exit.
    assert!(!s.pool.stop(Instant::now() + Duration::from_millis(20)));
    assert_eq!(s.q.fence_where(|_, _| true).0, 1);
    s.gate.open(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.pool.threads_alive() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} threads still parked",
            s.pool.threads_alive()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn only_block_devices_and_local_page_cache_files_are_read_zero_copy() {
    let file = image_with(4096, 0, 0);
    assert!(
        vduse_backends::file_io::zero_copy_reads(file.as_raw_fd()),
        "a file under the temporary directory (ext4 or tmpfs here)"
    );
    let proc = File::open("/proc/self/status").unwrap();
    assert!(!vduse_backends::file_io::zero_copy_reads(proc.as_raw_fd()));
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(!vduse_backends::file_io::zero_copy_reads(a.as_raw_fd()));
}
