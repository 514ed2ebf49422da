//! A kernel-free driver for one queue: a real split ring in process memory, filled by a driver thread
//! in batches of a chosen size and drained by the same `QueueShared::process` path a VDUSE device uses.
//! It measures everything above the kernel — ring, chain validation, the device model (for the Node
//! binding: the boundary to JavaScript and back) — without booting anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{IotlbMap, Memory};
use crate::model::{DeviceModel, RequestBatch};
use crate::queue::{QueueShared, Transport};
use crate::uapi::VDUSE_ACCESS_RW;

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x10_0000;
const USED: u64 = 0x20_0000;
const BUFFERS: u64 = 0x30_0000;
const MEMORY: usize = 0x100_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Wakes the driver when the device "interrupts".
#[derive(Default)]
struct Interrupts {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Transport for Interrupts {
    fn notify(&self, _queue: u16) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }
    fn refresh_memory(&self) -> bool {
        false
    }
}

/// Result of a run.
#[derive(Clone, Copy, Debug)]
pub struct LoopbackReport {
    pub requests: u64,
    pub elapsed: Duration,
    pub interrupts: u64,
}

pub struct Loopback {
    mem: GuestMemoryMmap,
    queue: Arc<QueueShared>,
    interrupts: Arc<Interrupts>,
    size: u16,
    submitted: AtomicU64,
}

impl Loopback {
    /// A queue of `size` entries whose requests are 3-buffer virtio-blk-shaped chains (16-byte header,
    /// 4 KiB data, 1-byte status), all in one memory region.
    pub fn new(size: u16) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("anonymous memory");
        let memory = Arc::new(Memory::default());
        memory.replace(IotlbMap::with_memory(
            mem.clone(),
            vec![(0, MEMORY as u64 - 1, VDUSE_ACCESS_RW)],
        ));
        let interrupts = Arc::new(Interrupts::default());
        let queue = QueueShared::new(0, memory, interrupts.clone());
        let mut q = Queue::new(size).expect("queue size");
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        queue.activate(q);
        // Each head h uses descriptors 3h..3h+2; the table holds size/3 requests at once.
        for h in 0..size / 3 {
            let base = BUFFERS + u64::from(h) * 0x2000;
            let d = 3 * h;
            write_desc(&mem, d, base, 16, VRING_DESC_F_NEXT, d + 1);
            write_desc(
                &mem,
                d + 1,
                base + 0x1000,
                4096,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                d + 2,
            );
            write_desc(&mem, d + 2, base + 0x40, 1, VRING_DESC_F_WRITE, 0);
        }
        Self {
            mem,
            queue,
            interrupts,
            size,
            submitted: AtomicU64::new(0),
        }
    }

    /// Most requests in flight at once.
    pub fn capacity(&self) -> u16 {
        self.size / 3
    }

    /// Submits `total` requests, `batch` at a time (each batch is one avail-index update and one
    /// `process` pass, i.e. one kick), and waits until all are completed.
    pub fn run(&self, model: &dyn DeviceModel, total: u64, batch: u16) -> LoopbackReport {
        let batch = batch.clamp(1, self.capacity());
        let start = Instant::now();
        let irq_before = *self.interrupts.count.lock().unwrap_or_else(|e| e.into_inner());
        let mut scratch = RequestBatch::new(Arc::new(IotlbMap::empty()));
        let mut done = 0u64;
        while done < total {
            let n = u64::from(batch).min(total - done);
            let first = self.submitted.load(Ordering::Relaxed);
            for i in 0..n {
                let slot = (first + i) % u64::from(self.size);
                let head = ((first + i) % u64::from(self.capacity())) as u16 * 3;
                let _ = self
                    .mem
                    .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot));
            }
            let idx = (first + n) as u16;
            let _ = self.mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2));
            self.submitted.store(first + n, Ordering::Relaxed);
            while self.queue.process(model, &mut scratch) {}
            // Wait for the device to publish all of this batch (asynchronous models complete later).
            let mut count = self.interrupts.count.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
                if used == idx {
                    break;
                }
                count = self
                    .interrupts
                    .cv
                    .wait_timeout(count, Duration::from_millis(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            done += n;
        }
        let interrupts = *self.interrupts.count.lock().unwrap_or_else(|e| e.into_inner()) - irq_before;
        LoopbackReport {
            requests: total,
            elapsed: start.elapsed(),
            interrupts,
        }
    }
}

fn write_desc(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * u64::from(index);
    let _ = mem.write_obj(addr.to_le(), GuestAddress(at));
    let _ = mem.write_obj(len.to_le(), GuestAddress(at + 8));
    let _ = mem.write_obj(flags.to_le(), GuestAddress(at + 12));
    let _ = mem.write_obj(next.to_le(), GuestAddress(at + 14));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram_blk::RamBlk;

    #[test]
    fn loopback_drives_the_native_model_through_a_real_ring() {
        let lb = Loopback::new(256);
        let model = RamBlk::new(1 << 20, 1, 256, "lb");
        for batch in [1, 16, 85] {
            let report = lb.run(&model, 1000, batch);
            assert_eq!(report.requests, 1000);
            assert!(report.interrupts >= 1);
        }
        let stats = &lb.queue.stats;
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3000);
        assert_eq!(stats.completions.load(Ordering::Relaxed), 3000);
        assert_eq!(stats.bad_chains_total(), 0);
    }
}
