//! One NBD connection in its transmission phase: commands out, replies in — framing and the cookie
//! table, no policy. What to resend where, and when a quiet connection is hung, is the caller's.
//!
//! Commands are written whole (header and payload in one `writev` loop, under a lock, so commands of
//! several threads never interleave on the wire). A receiver thread of its own reads replies into one
//! buffer and hands their parts to a [`Receiver`]. When the connection ends — the server closed it, it
//! broke the protocol, or [`Connection::close`] cut it — every command still in flight is handed back
//! once, through [`Receiver::lost`], and nothing is accepted any more: a command is either answered or
//! handed back, never both, never neither.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use super::proto::{self, Expect, ProtocolError, Replies, ReplyParser};

/// Bytes read from the socket at a time.
const RECEIVE: usize = 256 << 10;

/// Why a connection ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    #[error("the server closed the connection")]
    Closed,
    #[error("the connection was closed: {0}")]
    Cut(String),
    #[error("NBD server: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Io(String),
}

/// A command as it goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
}

/// A write's data, shared by the command on the wire and whoever keeps it for a replay (an `Arc` of the
/// staging `Vec` itself: no second copy to make it shareable).
pub type Payload = Arc<Vec<u8>>;

/// A command to send, its payload (a write's data) and its owner's state.
pub type Outgoing<P> = (Command, Option<Payload>, P);

/// What a connection tells its owner. Called on the connection's receiver thread (and `lost` also on a
/// sender's, when a send fails): never block for long. `data` and `zeroes` run with the connection's
/// cookie table locked: they must not call back into the connection. `done` for a command answered just
/// as the connection ended may arrive after `lost` (never for one of its orphans).
pub trait Receiver<P>: Send + Sync + 'static {
    /// Read data for `cmd`, `at` bytes into its range.
    fn data(&self, cmd: &mut P, at: u32, bytes: &[u8]);
    /// `len` bytes of zeroes for `cmd` (a hole), `at` bytes into its range.
    fn zeroes(&self, cmd: &mut P, at: u32, len: u32);
    /// `cmd` was answered: `error` 0, or the server's errno.
    fn done(&self, cmd: P, error: u32);
    /// The connection ended; `orphans` were in flight, unanswered (oldest first).
    fn lost(&self, orphans: Vec<P>, why: ConnError);
    /// The replies of one read from the socket were delivered: a moment to batch (interrupts).
    fn flush(&self) {}
}

struct Table<P> {
    next_cookie: u64,
    /// Cookie → the command's shape, its owner's state, and its send order.
    inflight: HashMap<u64, (Expect, P, u64)>,
    /// Why it ended, once it did: nothing is taken any more.
    ended: Option<ConnError>,
}

pub struct Connection<P> {
    fd: OwnedFd,
    table: Mutex<Table<P>>,
    /// Held while a command is written: commands never interleave on the wire.
    send: Mutex<()>,
    receiver: Arc<dyn Receiver<P>>,
    /// Microseconds since `born` when a byte last arrived, rounded up (liveness).
    heard: AtomicU64,
    born: Instant,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<P: Send + 'static> Connection<P> {
    /// Takes over `fd` (a connected stream socket, handshake done; `structured`: structured replies were
    /// agreed) and starts its receiver thread, which runs (and keeps the connection alive) until the
    /// connection ends: the owner ends it with [`close`](Self::close) or [`disconnect`](Self::disconnect).
    pub fn start(
        fd: OwnedFd,
        structured: bool,
        receiver: Arc<dyn Receiver<P>>,
    ) -> std::io::Result<Arc<Self>> {
        set_blocking(&fd)?;
        let conn = Arc::new(Self {
            fd,
            table: Mutex::new(Table {
                next_cookie: 1,
                inflight: HashMap::new(),
                ended: None,
            }),
            send: Mutex::new(()),
            receiver,
            heard: AtomicU64::new(0),
            born: Instant::now(),
            thread: Mutex::new(None),
        });
        let c = conn.clone();
        let thread = std::thread::Builder::new()
            .name("vduse-nbd-rx".into())
            .spawn(move || c.receive(structured))?;
        *lock(&conn.thread) = Some(thread);
        Ok(conn)
    }

    /// Sends `cmd` (with `payload` for a write, exactly `length` bytes). If the connection ended (or ends
    /// while this writes), `state` is handed back with why — through the return value if it never
    /// counted as in flight, else through [`Receiver::lost`] like every other orphan.
    pub fn send(&self, cmd: Command, payload: &[&[u8]], state: P) -> Result<(), (P, ConnError)> {
        let wire = lock(&self.send);
        self.send_locked(wire, cmd, payload, state)
    }

    /// [`send`](Self::send), unless another command is being written right now (a sender blocked on a
    /// server that reads nothing): then `state` comes straight back with `None`, nothing sent.
    pub fn try_send(&self, cmd: Command, payload: &[&[u8]], state: P) -> Result<(), (P, Option<ConnError>)> {
        match self.send.try_lock() {
            Ok(wire) => self
                .send_locked(wire, cmd, payload, state)
                .map_err(|(p, e)| (p, Some(e))),
            Err(_) => Err((state, None)),
        }
    }

    fn send_locked(
        &self,
        wire: MutexGuard<'_, ()>,
        cmd: Command,
        payload: &[&[u8]],
        state: P,
    ) -> Result<(), (P, ConnError)> {
        let cookie = {
            let mut t = lock(&self.table);
            if let Some(why) = &t.ended {
                return Err((state, why.clone()));
            }
            let cookie = t.next_cookie;
            t.next_cookie += 1;
            let expect = Expect {
                read: cmd.command == proto::CMD_READ,
                offset: cmd.offset,
                length: cmd.length,
            };
            t.inflight.insert(cookie, (expect, state, cookie));
            cookie
        };
        let header = proto::encode_request(cmd.flags, cmd.command, cookie, cmd.offset, cmd.length);
        let mut parts = Vec::with_capacity(1 + payload.len());
        parts.push(IoSlice::new(&header));
        parts.extend(payload.iter().map(|p| IoSlice::new(p)));
        let sent = write_all(&self.fd, &mut parts);
        drop(wire);
        if let Err(e) = sent {
            // The command may be half on the wire: the connection is unusable. Its orphans (this one
            // included) go back through `lost` (which may send elsewhere: the wire lock is not held).
            self.end(ConnError::Io(format!("send: {e}")));
        }
        Ok(())
    }

    /// Sends several commands in one system call (headers and payloads in one `writev`); each comes
    /// with its payload (a write's data), which this holds until the write ended — the command's own
    /// state may be answered or handed back (and dropped) meanwhile by a broken server or a cut.
    /// Commands the connection did not take (it had ended) come back, in order; if it ends while they
    /// are written, they are orphans like the others ([`Receiver::lost`]).
    pub fn send_all(&self, cmds: Vec<Outgoing<P>>) -> Result<(), (Vec<P>, ConnError)> {
        let wire = lock(&self.send);
        let mut headers: Vec<[u8; proto::REQUEST_LEN]> = Vec::with_capacity(cmds.len());
        let mut datas: Vec<Option<Payload>> = Vec::with_capacity(cmds.len());
        {
            let mut t = lock(&self.table);
            if let Some(why) = &t.ended {
                let why = why.clone();
                return Err((cmds.into_iter().map(|(_, _, p)| p).collect(), why));
            }
            for (cmd, data, state) in cmds {
                let cookie = t.next_cookie;
                t.next_cookie += 1;
                headers.push(proto::encode_request(
                    cmd.flags,
                    cmd.command,
                    cookie,
                    cmd.offset,
                    cmd.length,
                ));
                datas.push(data);
                let expect = Expect {
                    read: cmd.command == proto::CMD_READ,
                    offset: cmd.offset,
                    length: cmd.length,
                };
                t.inflight.insert(cookie, (expect, state, cookie));
            }
        }
        let mut parts = Vec::with_capacity(headers.len() * 2);
        for (h, d) in headers.iter().zip(&datas) {
            parts.push(IoSlice::new(h));
            if let Some(d) = d {
                parts.push(IoSlice::new(d));
            }
        }
        let sent = write_all(&self.fd, &mut parts);
        drop(wire);
        if let Err(e) = sent {
            self.end(ConnError::Io(format!("send: {e}")));
        }
        Ok(())
    }

    /// Whether any command in flight satisfies `f` (called with the cookie table locked: `f` must not
    /// call back into the connection).
    pub fn any_in_flight(&self, mut f: impl FnMut(&P) -> bool) -> bool {
        lock(&self.table).inflight.values().any(|(_, p, _)| f(p))
    }

    /// Waits for the receiver thread to end (after the connection ended: at once). Not from a callback.
    pub fn join(&self) {
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.table).inflight.len()
    }

    /// Whether the connection ended.
    pub fn ended(&self) -> bool {
        lock(&self.table).ended.is_some()
    }

    /// How long since a byte last arrived (or since the start).
    pub fn silent_for(&self) -> std::time::Duration {
        let heard = std::time::Duration::from_micros(self.heard.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(heard)
    }

    /// Whether a byte arrived at `t` or later.
    pub fn heard_since(&self, t: Instant) -> bool {
        let heard = std::time::Duration::from_micros(self.heard.load(Ordering::Relaxed));
        self.born + heard >= t
    }

    /// Cuts the connection: the server sees it go at once, and what was in flight is handed back.
    pub fn close(&self, why: &str) {
        self.end(ConnError::Cut(why.to_owned()));
    }

    /// Ends the session politely (NBD_CMD_DISC), then closes. Commands in flight are handed back.
    pub fn disconnect(&self) {
        // A sender blocked on a server that reads nothing holds the wire: then no NBD_CMD_DISC, and the
        // shutdown below unblocks it.
        if let Ok(_wire) = self.send.try_lock() {
            if !self.ended() {
                let h = proto::encode_request(0, proto::CMD_DISC, 0, 0, 0);
                // Best effort, never waiting on a full socket: the connection closes either way.
                // SAFETY: sending from a buffer we own, of its length, on our own socket.
                unsafe {
                    libc::send(
                        self.fd.as_raw_fd(),
                        h.as_ptr().cast(),
                        h.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
            }
        }
        self.end(ConnError::Cut("disconnected".into()));
    }

    /// Marks the connection ended (once), hands back what was in flight, and wakes the receiver.
    fn end(&self, why: ConnError) {
        let orphans = {
            let mut t = lock(&self.table);
            if t.ended.is_some() {
                return;
            }
            t.ended = Some(why.clone());
            let mut all: Vec<(u64, P)> = t.inflight.drain().map(|(_, (_, p, seq))| (seq, p)).collect();
            all.sort_unstable_by_key(|(seq, _)| *seq);
            all.into_iter().map(|(_, p)| p).collect::<Vec<_>>()
        };
        // SAFETY: shutdown on our own socket fd; it stays open (and valid) until `self` drops.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        self.receiver.lost(orphans, why);
    }

    fn receive(self: Arc<Self>, structured: bool) {
        let mut parser = ReplyParser::new(structured);
        let mut buf = vec![0u8; RECEIVE];
        let why = loop {
            // SAFETY: reading into a buffer we own, of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break ConnError::Io(format!("receive: {e}"));
            }
            if n == 0 {
                break ConnError::Closed;
            }
            self.heard
                .store(self.born.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
            let mut t = lock(&self.table);
            if t.ended.is_some() {
                return;
            }
            let mut sink = Sink {
                table: &mut t,
                receiver: &*self.receiver,
                done: Vec::new(),
            };
            let fed = parser.feed(&buf[..n as usize], &mut sink);
            let done = std::mem::take(&mut sink.done);
            drop(t);
            // Answered commands are completed outside the table's lock.
            for (p, error) in done {
                self.receiver.done(p, error);
            }
            self.receiver.flush();
            if let Err(e) = fed {
                break ConnError::Protocol(e);
            }
        };
        self.end(why);
    }
}

impl<P> Drop for Connection<P> {
    fn drop(&mut self) {
        // The receiver thread holds an Arc: by now it has ended.
        if let Some(t) = self.thread.get_mut().ok().and_then(|t| t.take()) {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The parser's view of the cookie table while a piece of the stream is taken apart.
struct Sink<'a, P: 'static> {
    table: &'a mut Table<P>,
    receiver: &'a dyn Receiver<P>,
    done: Vec<(P, u32)>,
}

impl<P: 'static> Replies for Sink<'_, P> {
    fn expect(&mut self, cookie: u64) -> Option<Expect> {
        self.table.inflight.get(&cookie).map(|(e, _, _)| *e)
    }
    fn data(&mut self, cookie: u64, at: u32, bytes: &[u8]) {
        if let Some((_, p, _)) = self.table.inflight.get_mut(&cookie) {
            self.receiver.data(p, at, bytes);
        }
    }
    fn zeroes(&mut self, cookie: u64, at: u32, len: u32) {
        if let Some((_, p, _)) = self.table.inflight.get_mut(&cookie) {
            self.receiver.zeroes(p, at, len);
        }
    }
    fn done(&mut self, cookie: u64, error: u32) {
        if let Some((_, p, _)) = self.table.inflight.remove(&cookie) {
            self.done.push((p, error));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_blocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on our own fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes every byte of `parts` (a partial write continues where it stopped).
fn write_all(fd: &OwnedFd, mut parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !parts.is_empty() {
        let n = parts.len().min(libc::UIO_MAXIOV as usize);
        // SAFETY: IoSlice is ABI-compatible with iovec; each points at memory valid for reading for the
        // call; MSG_NOSIGNAL: a peer that went away is EPIPE, not a signal.
        let written = unsafe {
            let msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: parts.as_ptr() as *mut libc::iovec,
                msg_iovlen: n,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if written < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        IoSlice::advance_slices(&mut parts, written as usize);
    }
    Ok(())
}
