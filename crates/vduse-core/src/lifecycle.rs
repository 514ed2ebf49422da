//! The life of requests across what a transport's control side does to a device: resets, stopped
//! queues and memory-map changes. Shared by every transport (VDUSE's message loop, vhost-user's socket):
//! each drains what it must within a bounded time, fences the rest, and answers only once no late access
//! to the memory it gives back is possible (see `device.rs` for the rules).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{DeviceEvent, DeviceEvents, DeviceStats, DrainReason, MAX_DRAIN};
use crate::error::{Error, Result};
use crate::inflight::QueueLog;
use crate::memory::{
    entry_keys, mappings_of, push_unique, wait_unpinned, EntryKey, IotlbMap, Janitor, Mapping, Memory,
};
use crate::model::{DeviceModel, DeviceSpec};
use crate::queue::{Budget, InFlight, RingInfo, Transport, Virtqueue};
use crate::worker::Worker;
use vm_memory::{Bytes, GuestAddress};

/// A device's queues and memory, and how long its control side may wait for them.
pub struct Lifecycle {
    pub name: String,
    pub memory: Arc<Memory>,
    pub queues: Vec<Arc<Virtqueue>>,
    /// One eventfd per queue, readable when the queue needs serving.
    pub kicks: Vec<Arc<EventFd>>,
    pub inflight: Arc<InFlight>,
    pub drain_timeout: Duration,
    /// How long one control message may wait for its answer, revocations included.
    pub answer_budget: Duration,
    pub janitor: Janitor,
    pub events: Option<Arc<dyn DeviceEvents>>,
    pub drains: AtomicU64,
    pub max_drain_us: AtomicU64,
}

impl Lifecycle {
    /// The queues of a device described by `spec`, over `memory`, reached through `transport`: one
    /// stable kick eventfd per queue (whoever serves the queue polls it), `log(i)` as queue `i`'s in-flight
    /// log if there is one.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        spec: &DeviceSpec,
        memory: Arc<Memory>,
        transport: Arc<dyn Transport>,
        log: impl Fn(u16) -> Option<QueueLog>,
        drain_timeout: Duration,
        answer_budget: Duration,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> Result<Self> {
        let inflight = Arc::new(InFlight::default());
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for i in 0..spec.num_queues {
            let kick = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
            let q = Virtqueue::new(
                i,
                spec.queue_size,
                spec.max_segments,
                memory.clone(),
                transport.clone(),
                inflight.clone(),
                log(i),
            );
            q.set_waker(kick.clone());
            q.set_held(i < 64 && spec.held_queues & (1 << i) != 0);
            q.set_fail_status(spec.fail_status());
            queues.push(q);
            kicks.push(kick);
        }
        Ok(Self {
            name: name.into(),
            memory,
            queues,
            kicks,
            inflight,
            // A drain leaves at least half of the answer budget for what follows it (revocations).
            drain_timeout: drain_timeout.min(MAX_DRAIN).min(answer_budget / 2),
            answer_budget,
            janitor: Janitor::new(name).map_err(|e| Error::sys("spawn", e))?,
            events,
            drains: AtomicU64::new(0),
            max_drain_us: AtomicU64::new(0),
        })
    }

    /// One worker thread per queue running `model` (natively served devices).
    pub fn spawn_workers(&self, model: &Arc<dyn DeviceModel>, budget: Budget) -> Result<Vec<Worker>> {
        self.queues
            .iter()
            .zip(&self.kicks)
            .map(|(q, kick)| {
                Worker::spawn(&self.name, q.clone(), model.clone(), kick.clone(), budget)
                    .map_err(|e| Error::sys("spawn", e))
            })
            .collect()
    }

    pub fn emit(&self, event: DeviceEvent) {
        if let Some(e) = &self.events {
            e.event(&event);
        }
    }

    /// Sums of the queues' counters and the drains.
    pub fn stats(&self) -> DeviceStats {
        let mut s = DeviceStats::default();
        for q in &self.queues {
            let st = &q.stats;
            s.kicks += st.kicks.load(Ordering::Relaxed);
            s.batches += st.batches.load(Ordering::Relaxed);
            s.requests += st.requests.load(Ordering::Relaxed);
            s.completions += st.completions.load(Ordering::Relaxed);
            s.interrupts += st.interrupts.load(Ordering::Relaxed);
            s.bad_chains += st.bad_chains_total();
            s.duplicate_heads += st.duplicate_heads.load(Ordering::Relaxed);
            s.fenced += st.fenced.load(Ordering::Relaxed);
            s.stale_completions += st.stale_completions.load(Ordering::Relaxed);
            s.broken_queues += st.broken.load(Ordering::Relaxed);
        }
        s.in_flight = self.inflight.get() as u64;
        s.iotlb_reloads = self.memory.reloads();
        s.drains = self.drains.load(Ordering::Relaxed);
        s.max_drain_us = self.max_drain_us.load(Ordering::Relaxed);
        s
    }

    /// Stops the queues `which` selects: requests in flight get until the drain deadline to finish, the
    /// rest are fenced (see [`Stop`] for what else goes). True when nothing of ours can touch the memory
    /// those requests used (the driver reuses it once answered); false when that could not be made sure
    /// within the budget — the caller fails closed.
    pub fn stop_queues(&self, started: Instant, which: impl Fn(&Virtqueue) -> bool, kind: Stop) -> bool {
        self.stop_queues_then(started, which, kind, || {})
    }

    /// [`stop_queues`](Self::stop_queues), calling `before_forget` once the queues are stopped and before
    /// the memory map is dropped (a transport drops its own record of the memory there, so that nothing
    /// maps it again).
    pub fn stop_queues_then(
        &self,
        started: Instant,
        which: impl Fn(&Virtqueue) -> bool,
        kind: Stop,
        before_forget: impl FnOnce(),
    ) -> bool {
        let deadline = started + self.drain_timeout;
        let chosen: Vec<&Arc<Virtqueue>> = self.queues.iter().filter(|q| which(q)).collect();
        for q in &chosen {
            q.quiesce();
        }
        // Held buffers (a NIC's receive buffers) wait for data, not for the model: not waited for.
        let waited = || {
            chosen
                .iter()
                .filter(|q| !q.held())
                .map(|q| q.count_where(|_, _| true))
                .sum::<usize>()
        };
        let busy = waited() > 0;
        // A client that is gone sees no completion: fence at once (the log keeps the requests).
        let drained = !busy || (kind != Stop::Gone && self.inflight.wait_until(deadline, || waited() == 0));
        let mut fenced = 0;
        let mut maps = Vec::new();
        // Requests fenced while native I/O moved their data: only that I/O could touch their buffers later.
        // Counted by the fences themselves, under each ring's lock (so none slips in between).
        let fenced_native = || {
            chosen
                .iter()
                .map(|q| q.stats.fenced_native.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let native_before = fenced_native();
        for q in &chosen {
            if kind == Stop::Ring && q.held() {
                // The ring resumes later: its receive buffers go back empty rather than be lost to the driver.
                let (_, m) = q.give_back_where(|_, _| true);
                maps.extend(m);
            }
            let (n, m) = match kind {
                Stop::Reset => q.stop(),
                Stop::Leave | Stop::Gone | Stop::Ring => q.abandon(),
            };
            if !q.held() {
                fenced += n;
            }
            maps.extend(m);
        }
        let native = fenced_native() - native_before;
        // Stopped queues touch no ring, and fenced tickets reach no buffer: what is left are pins.
        let (old, settled) = if kind == Stop::Ring {
            // The memory stays mapped for the other rings, whose own native I/O pins the same mappings: pins
            // cannot tell this ring's apart, and revoking would fault the others. Without native I/O of its
            // own in flight, and once no model's system call moves data through its buffers (a pinned
            // read or write, counted per queue), this ring is quiet; otherwise the caller must stop
            // everything instead.
            let pinned = || chosen.iter().map(|q| q.pinned_now()).sum::<usize>();
            // Past the drain deadline, still a brief wait (as `settle` gives pins): a pinned call lasts
            // one system call.
            let until = deadline.max(Instant::now() + Duration::from_millis(100));
            let unpinned = native == 0
                && loop {
                    if pinned() == 0 {
                        break true;
                    }
                    let now = Instant::now();
                    if now >= until {
                        break false;
                    }
                    std::thread::sleep((until - now).min(Duration::from_millis(1)));
                };
            (
                None,
                if native == 0 && unpinned {
                    Settled::Quiet
                } else {
                    Settled::Unsafe
                },
            )
        } else {
            before_forget();
            let old = self.memory.clear();
            let mappings = mappings_of(std::iter::once(&old).chain(&maps));
            (Some(old), self.settle(mappings, deadline, started, false))
        };
        self.janitor.dispose((old, maps));
        if !drained || fenced > 0 {
            log::warn!(
                "device {:?}: {} queue(s) stopped with {fenced} request(s) still in the model after {:?}: fenced",
                self.name,
                chosen.len(),
                started.elapsed()
            );
        }
        if busy || fenced > 0 || settled != Settled::Quiet {
            self.record_drain(DrainReason::Reset, started, fenced, settled == Settled::Revoked);
        }
        settled != Settled::Unsafe
    }

    /// Waits until none of `mappings` can be touched by this process any more: until no native I/O pins
    /// them (up to `deadline`, at least briefly), else — or when `force`d — by revoking them (up to the
    /// answer budget from `started`).
    pub fn settle(
        &self,
        mappings: Vec<Arc<Mapping>>,
        deadline: Instant,
        started: Instant,
        force: bool,
    ) -> Settled {
        let pin_deadline = deadline.max(Instant::now() + Duration::from_millis(100));
        if !force && wait_unpinned(&mappings, pin_deadline) {
            return Settled::Quiet;
        }
        let pinned: Vec<Arc<Mapping>> = if force {
            mappings
        } else {
            mappings.into_iter().filter(|m| m.is_pinned()).collect()
        };
        let bytes: usize = pinned.iter().map(|m| m.len()).sum();
        let mut revocation = self.janitor.revoke(pinned);
        match revocation.wait_until(started + self.answer_budget) {
            Some(true) => {
                log::warn!(
                    "device {:?}: native I/O still used {bytes} bytes of fenced memory; revoked them",
                    self.name
                );
                Settled::Revoked
            }
            Some(false) => {
                log::error!(
                    "device {:?}: cannot revoke {bytes} bytes of fenced memory that native I/O still uses",
                    self.name
                );
                Settled::Unsafe
            }
            None => {
                log::error!(
                    "device {:?}: revoking {bytes} bytes of fenced memory did not finish within {:?}",
                    self.name,
                    self.answer_budget
                );
                Settled::Unsafe
            }
        }
    }

    /// The driver changed its memory map (`VDUSE_UPDATE_IOTLB`, a vhost-user memory table). Entries that stayed the same keep their
    /// mappings and their requests; requests with a buffer in memory that is gone or changed are drained
    /// (bounded) or fenced, and that memory is made unreachable before the answer. Queues touch the rings
    /// through a fresh map from now on. False: refuse the update (its memory could not be made safe).
    pub fn memory_changed(&self, started: Instant) -> bool {
        let deadline = started + self.drain_timeout;
        self.memory.invalidate();
        // One fd open at a time, whatever the entry count. Without the new list nothing can tell which
        // requests lost their memory: then all of them did (they are drained or fenced, and every mapping
        // in use is made safe) — never "none".
        let keys: Option<Vec<EntryKey>> = match entry_keys(self.memory.source()) {
            Ok(keys) => Some(keys),
            Err(e) => {
                log::error!(
                    "device {:?}: cannot read the IOTLB after an update ({e}); treating all memory as gone",
                    self.name
                );
                None
            }
        };
        // Every map anything may still use: the current one (a serving thread may already have loaded the
        // new state) and each one requests in flight were popped with.
        let mut maps = vec![self.memory.peek()];
        for q in &self.queues {
            for m in q.maps_in_use() {
                push_unique(&mut maps, m);
            }
        }
        let mut removed: Vec<Arc<Mapping>> = Vec::new();
        for m in &maps {
            let gone = match &keys {
                Some(keys) => m.mappings_not_in(keys).into_iter().map(|(_, g)| g).collect(),
                None => m.mappings(),
            };
            for g in gone {
                push_unique(&mut removed, g);
            }
        }
        drop(maps);
        if removed.is_empty() {
            return true;
        }
        let affected = |map: &IotlbMap, segments: &[crate::chain::Segment]| match &keys {
            Some(keys) => segments
                .iter()
                .any(|s| !map.survives(s.addr, u64::from(s.len), keys)),
            None => true,
        };
        let busy = self
            .queues
            .iter()
            .filter(|q| !q.held())
            .map(|q| q.count_where(affected))
            .sum::<usize>();
        if busy > 0 {
            self.inflight.wait_until(deadline, || {
                self.queues
                    .iter()
                    .filter(|q| !q.held())
                    .all(|q| q.count_where(affected) == 0)
            });
        }
        let mut fenced = 0;
        let mut maps = Vec::new();
        for q in &self.queues {
            if q.held() {
                // Receive buffers hold nothing yet: give them back (the driver posts new ones) rather
                // than lose them until its next reset.
                let (_, m) = q.give_back_where(affected);
                maps.extend(m);
                continue;
            }
            let (n, m) = q.fence_where(affected);
            fenced += n;
            maps.extend(m);
        }
        // A publish that took the old map before the invalidation finishes under the queue lock; every
        // later one checks the map under that lock and reloads. A queue whose lock stays taken past the
        // deadline may still be writing through the old map: its memory is revoked, not trusted.
        let mut barred = true;
        for q in &self.queues {
            if !q.barrier(deadline.max(Instant::now() + Duration::from_millis(100))) {
                log::warn!(
                    "queue {}: busy past the drain deadline during a memory map update",
                    q.index
                );
                barred = false;
            }
        }
        let settled = self.settle(removed, deadline, started, !barred);
        self.janitor.dispose(maps);
        if fenced > 0 {
            log::warn!(
                "device {:?}: the driver unmapped memory that {fenced} request(s) still used: fenced",
                self.name
            );
        }
        if busy > 0 || fenced > 0 || settled != Settled::Quiet {
            self.record_drain(
                DrainReason::IotlbChange,
                started,
                fenced,
                settled == Settled::Revoked,
            );
        }
        settled != Settled::Unsafe
    }

    pub fn record_drain(&self, reason: DrainReason, started: Instant, fenced: usize, revoked: bool) {
        let waited = started.elapsed();
        self.drains.fetch_add(1, Ordering::Relaxed);
        self.max_drain_us
            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
        self.emit(DeviceEvent::Drained {
            reason,
            waited,
            fenced,
            revoked,
        });
    }
}

/// What stopping queues does besides fencing their requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The driver reset the device (VDUSE: status 0; vhost-user: `RESET_DEVICE`): the memory map goes and
    /// the in-flight log is cleared.
    Reset,
    /// This server is leaving while its client stays: requests get the drain deadline, the memory map
    /// goes, the in-flight log stays (fenced requests in it are served again by whoever resumes the rings
    /// — a reconnecting VMM hands the log back).
    Leave,
    /// The client is gone: like `Leave`, but nothing is waited for (nobody would see a completion).
    Gone,
    /// One ring stops while the others run (vhost-user `GET_VRING_BASE`, a disabled ring): the map stays,
    /// held buffers go back to the driver empty, the log stays for the ring's restart. Fails (false)
    /// when native I/O of the ring was still in flight: only a stop of every ring can make that safe.
    Ring,
}

/// What became of memory the loop took from the device (see `Shared::settle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Nothing used it any more.
    Quiet,
    /// Native I/O still used it: it was revoked.
    Revoked,
    /// It could not be made safe in time: fail closed.
    Unsafe,
}

/// Where a queue resumes when a new server takes over from one that died (a VDUSE takeover, a vhost-user
/// client reconnecting to a restarted server): its in-flight log, checked against the driver's rings.
#[derive(Debug)]
pub struct ResumePlan {
    used: u16,
    next_avail: u16,
    /// Heads the dead server published after its log's used index (it died between the two).
    published: Vec<u16>,
}

impl ResumePlan {
    /// Checks `log` against the rings at `info` (read through `map`). The reason when they do not fit: a
    /// log that does not describe these rings would replay requests the driver finished long ago.
    pub fn check(log: &QueueLog, info: &RingInfo, map: &IotlbMap, max_size: u16) -> Result<Self, String> {
        let size = info.size;
        if size == 0 || size > max_size || !size.is_power_of_two() {
            return Err(format!("the ring has {size} entries"));
        }
        let read_u16 = |addr: u64| map.read_obj::<u16>(GuestAddress(addr)).ok().map(u16::from_le);
        let (Some(used), Some(avail)) = (read_u16(info.used + 2), read_u16(info.avail + 2)) else {
            return Err("the rings are out of reach".into());
        };
        let since = used.wrapping_sub(log.used_idx());
        if since > size {
            return Err(format!("the used ring is {since} ahead of the log"));
        }
        let mut published = Vec::with_capacity(usize::from(since));
        for k in 0..since {
            let at = info.used + 4 + 8 * u64::from(log.used_idx().wrapping_add(k) % size);
            match map.read_obj::<u32>(GuestAddress(at)) {
                Ok(id) => published.push(u32::from_le(id) as u16),
                Err(_) => return Err("the used ring is out of reach".into()),
            }
        }
        let mut in_flight = log.in_flight();
        in_flight.retain(|h| !published.contains(h));
        let mut next_avail = log.next_avail();
        // A crash between logging a pop and advancing the log's avail index leaves the newest request
        // both in flight and next in the avail ring: take it once.
        if avail != next_avail {
            let at = info.avail + 4 + 2 * u64::from(next_avail % size);
            if read_u16(at).is_some_and(|h| in_flight.last() == Some(&h)) {
                next_avail = next_avail.wrapping_add(1);
            }
        }
        let taken = next_avail.wrapping_sub(used);
        if avail.wrapping_sub(next_avail) > size || taken > size || in_flight.len() > usize::from(taken) {
            return Err(format!(
                "the log (next avail {next_avail}, {} in flight) does not fit the rings (avail {avail}, used {used})",
                in_flight.len()
            ));
        }
        Ok(Self {
            used,
            next_avail,
            published,
        })
    }

    /// Repairs the log to match the rings; returns where the queue resumes and the heads to serve again
    /// first, in their original order (for [`Virtqueue::arm_resumed`]).
    pub fn apply(self, log: &QueueLog) -> (u16, Vec<u16>) {
        let base = log.used_idx();
        log.repair(self.used, |k| {
            self.published.get(usize::from(k.wrapping_sub(base))).copied()
        });
        log.set_next_avail(self.next_avail);
        (self.next_avail, log.in_flight())
    }
}
