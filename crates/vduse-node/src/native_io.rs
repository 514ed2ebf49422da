//! Native block I/O between a file and a request's buffers: `preadv`/`pwritev`/`fdatasync` on worker
//! threads, straight into guest memory — the data never passes through JavaScript. JavaScript decides
//! (parses, validates, picks the file offset); this pool moves the bytes, writes the virtio-blk status
//! byte and completes the request, flushing completions once per batch of operations.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vduse_core::chain::Segment;
use vduse_core::memory::IotlbMap;
use vduse_core::Completer;

use crate::js_model::JsModel;

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;

#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub slot: u32,
    pub fd: i32,
    pub kind: u8,
    pub position: u64,
    /// Bytes of the request's buffers to skip before the data (the virtio-blk header for writes).
    pub skip: u32,
}

struct Queue {
    ops: VecDeque<Op>,
    stop: bool,
}

pub struct IoPool {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    stopped: AtomicBool,
}

impl IoPool {
    pub fn new(threads: usize, model: Arc<JsModel>) -> std::io::Result<Self> {
        let queue = Arc::new((
            Mutex::new(Queue {
                ops: VecDeque::new(),
                stop: false,
            }),
            Condvar::new(),
        ));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (queue, model) = (queue.clone(), model.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vduse-io-{i}"))
                    .spawn(move || worker(&queue, &model))?,
            );
        }
        Ok(Self {
            queue,
            threads: handles,
            stopped: AtomicBool::new(false),
        })
    }

    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) {
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        let before = q.ops.len();
        q.ops.extend(ops);
        let added = q.ops.len() - before;
        drop(q);
        if added > 1 {
            cv.notify_all();
        } else if added == 1 {
            cv.notify_one();
        }
    }

    pub fn stop(&mut self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let (lock, cv) = &*self.queue;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker(queue: &(Mutex<Queue>, Condvar), model: &JsModel) {
    let (lock, cv) = queue;
    let mut batch = Vec::new();
    let mut segments = Vec::new();
    let mut iovecs = Vec::new();
    let mut touched: Vec<Completer> = Vec::new();
    loop {
        {
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            while q.ops.is_empty() && !q.stop {
                q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.ops.is_empty() && q.stop {
                return;
            }
            // Take a fair share so other workers get some of a large batch too.
            let n = q.ops.len().div_ceil(2).clamp(1, 64);
            batch.extend(q.ops.drain(..n));
        }
        for op in batch.drain(..) {
            let Some((map, readable)) = copy_slot(model, op.slot, &mut segments) else {
                continue;
            };
            let (status, used) = execute(&op, &map, readable, &segments, &mut iovecs);
            if let Some((completer, head)) = model.slots().release(op.slot) {
                completer.complete(head, used);
                if !touched.iter().any(|c| c.queue_index() == completer.queue_index()) {
                    touched.push(completer);
                }
            }
            let _ = status;
        }
        for c in touched.drain(..) {
            c.flush();
        }
    }
}

/// Copies what an operation needs out of its slot, so the slot lock is not held during I/O.
fn copy_slot(model: &JsModel, id: u32, out: &mut Vec<Segment>) -> Option<(Arc<IotlbMap>, usize)> {
    let slots = model.slots();
    let slot = slots.get(id)?;
    out.clear();
    out.extend_from_slice(&slot.segments);
    Some((slot.map.clone()?, usize::from(slot.readable)))
}

/// Host iovecs for `len` bytes of `segments` starting `skip` bytes in.
fn iovecs_for(
    map: &IotlbMap,
    segments: &[Segment],
    mut skip: u64,
    mut len: u64,
    out: &mut Vec<libc::iovec>,
) -> bool {
    out.clear();
    for seg in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let mut addr = seg.addr + skip;
        let mut left = (seg_len - skip).min(len);
        skip = 0;
        // A buffer may cross adjacent regions: one iovec per region.
        while left > 0 {
            let Some((region, offset)) = map.locate(addr) else {
                return false;
            };
            let Some((base, region_len)) = map.region_host(region) else {
                return false;
            };
            let n = left.min(region_len as u64 - offset);
            // SAFETY: offset < region_len, so the pointer stays inside the mapping.
            let ptr = unsafe { base.add(offset as usize) };
            out.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: n as usize,
            });
            addr += n;
            left -= n;
            len -= n;
        }
    }
    len == 0
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

fn execute(
    op: &Op,
    map: &IotlbMap,
    readable: usize,
    segments: &[Segment],
    iov: &mut Vec<libc::iovec>,
) -> (u8, u32) {
    let (ins, outs) = segments.split_at(readable);
    let Some(status_seg) = outs.last() else {
        return (STATUS_IOERR, 0);
    };
    let data_in_len = total(outs) - 1;
    let mut used = 1u32;
    let status = match op.kind {
        OP_READ => {
            if !iovecs_for(map, outs, 0, data_in_len, iov) {
                STATUS_IOERR
            } else if transfer(op.fd, iov, op.position, false) {
                used += data_in_len as u32;
                STATUS_OK
            } else {
                STATUS_IOERR
            }
        }
        OP_WRITE => {
            let len = total(ins).saturating_sub(u64::from(op.skip));
            if !iovecs_for(map, ins, u64::from(op.skip), len, iov) {
                STATUS_IOERR
            } else if transfer(op.fd, iov, op.position, true) {
                STATUS_OK
            } else {
                STATUS_IOERR
            }
        }
        // SAFETY: fdatasync on a caller-provided fd; a bad fd just fails.
        OP_FLUSH => match unsafe { libc::fdatasync(op.fd) } {
            0 => STATUS_OK,
            _ => STATUS_IOERR,
        },
        _ => STATUS_IOERR,
    };
    let status_at = status_seg.addr + u64::from(status_seg.len) - 1;
    if !iovecs_for(
        map,
        std::slice::from_ref(&Segment {
            addr: status_at,
            len: 1,
        }),
        0,
        1,
        iov,
    ) {
        return (STATUS_IOERR, 0);
    }
    // SAFETY: the iovec points at one validated, writable byte of the mapping (which `map` keeps alive).
    unsafe { std::ptr::write_volatile(iov[0].iov_base.cast::<u8>(), status) };
    (status, used)
}

/// Moves all bytes of `iov` at `position`, retrying partial transfers. Reads past the end of the file
/// leave zeroes.
fn transfer(fd: i32, iov: &mut [libc::iovec], mut position: u64, write: bool) -> bool {
    let mut start = 0usize;
    while start < iov.len() {
        let chunk = &iov[start..(start + 1024).min(iov.len())];
        // SAFETY: every iovec points into a live mapping validated for this access.
        let n = unsafe {
            if write {
                libc::pwritev(fd, chunk.as_ptr(), chunk.len() as i32, position as libc::off_t)
            } else {
                libc::preadv(fd, chunk.as_ptr(), chunk.len() as i32, position as libc::off_t)
            }
        };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        if n == 0 {
            if write {
                return false;
            }
            // End of file: the rest reads as zeroes.
            for v in &iov[start..] {
                // SAFETY: as above; zeroing the remaining destination bytes.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return true;
        }
        position += n as u64;
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            if n >= iov[start].iov_len {
                n -= iov[start].iov_len;
                start += 1;
            } else {
                // SAFETY: advancing inside the same iovec.
                iov[start].iov_base = unsafe { iov[start].iov_base.cast::<u8>().add(n).cast() };
                iov[start].iov_len -= n;
                n = 0;
            }
        }
    }
    true
}
