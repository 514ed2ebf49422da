//! The native reference model: a RAM-backed virtio-blk (IN, OUT, FLUSH, GET_ID; anything else is
//! UNSUPP). Small, but strict about bounds and request shapes, and allocation-free per request; tests and
//! benchmarks use it to measure the transport without any JavaScript in the way. Data moves through the
//! queue's ticket-checked copies: a request fenced mid-copy stops there, so the disk never takes bytes
//! from memory the driver no longer owns.

use std::sync::RwLock;

use crate::model::{Completer, DeviceModel, DeviceSpec};
use crate::queue::{Owner, Request, RequestBatch, Virtqueue};

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
const HEADER_LEN: u64 = 16;
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

    /// What the device is: features, config space (`struct virtio_blk_config` up to `num_queues`).
    pub fn spec(&self) -> DeviceSpec {
        let mut features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.queues > 1 {
            features |= VIRTIO_BLK_F_MQ;
        }
        let mut c = vec![0u8; 36];
        c[0..8].copy_from_slice(&(self.capacity / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(self.queue_size) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        DeviceSpec {
            device_id: VIRTIO_ID_BLOCK,
            features,
            config: c,
            num_queues: self.queues,
            queue_size: self.queue_size,
            max_segments: usize::from(self.queue_size),
            kind: "blk".into(),
            held_queues: 0,
        }
    }

    /// Serves one request of `queue`; returns `(status, bytes written into the data buffers)`.
    pub fn execute(&self, queue: &Virtqueue, req: &Request<'_>) -> (u8, u32) {
        let Some(hdr) = req.header.get(..HEADER_LEN as usize) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        // The status byte is the last writable byte; the data buffers are the rest.
        let data_in = u64::from(req.shape.writable_bytes).saturating_sub(1);
        let data_out = u64::from(req.shape.readable_bytes).saturating_sub(HEADER_LEN);
        let offset = sector.checked_mul(SECTOR_SIZE);
        let whole = |copied: Result<usize, crate::queue::Gone>, want: u64| copied == Ok(want as usize);
        match kind {
            VIRTIO_BLK_T_IN => {
                let Some(range) = self.range(offset, data_in) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let data = self.data.read().unwrap_or_else(|e| e.into_inner());
                if !whole(
                    queue.write_request(req.ticket, Owner::Model, 0, &data[range]),
                    data_in,
                ) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, data_in as u32)
            }
            VIRTIO_BLK_T_OUT => {
                let Some(range) = self.range(offset, data_out) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
                let copied = queue.read_request(req.ticket, Owner::Model, HEADER_LEN, &mut data[range]);
                if !whole(copied, data_out) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => (VIRTIO_BLK_S_OK, 0),
            VIRTIO_BLK_T_GET_ID => {
                let n = (ID_LEN as u64).min(data_in);
                let id = &self.serial[..n as usize];
                if !whole(queue.write_request(req.ticket, Owner::Model, 0, id), n) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
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

impl DeviceModel for RamBlk {
    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        let queue = completer.queue();
        for req in batch.iter() {
            if req.shape.writable == 0 {
                // Without a writable byte for the status nothing can be reported.
                completer.complete(req.ticket, 0, None);
                continue;
            }
            let (status, written) = self.execute(queue, &req);
            completer.complete(req.ticket, written + 1, Some(status));
        }
    }
}
