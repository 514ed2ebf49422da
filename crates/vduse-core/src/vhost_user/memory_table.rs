//! The client's memory table: regions of its memory, each backed by a file it sent, keyed by guest-physical
//! address and read by [`Memory`](crate::memory::Memory) like a VDUSE IOTLB — so they are mapped, permission-checked and revoked
//! the same way.

use std::fs::File;

use parking_lot::Mutex;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost::vhost_user::{Error as VuError, Result as VuResult};

use crate::memory::IotlbSource;
use crate::uapi::{vduse_iotlb_entry, VDUSE_ACCESS_RW};

/// Memory regions a client may register (what `GET_MAX_MEM_SLOTS` answers; QEMU uses up to 32).
pub const MAX_MEM_SLOTS: usize = 32;

/// One region of the client's memory table.
struct TableRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    mmap_offset: u64,
    file: File,
}

impl TableRegion {
    /// Region `r` backed by `file`, once it fits its file and overlaps none of `table`.
    pub(super) fn admit(table: &[TableRegion], r: &VhostUserMemoryRegion, file: File) -> VuResult<Self> {
        MemTable::admit(table, r)?;
        region_fits(r, &file)?;
        Ok(Self {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            file,
        })
    }
}

/// The client's memory table, read by [`Memory`](crate::memory::Memory) like a VDUSE IOTLB (keyed by guest-physical address).
#[derive(Default)]
pub struct MemTable {
    regions: Mutex<Vec<TableRegion>>,
}

impl MemTable {
    /// Replaces the whole table (SET_MEM_TABLE); refused whole if any region is.
    pub(super) fn replace(&self, regions: &[VhostUserMemoryRegion], files: Vec<File>) -> VuResult<()> {
        let mut table = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            let admitted = TableRegion::admit(&table, r, file)?;
            table.push(admitted);
        }
        *self.regions.lock() = table;
        Ok(())
    }

    /// Adds one region (ADD_MEM_REG).
    pub(super) fn add(&self, r: &VhostUserMemoryRegion, file: File) -> VuResult<()> {
        let mut table = self.regions.lock();
        let admitted = TableRegion::admit(&table, r, file)?;
        table.push(admitted);
        Ok(())
    }

    /// Removes the region at `r`'s address and size (REM_MEM_REG); refused if there is none.
    pub(super) fn remove(&self, r: &VhostUserMemoryRegion) -> VuResult<()> {
        let mut table = self.regions.lock();
        let before = table.len();
        table.retain(|t| !(t.gpa == r.guest_phys_addr && t.size == r.memory_size));
        if table.len() == before {
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }

    /// Forgets every region (the client left).
    pub(super) fn clear(&self) {
        self.regions.lock().clear();
    }

    /// Guest-physical address of the client's virtual address `va` (ring addresses come that way).
    pub(super) fn gpa_of(&self, va: u64) -> Option<u64> {
        self.regions
            .lock()
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
    }

    /// Checks a region against the others (and the limits) before it joins the table.
    fn admit(regions: &[TableRegion], r: &VhostUserMemoryRegion) -> VuResult<()> {
        let overflows = |a: u64, len: u64| len == 0 || a.checked_add(len - 1).is_none();
        if overflows(r.guest_phys_addr, r.memory_size)
            || overflows(r.user_addr, r.memory_size)
            || r.mmap_offset.checked_add(r.memory_size).is_none()
            || r.memory_size > isize::MAX as u64
        {
            return Err(VuError::InvalidParam);
        }
        let overlaps = |a: u64, b: u64, len_a: u64, len_b: u64| {
            a < b.saturating_add(len_b) && b < a.saturating_add(len_a)
        };
        if regions.len() >= MAX_MEM_SLOTS
            || regions.iter().any(|o| {
                overlaps(o.gpa, r.guest_phys_addr, o.size, r.memory_size)
                    || overlaps(o.user_addr, r.user_addr, o.size, r.memory_size)
            })
        {
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }
}

/// Checks that `file` holds the whole region (an access past its end would be a SIGBUS, not an error).
pub(super) fn region_fits(r: &VhostUserMemoryRegion, file: &File) -> VuResult<()> {
    let len = file.metadata().map_err(|_| VuError::InvalidParam)?.len();
    match r.mmap_offset.checked_add(r.memory_size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(VuError::InvalidParam),
    }
}

impl IotlbSource for MemTable {
    fn entry(&self, first: u64, last: u64) -> std::io::Result<Option<(vduse_iotlb_entry, File)>> {
        let regions = self.regions.lock();
        let found = regions
            .iter()
            .filter(|r| r.gpa <= last && r.gpa + (r.size - 1) >= first)
            .min_by_key(|r| r.gpa);
        let Some(r) = found else { return Ok(None) };
        let entry = vduse_iotlb_entry {
            offset: r.mmap_offset,
            start: r.gpa,
            last: r.gpa + (r.size - 1),
            perm: VDUSE_ACCESS_RW,
        };
        Ok(Some((entry, r.file.try_clone()?)))
    }
}
