//! The device's view of driver memory: every IOTLB entry the kernel reports (`VDUSE_IOTLB_GET_FD`),
//! mmap'ed once and assembled into a `vm_memory::GuestMemoryMmap` keyed by IOVA.
//!
//! A map is immutable; changes (a new bounce region, `VDUSE_UPDATE_IOTLB`, reset) build a new one that
//! replaces the old one atomically. Requests in flight keep their `Arc` snapshot alive, so a mapping is
//! never unmapped under a reader; the message loop drains them before it acknowledges a change.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, RwLock};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::uapi::{self, vduse_iotlb_entry};

/// Access a device needs to a driver buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads it (driver → device).
    Read,
    /// The device writes it (device → driver).
    Write,
}

impl Access {
    fn allowed_by(self, perm: u8) -> bool {
        match self {
            Access::Read => perm & uapi::VDUSE_ACCESS_RO != 0,
            Access::Write => perm & uapi::VDUSE_ACCESS_WO != 0,
        }
    }
}

/// One mmap'ed IOTLB entry. Unmapped when the last map holding it is dropped.
#[derive(Debug)]
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through vm-memory's volatile slices.
unsafe impl Send for Mapping {}
// SAFETY: as above; the struct itself is never mutated after creation.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len come from a successful mmap that nothing else unmaps.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// A snapshot of the IOTLB: regions sorted by IOVA, with the kernel's permission for each.
#[derive(Debug)]
pub struct IotlbMap {
    /// Unique per map (process-wide), so views handed out for one map are never mistaken for another's.
    epoch: u64,
    mem: GuestMemoryMmap,
    /// `(first IOVA, last IOVA, VDUSE_ACCESS_*)`, sorted, non-overlapping.
    ranges: Vec<(u64, u64, u8)>,
    // Declared last so the vm-memory view (which does not own the mappings) goes first.
    _mappings: Vec<Mapping>,
}

impl IotlbMap {
    pub fn empty() -> Self {
        Self::with_memory(GuestMemoryMmap::new(), Vec::new())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The region holding `addr`, and the offset of `addr` in it.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let i = self.ranges.partition_point(|&(_, last, _)| last < addr);
        let &(first, _, _) = self.ranges.get(i)?;
        (first <= addr).then(|| (i, addr - first))
    }

    /// Length of region `index`.
    pub fn region_len(&self, index: usize) -> Option<u64> {
        self.ranges.get(index).map(|&(first, last, _)| last - first + 1)
    }

    /// Host address and length of region `index`, for zero-copy views (valid while this map lives).
    pub fn region_host(&self, index: usize) -> Option<(*mut u8, usize)> {
        let &(first, _, _) = self.ranges.get(index)?;
        let len = self.region_len(index)? as usize;
        let ptr = vm_memory::GuestMemoryBackend::get_host_address(&self.mem, GuestAddress(first)).ok()?;
        Some((ptr, len))
    }

    /// A map over memory the caller owns (in-process transports and tests): `ranges` are
    /// `(first IOVA, last IOVA, VDUSE_ACCESS_*)`, sorted and non-overlapping, inside `mem`.
    pub fn with_memory(mem: GuestMemoryMmap, mut ranges: Vec<(u64, u64, u8)>) -> Self {
        ranges.sort_unstable();
        Self {
            epoch: next_epoch(),
            mem,
            ranges,
            _mappings: Vec::new(),
        }
    }

    /// The memory as vm-memory sees it (for virtio-queue and `Bytes` accesses).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// True when `[addr, addr+len)` is wholly mapped with the access the device needs. Every buffer of
    /// every request passes here before it is touched, so a bad address fails the request, never the process.
    pub fn check(&self, addr: u64, len: u32, access: Access) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = addr.checked_add(u64::from(len) - 1) else {
            return false;
        };
        let mut at = addr;
        // Ranges may be adjacent; walk them until the whole buffer is covered.
        let start = self.ranges.partition_point(|&(_, l, _)| l < at);
        for &(first, l, perm) in &self.ranges[start..] {
            if first > at || !access.allowed_by(perm) {
                return false;
            }
            if l >= last {
                return true;
            }
            at = l + 1;
        }
        false
    }

    pub fn regions(&self) -> usize {
        self.ranges.len()
    }

    /// Reads every IOTLB entry of the device: `GET_FD` from IOVA 0 upwards until the kernel has no more.
    pub fn load(dev: &File) -> std::io::Result<Self> {
        let mut regions = Vec::new();
        let mut ranges = Vec::new();
        let mut mappings = Vec::new();
        let mut start = 0u64;
        loop {
            let mut entry = vduse_iotlb_entry {
                start,
                last: u64::MAX,
                ..Default::default()
            };
            // SAFETY: VDUSE_IOTLB_GET_FD reads and writes one vduse_iotlb_entry through the pointer.
            let fd = unsafe { ioctl_with_mut_ref(dev, uapi::VDUSE_IOTLB_GET_FD(), &mut entry) };
            if fd < 0 {
                let err = std::io::Error::last_os_error();
                // EINVAL: no entry at or above `start` (or no domain yet): the map is complete.
                if err.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(err);
            }
            // SAFETY: the ioctl returned a new fd that we own; File closes it right after the mmap.
            let file = unsafe { File::from_raw_fd(fd) };
            if entry.last < entry.start || entry.last == u64::MAX || entry.start < start {
                return Err(std::io::Error::other(format!("bad IOTLB entry {entry:?}")));
            }
            let len = usize::try_from(entry.last - entry.start + 1)
                .map_err(|_| std::io::Error::other("IOTLB entry too large"))?;
            let mapping = map_entry(&file, &entry, len)?;
            drop(file);
            // SAFETY: the mapping stays alive (in `mappings`) as long as the region that points into it.
            let region = unsafe {
                MmapRegion::build_raw(mapping.addr.cast(), len, mapping_prot(&entry), libc::MAP_SHARED)
            }
            .map_err(std::io::Error::other)?;
            let region = GuestRegionMmap::new(region, GuestAddress(entry.start))
                .ok_or_else(|| std::io::Error::other("IOTLB entry overflows the address space"))?;
            regions.push(region);
            ranges.push((entry.start, entry.last, entry.perm));
            mappings.push(mapping);
            start = entry.last + 1;
        }
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_regions(regions).map_err(std::io::Error::other)?
        };
        Ok(Self {
            epoch: next_epoch(),
            mem,
            ranges,
            _mappings: mappings,
        })
    }
}

fn next_epoch() -> u64 {
    static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn mapping_prot(entry: &vduse_iotlb_entry) -> i32 {
    let mut prot = 0;
    if entry.perm & uapi::VDUSE_ACCESS_RO != 0 {
        prot |= libc::PROT_READ;
    }
    if entry.perm & uapi::VDUSE_ACCESS_WO != 0 {
        prot |= libc::PROT_WRITE;
    }
    prot
}

fn map_entry(file: &File, entry: &vduse_iotlb_entry, len: usize) -> std::io::Result<Mapping> {
    // Map read-write when the file allows it: the used ring and status bytes are written through
    // vm-memory, and a write-protected page would SIGSEGV instead of failing a request. Permissions are
    // enforced in software by `IotlbMap::check` before any buffer is touched.
    for prot in [libc::PROT_READ | libc::PROT_WRITE, mapping_prot(entry)] {
        // SAFETY: a fresh shared mapping of `len` bytes of the fd at the kernel-provided offset.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                entry.offset as libc::off_t,
            )
        };
        if addr != libc::MAP_FAILED {
            return Ok(Mapping { addr, len });
        }
    }
    Err(std::io::Error::last_os_error())
}

/// The current map of a device, swapped as a whole.
///
/// Maps replaced while the kernel waits for a message reply are *retired*, not dropped: with vhost-vdpa
/// the kernel may hold the driver process's mmap lock while it waits, and when that process is our own
/// (an in-process driver) an munmap — or an mmap — in the message loop would deadlock until the message
/// times out and the device is broken for good. Retired maps are released after the reply.
#[derive(Debug)]
pub struct Memory {
    current: RwLock<Arc<IotlbMap>>,
    retired: std::sync::Mutex<Vec<Arc<IotlbMap>>>,
    stale: std::sync::atomic::AtomicBool,
}

impl Default for Memory {
    fn default() -> Self {
        Self {
            current: RwLock::new(Arc::new(IotlbMap::empty())),
            retired: std::sync::Mutex::new(Vec::new()),
            stale: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Memory {
    pub fn snapshot(&self) -> Arc<IotlbMap> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, map: IotlbMap) -> Arc<IotlbMap> {
        let map = Arc::new(map);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = map.clone();
        map
    }

    pub fn clear(&self) {
        self.replace(IotlbMap::empty());
    }

    /// Empties the map without unmapping anything yet (see the type's doc); `stale` asks the next user
    /// to re-read the IOTLB first.
    pub fn retire(&self, stale: bool) {
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(IotlbMap::empty()),
        );
        self.retired.lock().unwrap_or_else(|e| e.into_inner()).push(old);
        self.stale.store(stale, std::sync::atomic::Ordering::Release);
    }

    /// Drops retired maps (their mappings go once no request holds them).
    pub fn release_retired(&self) {
        let retired = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()));
        drop(retired);
    }

    /// True once after `retire(true)`: the caller should reload the map before using it.
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(ranges: Vec<(u64, u64, u8)>) -> IotlbMap {
        IotlbMap::with_memory(GuestMemoryMmap::new(), ranges)
    }

    #[test]
    fn check_covers_adjacent_ranges_and_rejects_gaps() {
        let map = map_with(vec![
            (0x0, 0xfff, uapi::VDUSE_ACCESS_RW),
            (0x1000, 0x1fff, uapi::VDUSE_ACCESS_RW),
            (0x3000, 0x3fff, uapi::VDUSE_ACCESS_RO),
        ]);
        assert!(
            map.check(0x0, 0x2000, Access::Write),
            "spans two adjacent regions"
        );
        assert!(map.check(0xff0, 0x20, Access::Read));
        assert!(!map.check(0x1ff0, 0x20, Access::Read), "runs into the gap");
        assert!(!map.check(0x2000, 1, Access::Read), "inside the gap");
        assert!(map.check(0x3000, 0x1000, Access::Read));
        assert!(!map.check(0x3000, 0x10, Access::Write), "read-only entry");
        assert!(!map.check(0x4000, 1, Access::Read), "past the end");
        assert!(!map.check(u64::MAX - 2, 16, Access::Read), "overflowing length");
        assert!(map.check(0x5000, 0, Access::Read), "empty buffers touch nothing");
    }

    #[test]
    fn write_only_entries_are_not_readable() {
        let map = map_with(vec![(0x0, 0xfff, uapi::VDUSE_ACCESS_WO)]);
        assert!(map.check(0, 16, Access::Write));
        assert!(!map.check(0, 16, Access::Read));
    }

    #[test]
    fn memory_swaps_snapshots_without_invalidating_readers() {
        let memory = Memory::default();
        let old = memory.snapshot();
        memory.replace(map_with(vec![(0, 0xfff, uapi::VDUSE_ACCESS_RW)]));
        assert_eq!(old.regions(), 0, "a reader keeps the map it started with");
        assert_eq!(memory.snapshot().regions(), 1);
        memory.clear();
        assert_eq!(memory.snapshot().regions(), 0);
    }
}
