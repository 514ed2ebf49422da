//! The device's view of driver memory: the kernel's IOTLB (`VDUSE_IOTLB_GET_FD`), each entry mmap'ed
//! once with the protection the kernel grants, assembled into an immutable, permission-checked map keyed
//! by IOVA.
//!
//! - [`IotlbMap`] owns its mappings: a clone of the `Arc` keeps them mapped, nothing hands out a view
//!   that can outlive them. It implements vm-memory's [`GuestMemory`], so every access — virtio-queue's
//!   ring accesses included — is checked against the entry's permission: a write into a read-only entry
//!   is an error, never a SIGSEGV.
//! - Who may touch driver memory, and when: the queue copies a request's bytes only under its ring lock
//!   while the request's ticket is live, so a fence (taken under that lock) ends every such access at
//!   once. The one exception is a system call that moves data straight into the driver's buffers
//!   (native reads): it holds [`Pins`] on the mappings it uses, and the message loop waits for them —
//!   or, at its deadline, [revokes](Mapping::revoke) those mappings — before it answers the kernel.
//! - [`Mapping::revoke`] takes all access away from a mapping in place (`PROT_NONE`): a system call still
//!   moving data through an old pointer fails (`EFAULT`) at its next page instead of reaching pages the
//!   driver reuses. The range stays our mapping, so nothing else can be mapped there meanwhile. A
//!   revocation the kernel refuses is reported, and the mapping is never reused; the caller fails closed.
//! - [`Memory`] holds the current map. A change marks it stale; whoever serves the queues next reloads
//!   it, reusing the mappings of entries that did not change. The message loop never mmaps or munmaps.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemorySliceIterator, Result as MemResult};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};
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
    fn permission(self) -> Permissions {
        match self {
            Access::Read => Permissions::Read,
            Access::Write => Permissions::Write,
        }
    }
}

/// `VDUSE_ACCESS_*` bits allow `access`. The bit values are the same as vm-memory's `Permissions`.
fn perm_allows(perm: u8, access: Permissions) -> bool {
    let want = access as u8;
    perm & want == want
}

/// What identifies an IOTLB entry: its range, permission, and the file pages behind it. Two loads that
/// see the same key see the same memory, so a mapping can be kept across an IOTLB update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub first: u64,
    pub last: u64,
    pub perm: u8,
    pub offset: u64,
    /// `(st_dev, st_ino)` of the file the kernel handed out.
    pub file: (u64, u64),
}

impl EntryKey {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        len > 0 && addr <= self.last && addr.saturating_add(len - 1) >= self.first
    }
}

/// Where IOTLB entries come from (the VDUSE device fd; nothing, for memory the caller owns).
pub trait IotlbSource: Send + Sync {
    /// The first entry overlapping `[first, last]` and an fd to map it, or `None` if there is none.
    fn entry(&self, first: u64, last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>>;
}

/// No IOTLB: the map is whatever the caller built.
pub struct NoIotlb;

impl IotlbSource for NoIotlb {
    fn entry(&self, _first: u64, _last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>> {
        Ok(None)
    }
}

impl IotlbSource for File {
    fn entry(&self, first: u64, last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>> {
        let mut entry = vduse_iotlb_entry {
            start: first,
            last,
            ..Default::default()
        };
        // SAFETY: VDUSE_IOTLB_GET_FD reads and writes one vduse_iotlb_entry through the pointer.
        let fd = unsafe { ioctl_with_mut_ref(self, uapi::VDUSE_IOTLB_GET_FD(), &mut entry) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // EINVAL: no entry overlaps (or no domain yet).
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(None);
            }
            return Err(err);
        }
        // SAFETY: the ioctl returned a new fd (without CLOEXEC) that we now own and close on drop.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Some((entry, file)))
    }
}

/// Calls `f` with every entry the source has, in IOVA order, and an fd to map it (closed when `f`
/// returns: however many entries there are, at most one fd is open at a time).
fn for_each_entry(
    source: &dyn IotlbSource,
    mut f: impl FnMut(EntryKey, &File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut first = 0u64;
    let mut count = 0usize;
    loop {
        let Some((entry, file)) = source.entry(first, u64::MAX)? else {
            return Ok(());
        };
        let key = key_of(&entry, &file)?;
        count += 1;
        if key.first < first || count > MAX_ENTRIES {
            return Err(std::io::Error::other(format!("bad IOTLB entry {entry:?}")));
        }
        f(key, &file)?;
        if key.last == u64::MAX {
            return Ok(());
        }
        first = key.last + 1;
    }
}

/// The keys of every entry the source has, in IOVA order (what the message loop compares maps with).
pub fn entry_keys(source: &dyn IotlbSource) -> std::io::Result<Vec<EntryKey>> {
    let mut keys = Vec::new();
    for_each_entry(source, |key, _| {
        keys.push(key);
        Ok(())
    })?;
    Ok(keys)
}

/// More entries than any kernel keeps (6.12 caps them at 2048): a guard against a kernel bug looping us.
const MAX_ENTRIES: usize = 1 << 16;

fn key_of(entry: &vduse_iotlb_entry, file: &File) -> std::io::Result<EntryKey> {
    if entry.last < entry.start || entry.last - entry.start >= isize::MAX as u64 {
        return Err(std::io::Error::other(format!("bad IOTLB entry {entry:?}")));
    }
    let meta = file.metadata()?;
    Ok(EntryKey {
        first: entry.start,
        last: entry.last,
        perm: entry.perm & uapi::VDUSE_ACCESS_RW,
        offset: entry.offset,
        file: (meta.dev(), meta.ino()),
    })
}

/// A mapping's state: live, revoked (no access left), or failed (the kernel refused to revoke it: it is
/// still the driver's memory, and never reused).
const LIVE: u8 = 0;
const REVOKED: u8 = 1;
const FAILED: u8 = 2;

/// How much of a mapping one munmap call releases: a large unmap holds the process's mmap lock, and a
/// revocation waiting for that lock must not wait for gigabytes at once.
const UNMAP_STEP: usize = 64 << 20;

/// One mmap'ed IOTLB entry (or anonymous memory for in-process use), unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    /// Where the entry's first byte is mapped.
    addr: *mut u8,
    len: usize,
    /// The whole mmap: it starts up to a page before `addr` when the kernel's offset is not aligned.
    base: *mut u8,
    base_len: usize,
    state: AtomicU8,
    /// System calls moving data straight into this mapping right now (see [`Pins`]).
    pins: AtomicUsize,
    /// Test hook: the next revocation fails as if the kernel refused it.
    fail_revoke: std::sync::atomic::AtomicBool,
}

// SAFETY: the mapping is plain memory; all access goes through volatile slices or raw pointers whose
// users check bounds, and the struct itself is immutable apart from its atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(addr: *mut u8, len: usize, base: *mut u8, base_len: usize) -> Self {
        Self {
            addr,
            len,
            base,
            base_len,
            state: AtomicU8::new(LIVE),
            pins: AtomicUsize::new(0),
            fail_revoke: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn map(file: &File, offset: u64, len: usize, perm: u8) -> std::io::Result<Self> {
        let mut prot = 0;
        if perm & uapi::VDUSE_ACCESS_RO != 0 {
            prot |= libc::PROT_READ;
        }
        if perm & uapi::VDUSE_ACCESS_WO != 0 {
            prot |= libc::PROT_WRITE;
        }
        // mmap wants a page-aligned offset; map from the page start and skip the difference.
        let delta = (offset % page_size()) as usize;
        let base_len = len
            .checked_add(delta)
            .ok_or_else(|| std::io::Error::other("IOTLB entry too large"))?;
        // SAFETY: a fresh shared mapping of `base_len` bytes of `file` at a page-aligned offset. mmap checks
        // the offset; an access past the file's end would fault, so callers hand in ranges the file holds
        // (the kernel's IOTLB entries; vhost-user regions are checked against the file's size first).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                base_len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                (offset - delta as u64) as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: delta < one page <= base_len.
        let addr = unsafe { base.cast::<u8>().add(delta) };
        Ok(Self::new(addr, len, base.cast(), base_len))
    }

    /// Zero-filled anonymous memory the caller owns (in-process drivers, tests, benchmarks).
    pub fn anonymous(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self::new(addr.cast(), len, addr.cast(), len))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Revoked, or its revocation failed: never reused for a new map.
    pub fn is_revoked(&self) -> bool {
        self.state.load(Ordering::Acquire) != LIVE
    }

    /// The kernel refused to revoke it: a system call may still reach the driver's pages through it.
    pub fn is_lost(&self) -> bool {
        self.state.load(Ordering::Acquire) == FAILED
    }

    /// Test hook: makes the next [`revoke`](Self::revoke) fail as if the kernel refused it (ENOMEM).
    #[doc(hidden)]
    pub fn fail_next_revoke(&self) {
        self.fail_revoke.store(true, Ordering::Release);
    }

    /// Whether a system call may be moving data into this mapping right now.
    pub fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    /// Takes all access away from the mapping, in place (`PROT_NONE`): a system call still moving data
    /// through a pointer into it — a native read that outlived its request — fails with `EFAULT` at its
    /// next page instead of reaching pages the driver reuses. Nothing of ours touches a revoked mapping in
    /// user space (every copy checks its request's ticket first). Idempotent. If the kernel refuses, the
    /// mapping is marked failed (an error now and on every later call): it is still the driver's memory
    /// and never reused. Must not run where the kernel may hold this process's mmap lock while waiting on
    /// the caller (the VDUSE message loop): see [`Janitor`].
    pub fn revoke(&self) -> std::io::Result<()> {
        match self
            .state
            .compare_exchange(LIVE, REVOKED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(REVOKED) => return Ok(()),
            Err(_) => return Err(std::io::Error::other("revoking this mapping failed before")),
        }
        let result = if self.fail_revoke.swap(false, Ordering::AcqRel) {
            Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            // SAFETY: mprotect over exactly the range this struct mapped; success or failure, the range
            // stays this mapping (mprotect never unmaps), so no pointer into it can reach anything else.
            match unsafe { libc::mprotect(self.base.cast(), self.base_len, libc::PROT_NONE) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        };
        if result.is_err() {
            self.state.store(FAILED, Ordering::Release);
        }
        result
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let mut at = 0;
        while at < self.base_len {
            let n = UNMAP_STEP.min(self.base_len - at);
            // SAFETY: `[base + at, base + at + n)` lies in the range a successful mmap gave this struct,
            // which nothing else unmaps (revocation changes its protection only).
            unsafe { libc::munmap(self.base.add(at).cast(), n) };
            at += n;
        }
    }
}

/// Host pointers into driver memory for a system call that moves data straight into it (a native
/// read), and pins on the mappings they point into: while a mapping is pinned, the message loop does not
/// tell the kernel it is done with that memory (it waits, and at its deadline revokes the mapping first).
/// Taken under the queue lock of a live request (`Virtqueue::pin`), so a fence cannot miss one. The
/// pointers are valid until [`release`](Self::release) (or drop); reuse one `Pins` per thread: it keeps
/// its capacity.
#[derive(Default)]
pub struct Pins {
    held: Vec<Arc<Mapping>>,
    ranges: Vec<(*mut u8, usize)>,
    /// Counters of pins held now, one per queue whose requests these pins reach (see
    /// `Virtqueue::pinned_now`): raised with the pins, lowered on release.
    counted: Vec<Arc<AtomicUsize>>,
}

// SAFETY: the pointers point into mappings the pins keep alive; they are data for the holder's system
// calls, never dereferenced by this type.
unsafe impl Send for Pins {}

impl Pins {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The pinned byte ranges, in order.
    pub fn ranges(&self) -> &[(*mut u8, usize)] {
        &self.ranges
    }

    fn pin(&mut self, mapping: &Arc<Mapping>) {
        if self.held.iter().any(|m| Arc::ptr_eq(m, mapping)) {
            return;
        }
        mapping.pins.fetch_add(1, Ordering::AcqRel);
        self.held.push(mapping.clone());
    }

    /// Counts these pins in `counter` (a queue's) until they are released.
    pub fn count_in(&mut self, counter: &Arc<AtomicUsize>) {
        if self.counted.iter().any(|c| Arc::ptr_eq(c, counter)) {
            return;
        }
        counter.fetch_add(1, Ordering::AcqRel);
        self.counted.push(counter.clone());
    }

    /// Forgets the ranges and unpins: from here on the pointers must not be used.
    pub fn release(&mut self) {
        self.ranges.clear();
        for m in self.held.drain(..) {
            m.pins.fetch_sub(1, Ordering::AcqRel);
        }
        for c in self.counted.drain(..) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.release();
    }
}

/// Waits until none of `mappings` is pinned, or `deadline`; true if none is.
pub fn wait_unpinned(mappings: &[Arc<Mapping>], deadline: Instant) -> bool {
    loop {
        if mappings.iter().all(|m| !m.is_pinned()) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        // Pins last one system call; a poll at this period costs nothing next to the drain it ends.
        std::thread::sleep((deadline - now).min(Duration::from_millis(1)));
    }
}

#[derive(Debug)]
struct Region {
    key: EntryKey,
    mapping: Arc<Mapping>,
}

/// How a range lies over a map's entries (see `IotlbMap::span`).
enum Span {
    Covered,
    Gap(u64),
    Refused,
}

/// Whether `[addr, addr+len)` runs past the end of the address space.
/// Appends `item` unless `list` holds that very `Arc` already; whether it was appended.
pub(crate) fn push_unique<T>(list: &mut Vec<Arc<T>>, item: Arc<T>) -> bool {
    if list.iter().any(|x| Arc::ptr_eq(x, &item)) {
        return false;
    }
    list.push(item);
    true
}

/// The distinct mappings of `maps`: everything they may still reach.
pub(crate) fn mappings_of<'a>(maps: impl IntoIterator<Item = &'a Arc<IotlbMap>>) -> Vec<Arc<Mapping>> {
    let mut mappings = Vec::new();
    for m in maps {
        for mapping in m.mappings() {
            push_unique(&mut mappings, mapping);
        }
    }
    mappings
}

fn wraps(addr: u64, len: u64) -> bool {
    len > 0 && addr.checked_add(len - 1).is_none()
}

/// An immutable snapshot of the IOTLB: regions sorted by IOVA, each with the kernel's permission.
#[derive(Debug)]
pub struct IotlbMap {
    /// Unique per map (process-wide).
    epoch: u64,
    regions: Vec<Region>,
}

impl IotlbMap {
    pub fn empty() -> Self {
        Self {
            epoch: next_epoch(),
            regions: Vec::new(),
        }
    }

    /// A map over anonymous memory: `ranges` are `(first IOVA, length, VDUSE_ACCESS_*)`. For in-process
    /// drivers (tests, benchmarks): they reach the memory through this map, like the device does.
    pub fn anonymous(ranges: &[(u64, usize, u8)]) -> std::io::Result<Self> {
        let mut regions = Vec::new();
        for (i, &(first, len, perm)) in ranges.iter().enumerate() {
            let mapping = Arc::new(Mapping::anonymous(len)?);
            let key = EntryKey {
                first,
                last: first + len as u64 - 1,
                perm,
                offset: 0,
                file: (u64::MAX, i as u64),
            };
            regions.push(Region { key, mapping });
        }
        Self::assemble(regions)
    }

    fn assemble(mut regions: Vec<Region>) -> std::io::Result<Self> {
        regions.sort_by_key(|r| r.key.first);
        if regions.windows(2).any(|w| w[0].key.last >= w[1].key.first) {
            return Err(std::io::Error::other("overlapping IOTLB entries"));
        }
        Ok(Self {
            epoch: next_epoch(),
            regions,
        })
    }

    /// Reads every IOTLB entry of `source`, reusing the mappings of `previous` whose entries did not
    /// change (and were not revoked) and mapping the others.
    pub fn load(source: &dyn IotlbSource, previous: &IotlbMap) -> std::io::Result<Self> {
        let mut regions = Vec::new();
        for_each_entry(source, |key, file| {
            let mapping = match previous
                .regions
                .iter()
                .find(|r| r.key == key && !r.mapping.is_revoked())
            {
                Some(r) => r.mapping.clone(),
                None => Arc::new(Mapping::map(file, key.offset, key.len() as usize, key.perm)?),
            };
            regions.push(Region { key, mapping });
            Ok(())
        })?;
        Self::assemble(regions)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    pub fn keys(&self) -> impl Iterator<Item = EntryKey> + '_ {
        self.regions.iter().map(|r| r.key)
    }

    pub fn contains_key(&self, key: &EntryKey) -> bool {
        self.regions.iter().any(|r| r.key == *key)
    }

    /// The mappings of entries that `keep` does not list (what an IOTLB update removed or changed).
    pub fn mappings_not_in(&self, keep: &[EntryKey]) -> Vec<(EntryKey, Arc<Mapping>)> {
        self.regions
            .iter()
            .filter(|r| !keep.contains(&r.key))
            .map(|r| (r.key, r.mapping.clone()))
            .collect()
    }

    /// All mappings, for revoking them on reset.
    pub fn mappings(&self) -> Vec<Arc<Mapping>> {
        self.regions.iter().map(|r| r.mapping.clone()).collect()
    }

    /// The first address of `[addr, addr+len)` that no entry covers, if any: one binary search, then one
    /// step per entry the range crosses (never per page, whatever the length).
    pub fn first_uncovered(&self, addr: u64, len: u64) -> Option<u64> {
        match self.span(addr, len, |_| true) {
            Span::Gap(at) => Some(at),
            _ => None,
        }
    }

    /// Whether every byte of `[addr, addr+len)` lies in entries of this map that are still in `keys` (the
    /// kernel's entries after an update, in IOVA order): a buffer for which this is false lost (part of)
    /// its memory, or had it replaced by other pages.
    pub fn survives(&self, addr: u64, len: u64, keys: &[EntryKey]) -> bool {
        let kept = |r: &Region| {
            keys.binary_search_by_key(&r.key.first, |k| k.first)
                .is_ok_and(|i| keys[i] == r.key)
        };
        !wraps(addr, len) && matches!(self.span(addr, len, kept), Span::Covered)
    }

    /// Walks the entries `[addr, addr+len)` crosses, in order, asking `ok` of each: `Refused` at the first
    /// it refuses, `Gap` at the first address no entry covers, `Covered` if every byte lies in entries it
    /// took. One binary search, then one step per entry crossed — never one per page.
    fn span(&self, addr: u64, len: u64, mut ok: impl FnMut(&Region) -> bool) -> Span {
        if len == 0 {
            return Span::Covered;
        }
        let last = addr.saturating_add(len - 1);
        let mut at = addr;
        let start = self.regions.partition_point(|r| r.key.last < at);
        for r in &self.regions[start..] {
            if r.key.first > at {
                return Span::Gap(at);
            }
            if !ok(r) {
                return Span::Refused;
            }
            if r.key.last >= last {
                return Span::Covered;
            }
            at = r.key.last + 1;
        }
        Span::Gap(at)
    }

    /// Whether some entry covers `addr` at all (regardless of permission).
    pub fn covers(&self, addr: u64) -> bool {
        self.region_at(addr).is_some()
    }

    fn region_at(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.key.last < addr);
        (i < self.regions.len() && self.regions[i].key.first <= addr).then_some(i)
    }

    /// True when `[addr, addr+len)` is wholly mapped with `access` allowed. Every buffer of every request
    /// passes here before it is touched, so a bad address fails the request, never the process.
    pub fn check(&self, addr: u64, len: u64, access: Access) -> bool {
        self.allows(addr, len, access.permission())
    }

    fn allows(&self, addr: u64, len: u64, access: Permissions) -> bool {
        !wraps(addr, len)
            && matches!(
                self.span(addr, len, |r| perm_allows(r.key.perm, access)),
                Span::Covered
            )
    }

    /// Host pointers for `[addr, addr+len)`, one per region it crosses, appended to `pins`' ranges with
    /// their mappings pinned; false (and no range added) unless the whole range is mapped with `access`.
    /// Only the queue calls this, under its lock, for a live request.
    pub(crate) fn host_ranges_pinned(&self, addr: u64, len: u64, access: Access, pins: &mut Pins) -> bool {
        if !self.check(addr, len, access) {
            return false;
        }
        let mark = pins.ranges.len();
        let mut at = addr;
        let mut left = len;
        while left > 0 {
            let Some(i) = self.region_at(at) else {
                pins.ranges.truncate(mark);
                return false;
            };
            let r = &self.regions[i];
            let offset = at - r.key.first;
            let n = left.min(r.key.last - at + 1);
            // SAFETY: `offset + n` lies inside the region's mapping (checked above), whose length is the
            // entry's length.
            let ptr = unsafe { r.mapping.addr.add(offset as usize) };
            pins.ranges.push((ptr, n as usize));
            pins.pin(&r.mapping);
            at = at.wrapping_add(n);
            left -= n;
        }
        true
    }

    /// Copies guest bytes at `addr` into `out` (device reads driver memory).
    pub fn read_into(&self, addr: u64, out: &mut [u8]) -> bool {
        vm_memory::Bytes::read_slice(self, out, GuestAddress(addr)).is_ok()
    }

    /// Copies `data` into guest memory at `addr` (device writes driver memory).
    pub fn write_from(&self, addr: u64, data: &[u8]) -> bool {
        vm_memory::Bytes::write_slice(self, data, GuestAddress(addr)).is_ok()
    }
}

impl GuestMemory for IotlbMap {
    type PhysicalMemory = vm_memory::GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.allows(addr.0, count as u64, access)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> MemResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        if !self.allows(addr.0, count as u64, access) {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        }
        Ok(Slices {
            map: self,
            at: addr.0,
            left: count as u64,
        })
    }

    // No `physical_memory()`: nothing may reach the mappings around the permission checks.
}

/// The volatile slices of a checked range, one per region it crosses.
struct Slices<'a> {
    map: &'a IotlbMap,
    at: u64,
    left: u64,
}

impl<'a> Iterator for Slices<'a> {
    type Item = MemResult<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let Some(i) = self.map.region_at(self.at) else {
            self.left = 0;
            return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(self.at))));
        };
        let r = &self.map.regions[i];
        let offset = self.at - r.key.first;
        let n = self.left.min(r.key.last - self.at + 1);
        self.at = self.at.wrapping_add(n);
        self.left -= n;
        // SAFETY: `[offset, offset + n)` lies inside the region's mapping, which lives as long as the map
        // this slice borrows.
        Some(Ok(unsafe {
            VolatileSlice::new(r.mapping.addr.add(offset as usize), n as usize)
        }))
    }
}

impl std::iter::FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

fn next_epoch() -> u64 {
    static EPOCH: AtomicU64 = AtomicU64::new(1);
    EPOCH.fetch_add(1, Ordering::Relaxed)
}

/// The current map of a device, replaced as a whole.
///
/// Staleness is a generation: [`invalidate`](Memory::invalidate) bumps `wanted`, a reload records the
/// generation it loaded for. A thread that finds the map stale waits for the reload in progress (or does
/// one), so nobody gets an older map from a reload that raced them; [`is_current`](Memory::is_current)
/// lets holders of a map check, under their own lock, that no change happened since they took it.
pub struct Memory {
    current: RwLock<Arc<IotlbMap>>,
    /// Bumped by every change of the kernel's IOTLB (or reset).
    wanted: AtomicU64,
    /// The generation `current` was loaded for.
    loaded: AtomicU64,
    /// One reload at a time. Held across mmap: never taken by the message loop.
    reloading: Mutex<()>,
    source: Arc<dyn IotlbSource>,
    reloads: AtomicU64,
    reload_failed: std::sync::atomic::AtomicBool,
}

impl Memory {
    pub fn new(source: Arc<dyn IotlbSource>) -> Self {
        Self {
            current: RwLock::new(Arc::new(IotlbMap::empty())),
            wanted: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            reloading: Mutex::new(()),
            source,
            reloads: AtomicU64::new(0),
            reload_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Memory the caller owns, fixed for good (no IOTLB behind it).
    pub fn fixed(map: IotlbMap) -> Self {
        let memory = Self::new(Arc::new(NoIotlb));
        *memory.current.write() = Arc::new(map);
        memory
    }

    pub fn source(&self) -> &dyn IotlbSource {
        self.source.as_ref()
    }

    fn stale(&self) -> bool {
        self.loaded.load(Ordering::Acquire) != self.wanted.load(Ordering::Acquire)
    }

    /// The current map, reloaded first if the IOTLB changed since it was read. Serving threads call this;
    /// the message loop uses [`peek`](Self::peek) (it must not mmap). If the reload fails (fd or memory
    /// exhaustion), the old map is returned and the reload is tried again next time.
    pub fn snapshot(&self) -> Arc<IotlbMap> {
        if self.stale() {
            if let Err(e) = self.reload() {
                log::error!("cannot read the IOTLB ({e}); serving with the previous map");
            }
        }
        self.peek()
    }

    /// Whether the last reload failed (fd or memory exhaustion, a broken device): the map is outdated
    /// until one succeeds, and callers that must not touch memory through an outdated map fail closed.
    pub fn reload_failing(&self) -> bool {
        self.reload_failed.load(Ordering::Acquire)
    }

    /// The current map as it is, without reloading.
    pub fn peek(&self) -> Arc<IotlbMap> {
        self.current.read().clone()
    }

    /// Whether `map` is the current map and no change happened since it was loaded. Check it under the
    /// lock that the message loop takes before revoking (the queue lock).
    pub fn is_current(&self, map: &Arc<IotlbMap>) -> bool {
        !self.stale() && Arc::ptr_eq(&self.current.read(), map)
    }

    /// The kernel's IOTLB changed: the next [`snapshot`](Self::snapshot) re-reads it.
    pub fn invalidate(&self) {
        self.wanted.fetch_add(1, Ordering::AcqRel);
    }

    /// Replaces the map by an empty one (reset); returns the old one.
    pub fn clear(&self) -> Arc<IotlbMap> {
        self.invalidate();
        std::mem::replace(&mut *self.current.write(), Arc::new(IotlbMap::empty()))
    }

    /// Re-reads the IOTLB now (if it changed since the last load), keeping mappings of unchanged entries.
    pub fn reload(&self) -> std::io::Result<()> {
        let _one = self.reloading.lock();
        let want = self.wanted.load(Ordering::Acquire);
        if self.loaded.load(Ordering::Acquire) == want {
            return Ok(()); // someone else just did it
        }
        let previous = self.peek();
        let map = IotlbMap::load(self.source.as_ref(), &previous);
        self.reload_failed.store(map.is_err(), Ordering::Release);
        let map = map?;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        *self.current.write() = Arc::new(map);
        // A change that came in during the load bumped `wanted` past `want`: it stays stale.
        self.loaded.store(want, Ordering::Release);
        drop(previous);
        Ok(())
    }

    /// A buffer at `addr` fell outside `map`. Returns true if the caller should retry with a fresh
    /// snapshot: the current map covers `addr` (another thread reloaded), or the kernel has an entry for
    /// it that was not loaded yet (virtio-vdpa's bounce region appears with the first I/O) and the reload
    /// found it. One ioctl at most per call, so a driver that sends bad addresses cannot make the device
    /// reload the map for each.
    pub fn miss(&self, map: &Arc<IotlbMap>, addr: u64) -> bool {
        let current = self.snapshot();
        if !Arc::ptr_eq(&current, map) && current.covers(addr) {
            return true;
        }
        match self.source.entry(addr, addr) {
            Ok(Some((entry, file))) => {
                let Ok(key) = key_of(&entry, &file) else {
                    return false;
                };
                if current.contains_key(&key) {
                    return false;
                }
                self.invalidate();
                self.reload().is_ok() && self.peek().covers(addr)
            }
            _ => false,
        }
    }

    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }
}

/// Does mmap work for the message loop on threads of its own, so the loop can bound its waits.
///
/// With vhost-vdpa the kernel may send a message while holding the *driver* process's mmap lock; when the
/// driver is this very process (an in-process driver), an mmap or munmap in the message loop would wait
/// for that lock while the kernel waits for our reply — until the message times out and breaks the device.
/// Revocations and the final unmapping of old maps therefore run here. They run on two threads: a
/// revocation (which the loop waits for) never queues behind the unmapping of a large old map (which
/// nobody waits for), and unmapping goes in steps so a revocation gets the mmap lock between them.
pub struct Janitor {
    revoker: Option<std::sync::mpsc::Sender<RevokeJob>>,
    disposer: Option<std::sync::mpsc::Sender<Box<dyn Send>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct RevokeJob {
    mappings: Vec<Arc<Mapping>>,
    done: std::sync::mpsc::Sender<bool>,
}

/// A revocation under way (see [`Janitor::revoke`]).
pub struct Revocation {
    done: Option<std::sync::mpsc::Receiver<bool>>,
    /// Known already (nothing to revoke, or the janitor is gone).
    outcome: Option<bool>,
}

impl Revocation {
    /// Waits until the revocation finished or `deadline`: `Some(true)` when every mapping was revoked,
    /// `Some(false)` when one could not be (the kernel refused, or the janitor is gone), `None` while it
    /// is still running — it keeps running, and a later call may still see it finish.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<bool> {
        if let Some(o) = self.outcome {
            return Some(o);
        }
        let rx = self.done.as_ref()?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(timeout) {
            Ok(ok) => {
                self.outcome = Some(ok);
                Some(ok)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                self.outcome = Some(false);
                Some(false)
            }
        }
    }
}

impl Janitor {
    pub fn new(name: &str) -> std::io::Result<Self> {
        let (revoker, revokes) = std::sync::mpsc::channel::<RevokeJob>();
        let (disposer, disposals) = std::sync::mpsc::channel::<Box<dyn Send>>();
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name(format!("vduse-rv-{name}"))
                .spawn(move || {
                    for job in revokes {
                        let mut ok = true;
                        for m in &job.mappings {
                            if let Err(e) = m.revoke() {
                                ok = false;
                                log::error!("cannot revoke a mapping of {} bytes: {e}", m.len());
                            }
                        }
                        // Report before dropping: the last reference may unmap, which takes a while.
                        let _ = job.done.send(ok);
                        drop(job.mappings);
                    }
                })?,
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("vduse-mm-{name}"))
                .spawn(move || {
                    for thing in disposals {
                        drop(thing);
                    }
                })?,
        );
        Ok(Self {
            revoker: Some(revoker),
            disposer: Some(disposer),
            threads,
        })
    }

    /// Starts revoking `mappings` (see [`Mapping::revoke`]); wait for it with
    /// [`Revocation::wait_until`].
    pub fn revoke(&self, mappings: Vec<Arc<Mapping>>) -> Revocation {
        if mappings.is_empty() {
            return Revocation {
                done: None,
                outcome: Some(true),
            };
        }
        let (done, rx) = std::sync::mpsc::channel();
        let sent = self
            .revoker
            .as_ref()
            .is_some_and(|tx| tx.send(RevokeJob { mappings, done }).is_ok());
        Revocation {
            done: sent.then_some(rx),
            outcome: (!sent).then_some(false),
        }
    }

    /// Drops `thing` (typically the last reference to an old map) off the caller's thread.
    pub fn dispose(&self, thing: impl Send + 'static) {
        if let Some(tx) = self.disposer.as_ref() {
            let _ = tx.send(Box::new(thing));
        }
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        self.revoker = None;
        self.disposer = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn map(ranges: &[(u64, usize, u8)]) -> IotlbMap {
        IotlbMap::anonymous(ranges).unwrap()
    }

    #[test]
    fn check_covers_adjacent_ranges_and_rejects_gaps() {
        let map = map(&[
            (0x0, 0x1000, uapi::VDUSE_ACCESS_RW),
            (0x1000, 0x1000, uapi::VDUSE_ACCESS_RW),
            (0x3000, 0x1000, uapi::VDUSE_ACCESS_RO),
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
        let map = map(&[(0x0, 0x1000, uapi::VDUSE_ACCESS_WO)]);
        assert!(map.check(0, 16, Access::Write));
        assert!(!map.check(0, 16, Access::Read));
    }

    #[test]
    fn guest_memory_accesses_are_permission_checked() {
        let map = map(&[
            (0x0, 0x1000, uapi::VDUSE_ACCESS_RW),
            (0x1000, 0x1000, uapi::VDUSE_ACCESS_RO),
        ]);
        map.write_obj(0xabu8, GuestAddress(0x10)).unwrap();
        assert_eq!(map.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 0xab);
        assert!(
            map.write_obj(1u8, GuestAddress(0x1010)).is_err(),
            "no write into a read-only entry"
        );
        assert!(map.read_obj::<u8>(GuestAddress(0x1010)).is_ok());
        assert!(
            map.write_slice(&[0u8; 32], GuestAddress(0xff0)).is_err(),
            "crosses into read-only"
        );
        assert!(map.read_obj::<u8>(GuestAddress(0x9000)).is_err(), "unmapped");
    }

    #[test]
    fn host_ranges_split_at_region_boundaries_and_pin_their_mappings() {
        let map = map(&[
            (0x0, 0x1000, uapi::VDUSE_ACCESS_RW),
            (0x1000, 0x1000, uapi::VDUSE_ACCESS_RW),
        ]);
        let mut pins = Pins::new();
        assert!(map.host_ranges_pinned(0xff8, 16, Access::Write, &mut pins));
        assert_eq!(pins.ranges().iter().map(|r| r.1).collect::<Vec<_>>(), vec![8, 8]);
        assert!(map.mappings().iter().all(|m| m.is_pinned()));
        assert!(!map.host_ranges_pinned(0x1ff8, 16, Access::Write, &mut pins));
        assert_eq!(pins.ranges().len(), 2, "a failed lookup appends nothing");
        pins.release();
        assert!(map.mappings().iter().all(|m| !m.is_pinned()));
        assert!(wait_unpinned(&map.mappings(), Instant::now()));
    }

    /// A late native read: a system call writing `0x5a` through `ptr`. Its result: bytes or an errno.
    fn late_read(ptr: *mut u8, len: usize) -> Result<usize, i32> {
        // SAFETY: memfd_create with a static name; the fd is ours and closed below.
        let fd = unsafe { libc::memfd_create(c"late".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let data = vec![0x5au8; len];
        // SAFETY: writing our own buffer into our memfd.
        let written = unsafe { libc::pwrite(fd, data.as_ptr().cast(), len, 0) };
        assert_eq!(written, len as isize);
        // SAFETY: the kernel checks the destination; a revoked range makes it fail with EFAULT.
        let n = unsafe { libc::pread(fd, ptr.cast(), len, 0) };
        let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        if n < 0 {
            Err(err)
        } else {
            Ok(n as usize)
        }
    }

    #[test]
    fn a_revoked_mapping_turns_away_late_system_calls_and_keeps_its_range() {
        let map = map(&[(0x0, 0x2000, uapi::VDUSE_ACCESS_RW)]);
        map.write_slice(&[7u8; 64], GuestAddress(0x100)).unwrap();
        let mut pins = Pins::new();
        assert!(map.host_ranges_pinned(0x100, 64, Access::Write, &mut pins));
        let ptr = pins.ranges()[0].0;
        assert_eq!(late_read(ptr, 64), Ok(64), "live: the read lands");
        for m in map.mappings() {
            m.revoke().unwrap();
            m.revoke().unwrap();
        }
        assert_eq!(
            late_read(ptr, 64),
            Err(libc::EFAULT),
            "revoked: the late read fails instead of reaching the pages"
        );
        assert!(map.mappings()[0].is_revoked());
    }

    #[test]
    fn a_failed_revocation_is_reported_for_good_and_the_mapping_never_reused() {
        let first = map(&[(0x0, 0x2000, uapi::VDUSE_ACCESS_RW)]);
        let m = first.mappings()[0].clone();
        m.fail_next_revoke();
        assert!(m.revoke().is_err(), "the kernel refused");
        assert!(m.is_lost() && m.is_revoked(), "never reused for a new map");
        assert!(
            m.revoke().is_err(),
            "a failed mapping stays failed: a retry must not claim it is revoked"
        );
        drop(m);
        drop(first);
    }

    #[test]
    fn first_uncovered_steps_by_entry_not_by_page() {
        let map = map(&[
            (0x0, 0x1000, uapi::VDUSE_ACCESS_RW),
            (0x1000, 0x1000, uapi::VDUSE_ACCESS_RO),
            (0x4000, 0x1000, uapi::VDUSE_ACCESS_RW),
        ]);
        assert_eq!(map.first_uncovered(0, 0x2000), None);
        assert_eq!(map.first_uncovered(0x800, 0x2000), Some(0x2000));
        assert_eq!(map.first_uncovered(0x3000, 0x10), Some(0x3000));
        assert_eq!(map.first_uncovered(0x4000, u64::from(u32::MAX)), Some(0x5000));
        assert_eq!(map.first_uncovered(u64::MAX - 4, 16), Some(u64::MAX - 4));
        assert_eq!(map.first_uncovered(0x9000, 0), None);
    }

    #[test]
    fn memory_swaps_snapshots_without_invalidating_readers() {
        let memory = Memory::fixed(map(&[(0, 0x1000, uapi::VDUSE_ACCESS_RW)]));
        let old = memory.snapshot();
        let cleared = memory.clear();
        assert_eq!(old.regions(), 1, "a reader keeps the map it started with");
        assert_eq!(cleared.regions(), 1);
        assert_eq!(memory.peek().regions(), 0);
    }

    #[test]
    fn janitor_revokes_and_reports_failures() {
        let janitor = Janitor::new("test").unwrap();
        let map = map(&[(0, 0x1000, uapi::VDUSE_ACCESS_RW)]);
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(janitor.revoke(map.mappings()).wait_until(deadline), Some(true));
        assert!(map.mappings()[0].is_revoked());
        assert_eq!(janitor.revoke(Vec::new()).wait_until(Instant::now()), Some(true));
        let other = super::IotlbMap::anonymous(&[(0, 0x1000, uapi::VDUSE_ACCESS_RW)]).unwrap();
        other.mappings()[0].fail_next_revoke();
        assert_eq!(
            janitor.revoke(other.mappings()).wait_until(deadline),
            Some(false),
            "a refused revocation is reported, not taken for done"
        );
        janitor.dispose(map);
    }

    /// Drops only once told to: an old map whose unmapping takes a long time.
    struct SlowDrop(std::sync::mpsc::Receiver<()>);

    impl Drop for SlowDrop {
        fn drop(&mut self) {
            let _ = self.0.recv();
        }
    }

    #[test]
    fn a_revocation_never_waits_behind_a_disposal() {
        let janitor = Janitor::new("busy").unwrap();
        let (release, held) = std::sync::mpsc::channel();
        // The disposal thread is busy (a multi-gigabyte unmap, say) until the test lets it go…
        janitor.dispose(SlowDrop(held));
        let map = map(&[(0, 0x1000, uapi::VDUSE_ACCESS_RW)]);
        // …and a revocation the message loop waits for still finishes meanwhile.
        let mut revocation = janitor.revoke(map.mappings());
        assert_eq!(
            revocation.wait_until(Instant::now() + Duration::from_secs(60)),
            Some(true)
        );
        release.send(()).unwrap();
        drop(janitor);
    }
}
