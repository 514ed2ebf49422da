//! A kernel-free driver: a real split ring in anonymous memory, filled by a driver thread in batches of a
//! chosen size and drained through the same [`Virtqueue`] a VDUSE device uses. It measures everything
//! above the kernel — ring, chain validation, the device model (for the Node binding: the JavaScript
//! thread and back) — without booting anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{IotlbMap, Memory};
use crate::queue::{InFlight, RingInfo, Transport, Virtqueue};
use crate::uapi::VDUSE_ACCESS_RW;

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x10_0000;
const USED: u64 = 0x20_0000;
const BUFFERS: u64 = 0x30_0000;
const MEMORY: usize = 0x100_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// The driver side of the loopback: wakes when the device "interrupts".
struct Driver {
    size: u16,
    interrupts: Mutex<u64>,
    cv: Condvar,
}

impl Transport for Driver {
    fn notify(&self, _queue: u16) {
        *self.interrupts.lock() += 1;
        self.cv.notify_all();
    }
    fn ring_info(&self, _queue: u16) -> std::io::Result<RingInfo> {
        Ok(RingInfo {
            size: self.size,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            avail_idx: 0,
            ready: true,
        })
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
    map: Arc<IotlbMap>,
    queue: Arc<Virtqueue>,
    kick: Arc<EventFd>,
    driver: Arc<Driver>,
    size: u16,
    submitted: AtomicU64,
}

impl Loopback {
    /// A queue of `size` entries whose requests are 3-buffer virtio-blk-shaped chains (16-byte header,
    /// 4 KiB data, 1-byte status), all in one memory region.
    pub fn new(size: u16) -> std::io::Result<Self> {
        // The driver writes the rings through the very map the device reads them with.
        let memory = Arc::new(Memory::fixed(IotlbMap::anonymous(&[(
            0,
            MEMORY,
            VDUSE_ACCESS_RW,
        )])?));
        let map = memory.peek();
        let driver = Arc::new(Driver {
            size,
            interrupts: Mutex::new(0),
            cv: Condvar::new(),
        });
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let queue = Virtqueue::new(
            0,
            size,
            usize::from(size),
            memory,
            driver.clone(),
            Arc::new(InFlight::default()),
            None,
        );
        queue.set_waker(kick.clone());
        queue.arm();
        // Each head h uses descriptors 3h..3h+2; the table holds size/3 requests at once.
        for h in 0..size / 3 {
            let base = BUFFERS + u64::from(h) * 0x2000;
            let d = 3 * h;
            write_desc(&map, d, base, 16, VRING_DESC_F_NEXT, d + 1);
            write_desc(
                &map,
                d + 1,
                base + 0x1000,
                4096,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                d + 2,
            );
            write_desc(&map, d + 2, base + 0x40, 1, VRING_DESC_F_WRITE, 0);
        }
        Ok(Self {
            map,
            queue,
            kick,
            driver,
            size,
            submitted: AtomicU64::new(0),
        })
    }

    pub fn queue(&self) -> &Arc<Virtqueue> {
        &self.queue
    }

    /// Readable when the queue needs serving.
    pub fn kick_fd(&self) -> &Arc<EventFd> {
        &self.kick
    }

    /// Most requests in flight at once.
    pub fn capacity(&self) -> u16 {
        self.size / 3
    }

    /// Submits `total` requests, `batch` at a time (each batch is one avail-index update and one kick),
    /// calling `serve` after each kick (a native model drains the queue there; a device served elsewhere
    /// does nothing), and waits until each batch is completed.
    pub fn run(&self, total: u64, batch: u16, mut serve: impl FnMut()) -> LoopbackReport {
        let batch = batch.clamp(1, self.capacity());
        let start = Instant::now();
        let irq_before = *self.driver.interrupts.lock();
        let mut done = 0u64;
        while done < total {
            let n = u64::from(batch).min(total - done);
            let first = self.submitted.load(Ordering::Relaxed);
            for i in 0..n {
                let slot = (first + i) % u64::from(self.size);
                let head = ((first + i) % u64::from(self.capacity())) as u16 * 3;
                let _ = self
                    .map
                    .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot));
            }
            let idx = (first + n) as u16;
            let _ = self
                .map
                .store(idx.to_le(), GuestAddress(AVAIL + 2), Ordering::Release);
            self.submitted.store(first + n, Ordering::Relaxed);
            let _ = self.kick.write(1);
            serve();
            // Wait for the device to publish all of this batch (asynchronous models complete later).
            let mut count = self.driver.interrupts.lock();
            loop {
                let used: u16 = self
                    .map
                    .load(GuestAddress(USED + 2), Ordering::Acquire)
                    .unwrap_or(0);
                if used == idx {
                    break;
                }
                self.driver.cv.wait_for(&mut count, Duration::from_millis(1));
            }
            done += n;
        }
        let interrupts = *self.driver.interrupts.lock() - irq_before;
        LoopbackReport {
            requests: total,
            elapsed: start.elapsed(),
            interrupts,
        }
    }
}

fn write_desc(map: &IotlbMap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * u64::from(index);
    let _ = map.write_obj(addr.to_le(), GuestAddress(at));
    let _ = map.write_obj(len.to_le(), GuestAddress(at + 8));
    let _ = map.write_obj(flags.to_le(), GuestAddress(at + 12));
    let _ = map.write_obj(next.to_le(), GuestAddress(at + 14));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Completer;
    use crate::queue::{Budget, RequestBatch};
    use crate::ram_blk::RamBlk;
    use crate::worker::drain;

    #[test]
    fn loopback_drives_the_native_model_through_a_real_ring() {
        let lb = Loopback::new(256).unwrap();
        let model = RamBlk::new(1 << 20, 1, 256, "lb");
        let mut batch = RequestBatch::default();
        let completer = Completer::new(lb.queue().clone());
        for size in [1, 16, 85] {
            let report = lb.run(1000, size, || {
                drain(lb.queue(), &model, &mut batch, &completer, Budget::default())
            });
            assert_eq!(report.requests, 1000);
            assert!(report.interrupts >= 1);
        }
        let stats = &lb.queue().stats;
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3000);
        assert_eq!(stats.completions.load(Ordering::Relaxed), 3000);
        assert_eq!(stats.bad_chains_total(), 0);
    }
}
