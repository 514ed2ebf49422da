//! The socket side of a vhost-user device: binding or dialling, the control thread's loop over one client
//! at a time, the relay of the client's kicks into the queues' own eventfds, and the checks on the fds a
//! client sends.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vhost::vhost_user::{BackendReqHandler, Error as VuError, Result as VuResult};
use vmm_sys_util::eventfd::EventFd;

use super::{Session, Shared};
use crate::device::DeviceEvent;
use crate::error::{Error, Result};
use crate::lifecycle::Stop;

/// How long a client may leave a message half-sent (or our reply unread) before it is dropped: the control
/// thread serves every ring's kicks and must not wait on one client for long.
pub(super) const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `file` is an eventfd: kick and call fds must be (a regular file is always readable and
/// never blocks as a non-blocking fd would; a FIFO or FUSE file could block).
pub(super) fn is_eventfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// Checks that a client's fd is an eventfd and makes it non-blocking: the control thread and the serving
/// threads must never wait on it (a full counter, a client that drains it itself).
pub(super) fn set_nonblocking(file: &File) -> VuResult<()> {
    if !is_eventfd(file) {
        return Err(VuError::InvalidParam);
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own only change its status flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(VuError::InvalidParam)
    }
}

/// Binds the device's socket at `path`. A stale socket file there (its server gone) is replaced; a live
/// server's socket, or anything that is not a socket, is refused. Returns the listener and the socket
/// file's identity.
pub(super) fn bind_socket(name: &str, path: &Path) -> Result<(UnixListener, (u64, u64))> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Busy {
                    name: name.into(),
                    reason: "another server listens on its vhost-user socket",
                });
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(Error::InvalidConfig(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::sys("stat(vhost-user socket)", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::sys("bind(vhost-user socket)", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::sys("fcntl(vhost-user socket)", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| Error::sys("stat(vhost-user socket)", e))?;
    Ok((listener, (m.dev(), m.ino())))
}

const BROKEN: i16 = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;

/// Where clients come from: our listening socket, or a VMM's that we connect to.
pub(super) enum Endpoint {
    Listen(UnixListener),
    Connect(PathBuf),
}

/// How often connect mode tries again while the VMM's socket is not there (or refuses).
pub const RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Endpoint {
    /// The next client, or None once `stop` is readable.
    fn next(&self, name: &str, stop: &EventFd) -> Option<UnixStream> {
        loop {
            match self {
                Endpoint::Listen(listener) => {
                    match crate::poll_readable(&[stop.as_raw_fd(), listener.as_raw_fd()], -1) {
                        Ok(r) if r[0] != 0 => return None,
                        Ok(_) => {}
                        Err(e) => {
                            log::error!("device {name:?}: poll: {e}");
                            return None;
                        }
                    }
                    match listener.accept() {
                        Ok((s, _)) => return Some(s),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            // EMFILE and the like: do not spin on them.
                            log::warn!("device {name:?}: accept: {e}");
                            if !wait_stop(stop, 100) {
                                return None;
                            }
                        }
                    }
                }
                Endpoint::Connect(path) => match connect_nonblocking(path) {
                    Ok(s) => return Some(s),
                    Err(e) => {
                        log::debug!("device {name:?}: connect to {}: {e}", path.display());
                        if !wait_stop(stop, RECONNECT_EVERY.as_millis() as i32) {
                            return None;
                        }
                    }
                },
            }
        }
    }
}

/// Connects to the UNIX socket at `path` without blocking: a VMM whose backlog is full (QEMU listens with
/// a backlog of one and stops accepting while it has a back-end) is EAGAIN, tried again later, never a
/// wait that close() could not cut. The stream is left blocking.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: a new socket; the fd is owned by the UnixStream right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes, alive for the call.
    let ret = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Waits up to `ms` for `stop`; false if it came (or the wait failed: then stop too).
fn wait_stop(stop: &EventFd, ms: i32) -> bool {
    matches!(crate::poll_readable(&[stop.as_raw_fd()], ms), Ok(r) if r[0] == 0)
}

pub(super) fn control_loop(shared: &Arc<Shared>, endpoint: Endpoint, stop: &EventFd) {
    let name = shared.life.name.clone();
    loop {
        let Some(stream) = endpoint.next(&name, stop) else {
            return;
        };
        // Blocking reads, bounded: a message is read whole once its first byte is there, and a client
        // that stops half-way is dropped rather than waited for.
        let bounded = stream.set_nonblocking(false).is_ok()
            && stream.set_read_timeout(Some(MESSAGE_TIMEOUT)).is_ok()
            && stream.set_write_timeout(Some(MESSAGE_TIMEOUT)).is_ok();
        if !bounded {
            log::warn!("device {name:?}: cannot set up the client's socket; dropped");
            continue;
        }
        *shared.connection.lock() = stream.try_clone().ok();
        shared.drop_client.store(false, Ordering::Release);
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Release);
        log::info!("device {name:?}: a vhost-user client connected");
        let began = Instant::now();
        let stopped = serve_client(shared, stream, stop);
        *shared.connection.lock() = None;
        shared.connected.store(false, Ordering::Release);
        // Stopped by close(), the client is still there and sees what completes; otherwise it is gone.
        shared.reset(if stopped { Stop::Leave } else { Stop::Gone });
        log::info!("device {name:?}: the vhost-user client left");
        if shared.poisoned.load(Ordering::Acquire) {
            // Fail closed: a new client could be handed pages this process may still write.
            log::error!(
                "device {name:?}: not serving further vhost-user clients (memory could not be made safe)"
            );
            shared.life.emit(DeviceEvent::Broken);
            return;
        }
        if stopped {
            return;
        }
        // A VMM that hangs up at once must not make this a busy loop of dial, reset, dial.
        if matches!(endpoint, Endpoint::Connect(_))
            && began.elapsed() < RECONNECT_EVERY
            && !wait_stop(stop, RECONNECT_EVERY.as_millis() as i32)
        {
            return;
        }
    }
}

/// Serves one client until it leaves, breaks the protocol, or `stop`. True if stopped.
fn serve_client(shared: &Arc<Shared>, stream: UnixStream, stop: &EventFd) -> bool {
    let name = &shared.life.name;
    let mut handler = BackendReqHandler::from_stream(
        stream,
        Arc::new(Session {
            shared: shared.clone(),
        }),
    );
    loop {
        // The stop fd, the socket, then the kick fd of every running ring.
        let mut fds = vec![stop.as_raw_fd(), handler.as_raw_fd()];
        let mut rings = Vec::new();
        for (i, s) in shared.rings.setups.iter().enumerate() {
            let s = s.lock();
            if let (true, Some(kick)) = (s.started, s.kick.as_ref()) {
                fds.push(kick.as_raw_fd());
                rings.push(i);
            }
        }
        let ready = match crate::poll_readable(&fds, -1) {
            Ok(r) => r,
            Err(e) => {
                log::error!("device {name:?}: poll: {e}");
                return true;
            }
        };
        if ready[0] != 0 {
            return true;
        }
        for (k, &i) in rings.iter().enumerate() {
            let revents = ready[2 + k];
            if revents & BROKEN != 0 {
                log::warn!(
                    "device {name:?}: queue {i}: the client's kick fd is unusable; dropping the client"
                );
                return false;
            }
            if revents != 0 {
                relay_kick(shared, i);
            }
        }
        if ready[1] != 0 {
            shared.refused_with_ack.store(false, Ordering::Release);
            match handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected | VuError::PartialMessage) => return false,
                // Refused whole by a handler whose answer is an ack: nothing changed, the message was
                // read whole and (when asked for) answered, so the session is in step.
                Err(e @ (VuError::InvalidParam | VuError::InvalidOperation(_)))
                    if shared.refused_with_ack.load(Ordering::Acquire) =>
                {
                    log::debug!("device {name:?}: vhost-user request refused: {e}");
                }
                // SET_VRING_ENABLE before SET_FEATURES (QEMU's virtio-net does that): the crate ignores
                // it, unanswered, as no answer is owed.
                Err(e @ VuError::InactiveFeature(_)) => {
                    log::debug!("device {name:?}: vhost-user request ignored: {e}");
                }
                // Anything else may owe the client a reply nobody will send: it must not wait for ever.
                Err(e) => {
                    log::warn!("device {name:?}: vhost-user client dropped: {e}");
                    return false;
                }
            }
            if shared.drop_client.load(Ordering::Acquire) {
                return false;
            }
        }
    }
}

/// Moves one kick of the client's ring `i` to the queue's own eventfd.
fn relay_kick(shared: &Shared, i: usize) {
    let s = shared.rings.setups[i].lock();
    if let Some(kick) = s.kick.as_ref() {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`, which outlives the call; the fd is an eventfd made
        // non-blocking when the client gave it (EAGAIN: someone else drained it; the relay is harmless).
        let _ = unsafe { libc::read(kick.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
    drop(s);
    let _ = shared.life.kicks[i].write(1);
}
