//! The virtio-blk model of a device whose storage is an NBD export, served natively: each queue's
//! worker thread parses its requests and hands them to the engine, which writes their commands on the
//! spot — no JavaScript, no other thread between the driver's kick and the socket.
//!
//! The engine comes after the device (it needs the device's queues, and the caller opens the
//! connections once the device exists): requests popped before it arrives wait here, in order.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vduse_core::model::{Completer, DeviceModel};
use vduse_core::queue::{Owner, RequestBatch};
use vduse_core::ram_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use super::engine::{NbdEngine, Op, OpKind};

const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
const HEADER: usize = 16;
const ID_LEN: usize = 20;

/// What the device offers (its features decide what the driver may ask).
#[derive(Debug, Clone, Copy, Default)]
pub struct Offer {
    pub read_only: bool,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

pub struct NbdBlk {
    engine: OnceLock<Arc<NbdEngine>>,
    /// Requests waiting for the engine, or for a hold to end.
    early: Mutex<Vec<Op>>,
    /// A handover is being decided: requests wait (in `early`) instead of reaching the engine.
    held: AtomicBool,
    /// `handle` calls under way (a hold is complete when none is).
    serving: AtomicUsize,
    serial: [u8; ID_LEN],
    offer: Offer,
}

impl NbdBlk {
    /// `serial`: the GET_ID answer (at most 20 bytes are used).
    pub fn new(serial: &[u8], offer: Offer) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        Self {
            engine: OnceLock::new(),
            early: Mutex::new(Vec::new()),
            held: AtomicBool::new(false),
            serving: AtomicUsize::new(0),
            serial: id,
            offer,
        }
    }

    /// Gives the model its engine (once); requests that waited for it go to it (unless held).
    pub fn set_engine(&self, engine: Arc<NbdEngine>) -> bool {
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        if self.engine.set(engine.clone()).is_err() {
            return false;
        }
        // Under the lock: a worker that found no engine has queued here already, and one that comes
        // after sees it.
        if !self.held.load(Ordering::SeqCst) {
            engine.submit(early.drain(..));
        }
        true
    }

    /// Holds new requests back (a handover is being decided: the successor serves them if it happens)
    /// or lets them go again, the held ones first. Held is complete once [`busy`](Self::busy) is false.
    pub fn hold(&self, on: bool) {
        self.held.store(on, Ordering::SeqCst);
        if on {
            return;
        }
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = self.engine.get() {
            engine.submit(early.drain(..));
        }
    }

    /// Whether a worker is handing requests to the engine right now.
    pub fn busy(&self) -> bool {
        self.serving.load(Ordering::SeqCst) > 0
    }

    /// Which engine operation a request is, or the status to answer it with at once.
    fn decide(&self, kind: u32, sector: u64) -> Result<(OpKind, u64), u8> {
        let position = || sector.checked_mul(512).ok_or(VIRTIO_BLK_S_IOERR);
        let o = self.offer;
        match kind {
            VIRTIO_BLK_T_IN => Ok((OpKind::Read, position()?)),
            VIRTIO_BLK_T_OUT if o.read_only => Err(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => Ok((OpKind::Write, position()?)),
            // Nothing to make durable where no cache was offered.
            VIRTIO_BLK_T_FLUSH if !o.flush => Err(VIRTIO_BLK_S_OK),
            VIRTIO_BLK_T_FLUSH => Ok((OpKind::Flush, 0)),
            VIRTIO_BLK_T_DISCARD if o.discard && !o.read_only => Ok((OpKind::Discard, 0)),
            VIRTIO_BLK_T_WRITE_ZEROES if o.write_zeroes && !o.read_only => Ok((OpKind::WriteZeroes, 0)),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if o.read_only => Err(VIRTIO_BLK_S_IOERR),
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }
}

/// Counts a `handle` call while it runs.
struct Serving<'a>(&'a AtomicUsize);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DeviceModel for NbdBlk {
    fn handle(&self, _queue: u16, batch: &RequestBatch, completer: &Completer) {
        // Counted before the hold is looked at: a hold that sees no call under way has every later one
        // see it (both sequentially consistent).
        self.serving.fetch_add(1, Ordering::SeqCst);
        let _serving = Serving(&self.serving);
        let vq = completer.queue();
        let mut ops = Vec::with_capacity(batch.len());
        let mut answered = false;
        for req in batch.iter() {
            if req.shape.writable == 0 || req.shape.writable_bytes == 0 {
                // Without a writable byte for the status nothing can be reported.
                completer.complete(req.ticket, 0, None);
                answered = true;
                continue;
            }
            let Some(h) = req.header.get(..HEADER) else {
                completer.complete(req.ticket, 1, Some(VIRTIO_BLK_S_IOERR));
                answered = true;
                continue;
            };
            let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            if kind == VIRTIO_BLK_T_GET_ID {
                let n = ID_LEN.min(req.shape.writable_bytes as usize - 1); // the status byte is the last
                let status = match vq.write_request(req.ticket, Owner::Model, 0, &self.serial[..n]) {
                    Ok(k) if k == n => VIRTIO_BLK_S_OK,
                    _ => VIRTIO_BLK_S_IOERR,
                };
                let used = if status == VIRTIO_BLK_S_OK {
                    n as u32 + 1
                } else {
                    1
                };
                completer.complete(req.ticket, used, Some(status));
                answered = true;
                continue;
            }
            match self.decide(kind, sector) {
                Ok((kind, position)) => ops.push(Op {
                    ticket: req.ticket,
                    kind,
                    position,
                    fua: false,
                }),
                Err(status) => {
                    completer.complete(req.ticket, 1, Some(status));
                    answered = true;
                }
            }
        }
        if answered {
            completer.flush();
        }
        if ops.is_empty() {
            return;
        }
        let held = self.held.load(Ordering::SeqCst);
        match self.engine.get() {
            Some(engine) if !held => engine.serve(&ops),
            _ => {
                let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
                match self.engine.get() {
                    // Set (or the hold ended) while this waited for the lock: the early ones went already.
                    Some(engine) if !self.held.load(Ordering::SeqCst) => {
                        drop(early);
                        engine.serve(&ops)
                    }
                    _ => early.extend(ops),
                }
            }
        }
    }
}
