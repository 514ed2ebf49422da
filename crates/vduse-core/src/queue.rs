//! One virtqueue: a `virtio_queue::Queue` over the IOTLB map, drained in batches by a worker thread on
//! each kick, with notifications suppressed while draining, completions published in batches and at most
//! one interrupt per batch (EVENT_IDX honoured by virtio-queue's `needs_notification`).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{self, ChainError};
use crate::memory::Memory;
use crate::model::{Completer, DeviceModel, RequestBatch};

/// What a queue needs from its transport.
pub trait Transport: Send + Sync {
    /// Interrupts the driver for `queue` (VDUSE: `VDUSE_VQ_INJECT_IRQ`).
    fn notify(&self, queue: u16);
    /// Re-reads the driver's memory map after a buffer fell outside it; true if it changed.
    fn refresh_memory(&self) -> bool;
}

/// Counters of one queue, readable at any time.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub kicks: AtomicU64,
    pub batches: AtomicU64,
    pub requests: AtomicU64,
    pub completions: AtomicU64,
    pub interrupts: AtomicU64,
    /// Refused chains, by [`ChainError`] index.
    pub bad_chains: [AtomicU64; 6],
    /// Completions dropped because the device was reset before they arrived.
    pub stale_completions: AtomicU64,
}

impl QueueStats {
    pub fn bad_chains_total(&self) -> u64 {
        self.bad_chains.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

struct State {
    queue: Option<Queue>,
    generation: u64,
    pending: Vec<(u64, u16, u32)>,
    /// The avail index went insane (more entries than the ring holds): stop until the next reset.
    broken: bool,
}

/// The part of a queue shared by its worker, the message loop and completers.
pub struct QueueShared {
    pub(crate) index: u16,
    state: Mutex<State>,
    memory: Arc<Memory>,
    transport: Arc<dyn Transport>,
    pub stats: QueueStats,
    inflight: AtomicUsize,
    idle: (Mutex<()>, Condvar),
    logged: [AtomicBool; 6],
}

impl QueueShared {
    pub fn new(index: u16, memory: Arc<Memory>, transport: Arc<dyn Transport>) -> Arc<Self> {
        Arc::new(Self {
            index,
            state: Mutex::new(State {
                queue: None,
                generation: 0,
                pending: Vec::new(),
                broken: false,
            }),
            memory,
            transport,
            stats: QueueStats::default(),
            inflight: AtomicUsize::new(0),
            idle: (Mutex::new(()), Condvar::new()),
            logged: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts serving `queue` (the driver set it up); completions of an earlier life are void from now on.
    pub fn activate(&self, queue: Queue) -> u64 {
        let mut st = self.lock();
        st.generation += 1;
        st.queue = Some(queue);
        st.pending.clear();
        st.broken = false;
        st.generation
    }

    /// Stops serving (reset); returns the ring state for `GET_VQ_STATE`-style queries before it goes.
    pub fn deactivate(&self) {
        let mut st = self.lock();
        st.generation += 1;
        st.queue = None;
        st.pending.clear();
        drop(st);
        self.inflight.store(0, Ordering::Release);
        self.idle.1.notify_all();
    }

    /// The next avail index the device would process (`VDUSE_GET_VQ_STATE`).
    pub fn next_avail(&self) -> Option<u16> {
        self.lock().queue.as_ref().map(|q| q.next_avail())
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight, up to `timeout`; false if some still are.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.idle.0.lock().unwrap_or_else(|e| e.into_inner());
        while self.inflight() > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .idle
                .1
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub(crate) fn push_completion(&self, generation: u64, head: u16, used_len: u32) {
        self.lock().pending.push((generation, head, used_len));
    }

    pub(crate) fn flush_completions(&self) {
        let map = self.memory.snapshot();
        let mut st = self.lock();
        if st.pending.is_empty() {
            return;
        }
        let generation = st.generation;
        let pending = std::mem::take(&mut st.pending);
        let mut done = 0usize;
        let mut stale = 0u64;
        let mut notify = false;
        if let Some(q) = st.queue.as_mut() {
            for &(g, head, len) in &pending {
                if g != generation {
                    stale += 1;
                    continue;
                }
                if let Err(e) = q.add_used(map.memory(), head, len) {
                    log::warn!("queue {}: cannot publish completion of {head}: {e}", self.index);
                }
                done += 1;
            }
            notify = done > 0 && q.needs_notification(map.memory()).unwrap_or(true);
        } else {
            stale = pending.len() as u64;
        }
        // Give the buffer back to keep its capacity for the next batch.
        st.pending = pending;
        st.pending.clear();
        drop(st);
        self.stats.completions.fetch_add(done as u64, Ordering::Relaxed);
        if stale > 0 {
            self.stats.stale_completions.fetch_add(stale, Ordering::Relaxed);
        }
        if notify {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.transport.notify(self.index);
        }
        if done > 0 && self.inflight.fetch_sub(done, Ordering::AcqRel) == done {
            let _guard = self.idle.0.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.1.notify_all();
        }
    }

    fn refuse(&self, err: ChainError, head: u16) {
        self.stats.bad_chains[err.index()].fetch_add(1, Ordering::Relaxed);
        if !self.logged[err.index()].swap(true, Ordering::Relaxed) {
            log::warn!(
                "queue {}: refused request {head}: {} (logged once per kind)",
                self.index,
                err.as_str()
            );
        }
    }

    /// Pops one batch (up to a ring's worth), hands it to the model and publishes what it completed.
    /// Returns true while there may be more work.
    pub fn process(self: &Arc<Self>, model: &dyn DeviceModel, batch: &mut RequestBatch) -> bool {
        if self.memory.take_stale() {
            self.transport.refresh_memory();
        }
        let map = self.memory.snapshot();
        batch.reset(map.clone());
        let max_segments = model.max_segments();
        let mut refresh = false;
        let (generation, more) = {
            let mut st = self.lock();
            let generation = st.generation;
            if st.broken {
                return false;
            }
            let Some(q) = st.queue.as_mut() else { return false };
            let budget = usize::from(q.size());
            let _ = q.disable_notification(map.memory());
            let mut invalid_index = false;
            let mut refused = Vec::new();
            while batch.len() + refused.len() < budget {
                let mut iter = match q.iter(map.memory()) {
                    Ok(iter) => iter,
                    Err(QueueError::InvalidAvailRingIndex) => {
                        invalid_index = true;
                        break;
                    }
                    Err(_) => break,
                };
                let Some(chain) = iter.next() else { break };
                let head = chain.head_index();
                let first = batch.segments_mut().len();
                match chain::collect(chain, &map, max_segments, batch.segments_mut()) {
                    Ok((r, w)) => batch.push(head, first, r, w),
                    Err(ChainError::BadAddress | ChainError::Empty | ChainError::Truncated) if !refresh => {
                        // The map may predate this buffer or indirect table (virtio-vdpa creates the bounce
                        // region on first use): put the chain back, re-read the IOTLB and try once more.
                        q.go_to_previous_position();
                        refresh = true;
                        break;
                    }
                    Err(e) => refused.push((e, head)),
                }
            }
            if invalid_index {
                st.broken = true;
                log::error!(
                    "queue {}: avail index ahead of the ring size; queue stopped until reset",
                    self.index
                );
            }
            let popped = batch.len() + refused.len();
            self.inflight.fetch_add(popped, Ordering::AcqRel);
            for &(e, head) in &refused {
                self.refuse(e, head);
                st.pending.push((generation, head, 0));
            }
            let full = popped >= budget;
            (generation, !invalid_index && (full || refresh))
        };
        if !batch.is_empty() {
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .requests
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let completer = Completer::new(self.clone(), generation);
            model.handle(self.index, batch, &completer);
        }
        self.flush_completions();
        if refresh && !self.transport.refresh_memory() {
            // Nothing new in the IOTLB: the address really is bad. Refuse the chain on the next pass.
            return self.process_refusing_bad_addresses(model, batch);
        }
        if more {
            return true;
        }
        if self.lock().broken {
            return false;
        }
        // Re-enable notifications; if the driver added work meanwhile, go round again.
        let map = self.memory.snapshot();
        let mut st = self.lock();
        match st.queue.as_mut() {
            Some(q) => q.enable_notification(map.memory()).unwrap_or(false),
            None => false,
        }
    }

    fn process_refusing_bad_addresses(
        self: &Arc<Self>,
        model: &dyn DeviceModel,
        batch: &mut RequestBatch,
    ) -> bool {
        let map = self.memory.snapshot();
        {
            let mut st = self.lock();
            let generation = st.generation;
            let Some(q) = st.queue.as_mut() else { return false };
            let Ok(mut iter) = q.iter(map.memory()) else {
                return false;
            };
            let Some(chain) = iter.next() else { return false };
            let head = chain.head_index();
            let mut scratch = Vec::new();
            if let Err(e) = chain::collect(chain, &map, model.max_segments(), &mut scratch) {
                self.inflight.fetch_add(1, Ordering::AcqRel);
                st.pending.push((generation, head, 0));
                drop(st);
                self.refuse(e, head);
                self.flush_completions();
                return true;
            }
            // It validates now after all: leave it for the normal path.
            q.go_to_previous_position();
        }
        self.process(model, batch)
    }
}

/// Serves one queue until `stop` fires: waits for kicks, drains the queue in batches.
pub fn run_worker(shared: Arc<QueueShared>, model: Arc<dyn DeviceModel>, kick: EventFd, stop: Arc<EventFd>) {
    let mut batch = RequestBatch::new(Arc::new(crate::memory::IotlbMap::empty()));
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // A kick may have come before we were listening.
    while shared.process(model.as_ref(), &mut batch) {}
    loop {
        fds[0].revents = 0;
        fds[1].revents = 0;
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::error!(
                "queue {}: poll failed: {}",
                shared.index,
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = kick.read();
            shared.stats.kicks.fetch_add(1, Ordering::Relaxed);
            while shared.process(model.as_ref(), &mut batch) {}
        }
    }
}
