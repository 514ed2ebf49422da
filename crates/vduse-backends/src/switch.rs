//! An Ethernet switch in the process, served natively: each port is a virtio-net model, and a frame one
//! port's driver sends moves to the receive buffers another port's driver posted on the sender's TX
//! worker thread — no JavaScript, no system call, no thread in between.
//!
//! TX: the head of a chain — its virtio-net header and Ethernet header — is copied out of the sender's
//! buffers under its ticket, and everything is decided on that copy: the header checked against what the
//! sender negotiated and its MTU, the source address learned, the destination looked up. A receiver gets
//! that checked head, and the rest of the frame in one copy from the sender's buffers straight into its
//! own (`Virtqueue::copy_to_request`): a driver rewriting its buffers meanwhile changes payload bytes only,
//! never what was checked. Every copy is ticket-checked under the rings' locks, so a receive buffer given
//! back on a reset or a memory-map change is never written after, and no mapping is touched once revoked.
//! A receiver that needs the frame reshaped (segmented, its checksum completed) gets it from a whole copy.
//! Interrupts are raised once per sender's batch and receiver.
//!
//! Receivers get frames in the shape they negotiated: a partial checksum is completed for a driver
//! without GUEST_CSUM, and a TCP segmentation-offload packet is cut into MTU-sized segments for a driver
//! without the matching GUEST_TSO — NICs that negotiated differently still carry TCP between them.
//!
//! Port security, as in the TypeScript `NetSwitch`: an address learned on a port stays there while it is
//! in use (`mac_age` after it was last heard from); a frame from another port with that source address
//! is dropped (`spoofed`). Each port learns at most `max_macs_per_port` addresses, so a port sending from
//! ever-new ones fills only its own share and never turns the switch into a hub. Frames from a multicast
//! or all-zero source address are dropped (`invalid`, as Linux's bridge does).
//!
//! A frame for a port whose driver has too few buffers posted waits, copied, in that port's backlog
//! (bounded in frames and in bytes of buffer capacity, spare buffers included), delivered in order when
//! the driver posts buffers and forgotten when a new driver session starts; beyond the bound it is dropped
//! and counted (`rx_no_buffers`), as a switch drops on a full egress queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vduse_core::queue::Owner;
use vduse_core::{Completer, DeviceModel, Done, RequestBatch, Ticket, Virtqueue};

use crate::nic::{
    header_allowed, Delivery, ReceiveBuffers, ETH_HLEN, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, GSO_NONE,
    GSO_TCPV4, GSO_TCPV6, HDR, HDR_F_NEEDS_CSUM, MAX_FRAME, RX_QUEUE, TX_QUEUE,
};

/// Port security settings.
#[derive(Clone, Copy, Debug)]
pub struct SwitchOptions {
    /// Addresses one port may have learned at once.
    pub max_macs_per_port: usize,
    /// How long a learned address stays with its port after it was last heard from.
    pub mac_age: Duration,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        Self {
            max_macs_per_port: 64,
            mac_age: Duration::from_secs(300),
        }
    }
}

/// What the switch did with the frames its ports sent.
#[derive(Default)]
pub struct SwitchStats {
    /// Frames sent to the one port their destination was learned on.
    pub forwarded: AtomicU64,
    /// Broadcast, multicast and unknown-destination frames, sent to every other port.
    pub flooded: AtomicU64,
    /// Frames dropped because their destination lives behind their own port.
    pub filtered: AtomicU64,
    /// Frames dropped because their source address belongs to another port.
    pub spoofed: AtomicU64,
    /// New source addresses not learned because their port has its share.
    pub unlearned: AtomicU64,
    /// Frames dropped because their source is a group or the all-zero address.
    pub invalid: AtomicU64,
}

/// One port's counters, named as `NetDevice`'s `NetStats`.
#[derive(Default)]
pub struct PortStats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX frames dropped: too short or long, or a header the sender's features or MTU forbid.
    pub tx_malformed: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames for this port dropped because its driver had too few receive buffers posted.
    pub rx_no_buffers: AtomicU64,
    /// Frames for this port dropped because its driver can never take them (too large, a packet this
    /// switch cannot segment).
    pub rx_refused: AtomicU64,
}

/// Frames a port may have queued (copies) while its driver has too few receive buffers posted: enough to
/// ride out a driver refilling its ring under a burst of 64 KiB TSO packets, bounded so that no sender can
/// make the switch hold more.
const BACKLOG_BYTES: usize = 4 << 20;
const BACKLOG_FRAMES: usize = 256;

struct Port {
    id: u64,
    name: String,
    /// Largest frame payload (bytes after the Ethernet header) the port's driver was told of.
    mtu: usize,
    rx: ReceiveBuffers,
    /// Whether `backlog` holds frames: then every new frame for this port goes behind them, in order.
    backlogged: AtomicBool,
    backlog: Mutex<Backlog>,
    stats: PortStats,
}

/// Spare buffers a backlog keeps for its next frames.
const SPARE: usize = 8;

#[derive(Default)]
struct Backlog {
    /// Frames (virtio-net header + Ethernet frame), oldest first.
    frames: VecDeque<Vec<u8>>,
    /// Capacity of the queued frames' buffers and of the spare ones: what the backlog holds.
    bytes: usize,
    /// Buffers of delivered frames, reused.
    spare: Vec<Vec<u8>>,
}

impl Backlog {
    /// Keeps a delivered frame's buffer for reuse, or frees it.
    fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < SPARE {
            self.spare.push(buffer);
        } else {
            self.bytes -= buffer.capacity();
        }
    }

    /// Forgets every queued frame (a new driver session: they were for the one before).
    fn clear(&mut self) {
        while let Some(f) = self.frames.pop_front() {
            self.recycle(f);
        }
    }
}

impl Port {
    fn count(&self, delivery: Delivery, bytes: usize) {
        let stats = &self.stats;
        match delivery {
            Delivery::Done => {
                stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                stats.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Delivery::Dropped => {
                stats.rx_refused.fetch_add(1, Ordering::Relaxed);
            }
            Delivery::NoBuffers => {
                stats.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn lock_backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers queued frames while buffers last; true when none is left.
    fn drain(&self, backlog: &mut Backlog, done: &mut Vec<Done>) -> bool {
        while let Some(frame) = backlog.frames.front_mut() {
            let delivery = self.rx.deliver(frame, done);
            if delivery == Delivery::NoBuffers {
                return false;
            }
            self.count(delivery, frame.len() - HDR);
            if let Some(f) = backlog.frames.pop_front() {
                backlog.recycle(f);
            }
        }
        self.backlogged.store(false, Ordering::Release);
        true
    }

    /// Gives a frame to the driver in order behind any queued ones: `deliver` tries now; with too few
    /// buffers posted, `copy` fills a buffer with the whole frame (false: it could not), which waits in the
    /// backlog — or is dropped and counted when the backlog is full.
    /// `frame` is what both work on (the frame or its head).
    fn offer(
        &self,
        bytes: usize,
        frame: &mut [u8],
        done: &mut Vec<Done>,
        deliver: impl FnOnce(&mut [u8], &mut Vec<Done>) -> Delivery,
        copy: impl FnOnce(&[u8], &mut Vec<u8>) -> bool,
    ) {
        let mut held = None;
        if self.backlogged.load(Ordering::Acquire) {
            let mut backlog = self.lock_backlog();
            if !self.drain(&mut backlog, done) {
                return self.enqueue(backlog, bytes, done, |c| copy(frame, c));
            }
            held = Some(backlog);
        }
        match deliver(frame, done) {
            Delivery::NoBuffers => {
                let backlog = held.unwrap_or_else(|| self.lock_backlog());
                self.enqueue(backlog, bytes, done, |c| copy(frame, c));
            }
            delivery => self.count(delivery, bytes),
        }
    }

    fn enqueue(
        &self,
        mut backlog: std::sync::MutexGuard<'_, Backlog>,
        bytes: usize,
        done: &mut Vec<Done>,
        copy: impl FnOnce(&mut Vec<u8>) -> bool,
    ) {
        let len = HDR + bytes;
        let spare = backlog.spare.pop();
        // A new buffer (or one that must grow) counts its capacity against the bound.
        let grows = len.saturating_sub(spare.as_ref().map_or(0, Vec::capacity));
        if backlog.frames.len() >= BACKLOG_FRAMES || backlog.bytes + grows > BACKLOG_BYTES {
            if let Some(f) = spare {
                backlog.spare.push(f);
            }
            self.stats.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut frame = spare.unwrap_or_default();
        let before = frame.capacity();
        frame.clear();
        frame.reserve_exact(len);
        let copied = copy(&mut frame);
        backlog.bytes = backlog.bytes + frame.capacity() - before;
        if !copied {
            self.stats.rx_refused.fetch_add(1, Ordering::Relaxed);
            backlog.recycle(frame);
            return;
        }
        backlog.frames.push_back(frame);
        self.backlogged.store(true, Ordering::Release);
        // Buffers posted since `deliver` found too few would wait for the next post: try once more.
        self.drain(&mut backlog, done);
    }

    /// A new driver session: frames queued for the one before are not its.
    fn new_session(&self) {
        let mut backlog = self.lock_backlog();
        backlog.clear();
        self.backlogged.store(false, Ordering::Release);
    }

    /// After the driver posted receive buffers: what waits goes into them.
    fn posted(&self, done: &mut Vec<Done>) {
        if self.backlogged.load(Ordering::Acquire) {
            let mut backlog = self.lock_backlog();
            self.drain(&mut backlog, done);
        }
    }
}

struct Learned {
    port: u64,
    seen: Instant,
}

/// The forwarding database: address (48 bits) → its port, and how many each port has.
#[derive(Default)]
struct Fdb {
    table: HashMap<u64, Learned>,
    per_port: HashMap<u64, usize>,
}

impl Fdb {
    /// Learns (or refreshes) `src` behind `from`; false when another port owns it.
    fn learn(&mut self, src: u64, from: u64, options: &SwitchOptions, stats: &SwitchStats) -> bool {
        let now = Instant::now();
        if let Some(known) = self.table.get_mut(&src) {
            if known.port == from {
                known.seen = now;
                return true;
            }
            if now.duration_since(known.seen) < options.mac_age {
                return false;
            }
            // Not heard from on its port for a while: it moved.
            let old = known.port;
            self.table.remove(&src);
            self.forget_one(old);
        }
        let count = self.per_port.get(&from).copied().unwrap_or(0);
        if count >= options.max_macs_per_port && !self.evict_aged(from, now, options.mac_age) {
            // Its share is full and none of its own addresses aged out: this one is not learned.
            stats.unlearned.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.table.insert(
            src,
            Learned {
                port: from,
                seen: now,
            },
        );
        *self.per_port.entry(from).or_default() += 1;
        true
    }

    fn forget_one(&mut self, port: u64) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
        }
    }

    /// Forgets one aged address of `port`, if it has one.
    fn evict_aged(&mut self, port: u64, now: Instant, age: Duration) -> bool {
        let aged = self
            .table
            .iter()
            .find(|(_, l)| l.port == port && now.duration_since(l.seen) >= age)
            .map(|(&mac, _)| mac);
        match aged {
            Some(mac) => {
                self.table.remove(&mac);
                self.forget_one(port);
                true
            }
            None => false,
        }
    }

    fn forget_port(&mut self, port: u64) {
        self.table.retain(|_, l| l.port != port);
        self.per_port.remove(&port);
    }
}

/// The switch: create it, then a [`SwitchPort`] model per NIC.
pub struct Switch {
    options: SwitchOptions,
    /// The ports, replaced whole on a change: a sender takes the list for its batch without holding a
    /// lock that plugging a port in (on the JavaScript thread) would wait on.
    ports: RwLock<Arc<Vec<Arc<Port>>>>,
    fdb: Mutex<Fdb>,
    next_id: AtomicU64,
    stats: SwitchStats,
}

fn mac48(b: &[u8]) -> u64 {
    b[..6].iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

impl Switch {
    pub fn new(options: SwitchOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            ports: RwLock::new(Arc::new(Vec::new())),
            fdb: Mutex::new(Fdb::default()),
            next_id: AtomicU64::new(1),
            stats: SwitchStats::default(),
        })
    }

    pub fn stats(&self) -> &SwitchStats {
        &self.stats
    }

    /// A new port: the model of a NIC whose driver was told of `mtu`. It is plugged in at once and
    /// unplugged when dropped (or [`SwitchPort::leave`]).
    pub fn port(self: &Arc<Self>, name: &str, mtu: u16) -> Arc<SwitchPort> {
        let port = Arc::new(Port {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            mtu: usize::from(mtu),
            rx: ReceiveBuffers::default(),
            backlogged: AtomicBool::new(false),
            backlog: Mutex::new(Backlog::default()),
            stats: PortStats::default(),
        });
        self.update_ports(|ports| ports.push(port.clone()));
        Arc::new(SwitchPort {
            switch: self.clone(),
            port,
            tx: Mutex::new(Scratch {
                frame: vec![0u8; HDR + MAX_FRAME],
                out: vec![0u8; HDR + MAX_FRAME],
                done: Vec::new(),
                touched: Vec::new(),
            }),
        })
    }

    /// The name of the port `mac` was learned on, if any.
    pub fn port_of(&self, mac: [u8; 6]) -> Option<String> {
        let id = self.fdb().table.get(&mac48(&mac))?.port;
        self.ports_ref()
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.name.clone())
    }

    /// How many ports are plugged in.
    pub fn port_count(&self) -> usize {
        self.ports_ref().len()
    }

    fn fdb(&self) -> std::sync::MutexGuard<'_, Fdb> {
        self.fdb.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ports_ref(&self) -> Arc<Vec<Arc<Port>>> {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update_ports(&self, change: impl FnOnce(&mut Vec<Arc<Port>>)) {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Vec::clone(&ports);
        change(&mut next);
        *ports = Arc::new(next);
    }

    fn remove(&self, id: u64) {
        self.update_ports(|ports| ports.retain(|p| p.id != id));
        self.fdb().forget_port(id);
    }
}

/// A sender's reusable buffers (one TX worker per port: never contended).
struct Scratch {
    /// The frame as copied out of the sender's buffers: virtio-net header, then Ethernet onward. The
    /// first `HEAD` bytes for every frame; the rest only for a receiver that needs it reshaped.
    frame: Vec<u8>,
    /// A receiver's own version of it (a checksum completed, a segment).
    out: Vec<u8>,
    done: Vec<Done>,
    /// Indices (into the port list) of the ports given frames in this batch: their interrupts are owed.
    touched: Vec<usize>,
}

/// The smallest segment size a GSO packet may ask for (Linux's `tcp_min_snd_mss` default).
const MIN_MSS: usize = 48;

/// What is copied of every frame and checked first: the virtio-net header and the Ethernet header.
const HEAD: usize = HDR + ETH_HLEN;

/// The frame being forwarded: its checked head in the scratch, the rest in the sender's buffers (copied
/// into the scratch only for a receiver that needs the frame reshaped).
struct Sent<'a> {
    queue: &'a Virtqueue,
    ticket: Ticket,
    /// Header + frame bytes.
    len: usize,
    /// Whether `Scratch::frame` holds the whole frame; `None`: the copy failed (the sender's request was
    /// fenced meanwhile), and no receiver gets it.
    whole: Option<bool>,
}

impl Sent<'_> {
    /// Copies the rest of the frame after its head, once; false if it cannot be had.
    fn fetch(&mut self, frame: &mut [u8]) -> bool {
        if self.whole.is_none() {
            let rest = &mut frame[HEAD..self.len];
            let ok = self
                .queue
                .read_request(self.ticket, Owner::Model, HEAD as u64, rest)
                == Ok(rest.len());
            self.whole = Some(ok);
        }
        self.whole == Some(true)
    }
}

/// The virtio-net model of one port of a [`Switch`].
pub struct SwitchPort {
    switch: Arc<Switch>,
    port: Arc<Port>,
    tx: Mutex<Scratch>,
}

impl SwitchPort {
    pub fn stats(&self) -> &PortStats {
        &self.port.stats
    }

    /// Unplugs the port: no frame reaches it any more, and the addresses learned on it are forgotten.
    pub fn leave(&self) {
        self.switch.remove(self.port.id);
    }

    fn transmit(&self, batch: &RequestBatch, completer: &Completer) {
        let mut scratch = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let queue = completer.queue();
        let features = queue.features();
        let stats = &self.port.stats;
        let ports = self.switch.ports_ref();
        scratch.touched.clear();
        let ports = &ports[..];
        for req in batch.iter() {
            let len = req.shape.readable_bytes as usize;
            let valid = (HEAD..=HDR + MAX_FRAME).contains(&len)
                && queue.read_request(req.ticket, Owner::Model, 0, &mut scratch.frame[..HEAD]) == Ok(HEAD)
                && tx_header_valid(&scratch.frame[..HEAD], len, features, self.port.mtu);
            if valid {
                stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                stats.tx_bytes.fetch_add((len - HDR) as u64, Ordering::Relaxed);
                let mut sent = Sent {
                    queue,
                    ticket: req.ticket,
                    len,
                    whole: None,
                };
                self.forward(ports, &mut sent, &mut scratch);
            } else {
                stats.tx_malformed.fetch_add(1, Ordering::Relaxed);
            }
            // Only now: the receivers' copies came from these buffers.
            completer.complete(req.ticket, 0, None);
        }
        for &i in scratch.touched.iter() {
            ports[i].rx.flush();
        }
    }

    /// Learns the frame's source, then gives the frame to the port its destination lives behind, or to
    /// every other port.
    fn forward(&self, ports: &[Arc<Port>], sent: &mut Sent<'_>, scratch: &mut Scratch) {
        let switch = &*self.switch;
        let me = self.port.id;
        let head = &scratch.frame[..HEAD];
        let (dst, src) = (&head[HDR..HDR + 6], &head[HDR + 6..HDR + 12]);
        let unicast_dst = dst[0] & 1 == 0;
        if src[0] & 1 != 0 || src.iter().all(|&b| b == 0) {
            // No station sends from a group or the zero address (Linux's bridge drops these too).
            switch.stats.invalid.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let to = {
            let mut fdb = switch.fdb();
            if !fdb.learn(mac48(src), me, &switch.options, &switch.stats) {
                switch.stats.spoofed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if unicast_dst {
                fdb.table.get(&mac48(dst)).map(|l| l.port)
            } else {
                None
            }
        };
        let mut give_to = |i: usize, scratch: &mut Scratch| {
            give(&ports[i], sent, scratch);
            if !scratch.touched.contains(&i) {
                scratch.touched.push(i);
            }
        };
        match to {
            Some(id) if id == me => {
                switch.stats.filtered.fetch_add(1, Ordering::Relaxed);
            }
            Some(id) => {
                switch.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                if let Some(i) = ports.iter().position(|p| p.id == id) {
                    give_to(i, scratch);
                }
            }
            None => {
                switch.stats.flooded.fetch_add(1, Ordering::Relaxed);
                for (i, port) in ports.iter().enumerate() {
                    if port.id != me {
                        give_to(i, scratch);
                    }
                }
            }
        }
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.leave();
    }
}

impl DeviceModel for SwitchPort {
    fn started(&self, _features: u64) {
        self.port.new_session();
    }

    fn handle(&self, queue: u16, batch: &RequestBatch, completer: &Completer) {
        match queue {
            TX_QUEUE => self.transmit(batch, completer),
            RX_QUEUE => {
                self.port.rx.post(batch, completer);
                let mut done = Vec::new();
                self.port.posted(&mut done);
            }
            _ => {
                for req in batch.iter() {
                    completer.complete(req.ticket, 0, None);
                }
            }
        }
    }
}

fn u16le(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u16be(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Whether a sent frame of `total` bytes (header + Ethernet frame; `head`, its copied start) is one a
/// receiver may be given: a header the sender negotiated (spec 5.1.6.2), a partial checksum inside the
/// frame, no larger than the MTU unless it is a GSO packet, whose segments must fit the MTU.
fn tx_header_valid(head: &[u8], total: usize, features: u64, mtu: usize) -> bool {
    if !header_allowed(&head[..2], features) {
        return false;
    }
    let len = total - HDR;
    let (flags, gso) = (head[0], head[1]);
    if flags & HDR_F_NEEDS_CSUM != 0 && u16le(head, 6) + u16le(head, 8) + 2 > len {
        return false;
    }
    if gso == GSO_NONE {
        return len <= mtu + ETH_HLEN + 4;
    }
    let (hdr_len, gso_size) = (u16le(head, 2), u16le(head, 4));
    // A TCP packet: room for Ethernet, IP and TCP headers; segments of at least Linux's smallest MSS, so
    // that cutting one packet makes a bounded number of them.
    len >= ETH_HLEN + 20 + 20 && (MIN_MSS..=mtu).contains(&gso_size) && hdr_len <= len
}

/// Gives the frame `sent` to `port` in the shape its driver negotiated, and counts what became of it.
fn give(port: &Port, sent: &mut Sent<'_>, scratch: &mut Scratch) {
    let stats = &port.stats;
    let Some(features) = port.rx.features() else {
        stats.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let len = sent.len;
    let Scratch { frame, out, done, .. } = scratch;
    let gso = frame[1];
    let tso = match gso {
        GSO_TCPV4 => features & F_GUEST_TSO4 != 0,
        GSO_TCPV6 => features & F_GUEST_TSO6 != 0,
        _ => true,
    };
    if gso == GSO_NONE && len - HDR > port.mtu + ETH_HLEN + 4 {
        stats.rx_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let partial_refused = frame[0] & HDR_F_NEEDS_CSUM != 0 && features & F_GUEST_CSUM == 0;
    if tso && !partial_refused {
        // As sent: the checked head, then the rest straight from the sender's buffers (a copy of it only
        // if it has to wait in the backlog).
        let (queue, ticket) = (sent.queue, sent.ticket);
        port.offer(
            len - HDR,
            &mut frame[..HEAD],
            done,
            |head, done| {
                port.rx
                    .deliver_parts(head, len - HEAD, done, |to, t, at, from, n| {
                        queue.copy_to_request(ticket, (HEAD + from) as u64, to, t, at, n) == Ok(n)
                    })
            },
            |head, copy| {
                copy.resize(len, 0);
                copy[..HEAD].copy_from_slice(head);
                queue.read_request(ticket, Owner::Model, HEAD as u64, &mut copy[HEAD..]) == Ok(len - HEAD)
            },
        );
        return;
    }
    if !sent.fetch(frame) {
        stats.rx_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let put = |f: &mut [u8], done: &mut Vec<Done>| {
        port.offer(
            f.len() - HDR,
            f,
            done,
            |f, done| port.rx.deliver(f, done),
            |f, copy| {
                copy.extend_from_slice(f);
                true
            },
        )
    };
    if !tso {
        // A large TCP packet for a driver that cannot take it whole: cut it, as its NIC would have.
        let guest_csum = features & F_GUEST_CSUM != 0;
        let cut = segment(&frame[..len], port.mtu, out, |seg| {
            if !guest_csum {
                complete_checksum(seg);
            }
            put(seg, done);
        });
        if !cut {
            stats.rx_refused.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    // The driver takes no partial checksums: finish it, in a copy (other ports may take it partial).
    let copy = &mut out[..len];
    copy.copy_from_slice(&frame[..len]);
    complete_checksum(copy);
    put(copy, done);
}

/// Folds the Internet checksum of `data` into `sum` (ones' complement of 16-bit big-endian words).
fn checksum(data: &[u8], mut sum: u64) -> u16 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes the partial checksum of `f` (header + Ethernet frame) in place and clears NEEDS_CSUM: the
/// field holds the pseudo-header sum the sender left there, and the checksum covers it too.
fn complete_checksum(f: &mut [u8]) {
    if f[0] & HDR_F_NEEDS_CSUM == 0 {
        return;
    }
    let (start, offset) = (u16le(f, 6), u16le(f, 8));
    let frame = &mut f[HDR..];
    let value = !checksum(&frame[start..], 0);
    let value = if value == 0 { 0xffff } else { value };
    frame[start + offset..start + offset + 2].copy_from_slice(&value.to_be_bytes());
    f[0] = 0;
    f[6..10].fill(0);
}

/// Software segmentation (TSO done here): a TCP packet over IPv4 or IPv6 (no VLAN tag, no IPv6 extension
/// headers) in `f` (header + Ethernet frame) cut into `gso_size` segments, each built in `out` with its
/// own IP length, IPv4 id and header checksum, TCP sequence number and flags (FIN and PSH on the last, CWR
/// on the first), and a partial TCP checksum — then handed to `each`. False if the packet is not one
/// this can cut (too short, no payload, not TCP) or its segments do not fit `mtu`.
fn segment(f: &[u8], mtu: usize, out: &mut [u8], mut each: impl FnMut(&mut [u8])) -> bool {
    let frame = &f[HDR..];
    let len = frame.len();
    let v4 = f[1] == GSO_TCPV4;
    let ip = ETH_HLEN;
    if len < ip + if v4 { 20 } else { 40 } + 20 {
        return false;
    }
    let ethertype = u16be(frame, 12);
    let ip_len = if v4 { usize::from(frame[ip] & 0x0f) * 4 } else { 40 };
    let tcp = ip + ip_len;
    let mss = u16le(f, 4);
    let fits = ethertype == if v4 { 0x0800 } else { 0x86dd }
        && len >= tcp + 20
        && if v4 {
            frame[ip] >> 4 == 4 && ip_len >= 20 && frame[ip + 9] == 6
        } else {
            frame[ip] >> 4 == 6 && frame[ip + 6] == 6
        };
    if !fits {
        return false;
    }
    let tcp_len = usize::from(frame[tcp + 12] >> 4) * 4;
    let payload = tcp + tcp_len;
    // A packet without payload is not one to cut; segments must fit the receiver's MTU.
    if tcp_len < 20 || payload >= len || mss < MIN_MSS || payload + mss > mtu + ETH_HLEN {
        return false;
    }
    let seq = u32::from_be_bytes([frame[tcp + 4], frame[tcp + 5], frame[tcp + 6], frame[tcp + 7]]);
    let flags = frame[tcp + 13];
    let id = if v4 { u16be(frame, ip + 4) as u16 } else { 0 };
    let mut at = payload;
    let mut i = 0u16;
    while at < len {
        let n = mss.min(len - at);
        let last = at + n >= len;
        let seg_len = payload + n;
        let (hdr, seg) = out[..HDR + seg_len].split_at_mut(HDR);
        seg[..payload].copy_from_slice(&frame[..payload]);
        seg[payload..].copy_from_slice(&frame[at..at + n]);
        if v4 {
            seg[ip + 2..ip + 4].copy_from_slice(&((ip_len + tcp_len + n) as u16).to_be_bytes());
            seg[ip + 4..ip + 6].copy_from_slice(&id.wrapping_add(i).to_be_bytes());
            seg[ip + 10..ip + 12].fill(0);
            let sum = !checksum(&seg[ip..ip + ip_len], 0);
            seg[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
        } else {
            seg[ip + 4..ip + 6].copy_from_slice(&((tcp_len + n) as u16).to_be_bytes());
        }
        let seq = seq.wrapping_add((at - payload) as u32);
        seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        // FIN and PSH belong to the last segment, CWR to the first.
        let mut clear = 0u8;
        if !last {
            clear |= 0x09;
        }
        if i != 0 {
            clear |= 0x80;
        }
        seg[tcp + 13] = flags & !clear;
        // The pseudo-header sum in the checksum field, as a partial checksum carries it.
        let pseudo_len = (6 + tcp_len + n) as u64;
        let pseudo = if v4 {
            checksum(&seg[ip + 12..ip + 20], pseudo_len)
        } else {
            checksum(&seg[ip + 8..ip + 40], pseudo_len)
        };
        seg[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
        hdr.fill(0);
        hdr[0] = HDR_F_NEEDS_CSUM;
        hdr[6..8].copy_from_slice(&(tcp as u16).to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        each(&mut out[..HDR + seg_len]);
        at += n;
        i = i.wrapping_add(1);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_folds_carries_and_odd_bytes() {
        // RFC 1071's example words: 0001 f203 f4f5 f6f7 → sum 0xddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0xddf2
        );
        assert_eq!(checksum(&[0xff], 0), 0xff00);
    }
}
