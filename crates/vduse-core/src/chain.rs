//! Descriptor-chain validation against a hostile driver (split rings, with indirect tables).
//!
//! virtio-queue's iterator ends a chain silently on loops, bad indices or unreadable tables; here every
//! chain either becomes a well-formed request — readable buffers, then writable ones, all inside the
//! IOTLB with the access the device needs — or is refused with the precise reason, including the address
//! that was not mapped (so the caller can ask the kernel once whether its IOTLB grew). The work per chain
//! is bounded by the table size and the device's segment limit, and reported (`cost`: descriptors read),
//! so the caller can charge a refused chain what it cost, not a flat one; every address check is one
//! binary search plus one step per IOTLB entry a buffer crosses, never a step per page.

use crate::memory::{Access, IotlbMap};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;
/// An indirect table holds at most this many descriptors (their `next` fields are 16-bit).
const MAX_INDIRECT: u64 = 1 << 16;

/// One driver buffer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// The shape of a valid request: `readable` buffers (first in the output) then `writable` ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub readable: u16,
    pub writable: u16,
    pub readable_bytes: u32,
    pub writable_bytes: u32,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A head or `next` index outside the descriptor table.
    BadIndex,
    /// More descriptors than the table holds: the chain loops.
    Loop,
    /// A device-readable descriptor after a device-writable one (spec 2.7.4.2).
    ReadableAfterWritable,
    /// A zero-length buffer.
    ZeroLength,
    /// More buffers than the device accepts per request.
    TooManySegments,
    /// More than 4 GiB in one direction.
    TooLarge,
    /// An indirect descriptor that also says NEXT, a nested indirect table, or a table whose length is
    /// zero, not a multiple of 16, or too large.
    BadIndirect,
    /// A buffer or descriptor table at an address the IOTLB does not cover.
    Unmapped(u64),
    /// A buffer or table in memory the device may not access that way (e.g. writing a read-only entry).
    Forbidden,
}

impl ChainError {
    pub const KINDS: usize = 9;

    pub fn index(self) -> usize {
        match self {
            ChainError::BadIndex => 0,
            ChainError::Loop => 1,
            ChainError::ReadableAfterWritable => 2,
            ChainError::ZeroLength => 3,
            ChainError::TooManySegments => 4,
            ChainError::TooLarge => 5,
            ChainError::BadIndirect => 6,
            ChainError::Unmapped(_) => 7,
            ChainError::Forbidden => 8,
        }
    }

    pub fn name(index: usize) -> &'static str {
        [
            "bad index",
            "loop",
            "readable after writable",
            "zero length",
            "too many segments",
            "too large",
            "bad indirect table",
            "unmapped address",
            "forbidden access",
        ]
        .get(index)
        .copied()
        .unwrap_or("?")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChainError::BadIndex => "descriptor index outside the table",
            ChainError::Loop => "descriptor chain loops",
            ChainError::ReadableAfterWritable => "device-readable descriptor after a device-writable one",
            ChainError::ZeroLength => "zero-length descriptor",
            ChainError::TooManySegments => "more buffers than the device accepts",
            ChainError::TooLarge => "more than 4 GiB in one direction",
            ChainError::BadIndirect => "invalid indirect descriptor table",
            ChainError::Unmapped(_) => "buffer outside the driver's mapped memory",
            ChainError::Forbidden => "buffer in memory the device may not access that way",
        }
    }
}

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(map: &IotlbMap, at: u64) -> Result<Desc, ChainError> {
    let mut raw = [0u8; DESC_SIZE as usize];
    if !map.read_into(at, &mut raw) {
        return Err(access_error(map, at, DESC_SIZE));
    }
    Ok(Desc {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        flags: u16::from_le_bytes(raw[12..14].try_into().unwrap_or_default()),
        next: u16::from_le_bytes(raw[14..16].try_into().unwrap_or_default()),
    })
}

/// Unmapped (with the first uncovered address) or Forbidden, for a range that failed a check.
fn access_error(map: &IotlbMap, addr: u64, len: u64) -> ChainError {
    match map.first_uncovered(addr, len) {
        Some(at) => ChainError::Unmapped(at),
        None => ChainError::Forbidden,
    }
}

/// Walks the chain starting at `head` of the split descriptor table at `table` (with `size` entries),
/// appending its buffers to `out` (readable first, then writable). On error `out` is restored. `cost`
/// grows by the descriptors read, whether the chain is valid or not.
pub fn walk(
    map: &IotlbMap,
    table: u64,
    size: u16,
    head: u16,
    max_segments: usize,
    out: &mut Vec<Segment>,
    cost: &mut usize,
) -> Result<Shape, ChainError> {
    let mark = out.len();
    let result = walk_inner(map, table, size, head, max_segments, out, cost);
    if result.is_err() {
        out.truncate(mark);
    }
    result
}

fn walk_inner(
    map: &IotlbMap,
    table: u64,
    size: u16,
    head: u16,
    max_segments: usize,
    out: &mut Vec<Segment>,
    cost: &mut usize,
) -> Result<Shape, ChainError> {
    let mut shape = Shape::default();
    let mut base = table;
    let mut entries = u64::from(size);
    let mut indirect = false;
    let mut index = u64::from(head);
    let mut steps = 0u64;
    loop {
        if index >= entries {
            return Err(ChainError::BadIndex);
        }
        steps += 1;
        if steps > entries {
            return Err(ChainError::Loop);
        }
        *cost += 1;
        let desc = read_desc(map, base + index * DESC_SIZE)?;
        if desc.flags & DESC_F_INDIRECT != 0 {
            // Spec 2.7.5.3: one level only, not combined with NEXT; the table is a whole number of
            // descriptors.
            let len = u64::from(desc.len);
            if indirect || desc.flags & DESC_F_NEXT != 0 || len == 0 || len % DESC_SIZE != 0 {
                return Err(ChainError::BadIndirect);
            }
            if len / DESC_SIZE > MAX_INDIRECT {
                return Err(ChainError::BadIndirect);
            }
            if !map.check(desc.addr, len, Access::Read) {
                return Err(access_error(map, desc.addr, len));
            }
            indirect = true;
            base = desc.addr;
            entries = len / DESC_SIZE;
            index = 0;
            steps = 0;
            continue;
        }
        if desc.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        if usize::from(shape.readable) + usize::from(shape.writable) >= max_segments {
            return Err(ChainError::TooManySegments);
        }
        let len = u64::from(desc.len);
        if desc.flags & DESC_F_WRITE != 0 {
            if !map.check(desc.addr, len, Access::Write) {
                return Err(access_error(map, desc.addr, len));
            }
            shape.writable_bytes = shape
                .writable_bytes
                .checked_add(desc.len)
                .ok_or(ChainError::TooLarge)?;
            shape.writable += 1;
        } else {
            if shape.writable > 0 {
                return Err(ChainError::ReadableAfterWritable);
            }
            if !map.check(desc.addr, len, Access::Read) {
                return Err(access_error(map, desc.addr, len));
            }
            shape.readable_bytes = shape
                .readable_bytes
                .checked_add(desc.len)
                .ok_or(ChainError::TooLarge)?;
            shape.readable += 1;
        }
        out.push(Segment {
            addr: desc.addr,
            len: desc.len,
        });
        if desc.flags & DESC_F_NEXT == 0 {
            return Ok(shape);
        }
        index = u64::from(desc.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::{VDUSE_ACCESS_RO, VDUSE_ACCESS_RW};

    const TABLE: u64 = 0x1000;
    const N: u16 = DESC_F_NEXT;
    const W: u16 = DESC_F_WRITE;
    const I: u16 = DESC_F_INDIRECT;

    fn rig() -> IotlbMap {
        IotlbMap::anonymous(&[
            (0, 0x10_0000, VDUSE_ACCESS_RW),
            (0x10_0000, 0x1000, VDUSE_ACCESS_RO),
        ])
        .unwrap()
    }

    fn put(map: &IotlbMap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        assert!(map.write_from(at, &raw));
    }

    fn d(map: &IotlbMap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        put(map, TABLE + 16 * u64::from(i), addr, len, flags, next);
    }

    fn run(map: &IotlbMap, head: u16) -> Result<(Shape, Vec<Segment>), ChainError> {
        let mut out = vec![Segment::default()];
        let r = walk(map, TABLE, 16, head, 8, &mut out, &mut 0);
        match r {
            Ok(s) => Ok((s, out[1..].to_vec())),
            Err(e) => {
                assert_eq!(out.len(), 1, "a refused chain leaves the output as it was");
                Err(e)
            }
        }
    }

    #[test]
    fn a_valid_chain_is_split_into_readable_and_writable_buffers() {
        let m = rig();
        d(&m, 0, 0x8000, 16, N, 3);
        d(&m, 3, 0x9000, 4096, N | W, 5);
        d(&m, 5, 0xa000, 1, W, 0);
        let (shape, segs) = run(&m, 0).unwrap();
        assert_eq!(
            shape,
            Shape {
                readable: 1,
                writable: 2,
                readable_bytes: 16,
                writable_bytes: 4097
            }
        );
        assert_eq!(
            segs[1],
            Segment {
                addr: 0x9000,
                len: 4096
            }
        );
    }

    #[test]
    fn indirect_tables_are_followed_one_level_deep() {
        let m = rig();
        d(&m, 2, 0x4000, 48, I, 0);
        put(&m, 0x4000, 0x8000, 16, N, 1);
        put(&m, 0x4010, 0x9000, 512, N | W, 2);
        put(&m, 0x4020, 0xa000, 1, W, 0);
        assert_eq!(run(&m, 2).unwrap().0.writable_bytes, 513);
        // Nested indirect table.
        put(&m, 0x4010, 0x5000, 16, I, 0);
        assert_eq!(run(&m, 2), Err(ChainError::BadIndirect));
        // Indirect with NEXT, length not a multiple of 16, zero length.
        for (len, flags) in [(48, I | N), (17, I), (0, I)] {
            d(&m, 2, 0x4000, len, flags, 0);
            assert_eq!(
                run(&m, 2),
                Err(ChainError::BadIndirect),
                "len {len} flags {flags}"
            );
        }
        // A loop inside the table.
        d(&m, 2, 0x4000, 32, I, 0);
        put(&m, 0x4000, 0x8000, 16, N, 1);
        put(&m, 0x4010, 0x8000, 16, N, 0);
        assert_eq!(run(&m, 2), Err(ChainError::Loop));
    }

    #[test]
    fn malformed_chains_are_refused_with_the_reason() {
        let m = rig();
        assert_eq!(run(&m, 16), Err(ChainError::BadIndex), "head outside the table");
        d(&m, 0, 0x8000, 16, N, 40);
        assert_eq!(run(&m, 0), Err(ChainError::BadIndex), "next outside the table");
        d(&m, 0, 0x8000, 16, N, 1);
        d(&m, 1, 0x8000, 16, N, 0);
        assert_eq!(
            run(&m, 0),
            Err(ChainError::TooManySegments),
            "a loop hits the segment limit first…"
        );
        let mut out = Vec::new();
        assert_eq!(
            walk(&m, TABLE, 16, 0, 64, &mut out, &mut 0),
            Err(ChainError::Loop),
            "…or the table size, whichever is smaller"
        );
        d(&m, 0, 0x8000, 1, W | N, 1);
        d(&m, 1, 0x8000, 16, 0, 0);
        assert_eq!(run(&m, 0), Err(ChainError::ReadableAfterWritable));
        d(&m, 0, 0x8000, 0, 0, 0);
        assert_eq!(run(&m, 0), Err(ChainError::ZeroLength));
        d(&m, 0, 0x4000_0000, 16, 0, 0);
        assert_eq!(run(&m, 0), Err(ChainError::Unmapped(0x4000_0000)));
        d(&m, 0, 0xf_fff8, 16, 0, 0);
        assert!(
            run(&m, 0).is_ok(),
            "reading across a read-write and a read-only entry is fine"
        );
        d(&m, 0, 0xf_fff8, 16, W, 0);
        assert_eq!(
            run(&m, 0),
            Err(ChainError::Forbidden),
            "writing across into read-only memory"
        );
        d(&m, 0, 0x10_0000, 16, W, 0);
        assert_eq!(
            run(&m, 0),
            Err(ChainError::Forbidden),
            "write into read-only memory"
        );
        d(&m, 0, 0x8000, u32::MAX, N, 1);
        d(&m, 1, 0x8000, 2, 0, 0);
        assert!(run(&m, 0).is_err(), "huge length");
        for i in 0..9 {
            d(&m, i, 0x8000, 16, N, i + 1);
        }
        assert_eq!(run(&m, 0), Err(ChainError::TooManySegments));
        d(&m, 0, 0x7000_0000, 64, I, 0);
        assert_eq!(
            run(&m, 0),
            Err(ChainError::Unmapped(0x7000_0000)),
            "indirect table unmapped"
        );
    }

    #[test]
    fn a_huge_buffer_into_a_hole_is_refused_at_the_hole_and_costs_one_descriptor() {
        let m = rig();
        // 4 GiB from inside the read-write entry, across the read-only one, into the hole after it.
        d(&m, 0, 0x8000, u32::MAX, 0, 0);
        let mut out = Vec::new();
        let mut cost = 0;
        assert_eq!(
            walk(&m, TABLE, 16, 0, 8, &mut out, &mut cost),
            Err(ChainError::Unmapped(0x10_1000))
        );
        assert_eq!(cost, 1);
        // A chain of eight costs eight, refused or not.
        for i in 0..8 {
            d(&m, i, 0x8000, 16, N, i + 1);
        }
        d(&m, 8, 0x8000, 16, 0, 0);
        let mut cost = 0;
        assert_eq!(
            walk(&m, TABLE, 16, 0, 8, &mut out, &mut cost),
            Err(ChainError::TooManySegments)
        );
        assert_eq!(cost, 9);
    }

    #[test]
    fn a_table_outside_memory_is_unmapped() {
        let m = rig();
        let mut out = Vec::new();
        assert_eq!(
            walk(&m, 0x9000_0000, 16, 0, 8, &mut out, &mut 0),
            Err(ChainError::Unmapped(0x9000_0000))
        );
    }
}
