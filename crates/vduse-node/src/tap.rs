//! A virtio-net device bridged to a kernel TAP interface, served natively: frames never pass through
//! JavaScript. TX: each chain (virtio-net header + frame) goes to the tap with one `writev` straight from
//! guest memory — the tap takes the same 12-byte header (`IFF_VNET_HDR`), offloads included. RX: a reader
//! thread reads a frame (header + data) from the tap into one buffer and spreads it over the receive
//! buffers the driver posted (`num_buffers` with MRG_RXBUF), which the model holds until then.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vduse_core::memory::Access;
use vduse_core::{Completer, DeviceModel, RequestBatch, Ticket};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::serve::copy_in;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;

/// `struct virtio_net_hdr_v1`: with VERSION_1, 12 bytes, `num_buffers` at 10.
const HDR: usize = 12;
const ETH_HLEN: usize = 14;
/// A 64 KiB GSO packet plus its Ethernet and VLAN headers.
const MAX_FRAME: usize = 65_535 + ETH_HLEN + 4;

const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_MRG_RXBUF: u64 = 1 << 15;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

/// Frames per wake-up before the reader raises the interrupt for what it delivered.
const RX_BURST: usize = 64;

#[derive(Default)]
pub struct TapStats {
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Frames dropped: too large for the posted buffers, or held back past a reset.
    pub rx_dropped: AtomicU64,
}

/// Receive buffers held, oldest first, and the completer of the receive queue (once seen).
#[derive(Default)]
struct Held {
    buffers: VecDeque<(Ticket, u32)>,
    completer: Option<Completer>,
}

struct Shared {
    tap: OwnedFd,
    held: Mutex<Held>,
    mergeable: AtomicBool,
    /// Written when buffers are posted: the reader waits on it while none are held.
    posted: EventFd,
    stop: EventFd,
    stats: TapStats,
}

pub struct TapModel {
    shared: Arc<Shared>,
    name: String,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// Opens (or creates) tap interface `name` ("" lets the kernel pick), with virtio-net headers.
fn open_tap(name: &str) -> std::io::Result<(OwnedFd, String)> {
    // SAFETY: a plain open of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name (16 bytes), then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() >= 16 || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "tap name too long",
        ));
    }
    ifr[..bytes.len()].copy_from_slice(bytes);
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, 40 bytes on Linux, which `ifr` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let hdr_len: libc::c_int = HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
    Ok((fd, String::from_utf8_lossy(&ifr[..end]).into_owned()))
}

impl TapModel {
    pub fn open(name: &str) -> std::io::Result<Arc<Self>> {
        let (tap, name) = open_tap(name)?;
        let shared = Arc::new(Shared {
            tap,
            held: Mutex::new(Held::default()),
            mergeable: AtomicBool::new(false),
            posted: EventFd::new(EFD_NONBLOCK)?,
            stop: EventFd::new(EFD_NONBLOCK)?,
            stats: TapStats::default(),
        });
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("vduse-tap-{name}"))
                .spawn(move || read_loop(&shared))?
        };
        Ok(Arc::new(Self {
            shared,
            name,
            reader: Mutex::new(Some(reader)),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> &TapStats {
        &self.shared.stats
    }

    /// The driver's negotiated features: how to fill receive buffers, and which offloads the tap may
    /// hand us (only those the driver accepts: TUNSETOFFLOAD).
    pub fn configure(&self, features: u64) -> std::io::Result<()> {
        self.shared
            .mergeable
            .store(features & F_MRG_RXBUF != 0, Ordering::Relaxed);
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
        if unsafe {
            libc::ioctl(
                self.shared.tap.as_raw_fd(),
                TUNSETOFFLOAD as _,
                offload as libc::c_ulong,
            )
        } < 0
        {
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
        let mem = batch.memory();
        let mut ranges: Vec<(*mut u8, usize)> = Vec::new();
        let mut iov: Vec<libc::iovec> = Vec::new();
        for req in batch.iter() {
            let len = req.shape.readable_bytes as usize;
            let ok = (HDR + ETH_HLEN..=HDR + MAX_FRAME).contains(&len) && {
                ranges.clear();
                req.readable
                    .iter()
                    .all(|s| mem.host_ranges(s.addr, u64::from(s.len), Access::Read, &mut ranges))
            };
            if ok {
                iov.clear();
                iov.extend(ranges.iter().map(|&(base, len)| libc::iovec {
                    iov_base: base.cast(),
                    iov_len: len,
                }));
                // SAFETY: the iovecs point into guest memory the batch's map keeps mapped while we hold
                // `batch`; the tap only reads them.
                let n = unsafe {
                    libc::writev(
                        self.shared.tap.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as libc::c_int,
                    )
                };
                // A full tap queue (nobody reads the other side) or a frame the kernel refuses: dropped,
                // as a NIC drops on a full link.
                if n == len as isize {
                    self.shared.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            completer.complete(req.ticket, 0, None);
        }
    }
}

impl Drop for TapModel {
    fn drop(&mut self) {
        self.stop();
    }
}

impl DeviceModel for TapModel {
    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer) {
        match queue {
            TX_QUEUE => self.transmit(batch, completer),
            RX_QUEUE => {
                let mut held = self.shared.held.lock().unwrap_or_else(|e| e.into_inner());
                if held.completer.is_none() {
                    held.completer = Some(completer.clone());
                }
                for req in batch.iter() {
                    if (req.shape.writable_bytes as usize) < HDR {
                        completer.complete(req.ticket, 0, None);
                    } else {
                        held.buffers.push_back((req.ticket, req.shape.writable_bytes));
                    }
                }
                drop(held);
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

/// Polls `fds` (stop first); true when `stop` fired.
fn wait(fds: &mut [libc::pollfd]) -> bool {
    for f in fds.iter_mut() {
        f.revents = 0;
    }
    // SAFETY: `fds` is a valid array for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    n > 0 && fds[0].revents != 0
}

fn read_loop(shared: &Shared) {
    let mut frame = vec![0u8; HDR + MAX_FRAME];
    // A frame read but not delivered yet (no buffers posted): the tap's own queue holds the rest.
    let mut pending: usize = 0;
    let pollfd = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let have_buffers = !shared
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buffers
            .is_empty();
        // Without buffers, wait for some (not for the tap: its queue is the backpressure).
        let mut fds = [
            pollfd(shared.stop.as_raw_fd()),
            pollfd(shared.posted.as_raw_fd()),
            pollfd(shared.tap.as_raw_fd()),
        ];
        let watch = if have_buffers { 3 } else { 2 };
        if wait(&mut fds[..watch]) {
            return;
        }
        if fds[1].revents != 0 {
            let _ = shared.posted.read();
        }
        let mut delivered = false;
        for _ in 0..RX_BURST {
            if pending == 0 {
                // SAFETY: reading into our own buffer of the given length.
                let n = unsafe { libc::read(shared.tap.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len()) };
                if n <= 0 {
                    break; // EAGAIN: nothing more for now
                }
                pending = n as usize;
                if pending < HDR + ETH_HLEN {
                    pending = 0;
                    continue;
                }
            }
            match deliver(shared, &mut frame[..pending]) {
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
            if let Some(c) = shared
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .completer
                .as_ref()
            {
                c.flush();
            }
        }
    }
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

/// Spreads `frame` (header + data) over the oldest held buffers; dead ones (fenced) are skipped.
fn deliver(shared: &Shared, frame: &mut [u8]) -> Delivery {
    let mergeable = shared.mergeable.load(Ordering::Relaxed);
    let mut held = shared.held.lock().unwrap_or_else(|e| e.into_inner());
    let Held { buffers, completer } = &mut *held;
    let Some(completer) = completer.clone() else {
        return Delivery::NoBuffers;
    };
    let queue = completer.queue().clone();
    // Enough room among the live buffers at the front?
    let mut room = 0usize;
    let mut count = 0usize;
    let mut i = 0;
    while room < frame.len() && i < buffers.len() {
        let (ticket, size) = buffers[i];
        if queue.with_request(ticket, |_, _, _| ()).is_none() {
            buffers.remove(i); // fenced since it was posted
            continue;
        }
        room += size as usize;
        count += 1;
        i += 1;
        if !mergeable {
            break;
        }
    }
    if room < frame.len() {
        // Without MRG_RXBUF a frame takes one buffer: one too small for it means the frame is larger
        // than the driver takes (the buffer stays for the next one).
        return if !mergeable && count == 1 {
            Delivery::Dropped
        } else {
            Delivery::NoBuffers
        };
    }
    frame[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    let mut done = 0usize;
    for _ in 0..count {
        let Some((ticket, size)) = buffers.pop_front() else {
            break;
        };
        let n = (size as usize).min(frame.len() - done);
        let copied = copy_in(&queue, ticket, 0, &frame[done..done + n]);
        completer.complete(ticket, if copied < 0.0 { 0 } else { n as u32 }, None);
        done += n;
    }
    Delivery::Done
}
