//! Descriptor-chain validation that virtio-queue leaves to the device: its iterator ends a chain
//! silently on loops, bad indices, unreadable tables or length overflow. Here a chain either becomes a
//! well-formed request (readable buffers, then writable ones, all inside the IOTLB with the right
//! access) or is rejected with the reason — and the device keeps serving.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::memory::{Access, IotlbMap};

/// One driver buffer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor at all (unreadable table, bad head index).
    Empty,
    /// A device-readable descriptor after a device-writable one (spec 2.7.4.2).
    ReadableAfterWritable,
    /// A zero-length buffer.
    ZeroLength,
    /// The chain ended early: a loop, a `next` out of range, an unreadable or nested indirect table, or
    /// more than 4 GiB in total.
    Truncated,
    /// More descriptors than the device accepts.
    TooLong,
    /// A buffer outside the IOTLB, or in memory the device may not access that way.
    BadAddress,
}

impl ChainError {
    pub const ALL: [ChainError; 6] = [
        ChainError::Empty,
        ChainError::ReadableAfterWritable,
        ChainError::ZeroLength,
        ChainError::Truncated,
        ChainError::TooLong,
        ChainError::BadAddress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChainError::Empty => "empty descriptor chain",
            ChainError::ReadableAfterWritable => "device-readable descriptor after a device-writable one",
            ChainError::ZeroLength => "zero-length descriptor",
            ChainError::Truncated => {
                "descriptor chain loops, overflows or has an invalid next/indirect table"
            }
            ChainError::TooLong => "descriptor chain longer than the device accepts",
            ChainError::BadAddress => "buffer outside the driver's mapped memory or with the wrong access",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Walks `chain`, appending its buffers to `out` (readable first, then writable). Returns how many of
/// each there are. On error, `out` is restored to its length on entry.
pub fn collect<M>(
    chain: DescriptorChain<M>,
    map: &IotlbMap,
    max_segments: usize,
    out: &mut Vec<Segment>,
) -> Result<(u16, u16), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mark = out.len();
    let result = walk(chain, map, max_segments, out);
    if result.is_err() {
        out.truncate(mark);
    }
    result
}

fn walk<M>(
    chain: DescriptorChain<M>,
    map: &IotlbMap,
    max_segments: usize,
    out: &mut Vec<Segment>,
) -> Result<(u16, u16), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let (mut readable, mut writable) = (0u16, 0u16);
    let mut last_has_next = false;
    let mut any = false;
    for desc in chain {
        any = true;
        last_has_next = desc.has_next();
        if usize::from(readable) + usize::from(writable) >= max_segments {
            return Err(ChainError::TooLong);
        }
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength);
        }
        let addr = desc.addr().0;
        if desc.is_write_only() {
            if !map.check(addr, desc.len(), Access::Write) {
                return Err(ChainError::BadAddress);
            }
            writable += 1;
        } else {
            if writable > 0 {
                return Err(ChainError::ReadableAfterWritable);
            }
            if !map.check(addr, desc.len(), Access::Read) {
                return Err(ChainError::BadAddress);
            }
            readable += 1;
        }
        out.push(Segment {
            addr,
            len: desc.len(),
        });
    }
    if !any {
        return Err(ChainError::Empty);
    }
    // virtio-queue stops without an error on loops, bad `next`, bad indirect tables and 4 GiB overflow;
    // all of them leave a last descriptor that still says NEXT.
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok((readable, writable))
}
