//! A virtio-net device bridged to a kernel TAP interface, served natively: frames never pass through
//! JavaScript. TX: each chain's virtio-net header is copied out of the driver's buffers under its ticket
//! and checked *in the copy*; the tap gets that copy and, in the same `writev`, the rest of the frame
//! straight from the driver's buffers, pinned — the tap takes the same 12-byte header (`IFF_VNET_HDR`),
//! offloads included. The driver cannot change the header between the check and the send, and a fence
//! waits for the pins (or revokes them, and the `writev` fails) rather than turning the rest of a frame
//! into zeros on the wire; the request stays in flight until the `writev` returned, so a drain waits for
//! it. RX: a reader thread reads a frame (header + data) from the tap into one buffer and spreads it over
//! the receive buffers the driver posted (`num_buffers` with MRG_RXBUF), which the model holds until then,
//! with ticket-checked copies — held buffers are given back at once on a reset, so nothing may write into
//! them outside the ring lock — and publishes them with one used-index store: the driver never sees part
//! of a frame.
//!
//! The session's negotiated features come with the receive queue (`Virtqueue::features`), so a frame is
//! always shaped for the driver that will read it: a header the driver did not negotiate (a GSO or
//! partial-checksum frame the tap queued before a renegotiation) is dropped, `DATA_VALID` is cleared
//! without GUEST_CSUM, and without MRG_RXBUF a frame takes exactly one buffer.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vduse_core::memory::Pins;
use vduse_core::queue::{Owner, Part};
use vduse_core::{Completer, DeviceModel, Done, RequestBatch};

use crate::nic::{
    header_allowed, Delivery, ReceiveBuffers, ETH_HLEN, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, HDR,
    MAX_FRAME, RX_QUEUE, TX_QUEUE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;

/// Marks `Shared::offloads` as set (bit 63, SPEED_DUPLEX, is never offered; no offload reads it).
const OFFLOAD_PENDING: u64 = 1 << 63;

/// Frames per wake-up before the reader raises the interrupt for what it delivered.
const RX_BURST: usize = 64;

#[derive(Default)]
pub struct TapStats {
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Frames dropped: larger than the driver's buffers can ever hold, or with offloads it did not
    /// negotiate (queued by the tap before a renegotiation).
    pub rx_dropped: AtomicU64,
}

struct Shared {
    tap: OwnedFd,
    rx: ReceiveBuffers,
    /// A session's features whose offloads the reader is to set on the tap (`OFFLOAD_PENDING` set).
    offloads: AtomicU64,
    /// Written when buffers are posted (and when `offloads` changed): the reader waits on it while none are held.
    posted: EventFd,
    stop: EventFd,
    stats: TapStats,
}

pub struct TapModel {
    shared: Arc<Shared>,
    name: String,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// The TX worker's scratch (no allocation per frame).
    tx: Mutex<TxScratch>,
    tx_error_logged: AtomicBool,
}

/// A failed step of opening a tap: the system call and its error.
pub type TapError = (&'static str, std::io::Error);

/// Opens (or creates) tap interface `name` ("" lets the kernel pick), with virtio-net headers.
fn open_tap(name: &str) -> Result<(OwnedFd, String), TapError> {
    // SAFETY: a plain open of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(("open(/dev/net/tun)", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name (16 bytes), then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() >= 16 || bytes.contains(&0) {
        return Err((
            "ioctl(TUNSETIFF)",
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    ifr[..bytes.len()].copy_from_slice(bytes);
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, 40 bytes on Linux, which `ifr` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
        return Err(("ioctl(TUNSETIFF)", std::io::Error::last_os_error()));
    }
    let hdr_len: libc::c_int = HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
        return Err(("ioctl(TUNSETVNETHDRSZ)", std::io::Error::last_os_error()));
    }
    let end = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
    Ok((fd, String::from_utf8_lossy(&ifr[..end]).into_owned()))
}

impl TapModel {
    /// Opens (or creates) tap interface `name` ("" lets the kernel pick one) and serves a NIC over it.
    pub fn open(name: &str) -> Result<Arc<Self>, TapError> {
        let (tap, name) = open_tap(name)?;
        Self::over(tap, name)
    }

    /// A NIC over `tap`: anything that reads and writes one frame (virtio-net header first) per call,
    /// non-blocking — a tap, or a `SOCK_SEQPACKET` socket in tests.
    pub fn over(tap: OwnedFd, name: String) -> Result<Arc<Self>, TapError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|e| ("eventfd", e));
        let shared = Arc::new(Shared {
            tap,
            rx: ReceiveBuffers::default(),
            offloads: AtomicU64::new(0),
            posted: eventfd()?,
            stop: eventfd()?,
            stats: TapStats::default(),
        });
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("vduse-tap-{name}"))
                .spawn({
                    let name = name.clone();
                    move || read_loop(&shared, &name)
                })
                .map_err(|e| ("spawn", e))?
        };
        Ok(Arc::new(Self {
            shared,
            name,
            reader: Mutex::new(Some(reader)),
            tx: Mutex::new(TxScratch {
                header: [0; HDR],
                pins: Pins::new(),
                iov: Vec::new(),
            }),
            tx_error_logged: AtomicBool::new(false),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> &TapStats {
        &self.shared.stats
    }

    /// Which offloads the tap may hand us: only those the driver accepts (TUNSETOFFLOAD).
    fn configure(tap: &OwnedFd, features: u64) -> std::io::Result<()> {
        let mut offload = 0u32;
        if features & F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument value.
        if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD as _, offload as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn stop(&self) {
        let _ = self.shared.stop.write(1);
        if let Some(t) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }

    fn transmit(&self, batch: &RequestBatch, completer: &Completer) {
        // One worker thread per queue: the scratch is this queue's alone.
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let TxScratch { header, pins, iov } = &mut *tx;
        let queue = completer.queue();
        let features = queue.features();
        for req in batch.iter() {
            let len = req.shape.readable_bytes as usize;
            // The header is copied and checked; the frame goes from the driver's pinned buffers.
            let ok = (HDR + ETH_HLEN..=HDR + MAX_FRAME).contains(&len)
                && queue.read_request(req.ticket, Owner::Model, 0, header) == Ok(HDR)
                && header_allowed(&header[..2], features)
                && queue.pin(
                    req.ticket,
                    Owner::Model,
                    Part::Readable,
                    HDR as u64,
                    (len - HDR) as u64,
                    pins,
                ) == Ok(true)
                // One writev takes at most UIO_MAXIOV pieces (a chain has at most 64 buffers).
                && pins.ranges().len() < 1024;
            if !ok {
                pins.release();
            }
            if ok {
                iov.clear();
                iov.push(libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: HDR,
                });
                iov.extend(pins.ranges().iter().map(|&(p, n)| libc::iovec {
                    iov_base: p.cast(),
                    iov_len: n,
                }));
                // SAFETY: every iovec is our header or a range of a mapping `pins` keep mapped until
                // released below; a message loop that cannot wait for them revokes them (PROT_NONE), and
                // then the writev fails with EFAULT — a system call, never a fault in this process.
                let n = unsafe {
                    libc::writev(
                        self.shared.tap.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as libc::c_int,
                    )
                };
                let err = std::io::Error::last_os_error();
                pins.release();
                // A full tap queue (nobody reads the other side) or a frame the kernel refuses: dropped,
                // as a NIC drops on a full link.
                if n == len as isize {
                    self.shared.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                } else {
                    // EAGAIN: the tap's queue is full; EIO: the tap is down (no carrier). Both are a
                    // NIC dropping on its link; anything else is worth a word.
                    let link =
                        err.kind() == std::io::ErrorKind::WouldBlock || err.raw_os_error() == Some(libc::EIO);
                    if n < 0 && !link && !self.tx_error_logged.swap(true, Ordering::Relaxed) {
                        log::warn!("tap {}: a frame could not be sent ({err}); dropped (logged once, counted in txDropped)", self.name);
                    }
                    self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            completer.complete(req.ticket, 0, None);
        }
    }
}

/// The TX worker's reusable state.
struct TxScratch {
    /// The frame's virtio-net header, as copied and checked.
    header: [u8; HDR],
    pins: Pins,
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs point at the header beside them or into mappings `pins` hold; they are rebuilt for
// every frame and used only by the thread holding the scratch's lock.
unsafe impl Send for TxScratch {}

impl Drop for TapModel {
    fn drop(&mut self) {
        self.stop();
    }
}

impl DeviceModel for TapModel {
    fn started(&self, features: u64) {
        // Not here: TUNSETOFFLOAD takes the RTNL lock, which virtio_net's probe holds while it waits for
        // this very message to be answered. The reader sets it; meanwhile it fits every frame to the new
        // features anyway (`fit_header`).
        self.shared
            .offloads
            .store(features | OFFLOAD_PENDING, Ordering::Release);
        let _ = self.shared.posted.write(1);
    }

    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer) {
        match queue {
            TX_QUEUE => self.transmit(batch, completer),
            RX_QUEUE => {
                self.shared.rx.post(batch, completer);
                let _ = self.shared.posted.write(1);
            }
            _ => {
                for req in batch.iter() {
                    completer.complete(req.ticket, 0, None);
                }
            }
        }
        completer.flush();
    }
}

/// Longest a frame waits for the driver to post enough buffers before it is dropped: a driver that posts
/// none while the frame blocks its receive queue must not stall it for good.
const PENDING_MS: i32 = 1000;

/// Polls `fds` (stop first) for up to `timeout_ms` (-1: no limit). `None` when `stop` fired; else
/// whether anything is ready.
fn wait(fds: &mut [libc::pollfd], timeout_ms: i32) -> Option<bool> {
    for f in fds.iter_mut() {
        f.revents = 0;
    }
    // SAFETY: `fds` is a valid array for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n > 0 && fds[0].revents != 0 {
        return None;
    }
    Some(n > 0)
}

fn read_loop(shared: &Shared, name: &str) {
    let mut frame = vec![0u8; HDR + MAX_FRAME];
    let mut done: Vec<Done> = Vec::new();
    // A frame read but not delivered yet (too few buffers posted): the tap's own queue holds the rest.
    let mut pending: usize = 0;
    let pollfd = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let have_buffers = !shared.rx.is_empty();
        // Watch the tap only when a frame could go somewhere; otherwise wait for buffers (the tap's
        // queue is the backpressure). A frame waiting for more buffers waits for them, not for the tap.
        let mut fds = [
            pollfd(shared.stop.as_raw_fd()),
            pollfd(shared.posted.as_raw_fd()),
            pollfd(shared.tap.as_raw_fd()),
        ];
        let watch = if have_buffers && pending == 0 { 3 } else { 2 };
        let timeout = if pending == 0 { -1 } else { PENDING_MS };
        let Some(ready) = wait(&mut fds[..watch], timeout) else {
            return;
        };
        if !ready && pending != 0 {
            shared.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            pending = 0;
            continue;
        }
        if fds[1].revents != 0 {
            let _ = shared.posted.read();
        }
        let offloads = shared.offloads.swap(0, Ordering::AcqRel);
        if offloads & OFFLOAD_PENDING != 0 {
            if let Err(e) = TapModel::configure(&shared.tap, offloads & !OFFLOAD_PENDING) {
                log::error!("tap {name}: cannot set its offloads (TUNSETOFFLOAD): {e}");
            }
        }
        if watch == 3 && fds[2].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            log::error!("tap {name}: the interface went away; the NIC receives nothing more");
            return;
        }
        let mut delivered = false;
        for _ in 0..RX_BURST {
            if pending == 0 {
                // SAFETY: reading into our own buffer of the given length.
                let n = unsafe { libc::read(shared.tap.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len()) };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    match err.kind() {
                        std::io::ErrorKind::WouldBlock => break,
                        std::io::ErrorKind::Interrupted => continue,
                        _ => {
                            log::error!("tap {name}: read failed ({err}); the NIC receives nothing more");
                            return;
                        }
                    }
                }
                pending = n as usize;
                if pending < HDR + ETH_HLEN {
                    pending = 0;
                    continue;
                }
            }
            match shared.rx.deliver(&mut frame[..pending], &mut done) {
                Delivery::Done => {
                    shared.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    delivered = true;
                    pending = 0;
                }
                Delivery::Dropped => {
                    shared.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    pending = 0;
                }
                Delivery::NoBuffers => break,
            }
        }
        if delivered {
            shared.rx.flush();
        }
    }
}
