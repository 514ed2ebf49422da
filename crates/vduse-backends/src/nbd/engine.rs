//! virtio-blk requests served over NBD connections, natively: the model (TypeScript) validates a request
//! and hands it over ([`NbdEngine::submit`]); from then on threads of this engine stage its data, send
//! its commands, put the replies' data into the driver's buffers, write the status byte and complete it
//! — no JavaScript per request. The caller keeps the handshake and the reconnect policy: it is told when
//! a connection is lost ([`Events::lost`]) and gives a new one ([`NbdEngine::attach`]).
//!
//! What a storage engineer relies on, and how:
//!
//! - **Driver memory only through ticket-checked copies**: write data is copied out of the driver's
//!   buffers into a buffer of the engine before its command is sent (so a late send reads no fenced
//!   memory, and the copy is what a replay sends again); read data is copied in as it arrives, each
//!   piece checked against the request's ticket — a fenced request's late reply reaches nothing.
//! - **A connection loss is never an I/O error by itself**: commands in flight on it go again on
//!   another (or on its replacement); only a server away longer than `reconnect_timeout` fails them.
//! - **ESHUTDOWN** (a server stopping gracefully) means "not executed": the command goes again, the
//!   connection takes nothing new and is closed politely (NBD_CMD_DISC) once idle.
//! - **Liveness, not silence**: a connection quiet for `hang_timeout` with commands in flight is asked a
//!   one-block read; it is cut only if that goes unanswered too. One slow command is never cut.
//! - **Fenced and timed-out commands**: a request fenced (driver reset) or past `request_timeout` while
//!   the server has it gets its connection closed, so no copy of it can run later; a timed-out request
//!   fails at once. Until that connection is replaced, its range is a *ghost*: newer commands on those
//!   bytes wait, so a stale write never lands on top of a newer one.
//! - **fsync tells the truth**: on an export that may cache writes (it offers FLUSH), acknowledged
//!   changes no flush has covered are kept (their staged data, no extra copy) up to
//!   `keep_unflushed_bytes`; after any connection loss they are sent again — once nothing else is in
//!   flight, one at a time, in acknowledgement order — before anything new. Past the limit nothing is
//!   kept until a flush covers it, and the first flush after a loss meanwhile fails (EIO).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vduse_core::queue::{Owner, Ticket, Virtqueue};
use vduse_core::ram_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

use super::conn::{Command, ConnError, Connection, Payload, Receiver};
use super::proto::{
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, NBD_EIO,
    NBD_ESHUTDOWN,
};

/// The virtio-blk request header a write's data follows.
const HEADER: u64 = 16;
/// A discard / write-zeroes range descriptor.
const RANGE: u64 = 16;
/// Most ranges one discard / write-zeroes request may carry, and sectors per range (what the model
/// offers the driver: `max_discard_seg`, `max_discard_sectors`). Checked again here: the driver may
/// rewrite its ranges after the model read them.
const MAX_RANGES: u64 = 16;
const MAX_RANGE_SECTORS: u32 = 0x40_0000;
/// What a kept change without data (TRIM, WRITE_ZEROES) counts against `keep_unflushed_bytes`.
const RANGE_COST: u64 = 64;
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// What a request asks, as the model decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One virtio-blk request handed over: its ticket, what it is, and for a read or write the byte offset
/// in the export (its length is the request's data, the model checked it lies inside the export).
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub ticket: Ticket,
    pub kind: OpKind,
    pub position: u64,
    /// A write the driver wants durable on completion (FUA).
    pub fua: bool,
}

/// What the handshake learnt, as the engine uses it.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    /// Bytes the device offers (a whole number of blocks).
    pub size: u64,
    /// The device's logical block size (512 or 4096).
    pub block_size: u32,
    /// Largest READ/WRITE payload per command (a multiple of the block size).
    pub max_payload: u32,
    /// Largest TRIM/WRITE_ZEROES per command (a multiple of the block size).
    pub max_range: u32,
    /// The export may cache writes (it offers FLUSH): acknowledged changes are kept until a flush.
    pub volatile: bool,
    /// Send FUA on every write (the export offers FUA but no FLUSH).
    pub always_fua: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Connections (slots); whichever sender is free takes the next command.
    pub slots: usize,
    /// See the module notes; `None`: never probe.
    pub hang_timeout: Option<Duration>,
    /// How long a command may wait for a connection before its request fails.
    pub reconnect_timeout: Duration,
    /// A request still unanswered this long after it was handed over fails, and its connection is
    /// closed. `None`: no deadline (as the kernel's NBD client by default).
    pub request_timeout: Option<Duration>,
    pub keep_unflushed_bytes: u64,
}

/// What the engine tells its owner (from its threads; never block).
pub trait Events: Send + Sync + 'static {
    /// Connection `slot` was lost (`why`); its commands wait for another. Give it a new one with
    /// [`NbdEngine::attach`].
    fn lost(&self, slot: usize, why: &str);
    /// `failed` requests failed because no connection came back within `reconnect_timeout`.
    fn unavailable(&self, failed: usize);
}

#[derive(Debug, Default)]
pub struct NbdStats {
    /// Requests handed over, and those that failed (I/O error or unsupported).
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Requests fenced before or while they were served (nothing answered for them).
    pub fenced: AtomicU64,
    /// Requests past their deadline.
    pub timed_out: AtomicU64,
    /// Commands the server refused while shutting down (ESHUTDOWN), sent again.
    pub shutdown_retries: AtomicU64,
    /// Liveness probes sent, and connections cut as hung.
    pub probes: AtomicU64,
    pub hung_cut: AtomicU64,
    /// Connections given after the first ones (reconnects).
    pub reconnects: AtomicU64,
    /// Kept changes sent again after a loss.
    pub replayed: AtomicU64,
}

/// A request handed over, shared by its commands.
struct Req {
    ticket: Ticket,
    kind: OpKind,
    /// Commands not answered yet.
    parts: AtomicU32,
    failed: AtomicBool,
    /// Answered already (failed at its deadline): later answers are ignored.
    answered: AtomicBool,
    /// Bytes of read data (the status byte follows).
    data_len: u32,
    born: Instant,
    /// The lowest and highest byte it touches (ghost bookkeeping).
    start: u64,
    end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Part of a driver's request.
    Request,
    /// A liveness probe (a one-block read whose data goes nowhere).
    Probe,
    /// A kept change sent again after a loss.
    Replay,
    /// A flush the engine starts itself when many changes are kept.
    Background,
    /// A flush its owner asked for ([`NbdEngine::flush`]) and waits for.
    Caller,
}

/// Where a caller's flush hears its answer: the server's errno (0: success).
#[derive(Default)]
struct Waiter {
    result: Mutex<Option<u32>>,
    answered: Condvar,
}

impl Waiter {
    fn answer(&self, error: u32) {
        *lock(&self.result) = Some(error);
        self.answered.notify_all();
    }
}

struct Cmd {
    req: Option<Arc<Req>>,
    role: Role,
    cmd: Command,
    /// Where its data sits in the request's data (read: writable bytes; write: after the header).
    at: u64,
    data: Option<Payload>,
    /// FLUSH: the last acknowledged change it covers.
    mark: u64,
    /// A caller's flush: who waits for it.
    waiter: Option<Arc<Waiter>>,
    /// A FLUSH: the loss epoch when it was taken (a loss of unkept changes since fails it). A replayed
    /// change: the replay it belongs to.
    epoch: u64,
}

impl Cmd {
    /// A FLUSH of the engine's own (`Background`) or a caller's, taken in loss epoch `epoch`.
    fn flush(role: Role, epoch: u64, waiter: Option<Arc<Waiter>>) -> Self {
        Cmd {
            req: None,
            role,
            cmd: Command {
                command: CMD_FLUSH,
                flags: 0,
                offset: 0,
                length: 0,
            },
            at: 0,
            data: None,
            mark: 0,
            waiter,
            epoch,
        }
    }

    fn range(&self) -> (u64, u64) {
        (self.cmd.offset, self.cmd.offset + u64::from(self.cmd.length))
    }
}

/// An acknowledged change no flush has covered yet.
#[derive(Clone)]
struct Kept {
    cmd: Command,
    data: Option<Payload>,
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Connection<Cmd>>>,
    /// ESHUTDOWN seen: nothing new goes there; closed once idle.
    draining: bool,
    probe_sent: Option<Instant>,
    /// Commands sent on it (resends included).
    sent: u64,
    /// Which connection it has (counts attaches): callbacks of an older one do not touch the slot.
    gen: u64,
}

/// Commands a thread took and is writing, not yet in a connection's table: (start, end, request).
struct Transit {
    token: u64,
    ranges: Vec<(u64, u64, Option<Arc<Req>>)>,
}

#[derive(Default)]
struct Replay {
    /// Which replay this is (a loss starts a new one): answers of an older one are ignored.
    epoch: u64,
    /// A loss happened while changes were kept: they go again before anything new.
    pending: bool,
    started: bool,
    queue: VecDeque<Kept>,
    on_wire: bool,
}

#[derive(Default)]
struct State {
    /// Requests handed over, not yet taken apart, and when.
    incoming: VecDeque<(Op, Instant)>,
    /// Commands ready to send (resends in front).
    pending: VecDeque<Cmd>,
    slots: Vec<Slot>,
    /// Byte ranges fenced commands may still write, per slot, until that slot gets a new connection.
    ghosts: Vec<(usize, u64, u64)>,
    kept: BTreeMap<u64, Kept>,
    kept_by_range: HashMap<(u16, u64, u32), u64>,
    kept_bytes: u64,
    ack_seq: u64,
    /// The last acknowledged change that was not kept (0: none), until a flush covers it.
    unkept_until: u64,
    /// A loss happened while unkept changes were unflushed: the next flush fails.
    maybe_lost: bool,
    /// Counts such losses: a flush taken before one fails even if the server answers it.
    loss_epoch: u64,
    /// Callers waiting for a flush ([`NbdEngine::flush`]): answered when the engine stops.
    waiters: Vec<Weak<Waiter>>,
    /// What threads are writing right now (seen by the ghost check and `pending`).
    in_transit: Vec<Transit>,
    next_token: u64,
    replay: Replay,
    background_flush: bool,
    /// Since when no connection has been up (None: one is).
    down_since: Option<Instant>,
    stop: bool,
}

struct Inner {
    queues: Vec<Arc<Virtqueue>>,
    export: Export,
    opts: Options,
    events: Arc<dyn Events>,
    state: Mutex<State>,
    /// Work for the senders (or a connection came, or the engine stops).
    work: Condvar,
    stats: NbdStats,
    /// Connection generations handed out (`Slot::gen`).
    next_gen: AtomicU64,
    /// Queues with completions not yet signalled, per receiver (bit per queue, at most 64 queues
    /// signalled together; others at once).
    touched: AtomicU64,
}

/// The engine; dropping it stops it (see [`stop`](Self::stop)).
pub struct NbdEngine {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl NbdEngine {
    pub fn new(
        queues: Vec<Arc<Virtqueue>>,
        export: Export,
        opts: Options,
        events: Arc<dyn Events>,
    ) -> std::io::Result<Self> {
        let slots = opts.slots.max(1);
        let inner = Arc::new(Inner {
            queues,
            export,
            opts: Options { slots, ..opts },
            events,
            state: Mutex::new(State {
                slots: (0..slots).map(|_| Slot::default()).collect(),
                down_since: Some(Instant::now()),
                ..State::default()
            }),
            work: Condvar::new(),
            stats: NbdStats::default(),
            next_gen: AtomicU64::new(0),
            touched: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        for slot in 0..slots {
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vduse-nbd-tx{slot}"))
                    .spawn(move || i.sender(slot))?,
            );
        }
        let weak = Arc::downgrade(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("vduse-nbd-watch".into())
                .spawn(move || watchdog(weak))?,
        );
        Ok(Self {
            inner,
            threads: Mutex::new(threads),
        })
    }

    pub fn stats(&self) -> &NbdStats {
        &self.inner.stats
    }

    /// Gives slot `slot` a connection (`fd`: a connected socket in its transmission phase;
    /// `structured`: structured replies were agreed). A slot that had one before counts as a reconnect;
    /// the ghosts of its old connection are gone.
    pub fn attach(&self, slot: usize, fd: OwnedFd, structured: bool) -> std::io::Result<()> {
        if slot >= self.inner.opts.slots {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no such slot",
            ));
        }
        let gen = self.inner.next_gen.fetch_add(1, Ordering::Relaxed) + 1;
        let rx = Arc::new(SlotRx {
            inner: Arc::downgrade(&self.inner),
            slot,
            gen,
        });
        let conn = Connection::start(fd, structured, rx)?;
        let old = {
            let mut s = self.inner.lock();
            if s.stop {
                drop(s);
                conn.disconnect();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the engine stopped",
                ));
            }
            let sl = &mut s.slots[slot];
            let old = sl.conn.replace(conn);
            sl.gen = gen;
            if sl.sent > 0 || old.is_some() {
                self.inner.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            sl.draining = false;
            sl.probe_sent = None;
            s.ghosts.retain(|g| g.0 != slot);
            s.down_since = None;
            old
        };
        if let Some(old) = old {
            old.close("replaced");
        }
        self.inner.work.notify_all();
        Ok(())
    }

    /// Hands requests over. Never blocks on the network: the engine's threads do the rest.
    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) {
        let now = Instant::now();
        let mut s = self.inner.lock();
        let before = s.incoming.len();
        s.incoming.extend(ops.into_iter().map(|op| (op, now)));
        let n = s.incoming.len() - before;
        drop(s);
        self.inner.stats.requests.fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            self.inner.work.notify_all();
        }
    }

    /// Hands requests over and serves them on the calling thread where it can (see `serve_inline`):
    /// for a queue's own worker thread, which may block on the network — never the JavaScript thread.
    pub fn serve(&self, ops: &[Op]) {
        self.inner
            .stats
            .requests
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        if !ops.is_empty() {
            self.inner.serve_inline(ops);
        }
    }

    /// Connections up now.
    pub fn connections(&self) -> usize {
        let s = self.inner.lock();
        s.slots
            .iter()
            .filter(|sl| sl.conn.as_ref().is_some_and(|c| !c.ended()))
            .count()
    }

    /// Commands sent per slot since the start (resends included).
    pub fn sent(&self) -> Vec<u64> {
        self.inner.lock().slots.iter().map(|s| s.sent).collect()
    }

    /// Requests and commands not answered yet (waiting, or with the server).
    pub fn pending(&self) -> usize {
        let s = self.inner.lock();
        let on_wire: usize = s
            .slots
            .iter()
            .filter_map(|sl| sl.conn.as_ref())
            .map(|c| c.in_flight())
            .sum();
        let in_transit: usize = s.in_transit.iter().map(|t| t.ranges.len()).sum();
        // Ghosts count too: a stale command may still run on a server that was cut off.
        s.incoming.len() + s.pending.len() + in_transit + on_wire + s.ghosts.len()
    }

    /// Acknowledged changes kept until a flush: (changes, bytes).
    pub fn unflushed(&self) -> (usize, u64) {
        let s = self.inner.lock();
        (s.kept.len(), s.kept_bytes)
    }

    /// Makes every change acknowledged so far durable on the server (a FLUSH, sent like any command —
    /// again after a lost connection), waiting at most `timeout`. Fails (EIO) as a driver's flush would:
    /// when the server fails it, or when changes acknowledged before a loss were not kept.
    pub fn flush(&self, timeout: Duration) -> std::io::Result<()> {
        let waiter = Arc::new(Waiter::default());
        {
            let mut s = self.inner.lock();
            if s.stop {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the engine stopped",
                ));
            }
            if s.maybe_lost {
                // Failed, but the report stays for the driver's next flush.
                return Err(std::io::Error::other(
                    "writes the server acknowledged before a connection was lost were not kept, and may be gone",
                ));
            }
            let flush = Cmd::flush(Role::Caller, s.loss_epoch, Some(waiter.clone()));
            s.pending.push_back(flush);
            s.waiters.retain(|w| w.strong_count() > 0);
            s.waiters.push(Arc::downgrade(&waiter));
        }
        self.inner.work.notify_all();
        let deadline = Instant::now() + timeout;
        let mut result = lock(&waiter.result);
        loop {
            if let Some(error) = *result {
                return match error {
                    0 => Ok(()),
                    e => Err(std::io::Error::from_raw_os_error(e as i32)),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer to the flush within {timeout:?}"),
                ));
            }
            result = waiter
                .answered
                .wait_timeout(result, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops: nothing new is sent; every connection is ended politely; requests not answered stay
    /// unanswered (the transport fences them). Idempotent.
    pub fn stop(&self) {
        let conns: Vec<_> = {
            let mut s = self.inner.lock();
            s.stop = true;
            s.incoming.clear();
            for c in s.pending.drain(..) {
                if let Some(w) = &c.waiter {
                    w.answer(NBD_EIO);
                }
            }
            for w in s.waiters.drain(..).filter_map(|w| w.upgrade()) {
                w.answer(NBD_EIO);
            }
            s.slots.iter_mut().filter_map(|sl| sl.conn.take()).collect()
        };
        self.inner.work.notify_all();
        for c in &conns {
            c.disconnect();
        }
        // No reply completes a request after this returns (a worker still inside `serve` may answer one it
        // refuses; the device is still there).
        for c in &conns {
            c.join();
        }
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for NbdEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn queue(&self, ticket: Ticket) -> Option<&Arc<Virtqueue>> {
        self.queues.get(usize::from(ticket.queue()))
    }

    fn live(&self, req: &Req) -> bool {
        !req.answered.load(Ordering::Acquire) && self.queue(req.ticket).is_some_and(|q| q.is_live(req.ticket))
    }

    /// One sender per slot: takes work while its slot has a usable connection.
    fn sender(&self, slot: usize) {
        let mut s = self.lock();
        loop {
            if s.stop {
                return;
            }
            let conn = match &s.slots[slot].conn {
                Some(c) if !s.slots[slot].draining && !c.ended() => c.clone(),
                _ => {
                    s = self.work.wait(s).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
            };
            if let Some(cmds) = self.take(&mut s, slot) {
                let token = Self::in_transit(&mut s, slot, &cmds);
                drop(s);
                self.send(&conn, cmds);
                s = self.lock();
                s.in_transit.retain(|t| t.token != token);
                continue;
            }
            if let Some((op, born)) = (!s.replay.pending).then(|| s.incoming.pop_front()).flatten() {
                drop(s);
                let cmds = self.take_over(op, born);
                s = self.lock();
                // Taken apart outside the lock: into the queue in order, sent by whichever sender is free.
                for c in cmds.into_iter().rev() {
                    s.pending.push_front(c);
                }
                continue;
            }
            s = self
                .work
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Records `cmds` as being written on `slot` (until the connection's table has them, other threads
    /// see them here); returns the token that ends it.
    fn in_transit(s: &mut State, slot: usize, cmds: &[Cmd]) -> u64 {
        s.slots[slot].sent += cmds.len() as u64;
        s.next_token += 1;
        let token = s.next_token;
        let ranges = cmds
            .iter()
            .map(|c| {
                let (a, b) = c.range();
                (a, b, c.req.clone())
            })
            .collect();
        s.in_transit.push(Transit { token, ranges });
        token
    }

    /// Serves requests on the calling thread (a queue's worker): each is taken apart and its commands
    /// written at once on the queue's connection — no hand-off to another thread. What cannot go now (no
    /// connection, a replay or a ghost in the way) waits for the senders.
    fn serve_inline(&self, ops: &[Op]) {
        let now = Instant::now();
        let mut cmds = Vec::new();
        for op in ops {
            cmds.extend(self.take_over(*op, now));
        }
        if cmds.is_empty() {
            return;
        }
        let queue = usize::from(ops[0].ticket.queue());
        let mut s = self.lock();
        s.pending.extend(cmds);
        let n = s.slots.len();
        let usable = |sl: &Slot| sl.conn.as_ref().is_some_and(|c| !c.ended()) && !sl.draining;
        let slot = if usable(&s.slots[queue % n]) {
            Some(queue % n)
        } else {
            (0..n).find(|&i| usable(&s.slots[i]))
        };
        let Some(slot) = slot else {
            drop(s);
            self.work.notify_all();
            return;
        };
        let conn = s.slots[slot].conn.clone().expect("usable");
        // Only while the slot still has this connection, up and not draining: a loss (perhaps of this
        // very write) hands the rest to the senders.
        let still = |s: &State| {
            let sl = &s.slots[slot];
            !sl.draining
                && sl
                    .conn
                    .as_ref()
                    .is_some_and(|c| Arc::ptr_eq(c, &conn) && !c.ended())
        };
        while still(&s) {
            let Some(taken) = self.take(&mut s, slot) else {
                break;
            };
            let token = Self::in_transit(&mut s, slot, &taken);
            drop(s);
            self.send(&conn, taken);
            s = self.lock();
            s.in_transit.retain(|t| t.token != token);
        }
        let left = !s.pending.is_empty();
        drop(s);
        if left {
            self.work.notify_all();
        }
    }

    /// What `slot`'s sender sends next: the next kept change of a replay, or ready commands whose bytes
    /// no ghost may still write (at most a few, so senders share the work).
    fn take(&self, s: &mut State, slot: usize) -> Option<Vec<Cmd>> {
        if s.replay.pending {
            return self.replay_next(s).map(|c| vec![c]);
        }
        let mut out = Vec::new();
        let mut k = 0;
        while k < s.pending.len() && out.len() < 16 {
            // A request fenced (or failed) while it waited must not reach the server: a stale write
            // would overwrite newer data.
            if let Some(req) = &s.pending[k].req {
                if s.pending[k].role == Role::Request && !self.live(req) {
                    s.pending.remove(k);
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            if self.blocked_by_ghost(s, &s.pending[k]) {
                k += 1;
                continue;
            }
            let mut c = s.pending.remove(k).expect("in range");
            if c.cmd.command == CMD_FLUSH {
                // A flush covers what was acknowledged before the server receives it.
                c.mark = s.ack_seq;
            }
            out.push(c);
        }
        let _ = slot;
        (!out.is_empty()).then_some(out)
    }

    /// Whether a change to `c`'s bytes must wait: a command of a fenced (or failed) request may still
    /// write them — on a connection cut since (until its slot reconnects), or still on the wire (until
    /// the watchdog cuts it).
    fn blocked_by_ghost(&self, s: &State, c: &Cmd) -> bool {
        let (a, b) = c.range();
        if b <= a || !matches!(c.cmd.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
            return false;
        }
        if s.ghosts.iter().any(|g| g.1 < b && a < g.2) {
            return true;
        }
        // A connection that ended and whose loss is not processed yet: its stale commands are in no table
        // and not yet ghosts. Wait for that (it comes at once).
        if s.slots
            .iter()
            .any(|sl| sl.conn.as_ref().is_some_and(|c| c.ended()))
        {
            return true;
        }
        let stale = |r: &Option<Arc<Req>>| r.as_ref().is_some_and(|r| !self.live(r));
        if s.in_transit
            .iter()
            .flat_map(|t| &t.ranges)
            .any(|(x, y, r)| *x < b && a < *y && stale(r))
        {
            return true;
        }
        s.slots.iter().filter_map(|sl| sl.conn.as_ref()).any(|conn| {
            conn.any_in_flight(|o| {
                let (x, y) = o.range();
                x < b
                    && a < y
                    && o.role == Role::Request
                    && matches!(o.cmd.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
                    && o.req.as_ref().is_some_and(|r| !self.live(r))
            })
        })
    }

    /// The replay: starts once nothing of the lost session's time is in flight anywhere; one kept change
    /// at a time.
    fn replay_next(&self, s: &mut State) -> Option<Cmd> {
        if s.replay.on_wire {
            return None;
        }
        if !s.replay.started {
            // Nothing of the lost session's time may still be on its way: in a connection's table, or
            // being written by a thread.
            let busy = !s.in_transit.is_empty()
                || s.slots
                    .iter()
                    .any(|sl| sl.conn.as_ref().is_some_and(|c| c.in_flight() > 0));
            if busy {
                return None;
            }
            s.replay.started = true;
            s.replay.queue = s.kept.values().cloned().collect();
        }
        let Some(k) = s.replay.queue.pop_front() else {
            s.replay = Replay {
                epoch: s.replay.epoch,
                ..Replay::default()
            };
            return None;
        };
        s.replay.on_wire = true;
        self.stats.replayed.fetch_add(1, Ordering::Relaxed);
        Some(Cmd {
            req: None,
            role: Role::Replay,
            cmd: k.cmd,
            at: 0,
            data: k.data,
            mark: 0,
            waiter: None,
            epoch: s.replay.epoch,
        })
    }

    fn send(&self, conn: &Connection<Cmd>, cmds: Vec<Cmd>) {
        let mut batch = Vec::with_capacity(cmds.len());
        for c in cmds {
            if let Some(req) = &c.req {
                // Fenced (or failed at its deadline) since it was taken: it must not reach the server.
                if c.role == Role::Request && !self.live(req) {
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            batch.push((c.cmd, c.data.clone(), c));
        }
        if batch.is_empty() {
            return;
        }
        if let Err((back, _)) = conn.send_all(batch) {
            // The connection ended before it took them: back in front, in order, for another.
            let mut s = self.lock();
            for c in back.into_iter().rev() {
                self.requeue(&mut s, c);
            }
        }
    }

    /// Takes a request over and splits it into commands. Nothing (the request is answered or dropped)
    /// when it was fenced, is malformed, or asks what the export cannot do.
    fn take_over(&self, op: Op, born: Instant) -> Vec<Cmd> {
        let Some(vq) = self.queue(op.ticket) else {
            return Vec::new();
        };
        let Some(shape) = vq.begin_native(op.ticket) else {
            self.stats.fenced.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        };
        let fail = |status: u8| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            let used = u32::from(shape.writable_bytes > 0);
            vq.complete_native(op.ticket, used, Some(status));
            vq.notify();
            Vec::new()
        };
        if shape.writable_bytes == 0 {
            return fail(VIRTIO_BLK_S_IOERR);
        }
        let e = &self.export;
        let block = u64::from(e.block_size);
        let mut req = Req {
            ticket: op.ticket,
            kind: op.kind,
            parts: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            data_len: 0,
            born,
            start: u64::MAX,
            end: 0,
        };
        // (command, flags, offset, length, where its data is in the request)
        let mut parts: Vec<(u16, u16, u64, u32, u64)> = Vec::new();
        match op.kind {
            OpKind::Read | OpKind::Write => {
                let len = match op.kind {
                    OpKind::Read => u64::from(shape.writable_bytes) - 1,
                    _ => u64::from(shape.readable_bytes).saturating_sub(HEADER),
                };
                let end = op.position.checked_add(len);
                if !len.is_multiple_of(block)
                    || !op.position.is_multiple_of(block)
                    || end.is_none_or(|x| x > e.size)
                {
                    return fail(VIRTIO_BLK_S_IOERR);
                }
                let (command, flags) = match op.kind {
                    OpKind::Read => (CMD_READ, 0),
                    _ => (CMD_WRITE, if op.fua || e.always_fua { CMD_FLAG_FUA } else { 0 }),
                };
                let max = u64::from(e.max_payload);
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(max);
                    parts.push((command, flags, op.position + at, n as u32, at));
                    at += n;
                }
                if op.kind == OpKind::Read {
                    req.data_len = len as u32;
                }
            }
            OpKind::Flush => parts.push((CMD_FLUSH, 0, 0, 0, 0)),
            OpKind::Discard | OpKind::WriteZeroes => {
                let bytes = u64::from(shape.readable_bytes).saturating_sub(HEADER);
                let count = bytes / RANGE;
                if !bytes.is_multiple_of(RANGE) || count == 0 || count > MAX_RANGES {
                    return fail(VIRTIO_BLK_S_IOERR);
                }
                let mut list = vec![0u8; bytes as usize];
                match vq.read_request(op.ticket, Owner::Native, HEADER, &mut list) {
                    Ok(n) if n == list.len() => {}
                    Ok(_) => return fail(VIRTIO_BLK_S_IOERR),
                    Err(_) => {
                        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                        return Vec::new();
                    }
                }
                for r in list.chunks_exact(RANGE as usize) {
                    let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                    let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
                    let unmap = flags & 1 == 1;
                    if flags & !1 != 0 || (op.kind == OpKind::Discard && unmap) {
                        return fail(VIRTIO_BLK_S_UNSUPP);
                    }
                    if sectors > MAX_RANGE_SECTORS {
                        return fail(VIRTIO_BLK_S_IOERR);
                    }
                    let offset = sector.checked_mul(512);
                    let length = u64::from(sectors) * 512;
                    if offset
                        .and_then(|o| o.checked_add(length))
                        .is_none_or(|x| x > e.size)
                    {
                        return fail(VIRTIO_BLK_S_IOERR);
                    }
                    let offset = offset.expect("checked");
                    let (command, nbd_flags) = match op.kind {
                        OpKind::Discard => (CMD_TRIM, 0),
                        _ => (CMD_WRITE_ZEROES, if unmap { 0 } else { CMD_FLAG_NO_HOLE }),
                    };
                    let max = u64::from(e.max_range);
                    let mut at = 0;
                    while at < length {
                        let n = (length - at).min(max);
                        parts.push((command, nbd_flags, offset + at, n as u32, 0));
                        at += n;
                    }
                }
            }
        }
        if parts.is_empty() {
            // A read or write of nothing, a range of no sectors: done.
            vq.complete_native(op.ticket, 1, Some(VIRTIO_BLK_S_OK));
            vq.notify();
            return Vec::new();
        }
        for p in &parts {
            if p.3 > 0 {
                req.start = req.start.min(p.2);
                req.end = req.end.max(p.2 + u64::from(p.3));
            }
        }
        req.parts.store(parts.len() as u32, Ordering::Relaxed);
        let req = Arc::new(req);
        let mut cmds = Vec::with_capacity(parts.len());
        for (command, flags, offset, length, at) in parts {
            let mut data = None;
            if command == CMD_WRITE {
                // Staged: a late send reads no fenced memory, and a replay sends this copy again.
                let mut buf = vec![0u8; length as usize];
                match vq.read_request(op.ticket, Owner::Native, HEADER + at, &mut buf) {
                    Ok(n) if n == buf.len() => data = Some(Arc::new(buf)),
                    Ok(_) => return fail(VIRTIO_BLK_S_IOERR),
                    Err(_) => {
                        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                        return Vec::new();
                    }
                }
            }
            cmds.push(Cmd {
                req: Some(req.clone()),
                role: Role::Request,
                cmd: Command {
                    command,
                    flags,
                    offset,
                    length,
                },
                at,
                data,
                mark: 0,
                waiter: None,
                epoch: 0,
            });
        }
        if op.kind == OpKind::Flush {
            let mut s = self.lock();
            for c in &mut cmds {
                c.epoch = s.loss_epoch;
            }
            if s.maybe_lost {
                // Reported once, as the kernel reports a lost page-cache write once.
                s.maybe_lost = false;
                drop(s);
                log::warn!(
                    "NBD: a flush fails: writes the server acknowledged before a connection was lost were \
                     not kept, and may be gone"
                );
                return fail(VIRTIO_BLK_S_IOERR);
            }
        }
        cmds
    }

    /// A command goes back to the front of the queue, unless its request no longer matters.
    fn requeue(&self, s: &mut State, c: Cmd) {
        match c.role {
            Role::Request => {
                if let Some(req) = &c.req {
                    if !self.live(req) {
                        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                s.pending.push_front(c);
                self.work.notify_all();
            }
            Role::Caller => {
                s.pending.push_front(c);
                self.work.notify_all();
            }
            // The loss that comes restarts the replay; a probe's question died with its connection.
            Role::Replay | Role::Probe | Role::Background => {
                if c.role == Role::Replay && c.epoch == s.replay.epoch {
                    // Not sent: it is still the next to go (a loss since starts a new replay anyway).
                    s.replay.on_wire = false;
                    if s.replay.started {
                        s.replay.queue.push_front(Kept {
                            cmd: c.cmd,
                            data: c.data.clone(),
                        });
                    }
                    self.work.notify_all();
                }
                if c.role == Role::Background {
                    s.background_flush = false;
                }
            }
        }
    }

    fn on_data(&self, cmd: &mut Cmd, at: u32, bytes: &[u8]) {
        let Some(req) = &cmd.req else { return };
        if req.answered.load(Ordering::Relaxed) {
            return;
        }
        let Some(vq) = self.queue(req.ticket) else { return };
        // Ticket-checked: a request fenced meanwhile is not written to (its bytes are consumed all the same).
        if vq
            .write_request(req.ticket, Owner::Native, cmd.at + u64::from(at), bytes)
            .is_err()
        {
            req.answered.store(true, Ordering::Release);
        }
    }

    fn on_zeroes(&self, cmd: &mut Cmd, at: u32, len: u32) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u32);
            self.on_data(cmd, at + done, &ZEROES[..n as usize]);
            done += n;
        }
    }

    fn on_done(&self, slot: usize, gen: u64, c: Cmd, mut error: u32) {
        let mut s = self.lock();
        // A late answer of a connection the slot no longer has: its command counts, the slot is not its.
        let current = s.slots[slot].gen == gen;
        if error == 0 && c.cmd.command == CMD_FLUSH && c.epoch != s.loss_epoch && c.role != Role::Probe {
            // Changes acknowledged before this flush may have been lost with a connection since (and
            // were not kept): the flush cannot vouch for them. Reported once, as the kernel reports a lost
            // page-cache write.
            error = NBD_EIO;
            if c.role == Role::Request {
                // Said to the driver: reported. (The owner's and the engine's own flushes fail too, but
                // leave the report to the driver's next flush.)
                s.maybe_lost = false;
                log::warn!(
                    "NBD: a flush fails: writes the server acknowledged before a connection was lost were \
                     not kept, and may be gone"
                );
            }
        }
        if error == NBD_ESHUTDOWN {
            // Not executed: it goes again elsewhere, and this connection takes nothing new.
            self.stats.shutdown_retries.fetch_add(1, Ordering::Relaxed);
            if current {
                s.slots[slot].draining = true;
            }
            if c.role == Role::Replay && s.replay.started && c.epoch == s.replay.epoch {
                // Not executed: it is the next to go again.
                s.replay.queue.push_front(Kept {
                    cmd: c.cmd,
                    data: c.data.clone(),
                });
            }
            self.requeue(&mut s, c);
            let idle = (current)
                .then(|| s.slots[slot].conn.clone())
                .flatten()
                .filter(|c| c.in_flight() == 0);
            drop(s);
            if let Some(conn) = idle {
                conn.disconnect();
            }
            return;
        }
        match c.role {
            Role::Probe => {}
            Role::Replay => {
                if c.epoch == s.replay.epoch {
                    if error != 0 {
                        // A change that could not be sent again may be gone: the next flush says so,
                        // and no flush taken before can vouch for it.
                        s.maybe_lost = true;
                        s.loss_epoch += 1;
                    }
                    s.replay.on_wire = false;
                    self.work.notify_all();
                }
            }
            Role::Background => {
                s.background_flush = false;
                if error == 0 {
                    self.flushed(&mut s, c.mark);
                }
            }
            Role::Caller => {
                if error == 0 {
                    self.flushed(&mut s, c.mark);
                }
                if let Some(w) = &c.waiter {
                    w.answer(error);
                }
            }
            Role::Request => {
                if error == 0 && self.export.volatile {
                    match c.cmd.command {
                        CMD_FLUSH => self.flushed(&mut s, c.mark),
                        // FUA writes too: durable themselves, but a replay of an older change to the same
                        // bytes must not land on them.
                        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => self.keep(&mut s, &c),
                        _ => {}
                    }
                }
                if s.replay.pending {
                    // The last command of the lost session's time may have finished: the replay may begin.
                    self.work.notify_all();
                }
            }
        }
        let draining_idle = current && s.slots[slot].draining;
        let conn = s.slots[slot].conn.clone();
        drop(s);
        if let Some(req) = c.req {
            if error != 0 {
                req.failed.store(true, Ordering::Relaxed);
            }
            self.part_done(&req);
        }
        if draining_idle {
            if let Some(conn) = conn.filter(|c| c.in_flight() == 0) {
                conn.disconnect();
            }
        }
    }

    /// One command of `req` finished; the last one answers the driver.
    fn part_done(&self, req: &Req) {
        if req.parts.fetch_sub(1, Ordering::AcqRel) != 1 || req.answered.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(vq) = self.queue(req.ticket) else { return };
        let failed = req.failed.load(Ordering::Relaxed);
        if failed {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let used = if failed || req.kind != OpKind::Read {
            1
        } else {
            1 + req.data_len
        };
        let status = if failed {
            VIRTIO_BLK_S_IOERR
        } else {
            VIRTIO_BLK_S_OK
        };
        vq.complete_native(req.ticket, used, Some(status));
        self.touch(req.ticket);
    }

    /// `ticket`'s queue owes an interrupt (raised by [`signal`](Self::signal)).
    fn touch(&self, ticket: Ticket) {
        let q = u32::from(ticket.queue());
        if q < 64 {
            self.touched.fetch_or(1 << q, Ordering::AcqRel);
        } else if let Some(vq) = self.queue(ticket) {
            vq.notify();
        }
    }

    /// Raises the interrupts owed for what was completed since the last flush.
    fn signal(&self) {
        let mut t = self.touched.swap(0, Ordering::AcqRel);
        while t != 0 {
            let q = t.trailing_zeros() as usize;
            t &= t - 1;
            if let Some(vq) = self.queues.get(q) {
                vq.notify();
            }
        }
    }

    /// A change was acknowledged: keep it until a flush covers it (or note that it could not be kept).
    fn keep(&self, s: &mut State, c: &Cmd) {
        s.ack_seq += 1;
        let seq = s.ack_seq;
        let cost = if c.cmd.command == CMD_WRITE {
            u64::from(c.cmd.length)
        } else {
            RANGE_COST
        };
        let limit = self.opts.keep_unflushed_bytes;
        if s.unkept_until > 0 || s.kept_bytes + cost > limit {
            // Past the limit nothing is kept — a partial set sent again could put an older change over a
            // newer one — until a flush covers every change that was not.
            s.unkept_until = seq;
            s.kept.clear();
            s.kept_by_range.clear();
            s.kept_bytes = 0;
        } else {
            let key = (c.cmd.command, c.cmd.offset, c.cmd.length);
            if let Some(old) = s.kept_by_range.insert(key, seq) {
                if let Some(k) = s.kept.remove(&old) {
                    s.kept_bytes -= k.data.as_ref().map_or(RANGE_COST, |d| d.len() as u64);
                }
            }
            s.kept.insert(
                seq,
                Kept {
                    cmd: c.cmd,
                    data: c.data.clone(),
                },
            );
            s.kept_bytes += cost;
        }
        if (s.kept_bytes > limit / 4 || s.unkept_until > 0) && !s.background_flush {
            s.background_flush = true;
            let flush = Cmd::flush(Role::Background, s.loss_epoch, None);
            s.pending.push_back(flush);
            self.work.notify_all();
        }
    }

    /// A flush made everything acknowledged up to `mark` durable.
    fn flushed(&self, s: &mut State, mark: u64) {
        while let Some((&seq, _)) = s.kept.first_key_value() {
            if seq > mark {
                break;
            }
            let k = s.kept.remove(&seq).expect("present");
            s.kept_by_range
                .remove(&(k.cmd.command, k.cmd.offset, k.cmd.length));
            s.kept_bytes -= k.data.as_ref().map_or(RANGE_COST, |d| d.len() as u64);
        }
        if s.unkept_until > 0 && s.unkept_until <= mark {
            s.unkept_until = 0;
        }
    }

    fn on_lost(&self, slot: usize, gen: u64, orphans: Vec<Cmd>, why: &ConnError) {
        let mut s = self.lock();
        if s.stop {
            for c in &orphans {
                if let Some(w) = &c.waiter {
                    w.answer(NBD_EIO);
                }
            }
            return;
        }
        let sl = &mut s.slots[slot];
        let ended_current = sl.gen == gen && sl.conn.as_ref().is_some_and(|c| c.ended());
        if ended_current {
            sl.conn = None;
            sl.draining = false;
            sl.probe_sent = None;
        }
        // Oldest first, in front of everything waiting: they were sent before it.
        for c in orphans.into_iter().rev() {
            if c.role == Role::Request {
                if let Some(req) = &c.req {
                    if !self.live(req) {
                        // Fenced or failed while the server had it: its copy may still run there until
                        // this slot's connection is replaced. Newer commands on its bytes wait.
                        let (a, b) = c.range();
                        if b > a {
                            s.ghosts.push((slot, a, b));
                        }
                        continue;
                    }
                }
            }
            self.requeue(&mut s, c);
        }
        if s.slots.iter().all(|sl| sl.conn.is_none()) && s.down_since.is_none() {
            s.down_since = Some(Instant::now());
        }
        // Any loss may be a restart that lost the server's cache (with several connections each notices
        // on its own clock): what it acknowledged goes again first, from the first change.
        if s.unkept_until > 0 {
            s.maybe_lost = true;
            s.loss_epoch += 1;
        }
        s.replay = Replay {
            epoch: s.replay.epoch + 1,
            pending: !s.kept.is_empty(),
            ..Replay::default()
        };
        drop(s);
        self.work.notify_all();
        if ended_current {
            self.events.lost(slot, &why.to_string());
        }
    }

    /// The watchdog's round: requests that waited too long, fenced or timed-out requests on the wire,
    /// hung connections.
    fn watch(&self) {
        let now = Instant::now();
        let mut cut: Vec<(Arc<Connection<Cmd>>, String)> = Vec::new();
        let mut probe: Vec<Arc<Connection<Cmd>>> = Vec::new();
        let mut polite: Vec<Arc<Connection<Cmd>>> = Vec::new();
        let mut expired = Vec::new();
        let mut stale_ops = Vec::new();
        {
            let mut s = self.lock();
            if s.stop {
                return;
            }
            // Waiting commands: fenced ones are dropped; ones that waited longer than a request may wait
            // for a connection (or past their deadline) fail.
            let limit = self.opts.reconnect_timeout;
            let deadline = self.opts.request_timeout;
            let too_old = |born: Instant| {
                now.duration_since(born) >= limit || deadline.is_some_and(|d| now.duration_since(born) >= d)
            };
            let mut keep = VecDeque::with_capacity(s.pending.len());
            while let Some(c) = s.pending.pop_front() {
                match &c.req {
                    Some(req) if !self.live(req) => {
                        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(req) if too_old(req.born) => expired.push(req.clone()),
                    _ => keep.push_back(c),
                }
            }
            s.pending = keep;
            // Requests nobody could take over (no connection at all) fail the same way.
            while s.incoming.front().is_some_and(|(_, born)| too_old(*born)) {
                let (op, _) = s.incoming.pop_front().expect("checked");
                stale_ops.push(op);
            }
            let hang = self.opts.hang_timeout;
            for sl in s.slots.iter_mut() {
                let Some(conn) = sl.conn.clone() else { continue };
                if conn.ended() || conn.in_flight() == 0 {
                    if sl.draining && !conn.ended() {
                        polite.push(conn);
                    }
                    continue;
                }
                // A request that stopped mattering (fenced, past its deadline) while the server has it:
                // its connection goes, so its copy cannot land after newer writes.
                let deadline = self.opts.request_timeout;
                let mut late = Vec::new();
                let stale = conn.any_in_flight(|c| match &c.req {
                    Some(req) if c.role == Role::Request => {
                        if deadline.is_some_and(|d| now.duration_since(req.born) >= d) {
                            late.push(req.clone());
                        }
                        !self.live(req)
                    }
                    _ => false,
                });
                if !late.is_empty() {
                    expired_late(self, &late);
                }
                if stale || !late.is_empty() {
                    cut.push((conn, "a request fenced or past its deadline was in flight".into()));
                    continue;
                }
                let Some(hang) = hang else { continue };
                let silent = conn.silent_for();
                if let Some(sent) = sl.probe_sent {
                    // Anything received since the probe went out answers it.
                    if conn.heard_since(sent) {
                        sl.probe_sent = None;
                    }
                }
                if sl.draining && silent >= hang {
                    cut.push((conn, "the server shut down and stopped answering".into()));
                    continue;
                }
                if silent < hang {
                    continue;
                }
                match sl.probe_sent {
                    None if !sl.draining => {
                        sl.probe_sent = Some(now);
                        probe.push(conn);
                    }
                    Some(sent) if now.duration_since(sent) >= hang => {
                        self.stats.hung_cut.fetch_add(1, Ordering::Relaxed);
                        cut.push((
                            conn,
                            format!(
                                "nothing received for {} ms with commands in flight, a probe unanswered: \
                                 the connection is considered hung",
                                silent.as_millis()
                            ),
                        ));
                    }
                    _ => {}
                }
            }
        }
        let mut failed_ops = 0;
        for op in stale_ops {
            let Some(vq) = self.queue(op.ticket) else { continue };
            if vq.begin_native(op.ticket).is_some() {
                vq.complete_native(op.ticket, 1, Some(VIRTIO_BLK_S_IOERR));
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.touch(op.ticket);
                failed_ops += 1;
            }
        }
        if !expired.is_empty() || failed_ops > 0 {
            let mut failed = failed_ops;
            for req in &expired {
                req.failed.store(true, Ordering::Relaxed);
                if self.answer_now(req) {
                    failed += 1;
                }
            }
            self.signal();
            if failed > 0 {
                self.events.unavailable(failed);
            }
        }
        for conn in probe {
            self.stats.probes.fetch_add(1, Ordering::Relaxed);
            let block = self.export.block_size;
            let c = Cmd {
                req: None,
                role: Role::Probe,
                cmd: Command {
                    command: CMD_READ,
                    flags: 0,
                    offset: 0,
                    length: block,
                },
                at: 0,
                data: None,
                mark: 0,
                waiter: None,
                epoch: 0,
            };
            // Never waiting for the wire: a sender blocked on it means the server reads nothing, and its
            // write stands for the probe (an answer to anything clears it). A connection that ended
            // meanwhile: nothing to probe.
            let _ = conn.try_send(c.cmd, &[], c);
        }
        for (conn, why) in cut {
            conn.close(&why);
        }
        for conn in polite {
            conn.disconnect();
        }
    }

    /// Fails `req` now (whatever of it is still out): returns whether this answered it.
    fn answer_now(&self, req: &Req) -> bool {
        if req.answered.swap(true, Ordering::AcqRel) {
            return false;
        }
        let Some(vq) = self.queue(req.ticket) else {
            return false;
        };
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let done = vq.complete_native(req.ticket, 1, Some(VIRTIO_BLK_S_IOERR));
        self.touch(req.ticket);
        matches!(done, vduse_core::queue::Completion::Done)
    }
}

/// Requests past their deadline on the wire fail now (their connection is closed by the caller).
fn expired_late(inner: &Inner, late: &[Arc<Req>]) {
    for req in late {
        if inner.answer_now(req) {
            inner.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }
    inner.signal();
}

fn watchdog(inner: Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        if i.lock().stop {
            return;
        }
        let period = i
            .opts
            .hang_timeout
            .map_or(Duration::from_millis(250), |h| h / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        i.watch();
        drop(i);
        std::thread::sleep(period);
    }
}

/// The receiver of one slot's connection.
struct SlotRx {
    inner: Weak<Inner>,
    slot: usize,
    gen: u64,
}

impl Receiver<Cmd> for SlotRx {
    fn data(&self, cmd: &mut Cmd, at: u32, bytes: &[u8]) {
        if let Some(i) = self.inner.upgrade() {
            i.on_data(cmd, at, bytes);
        }
    }
    fn zeroes(&self, cmd: &mut Cmd, at: u32, len: u32) {
        if let Some(i) = self.inner.upgrade() {
            i.on_zeroes(cmd, at, len);
        }
    }
    fn done(&self, cmd: Cmd, error: u32) {
        if let Some(i) = self.inner.upgrade() {
            i.on_done(self.slot, self.gen, cmd, error);
        }
    }
    fn lost(&self, orphans: Vec<Cmd>, why: ConnError) {
        if let Some(i) = self.inner.upgrade() {
            i.on_lost(self.slot, self.gen, orphans, &why);
        }
    }
    fn flush(&self) {
        if let Some(i) = self.inner.upgrade() {
            i.signal();
        }
    }
}
