//! Test support (feature `test-rig`): an in-process driver for one queue — split rings in memory the
//! device reaches through a real `Memory` (optionally loaded from memfd-backed "IOTLB entries", so the
//! device maps the pages itself, as it does with VDUSE, while the driver keeps its own mapping of them).
//! Shared by this crate's tests and those of the native backends.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::{IotlbMap, IotlbSource, Memory};
use crate::queue::{InFlight, RingInfo, Transport, Virtqueue};
use crate::uapi::vduse_iotlb_entry;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

pub const QSIZE: u16 = 16;
pub const RO_START: u64 = 0x18_0000;
pub const MEM_END: u64 = 0x20_0000;

pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Counts interrupts; the ring is where the mock put it.
pub struct TestTransport {
    pub ring: Mutex<RingInfo>,
    pub interrupts: AtomicUsize,
}

impl Transport for TestTransport {
    fn notify(&self, _queue: u16) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }
    fn ring_info(&self, _queue: u16) -> std::io::Result<RingInfo> {
        Ok(*self.ring.lock().unwrap())
    }
}

/// IOTLB entries backed by memfds, like vhost-vdpa's: `(first, len, perm, memfd)`. Entries can be added
/// and removed; `queries` counts lookups.
/// `(first IOVA, length, VDUSE_ACCESS_*, backing memfd)`.
pub type MemfdEntry = (u64, u64, u8, Arc<File>);

#[derive(Default)]
pub struct MemfdIotlb {
    pub entries: Mutex<Vec<MemfdEntry>>,
    pub queries: AtomicUsize,
}

pub fn memfd(len: u64) -> Arc<File> {
    // SAFETY: memfd_create with a static name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vduse-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    Arc::new(f)
}

impl IotlbSource for MemfdIotlb {
    fn entry(&self, first: u64, last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let entries = self.entries.lock().unwrap();
        let mut hits: Vec<_> = entries
            .iter()
            .filter(|(f, len, _, _)| *f <= last && f + len > first)
            .collect();
        hits.sort_by_key(|e| e.0);
        let Some((f, len, perm, file)) = hits.first() else {
            return Ok(None);
        };
        let e = vduse_iotlb_entry {
            offset: 0,
            start: *f,
            last: f + len - 1,
            perm: *perm,
        };
        Ok(Some((e, file.try_clone()?)))
    }
}

pub struct Rig {
    /// The driver's view of memory (anonymous here; the device gets the same map).
    pub map: Arc<IotlbMap>,
    pub memory: Arc<Memory>,
    pub transport: Arc<TestTransport>,
    pub inflight: Arc<InFlight>,
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

impl Rig {
    /// Read-write memory up to RO_START, read-only after, one map shared by driver and device.
    pub fn new() -> Self {
        let map = IotlbMap::anonymous(&[
            (0, RO_START as usize, crate::uapi::VDUSE_ACCESS_RW),
            (
                RO_START,
                (MEM_END - RO_START) as usize,
                crate::uapi::VDUSE_ACCESS_RO,
            ),
        ])
        .unwrap();
        let memory = Arc::new(Memory::fixed(map));
        Self::with_memory(memory)
    }

    /// `len` bytes of read-write memory at IOVA 0 backed by a memfd the device maps through its IOTLB,
    /// as with VDUSE: revoking the device's mapping leaves the driver's pages (the memfd) alone.
    /// `map` is the device's map (the driver writes through it: the same pages).
    pub fn memfd_backed(len: u64) -> (Self, Arc<File>) {
        let (rig, mut files) = Self::memfd_regions(&[len]);
        (rig, files.remove(0))
    }

    /// [`memfd_backed`](Self::memfd_backed) with one IOTLB entry (and memfd) per length, laid out one after
    /// the other from IOVA 0: a buffer across their boundary crosses from one mapping into the next.
    pub fn memfd_regions(lens: &[u64]) -> (Self, Vec<Arc<File>>) {
        let source = Arc::new(MemfdIotlb::default());
        let mut files = Vec::new();
        let mut at = 0;
        for &len in lens {
            let file = memfd(len);
            source
                .entries
                .lock()
                .unwrap()
                .push((at, len, crate::uapi::VDUSE_ACCESS_RW, file.clone()));
            files.push(file);
            at += len;
        }
        let memory = Arc::new(Memory::new(source));
        memory.invalidate();
        let map = memory.snapshot();
        (
            Self {
                map,
                ..Self::with_memory(memory)
            },
            files,
        )
    }

    pub fn with_memory(memory: Arc<Memory>) -> Self {
        let map = memory.peek();
        Self {
            map,
            memory,
            transport: Arc::new(TestTransport {
                ring: Mutex::new(RingInfo::default()),
                interrupts: AtomicUsize::new(0),
            }),
            inflight: Arc::new(InFlight::default()),
        }
    }

    /// A blk request header at `at`.
    pub fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.map.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// A driver ring (desc 0x0, avail 0x1000, used 0x3000) and a queue armed over it.
    pub fn queue(&self, max_segments: usize, event_idx: bool) -> (DriverRing, Arc<Virtqueue>) {
        self.queue_sized(QSIZE, max_segments, event_idx)
    }

    /// [`queue`](Self::queue) with a ring of `size` entries (at most 256: the rings must fit).
    pub fn queue_sized(
        &self,
        size: u16,
        max_segments: usize,
        event_idx: bool,
    ) -> (DriverRing, Arc<Virtqueue>) {
        assert!(size <= 256);
        let ring = DriverRing {
            map: self.map.clone(),
            desc: 0,
            avail: 0x1000,
            used: 0x3000,
            size,
        };
        // A fresh ring: indices and flags at zero.
        self.map.write_slice(&[0u8; 8], GuestAddress(ring.avail)).unwrap();
        self.map.write_slice(&[0u8; 8], GuestAddress(ring.used)).unwrap();
        *self.transport.ring.lock().unwrap() = RingInfo {
            size,
            desc: ring.desc,
            avail: ring.avail,
            used: ring.used,
            avail_idx: 0,
            ready: true,
        };
        let q = Virtqueue::new(
            0,
            size,
            max_segments,
            self.memory.clone(),
            self.transport.clone(),
            self.inflight.clone(),
            None,
        );
        q.set_event_idx(event_idx);
        q.arm();
        (ring, q)
    }
}

/// The driver's side of a split ring, written through the map like a driver writes its memory.
pub struct DriverRing {
    pub map: Arc<IotlbMap>,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl DriverRing {
    pub fn store_desc(&self, i: u16, d: RawDescriptor) {
        self.map
            .write_obj(d, GuestAddress(self.desc + 16 * u64::from(i)))
            .unwrap();
    }
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.map.read_obj(GuestAddress(self.avail + 2)).unwrap())
    }
    pub fn set_avail_idx(&self, idx: u16) {
        self.map
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.map.read_obj(GuestAddress(self.used + 2)).unwrap())
    }
    pub fn set_used_idx(&self, idx: u16) {
        self.map
            .write_obj(idx.to_le(), GuestAddress(self.used + 2))
            .unwrap();
    }
    /// The used element at ring index `k` (mod size).
    pub fn used_elem(&self, k: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(k % self.size);
        let id: u32 = self.map.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.map.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
    /// The `used_event` the driver asks interrupts for (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        self.map
            .write_obj(v.to_le(), GuestAddress(self.avail + 4 + 2 * u64::from(self.size)))
            .unwrap();
    }
}

/// Writes `table` into the descriptor table and makes `heads` available.
pub fn offer(ring: &DriverRing, table: &[(u16, RawDescriptor)], heads: &[u16]) {
    for &(i, d) in table {
        ring.store_desc(i, d);
    }
    let start = ring.avail_idx();
    for (k, &head) in heads.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(k as u16) % ring.size);
        ring.map
            .write_obj(head.to_le(), GuestAddress(ring.avail + 4 + 2 * slot))
            .unwrap();
    }
    ring.set_avail_idx(start.wrapping_add(heads.len() as u16));
}

/// The used ring entries `(head, len)` from index `from` on.
pub fn used(ring: &DriverRing, from: u16) -> Vec<(u32, u32)> {
    let idx = ring.used_idx();
    let mut out = Vec::new();
    let mut i = from;
    while i != idx {
        out.push(ring.used_elem(i));
        i = i.wrapping_add(1);
    }
    out
}

/// A late native read: a system call writing `len` bytes of `byte` through `ptr` (what a zero-copy
/// backend does when its read outlives its request). Bytes written, or the errno: `EFAULT` when the
/// memory was revoked.
pub fn late_read(ptr: *mut u8, len: usize, byte: u8) -> Result<usize, i32> {
    let src = memfd(len as u64);
    std::os::unix::fs::FileExt::write_all_at(src.as_ref(), &vec![byte; len], 0).unwrap();
    // SAFETY: the kernel checks the destination range: a revoked (PROT_NONE) one fails with EFAULT.
    let n = unsafe { libc::pread(std::os::fd::AsRawFd::as_raw_fd(src.as_ref()), ptr.cast(), len, 0) };
    if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(n as usize)
    }
}
