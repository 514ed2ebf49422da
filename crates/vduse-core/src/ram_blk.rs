//! The native reference model: a RAM-backed virtio-blk (IN, OUT, FLUSH, GET_ID; anything else is
//! UNSUPP). Small, but strict about bounds and request shapes; tests and benchmarks use it to measure
//! the transport without any JavaScript in the way.

use std::sync::RwLock;

use vm_memory::{Bytes, GuestAddress};

use crate::chain::Segment;
use crate::memory::IotlbMap;
use crate::model::{Completer, DeviceModel, Request, RequestBatch};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_LEN: u32 = 16;
const ID_LEN: usize = 20;

pub struct RamBlk {
    data: RwLock<Vec<u8>>,
    capacity: u64,
    queues: u16,
    queue_size: u16,
    serial: [u8; ID_LEN],
}

impl RamBlk {
    /// A zero-filled disk of `size` bytes (rounded down to whole sectors).
    pub fn new(size: u64, queues: u16, queue_size: u16, serial: &str) -> Self {
        let capacity = size / SECTOR_SIZE * SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            data: RwLock::new(vec![0; capacity as usize]),
            capacity,
            queues,
            queue_size,
            serial: id,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Serves one request; returns `(status, bytes written into the data buffers)`.
    pub fn execute(&self, mem: &IotlbMap, req: &Request<'_>) -> Option<(u8, u32)> {
        let hdr = read_header(mem, req.readable)?;
        let (kind, sector) = hdr;
        // The status byte is the last byte of the last writable buffer; data buffers are the rest.
        let data_out = skip_bytes(req.readable, HEADER_LEN);
        let mut data_in: Vec<Segment> = req.writable.to_vec();
        let last = data_in.last_mut()?;
        last.len -= 1;
        if last.len == 0 {
            data_in.pop();
        }
        let offset = sector.checked_mul(SECTOR_SIZE);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len: u64 = data_in.iter().map(|s| u64::from(s.len)).sum();
                let Some(range) = self.range(offset, len) else {
                    return Some((VIRTIO_BLK_S_IOERR, 0));
                };
                let data = self.data.read().unwrap_or_else(|e| e.into_inner());
                let mut at = range.start;
                for seg in &data_in {
                    let end = at + seg.len as usize;
                    if mem
                        .memory()
                        .write_slice(&data[at..end], GuestAddress(seg.addr))
                        .is_err()
                    {
                        return Some((VIRTIO_BLK_S_IOERR, 0));
                    }
                    at = end;
                }
                Some((VIRTIO_BLK_S_OK, len as u32))
            }
            VIRTIO_BLK_T_OUT => {
                let len: u64 = data_out.iter().map(|s| u64::from(s.len)).sum();
                let Some(range) = self.range(offset, len) else {
                    return Some((VIRTIO_BLK_S_IOERR, 0));
                };
                let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
                let mut at = range.start;
                for seg in &data_out {
                    let end = at + seg.len as usize;
                    if mem
                        .memory()
                        .read_slice(&mut data[at..end], GuestAddress(seg.addr))
                        .is_err()
                    {
                        return Some((VIRTIO_BLK_S_IOERR, 0));
                    }
                    at = end;
                }
                Some((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_FLUSH => Some((VIRTIO_BLK_S_OK, 0)),
            VIRTIO_BLK_T_GET_ID => {
                let mut left = ID_LEN;
                let mut written = 0u32;
                for seg in &data_in {
                    let n = (seg.len as usize).min(left);
                    let from = ID_LEN - left;
                    if mem
                        .memory()
                        .write_slice(&self.serial[from..from + n], GuestAddress(seg.addr))
                        .is_err()
                    {
                        return Some((VIRTIO_BLK_S_IOERR, 0));
                    }
                    written += n as u32;
                    left -= n;
                    if left == 0 {
                        break;
                    }
                }
                Some((VIRTIO_BLK_S_OK, written))
            }
            _ => Some((VIRTIO_BLK_S_UNSUPP, 0)),
        }
    }

    /// The byte range of an I/O, if it is whole sectors inside the disk.
    fn range(&self, offset: Option<u64>, len: u64) -> Option<std::ops::Range<usize>> {
        let offset = offset?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = offset.checked_add(len)?;
        (end <= self.capacity).then_some(offset as usize..end as usize)
    }
}

fn read_header(mem: &IotlbMap, readable: &[Segment]) -> Option<(u32, u64)> {
    let mut hdr = [0u8; HEADER_LEN as usize];
    let mut filled = 0usize;
    for seg in readable {
        let n = (seg.len as usize).min(hdr.len() - filled);
        mem.memory()
            .read_slice(&mut hdr[filled..filled + n], GuestAddress(seg.addr))
            .ok()?;
        filled += n;
        if filled == hdr.len() {
            let kind = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
            let sector = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
            return Some((kind, sector));
        }
    }
    None
}

/// The buffers after the first `n` bytes.
fn skip_bytes(segments: &[Segment], mut n: u32) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        if n >= seg.len {
            n -= seg.len;
            continue;
        }
        out.push(Segment {
            addr: seg.addr + u64::from(n),
            len: seg.len - n,
        });
        n = 0;
    }
    out
}

impl DeviceModel for RamBlk {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.queues > 1 {
            f |= VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn config_space(&self) -> Vec<u8> {
        // struct virtio_blk_config up to num_queues (36 bytes), little-endian.
        let mut c = vec![0u8; 36];
        c[0..8].copy_from_slice(&(self.capacity / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(self.queue_size) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        c
    }

    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        let mem = batch.memory();
        for req in batch.iter() {
            // Without a writable byte for the status nothing can be reported: complete it empty.
            let Some(status_seg) = req.writable.last() else {
                completer.complete(req.head, 0);
                continue;
            };
            let (status, written) = self.execute(mem, &req).unwrap_or((VIRTIO_BLK_S_IOERR, 0));
            let at = GuestAddress(status_seg.addr + u64::from(status_seg.len) - 1);
            let used = match mem.memory().write_obj(status, at) {
                Ok(()) => written + 1,
                Err(_) => 0,
            };
            completer.complete(req.head, used);
        }
    }
}
