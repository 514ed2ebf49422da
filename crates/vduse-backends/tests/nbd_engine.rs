//! virtio-blk requests served natively over NBD, against real servers: a driver's ring (the test rig)
//! on one side, qemu-nbd or nbdkit on the other, the server's life events in between — killed,
//! stopped gracefully (ESHUTDOWN), slow, silent, losing its cache — and what the driver sees each time.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vduse_backends::nbd::engine::{Events, Export, NbdEngine, Op, OpKind, Options};
use vduse_core::queue::{Budget, Pop, RequestBatch, Ticket, Virtqueue};
use vduse_core::ram_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vduse_core::rig::{desc, offer, used, DriverRing, Rig};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

mod servers;
use servers::*;

const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;
const BLOCK: u64 = 4096;
/// Where request i's data sits in the driver's memory (64 KiB each).
const DATA: u64 = 0x10_0000;

/// What the engine told: lost slots, failed-as-unavailable counts.
#[derive(Default)]
struct Told {
    lost: Mutex<Option<Sender<usize>>>,
    unavailable: Mutex<usize>,
}

impl Events for Told {
    fn lost(&self, slot: usize, _why: &str) {
        if let Some(tx) = &*self.lost.lock().unwrap() {
            let _ = tx.send(slot);
        }
    }
    fn unavailable(&self, failed: usize) {
        *self.unavailable.lock().unwrap() += failed;
    }
}

struct Setup {
    rig: Rig,
    ring: DriverRing,
    q: Arc<Virtqueue>,
    engine: NbdEngine,
    told: Arc<Told>,
    lost: Receiver<usize>,
    sock: std::path::PathBuf,
    next_head: Mutex<u16>,
}

fn export(size: u64, volatile: bool) -> Export {
    Export {
        size,
        block_size: BLOCK as u32,
        max_payload: 32 << 20,
        max_range: 1 << 30,
        volatile,
        always_fua: false,
    }
}

fn options(slots: usize) -> Options {
    Options {
        slots,
        hang_timeout: None,
        reconnect_timeout: Duration::from_secs(60),
        request_timeout: None,
        keep_unflushed_bytes: 256 << 20,
    }
}

fn setup(sock: &Path, export: Export, opts: Options) -> Setup {
    let (rig, _mem) = Rig::memfd_backed(16 << 20);
    let (ring, q) = rig.queue_sized(256, 16, false);
    let told = Arc::new(Told::default());
    let (tx, lost) = channel();
    *told.lost.lock().unwrap() = Some(tx);
    let engine = NbdEngine::new(vec![q.clone()], export, opts, told.clone()).unwrap();
    let s = Setup {
        rig,
        ring,
        q,
        engine,
        told,
        lost,
        sock: sock.to_owned(),
        next_head: Mutex::new(0),
    };
    for slot in 0..opts.slots {
        s.attach(slot);
    }
    s
}

impl Setup {
    /// Connects slot `slot` (handshake here, as the caller of the engine does it).
    fn attach(&self, slot: usize) {
        let (stream, _, _) = handshake(&self.sock);
        self.engine.attach(slot, OwnedFd::from(stream), true).unwrap();
    }

    /// A request as the driver makes it (header, one data buffer of `len` at request `i`'s data area,
    /// status), popped; returns its ticket and head. Writes carry `fill`.
    fn offer(&self, kind: u32, position: u64, len: u32, fill: Option<&[u8]>, i: u64) -> (Ticket, u16) {
        let h = {
            let mut n = self.next_head.lock().unwrap();
            let h = *n;
            *n = (h + 3) % 255;
            h
        };
        let hdr = 0x1_0000 + 0x100 * u64::from(h);
        self.rig.header(hdr, kind, position / 512);
        let data = DATA + i * (64 << 10);
        let flags = match fill {
            Some(bytes) => {
                self.rig.map.write_slice(bytes, GuestAddress(data)).unwrap();
                N
            }
            None => W | N,
        };
        let status = hdr + 0x80;
        self.rig.map.write_slice(&[0xff], GuestAddress(status)).unwrap();
        let mut table = vec![(h, desc(hdr, 16, N, h + 1))];
        if len > 0 {
            table.push((h + 1, desc(data, len, flags, h + 2)));
            table.push((h + 2, desc(status, 1, W, 0)));
        } else {
            table[0] = (h, desc(hdr, 16, N, h + 2));
            table.push((h + 2, desc(status, 1, W, 0)));
        }
        offer(&self.ring, &table, &[h]);
        let mut batch = RequestBatch::default();
        assert_ne!(self.q.pop(Budget::default(), &mut batch), Pop::Full);
        assert_eq!(batch.len(), 1);
        (batch.get(0).unwrap().ticket, h)
    }

    fn submit(&self, ticket: Ticket, kind: OpKind, position: u64) {
        self.engine.submit([Op {
            ticket,
            kind,
            position,
            fua: false,
        }]);
    }

    fn write(&self, i: u64, position: u64, bytes: &[u8]) -> u16 {
        let (t, h) = self.offer(VIRTIO_BLK_T_OUT, position, bytes.len() as u32, Some(bytes), i);
        self.submit(t, OpKind::Write, position);
        h
    }

    fn read(&self, i: u64, position: u64, len: u32) -> u16 {
        let (t, h) = self.offer(VIRTIO_BLK_T_IN, position, len, None, i);
        self.submit(t, OpKind::Read, position);
        h
    }

    fn flush(&self) -> u16 {
        let (t, h) = self.offer(4, 0, 0, None, 0);
        self.submit(t, OpKind::Flush, 0);
        h
    }

    /// A discard of one range, as request `i`.
    fn discard(&self, i: u64, position: u64, len: u64) -> u16 {
        self.ranges(i, OpKind::Discard, &[(position, len, false)])
    }

    /// A discard or write-zeroes request of `ranges` (offset, length, unmap), as request `i`.
    fn ranges(&self, i: u64, kind: OpKind, ranges: &[(u64, u64, bool)]) -> u16 {
        let mut list = Vec::new();
        for &(position, len, unmap) in ranges {
            list.extend((position / 512).to_le_bytes());
            list.extend(((len / 512) as u32).to_le_bytes());
            list.extend(u32::from(unmap).to_le_bytes());
        }
        let code = if kind == OpKind::Discard { 11 } else { 13 };
        let (t, h) = self.offer(code, 0, list.len() as u32, Some(&list), i);
        self.submit(t, kind, 0);
        h
    }

    fn status(&self, head: u16) -> u8 {
        let hdr = 0x1_0000 + 0x100 * u64::from(head);
        self.rig.map.read_obj(GuestAddress(hdr + 0x80)).unwrap()
    }

    /// Waits for `n` completions in all; returns them.
    fn completed(&self, n: usize, within: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + within;
        loop {
            let done = used(&self.ring, 0);
            if done.len() >= n {
                return done;
            }
            assert!(
                Instant::now() < deadline,
                "{n} completions within {within:?} (have {}; engine pending {}; used idx {}; requests {} fenced {})",
                done.len(),
                self.engine.pending(),
                self.ring.used_idx(),
                self.engine.stats().requests.load(Ordering::Relaxed),
                self.engine.stats().fenced.load(Ordering::Relaxed),
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn data(&self, i: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.rig
            .map
            .read_slice(&mut buf, GuestAddress(DATA + i * (64 << 10)))
            .unwrap();
        buf
    }

    /// Waits for the engine to say slot(s) were lost; returns them.
    fn lost_slot(&self, within: Duration) -> usize {
        self.lost
            .recv_timeout(within)
            .expect("a lost connection reported")
    }
}

fn image(dir: &Path, size: u64) -> (std::path::PathBuf, File) {
    let path = dir.join("disk.img");
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    (path, f)
}

fn bytes_at(f: &File, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn reads_writes_flush_and_discard_round_trip_over_two_connections() {
    let server = qemu_nbd("eng-rw", 64 << 20);
    let s = setup(&server.sock, export(64 << 20, true), options(2));
    for i in 0..32u64 {
        s.write(i, i * (64 << 10), &pattern(i, 64 << 10));
    }
    s.completed(32, Duration::from_secs(30));
    let f = s.flush();
    s.completed(33, Duration::from_secs(30));
    assert_eq!(s.status(f), VIRTIO_BLK_S_OK);
    assert_eq!(
        s.engine.unflushed(),
        (0, 0),
        "the flush made every kept write durable"
    );
    // The owner's own flush (the device's final one) too.
    s.write(40, 40 * (64 << 10), &pattern(40, 64 << 10));
    s.completed(34, Duration::from_secs(30));
    assert_eq!(s.engine.unflushed().0, 1);
    s.engine.flush(Duration::from_secs(10)).unwrap();
    assert_eq!(s.engine.unflushed(), (0, 0));
    let image = File::open(server.dir.join("disk.img")).unwrap();
    for i in 0..32u64 {
        assert!(
            bytes_at(&image, i * (64 << 10), 64 << 10) == pattern(i, 64 << 10),
            "block {i}"
        );
    }
    // Read back into fresh buffers (cleared first), one request per 64 KiB block.
    for i in 0..32u64 {
        s.rig
            .map
            .write_slice(&vec![0xee; 64 << 10], GuestAddress(DATA + i * (64 << 10)))
            .unwrap();
    }
    let heads: Vec<u16> = (0..32u64).map(|i| s.read(i, i * (64 << 10), 64 << 10)).collect();
    let done = s.completed(66, Duration::from_secs(30));
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(s.status(*h), VIRTIO_BLK_S_OK);
        assert!(
            s.data(i as u64, 64 << 10) == pattern(i as u64, 64 << 10),
            "read {i}"
        );
    }
    // A read's used length counts its data and the status byte.
    assert!(done[34..].iter().all(|&(_, len)| len == (64 << 10) + 1));
    // Both connections carried commands.
    let sent = s.engine.sent();
    assert!(sent.iter().all(|&n| n > 0), "{sent:?}");
    // A discard reaches the server; write-zeroes of two ranges (split at the server's maximum) zero them.
    let d = s.discard(0, 0, 64 << 10);
    s.completed(67, Duration::from_secs(30));
    assert_eq!(s.status(d), VIRTIO_BLK_S_OK);
    let z = s.ranges(
        1,
        OpKind::WriteZeroes,
        &[(64 << 10, 64 << 10, false), (10 << 20, 4 << 20, true)],
    );
    s.completed(68, Duration::from_secs(30));
    assert_eq!(s.status(z), VIRTIO_BLK_S_OK);
    assert!(bytes_at(&image, 64 << 10, 64 << 10).iter().all(|&b| b == 0));
    assert!(
        bytes_at(&image, 128 << 10, 64 << 10) == pattern(2, 64 << 10),
        "nothing else zeroed"
    );
    // A range past the end fails the request; nothing is sent.
    let sent = s.engine.sent().iter().sum::<u64>();
    let bad = s.ranges(
        2,
        OpKind::WriteZeroes,
        &[(0, 4096, false), ((64 << 20) - 4096, 8192, false)],
    );
    s.completed(69, Duration::from_secs(30));
    assert_eq!(s.status(bad), VIRTIO_BLK_S_IOERR);
    assert_eq!(s.engine.sent().iter().sum::<u64>(), sent);
    assert_eq!(s.engine.stats().errors.load(Ordering::Relaxed), 1);
}

#[test]
fn a_server_killed_under_writes_is_replaced_and_nothing_fails() {
    let dir = tempdir("eng-kill");
    let (path, image) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    // Every write takes 500 ms: they are all with the server when it dies.
    let args = ["--filter=delay", "file", file.as_str(), "wdelay=500ms"];
    let mut child = spawn_nbdkit(&sock, &args);
    let s = setup(&sock, export(16 << 20, true), options(1));
    for i in 0..8u64 {
        s.write(i, i * BLOCK, &pattern(i, BLOCK as usize));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.engine.pending(), 8);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(s.lost_slot(Duration::from_secs(10)), 0);
    assert!(used(&s.ring, 0).is_empty(), "a lost connection is not an error");
    let mut child = spawn_nbdkit(&sock, &args);
    s.attach(0);
    s.completed(8, Duration::from_secs(30));
    for i in 0..8u64 {
        let h = (3 * i) as u16;
        assert_eq!(s.status(h), VIRTIO_BLK_S_OK, "write {i}");
        assert!(bytes_at(&image, i * BLOCK, BLOCK as usize) == pattern(i, BLOCK as usize));
    }
    assert_eq!(s.engine.stats().reconnects.load(Ordering::Relaxed), 1);
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_graceful_stop_answers_eshutdown_and_the_commands_go_again_without_an_error() {
    let dir = tempdir("eng-shut");
    let (path, image) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    let args = ["--filter=delay", "file", file.as_str(), "wdelay=300ms"];
    let mut child = spawn_nbdkit(&sock, &args);
    let s = setup(&sock, export(16 << 20, true), options(1));
    for i in 0..4u64 {
        s.write(i, i * BLOCK, &pattern(i, BLOCK as usize));
    }
    std::thread::sleep(Duration::from_millis(100));
    // SIGTERM: nbdkit finishes what it has, and answers what comes next with ESHUTDOWN.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(50));
    for i in 4..16u64 {
        s.write(i, i * BLOCK, &pattern(i, BLOCK as usize));
    }
    assert_eq!(s.lost_slot(Duration::from_secs(20)), 0);
    let _ = child.wait();
    let mut child = spawn_nbdkit(&sock, &args);
    s.attach(0);
    s.completed(16, Duration::from_secs(30));
    for i in 0..16u64 {
        assert_eq!(s.status((3 * i) as u16), VIRTIO_BLK_S_OK, "write {i}");
        assert!(
            bytes_at(&image, i * BLOCK, BLOCK as usize) == pattern(i, BLOCK as usize),
            "block {i}"
        );
    }
    assert!(
        s.engine.stats().shutdown_retries.load(Ordering::Relaxed) > 0,
        "the server did answer ESHUTDOWN"
    );
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_slow_trim_on_a_live_server_is_probed_never_cut() {
    let server = nbdkit("eng-slow", &["--filter=delay", "memory", "16M", "delay-trim=2"]);
    let opts = Options {
        hang_timeout: Some(Duration::from_millis(300)),
        ..options(1)
    };
    let s = setup(&server.sock, export(16 << 20, true), opts);
    let d = s.discard(0, 0, 4 << 20);
    s.completed(1, Duration::from_secs(20));
    assert_eq!(s.status(d), VIRTIO_BLK_S_OK);
    let st = s.engine.stats();
    assert!(
        st.probes.load(Ordering::Relaxed) >= 1,
        "the quiet connection was probed"
    );
    assert_eq!(st.hung_cut.load(Ordering::Relaxed), 0);
    assert!(s.lost.try_recv().is_err(), "never cut");
}

#[test]
fn a_reply_that_never_comes_fails_only_its_request_at_the_deadline_and_its_connection_goes() {
    // Reads take 60 s (the dropped reply); writes 300 ms (the load: some are with the server when the
    // read's deadline cuts the connection, and go again on the next well within their own deadline).
    let dir = tempdir("eng-late");
    let (path, img) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    let args = [
        "--filter=delay",
        "file",
        file.as_str(),
        "rdelay=60",
        "wdelay=300ms",
    ];
    let mut child = spawn_nbdkit(&sock, &args);
    let opts = Options {
        request_timeout: Some(Duration::from_millis(1500)),
        ..options(1)
    };
    // No write cache: nothing acknowledged is kept and replayed, so every command sent beyond one per
    // request is a write that was on the connection when it was cut, sent again.
    let s = setup(&sock, export(16 << 20, false), opts);
    let t = Instant::now();
    let r = s.read(0, 0, BLOCK as u32);
    std::thread::sleep(Duration::from_millis(1300));
    let mut writes: Vec<(u64, u16)> = (1..=24)
        .map(|i| (i, s.write(i, i * BLOCK, &pattern(i, BLOCK as usize))))
        .collect();
    // Its connection is closed so that the read cannot run later; the device asks for a new one. The
    // writes that were on it go again on the next; writes arriving meanwhile wait for it.
    assert_eq!(s.lost_slot(Duration::from_secs(5)), 0);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(s.status(r), VIRTIO_BLK_S_IOERR, "the read failed at its deadline");
    writes.extend((25..=32).map(|i| (i, s.write(i, i * BLOCK, &pattern(i, BLOCK as usize)))));
    // nbdkit 1.32 may abort, at some point, after a connection closes under its delayed commands (its
    // assertion `sock >= 0` in raw_send_socket): the server is started again, on the same image, before
    // the device reconnects.
    let _ = child.kill();
    let _ = child.wait();
    child = spawn_nbdkit(&sock, &args);
    s.attach(0);
    s.completed(33, Duration::from_secs(20));
    for &(i, head) in &writes {
        assert_eq!(
            s.status(head),
            VIRTIO_BLK_S_OK,
            "write {i} is not failed by the read's deadline"
        );
    }
    assert_eq!(
        s.engine.stats().timed_out.load(Ordering::Relaxed),
        1,
        "only the read"
    );
    let sent = s.engine.sent()[0];
    assert!(
        sent > 1 + 32,
        "writes in flight at the cut were sent again ({sent} commands for 33 requests)"
    );
    for (i, _) in writes {
        assert_eq!(
            bytes_at(&img, i * BLOCK, BLOCK as usize),
            pattern(i, BLOCK as usize),
            "write {i} is in the image"
        );
    }
    assert_eq!(s.engine.pending(), 0, "nothing stays in flight");
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_fenced_with_the_server_holds_newer_writes_to_its_bytes_until_its_connection_is_replaced() {
    let dir = tempdir("eng-fence");
    let (path, image) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    let mut child = spawn_nbdkit(&sock, &["--filter=delay", "file", file.as_str(), "wdelay=1"]);
    let s = setup(&sock, export(16 << 20, true), options(1));
    s.write(0, 0, &[0xaa; BLOCK as usize]);
    std::thread::sleep(Duration::from_millis(200));
    // The driver resets: the write is fenced while the server has it.
    let (fenced, _) = s.q.fence_where(|_, _| true);
    assert_eq!(fenced, 1);
    let newer = s.write(1, 0, &[0xbb; BLOCK as usize]);
    // The watchdog cuts the connection the stale write is on; the newer write waits for a new one.
    assert_eq!(s.lost_slot(Duration::from_secs(5)), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.engine.sent(),
        vec![1],
        "the newer write was not sent while the stale one may run"
    );
    s.attach(0);
    // The ring restarted after the fence: the newer write's completion is the first used entry.
    s.completed(1, Duration::from_secs(20));
    assert_eq!(s.status(newer), VIRTIO_BLK_S_OK);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        bytes_at(&image, 0, BLOCK as usize).iter().all(|&b| b == 0xbb),
        "the newest write won"
    );
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_server_that_loses_its_cache_gets_the_acknowledged_writes_again_and_the_flush_is_true() {
    let dir = tempdir("eng-cache");
    let (path, image) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    // Writes are acknowledged from nbdkit's memory; a kill loses them.
    let args = ["--filter=cache", "file", file.as_str(), "cache=writeback"];
    let mut child = spawn_nbdkit(&sock, &args);
    let s = setup(&sock, export(16 << 20, true), options(1));
    for i in 0..16u64 {
        s.write(i, i * BLOCK, &pattern(i, BLOCK as usize));
    }
    s.completed(16, Duration::from_secs(20));
    assert_eq!(s.engine.unflushed(), (16, 16 * BLOCK));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        bytes_at(&image, 0, BLOCK as usize).iter().all(|&b| b == 0),
        "the killed server's cache had the writes, not the file"
    );
    assert_eq!(s.lost_slot(Duration::from_secs(10)), 0);
    let mut child = spawn_nbdkit(&sock, &args);
    s.attach(0);
    let f = s.flush();
    s.completed(17, Duration::from_secs(20));
    assert_eq!(s.status(f), VIRTIO_BLK_S_OK);
    for i in 0..16u64 {
        assert!(
            bytes_at(&image, i * BLOCK, BLOCK as usize) == pattern(i, BLOCK as usize),
            "block {i}"
        );
    }
    assert_eq!(s.engine.stats().replayed.load(Ordering::Relaxed), 16);
    assert_eq!(s.engine.unflushed(), (0, 0));
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn more_unflushed_writes_than_are_kept_make_the_first_flush_after_a_loss_fail() {
    let dir = tempdir("eng-unkept");
    let (path, _image) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    let args = ["--filter=cache", "file", file.as_str(), "cache=writeback"];
    let mut child = spawn_nbdkit(&sock, &args);
    let opts = Options {
        keep_unflushed_bytes: 2 * BLOCK,
        ..options(1)
    };
    let s = setup(&sock, export(16 << 20, true), opts);
    for i in 0..4u64 {
        s.write(i, i * BLOCK, &pattern(i, BLOCK as usize));
    }
    s.completed(4, Duration::from_secs(20));
    // The background flush the limit starts may or may not have covered them: kill at once.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(s.lost_slot(Duration::from_secs(10)), 0);
    let mut child = spawn_nbdkit(&sock, &args);
    s.attach(0);
    let first = s.flush();
    s.completed(5, Duration::from_secs(20));
    let second = s.flush();
    s.completed(6, Duration::from_secs(20));
    let unkept = s.engine.stats().errors.load(Ordering::Relaxed);
    // Either the background flush covered everything before the kill (nothing lost, both flushes
    // true), or the first flush says writes may be gone; the second is true again.
    assert!(unkept <= 1);
    if unkept == 1 {
        assert_eq!(s.status(first), VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(s.status(second), VIRTIO_BLK_S_OK);
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn requests_fail_after_the_reconnect_timeout_when_no_server_comes_back() {
    let mut server = qemu_nbd("eng-away", 16 << 20);
    let opts = Options {
        reconnect_timeout: Duration::from_millis(700),
        ..options(1)
    };
    let s = setup(&server.sock, export(16 << 20, true), opts);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    assert_eq!(s.lost_slot(Duration::from_secs(10)), 0);
    let t = Instant::now();
    let w = s.write(0, 0, &[1; BLOCK as usize]);
    s.completed(1, Duration::from_secs(10));
    assert_eq!(s.status(w), VIRTIO_BLK_S_IOERR);
    assert!(t.elapsed() >= Duration::from_millis(600));
    assert_eq!(*s.told.unavailable.lock().unwrap(), 1);
}

#[test]
fn a_server_that_stops_reading_is_cut_as_hung_even_with_a_sender_blocked_on_it() {
    // One thread per connection and slow writes: after the first write nbdkit reads nothing more, and
    // the socket fills up under the next ones — the sender blocks in sendmsg, holding the wire.
    let server = nbdkit(
        "eng-stuck",
        &["--threads=1", "--filter=delay", "memory", "64M", "delay-write=30"],
    );
    let opts = Options {
        hang_timeout: Some(Duration::from_millis(300)),
        ..options(1)
    };
    let s = setup(&server.sock, export(64 << 20, true), opts);
    for i in 0..12u64 {
        s.write(i, i * (1 << 20), &vec![i as u8; 64 << 10]);
    }
    let t = Instant::now();
    assert_eq!(
        s.lost_slot(Duration::from_secs(10)),
        0,
        "the hung connection is cut"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(s.engine.stats().hung_cut.load(Ordering::Relaxed), 1);
    // Nothing was answered: the writes wait for a new connection (none comes here).
    assert!(used(&s.ring, 0).is_empty());
    s.engine.stop();
}

#[test]
fn a_flush_in_flight_when_unkept_writes_are_lost_fails_even_if_the_new_server_answers_it() {
    let dir = tempdir("eng-flush-loss");
    let (path, _image) = image(&dir, 16 << 20);
    let sock = dir.join("nbd.sock");
    let file = format!("file={}", path.display());
    // Serial processing (one thread) and slow writes: the flush waits behind the last write on the
    // server when the server is killed.
    let args = [
        "--threads=1",
        "--filter=delay",
        "--filter=cache",
        "file",
        file.as_str(),
        "cache=writeback",
        "delay-write=1",
    ];
    let mut child = spawn_nbdkit(&sock, &args);
    let opts = Options {
        keep_unflushed_bytes: BLOCK,
        ..options(1)
    };
    let s = setup(&sock, export(16 << 20, true), opts);
    // Two writes: the second is past the keep limit, so nothing is kept until a flush covers it.
    s.write(0, 0, &pattern(0, BLOCK as usize));
    s.write(1, BLOCK, &pattern(1, BLOCK as usize));
    s.completed(2, Duration::from_secs(20));
    // The limit's background flush may have covered them; a third write and the flush behind it are
    // what this test is about.
    s.write(2, 2 * BLOCK, &pattern(2, BLOCK as usize));
    let f = s.flush();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(s.lost_slot(Duration::from_secs(10)), 0);
    let mut child = spawn_nbdkit(&sock, &args);
    s.attach(0);
    s.completed(4, Duration::from_secs(30));
    // The third write was not kept (past the limit, or the limit's flush had not covered the second):
    // the flush cannot vouch for it, whatever the new server answers.
    let unkept_lost = s.engine.stats().errors.load(Ordering::Relaxed) > 0;
    assert!(unkept_lost, "the flush failed");
    assert_eq!(s.status(f), VIRTIO_BLK_S_IOERR);
    // Reported once: the next flush is true again.
    let again = s.flush();
    s.completed(5, Duration::from_secs(20));
    assert_eq!(s.status(again), VIRTIO_BLK_S_OK);
    s.engine.stop();
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_worker_model_answers_what_it_can_at_once_and_hands_early_requests_to_the_engine_once_it_comes() {
    use vduse_backends::nbd::model::{NbdBlk, Offer};
    use vduse_core::model::{Completer, DeviceModel};
    let server = qemu_nbd("eng-model", 16 << 20);
    let (rig, _mem) = Rig::memfd_backed(16 << 20);
    let (ring, q) = rig.queue_sized(256, 16, false);
    let model = NbdBlk::new(
        b"nbd-serial-0123456789",
        Offer {
            read_only: false,
            flush: true,
            discard: false,
            write_zeroes: false,
        },
    );
    // Requests as a worker pops them: header, data, status.
    let offer_one = |h: u16, kind: u32, sector: u64, len: u32, data: Option<&[u8]>| {
        let hdr = 0x1_0000 + 0x100 * u64::from(h);
        rig.header(hdr, kind, sector);
        let buf = DATA + u64::from(h) * (64 << 10);
        if let Some(d) = data {
            rig.map.write_slice(d, GuestAddress(buf)).unwrap();
        }
        let flags = if data.is_some() { N } else { W | N };
        offer(
            &ring,
            &[
                (h, desc(hdr, 16, N, h + 1)),
                (h + 1, desc(buf, len, flags, h + 2)),
                (h + 2, desc(hdr + 0x80, 1, W, 0)),
            ],
            &[h],
        );
    };
    offer_one(0, VIRTIO_BLK_T_OUT, 8, 4096, Some(&[7; 4096]));
    offer_one(3, 8, 0, 20, None); // GET_ID
    offer_one(6, 11, 0, 16, Some(&[0; 16])); // DISCARD, not offered
    offer_one(9, VIRTIO_BLK_T_IN, 8, 4096, None);
    let mut batch = RequestBatch::default();
    q.pop(Budget::default(), &mut batch);
    assert_eq!(batch.len(), 4);
    let completer = Completer::new(q.clone());
    model.handle(0, &batch, &completer);
    // GET_ID and the refused discard are answered at once; the write and the read wait for the engine.
    let done = used(&ring, 0);
    assert_eq!(done.len(), 2);
    let status = |h: u64| -> u8 {
        rig.map
            .read_obj(GuestAddress(0x1_0000 + 0x100 * h + 0x80))
            .unwrap()
    };
    assert_eq!(status(3), VIRTIO_BLK_S_OK);
    assert_eq!(status(6), vduse_core::ram_blk::VIRTIO_BLK_S_UNSUPP);
    let mut id = [0u8; 20];
    rig.map
        .read_slice(&mut id, GuestAddress(DATA + 3 * (64 << 10)))
        .unwrap();
    assert_eq!(&id, b"nbd-serial-012345678");
    // The engine comes (and its connection): the early requests are served, in order.
    let told = Arc::new(Told::default());
    let engine = Arc::new(NbdEngine::new(vec![q.clone()], export(16 << 20, true), options(1), told).unwrap());
    assert!(model.set_engine(engine.clone()));
    let (stream, _, _) = handshake(&server.sock);
    engine.attach(0, OwnedFd::from(stream), true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while used(&ring, 0).len() < 4 {
        assert!(Instant::now() < deadline, "the early requests were served");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(0), VIRTIO_BLK_S_OK);
    assert_eq!(status(9), VIRTIO_BLK_S_OK);
    // (The read and the write were in flight together: NBD orders neither.) The write is in the image.
    let image = File::open(server.dir.join("disk.img")).unwrap();
    assert!(bytes_at(&image, 4096, 4096).iter().all(|&b| b == 7));

    // With the engine there, the worker writes the commands itself (serve_inline): answered without any
    // sender thread having to take them.
    let sent = engine.sent()[0];
    offer_one(12, VIRTIO_BLK_T_OUT, 16, 4096, Some(&[9; 4096]));
    let mut batch = RequestBatch::default();
    q.pop(Budget::default(), &mut batch);
    model.handle(0, &batch, &completer);
    assert_eq!(
        engine.sent()[0],
        sent + 1,
        "sent on the worker's own thread, before handle returned"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while used(&ring, 0).len() < 5 {
        assert!(Instant::now() < deadline, "the inline write was answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(12), VIRTIO_BLK_S_OK);
    assert!(bytes_at(&image, 8192, 4096).iter().all(|&b| b == 9));

    // A hold (a handover being decided): new requests wait in the model, nothing reaches the engine;
    // when it ends they go.
    model.hold(true);
    offer_one(15, VIRTIO_BLK_T_OUT, 24, 4096, Some(&[5; 4096]));
    let mut batch = RequestBatch::default();
    q.pop(Budget::default(), &mut batch);
    model.handle(0, &batch, &completer);
    assert!(!model.busy());
    assert_eq!(engine.pending(), 0, "held in the model, not in the engine");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(used(&ring, 0).len(), 5);
    model.hold(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while used(&ring, 0).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "the held write went once the hold ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(15), VIRTIO_BLK_S_OK);
    engine.stop();
}
