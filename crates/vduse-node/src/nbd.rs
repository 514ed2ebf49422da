//! The native NBD data path, from JavaScript: dialing a server (TypeScript handshakes over one socket,
//! the engine keeps its twin for the transmission phase), the engine's options and its events.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::{AsyncTask, Buffer};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status, Task};
use napi_derive::napi;
use vduse_backends::nbd::engine::{Events, NbdEngine, NbdStats};

use crate::error::{Failure, Parked};

/// Where an NBD server listens: a UNIX socket `path`, or TCP `host` and `port`.
#[napi(object)]
pub struct NbdDialTarget {
    pub path: Option<String>,
    pub host: Option<String>,
    pub port: Option<u32>,
}

/// A connected socket to an NBD server, in two halves: `fd` for JavaScript to handshake over (a
/// `net.Socket` takes it, and closes it), and its twin the engine takes for the transmission phase
/// (`BindingDevice.nbdAttach`). Closing (or collecting) this object closes the engine's half if it
/// was never attached.
#[napi]
pub struct BindingNbdSocket {
    keep: Option<OwnedFd>,
    fd: i32,
}

#[napi]
impl BindingNbdSocket {
    /// JavaScript's half.
    #[napi(getter)]
    pub fn fd(&self) -> i32 {
        self.fd
    }

    /// Closes the engine's half (if not attached). JavaScript's half is its own to close.
    #[napi]
    pub fn close(&mut self) {
        self.keep = None;
    }
}

impl BindingNbdSocket {
    pub fn take(&mut self) -> Option<OwnedFd> {
        self.keep.take()
    }
}

pub struct Dial {
    target: Option<NbdDialTarget>,
    timeout: Duration,
    failure: Parked,
}

fn unreachable_error(what: String, e: std::io::Error) -> Failure {
    Failure::new(
        "ERR_VDUSE_UNREACHABLE",
        format!("cannot connect to {what}: {e}"),
        e.raw_os_error().map(|n| -n),
        Some("connect"),
        Some("is the server running, and the address right?"),
    )
}

impl Task for Dial {
    type Output = (OwnedFd, OwnedFd);
    type JsValue = BindingNbdSocket;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let target = self.target.take().expect("computed once");
        let fd: OwnedFd = match (&target.path, &target.host) {
            (Some(path), _) => UnixStream::connect(path)
                .map_err(|e| self.failure.park(unreachable_error(path.clone(), e)))?
                .into(),
            (None, Some(host)) => {
                let port = target.port.unwrap_or(10809) as u16;
                let what = format!("{host}:{port}");
                let addrs = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| self.failure.park(unreachable_error(what.clone(), e)))?;
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, self.timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let stream = found.ok_or_else(|| self.failure.park(unreachable_error(what.clone(), last)))?;
                // Requests leave at once; a peer host that vanishes is noticed even while every command is slow.
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                stream.into()
            }
            (None, None) => {
                return Err(self
                    .failure
                    .park(crate::error::native("an NBD target needs a path or a host")));
            }
        };
        let twin = fd
            .try_clone()
            .map_err(|e| self.failure.park(crate::error::syscall("dup", e)))?;
        Ok((fd, twin))
    }

    fn resolve(&mut self, _env: Env, (keep, js): Self::Output) -> napi::Result<BindingNbdSocket> {
        Ok(BindingNbdSocket {
            keep: Some(keep),
            fd: js.into_raw_fd(),
        })
    }

    fn reject(&mut self, env: Env, err: napi::Error) -> napi::Result<BindingNbdSocket> {
        self.failure.reject(&env, err)
    }
}

/// TCP keepalive: a peer that vanished without a word is found after about 10 s + 3 × 5 s of silence.
fn keepalive(stream: &TcpStream) {
    let fd = stream.as_raw_fd();
    let set = |level: i32, name: i32, value: i32| {
        // SAFETY: setsockopt with an int option on our own socket.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// Connects to an NBD server (off the JavaScript thread, at most `timeoutMs` per address for TCP).
/// Throws ERR_VDUSE_UNREACHABLE.
#[napi(ts_return_type = "Promise<BindingNbdSocket>")]
pub fn nbd_dial(target: NbdDialTarget, timeout_ms: u32) -> AsyncTask<Dial> {
    AsyncTask::new(Dial {
        target: Some(target),
        timeout: Duration::from_millis(u64::from(timeout_ms.max(1))),
        failure: Parked::default(),
    })
}

/// What the handshake learnt, as the engine uses it (see `vduse_backends::nbd::engine::Export`).
#[napi(object)]
pub struct NbdExportJs {
    pub size: f64,
    pub block_size: u32,
    pub max_payload: u32,
    pub max_range: u32,
    pub volatile: bool,
    pub always_fua: bool,
}

/// The engine's options; times in milliseconds, 0 for "none" where that makes sense.
#[napi(object)]
pub struct NbdOptionsJs {
    pub connections: u32,
    pub hang_timeout_ms: f64,
    pub reconnect_timeout_ms: f64,
    pub request_timeout_ms: f64,
    pub keep_unflushed_bytes: f64,
}

/// `lost` (a connection `slot` ended: `message`) or `unavailable` (`failed` requests failed waiting
/// for a connection).
#[napi(object)]
pub struct NbdEventJs {
    pub kind: String,
    pub slot: Option<u32>,
    pub message: Option<String>,
    pub failed: Option<u32>,
}

/// The engine's counters.
#[napi(object)]
#[derive(Clone, Default)]
pub struct NbdCounters {
    pub requests: f64,
    pub errors: f64,
    pub fenced: f64,
    pub timed_out: f64,
    pub shutdown_retries: f64,
    pub probes: f64,
    pub hung_cut: f64,
    pub reconnects: f64,
    pub replayed: f64,
    /// Requests and commands not answered yet.
    pub pending: f64,
    /// Acknowledged changes kept until a flush, and their bytes.
    pub unflushed_changes: f64,
    pub unflushed_bytes: f64,
    /// Commands sent per connection since the start.
    pub sent: Vec<f64>,
    /// Connections up.
    pub connections: u32,
}

pub fn counters(engine: &NbdEngine) -> NbdCounters {
    let s: &NbdStats = engine.stats();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let (changes, bytes) = engine.unflushed();
    NbdCounters {
        requests: get(&s.requests),
        errors: get(&s.errors),
        fenced: get(&s.fenced),
        timed_out: get(&s.timed_out),
        shutdown_retries: get(&s.shutdown_retries),
        probes: get(&s.probes),
        hung_cut: get(&s.hung_cut),
        reconnects: get(&s.reconnects),
        replayed: get(&s.replayed),
        pending: engine.pending() as f64,
        unflushed_changes: changes as f64,
        unflushed_bytes: bytes as f64,
        sent: engine.sent().into_iter().map(|n| n as f64).collect(),
        connections: engine.connections() as u32,
    }
}

pub type NbdSink = ThreadsafeFunction<NbdEventJs, (), NbdEventJs, Status, false, true, 0>;

/// The engine's events, to JavaScript (never blocking the engine's threads).
pub struct JsNbdEvents {
    pub sink: NbdSink,
}

impl Events for JsNbdEvents {
    fn lost(&self, slot: usize, why: &str) {
        let e = NbdEventJs {
            kind: "lost".into(),
            slot: Some(slot as u32),
            message: Some(why.to_owned()),
            failed: None,
        };
        let _ = self.sink.call(e, ThreadsafeFunctionCallMode::NonBlocking);
    }
    fn unavailable(&self, failed: usize) {
        let e = NbdEventJs {
            kind: "unavailable".into(),
            slot: None,
            message: None,
            failed: Some(failed as u32),
        };
        let _ = self.sink.call(e, ThreadsafeFunctionCallMode::NonBlocking);
    }
}

/// The engine of a device, with what the binding needs to stop it.
pub type Engine = Arc<NbdEngine>;

/// The engine's own flush (`NbdEngine::flush`), off the JavaScript thread.
pub struct Flush {
    pub engine: Engine,
    pub timeout: Duration,
    pub failure: Parked,
}

impl Task for Flush {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        self.engine.flush(self.timeout).map_err(|e| {
            let errno = e.raw_os_error().map(|n| -n).or(Some(-libc::EIO));
            self.failure.park(Failure::new(
                "ERR_VDUSE_SYSCALL",
                format!("NBD server: the flush failed: {e}"),
                errno,
                Some("NBD_CMD_FLUSH"),
                None,
            ))
        })
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }

    fn reject(&mut self, env: Env, err: napi::Error) -> napi::Result<()> {
        self.failure.reject(&env, err)
    }
}

/// A blk device served over NBD on worker threads (`DeviceInit.nbdModel`): what it offers the driver.
#[napi(object)]
pub struct NbdModelInit {
    /// The GET_ID answer (at most 20 bytes).
    pub serial: Buffer,
    pub read_only: bool,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

pub fn model_of(init: &NbdModelInit) -> vduse_backends::nbd::model::NbdBlk {
    vduse_backends::nbd::model::NbdBlk::new(
        &init.serial,
        vduse_backends::nbd::model::Offer {
            read_only: init.read_only,
            flush: init.flush,
            discard: init.discard,
            write_zeroes: init.write_zeroes,
        },
    )
}
