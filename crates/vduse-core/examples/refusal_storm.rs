//! A hostile driver's refusal storm, measured: every avail slot holds the same descriptor, a 4 GiB
//! buffer that runs from mapped memory into a hole, and the driver keeps them coming. Prints, per ring
//! size, what one pop round costs (the time the queue lock is held) with the budgets the servers use, and
//! how long another thread waits for the queue lock meanwhile (what the message loop would wait).
//!
//! `cargo run --release --example refusal_storm [ROUNDS] [RING,RING,…]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vduse_core::memory::{IotlbMap, Memory};
use vduse_core::queue::{Budget, InFlight, Pop, RequestBatch, RingInfo, Transport, Virtqueue};
use vduse_core::uapi::VDUSE_ACCESS_RW;
use vm_memory::{Bytes, GuestAddress};

/// The driver's memory: 4 GiB.
const MAPPED: u64 = 1 << 32;

struct Driver(u16);

impl Transport for Driver {
    fn notify(&self, _queue: u16) {}
    fn ring_info(&self, _queue: u16) -> std::io::Result<RingInfo> {
        Ok(RingInfo {
            size: self.0,
            desc: 0,
            avail: 0x80_0000,
            used: 0x90_0000,
            avail_idx: 0,
            ready: true,
        })
    }
}

fn storm(size: u16, rounds: u32, budget: Budget) -> (Duration, Duration, Duration, u64) {
    // 4 GiB of memory (reserved, barely touched): rings at the start, then the buffer, then the hole.
    let memory = Arc::new(Memory::fixed(
        IotlbMap::anonymous(&[(0, MAPPED as usize, VDUSE_ACCESS_RW)]).unwrap(),
    ));
    let map = memory.peek();
    let q = Virtqueue::new(
        0,
        size,
        usize::from(size),
        memory.clone(),
        Arc::new(Driver(size)),
        Arc::new(InFlight::default()),
        None,
    );
    q.arm();
    // One descriptor, device-writable, 4 GiB from 16 MiB: mapped for all but its last 16 MiB.
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&0x100_0000u64.to_le_bytes());
    d[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    d[12..14].copy_from_slice(&2u16.to_le_bytes());
    for i in 0..size {
        map.write_slice(&d, GuestAddress(16 * u64::from(i))).unwrap();
    }
    let mut avail_idx = 0u16;
    let offer_all = |avail_idx: &mut u16| {
        for k in 0..size {
            let slot = u64::from(avail_idx.wrapping_add(k) % size);
            map.write_obj(k.to_le(), GuestAddress(0x80_0000 + 4 + 2 * slot))
                .unwrap();
        }
        *avail_idx = avail_idx.wrapping_add(size);
        map.write_obj(avail_idx.to_le(), GuestAddress(0x80_0002)).unwrap();
    };
    // Another thread takes the queue lock now and then, as the message loop does (`quiesce`, a fence).
    let stop = Arc::new(AtomicBool::new(false));
    let worst_wait = Arc::new(AtomicU64::new(0));
    let prober = {
        let (q, stop, worst) = (q.clone(), stop.clone(), worst_wait.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _ = q.live();
                worst.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut batch = RequestBatch::default();
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    let mut pops = 0u64;
    for _ in 0..rounds {
        offer_all(&mut avail_idx);
        loop {
            let t = Instant::now();
            let more = q.pop(budget, &mut batch);
            let took = t.elapsed();
            worst = worst.max(took);
            total += took;
            pops += 1;
            if more != Pop::More {
                break;
            }
        }
        if q.stats.broken.load(Ordering::Relaxed) > 0 {
            // The queue gave up on this driver; a reset revives it (as the driver's would).
            q.stop();
            q.arm();
            avail_idx = 0;
            map.write_obj(0u16, GuestAddress(0x80_0002)).unwrap();
            map.write_obj(0u16, GuestAddress(0x90_0002)).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    (
        worst,
        total / pops.max(1) as u32,
        Duration::from_nanos(worst_wait.load(Ordering::Relaxed)),
        q.stats.bad_chains_total(),
    )
}

fn main() {
    let rounds: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let rings: Vec<u16> = std::env::args()
        .nth(2)
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 1024, 32768]);
    println!("refusal storm: every avail slot a 4 GiB buffer into a hole; {rounds} ring refills per size");
    println!(
        "{:>6} {:>22} {:>14} {:>14} {:>20} {:>12}",
        "ring", "budget (chains/descs)", "worst round", "mean round", "worst lock wait", "refused"
    );
    for size in rings {
        // The default (and the JavaScript server's with batchSize 64), and batchSize 256's.
        for budget in [
            Budget::default(),
            Budget {
                requests: 256,
                descriptors: 256 * 64,
            },
        ] {
            let (worst, mean, wait, refused) = storm(size, rounds, budget);
            println!(
                "{size:>6} {:>22} {:>14?} {:>14?} {:>20?} {refused:>12}",
                format!("{}/{}", budget.requests, budget.descriptors),
                worst,
                mean,
                wait
            );
        }
    }
}
