//! The device's persistent state file: what a restarted server (or a reclaimer of a dead server's
//! device) needs to take over the queues — the device description, the negotiated features and status,
//! and per queue the set of requests popped but not yet in the used ring.
//!
//! The file is mmapped and updated on the data path with plain atomic stores (no syscall per request), in
//! an order that leaves it consistent after a crash at any instruction:
//!
//! - pop: `entry[head] = ++counter` (non-zero = in flight; the counter orders resubmission), then
//!   `next_avail`. A crash between the two leaves the head both in flight and at `next_avail` in the avail
//!   ring; the new server resubmits it and refuses the second sighting as a duplicate head.
//! - refuse: `next_avail` first, then the used element (a crash between loses only a malformed chain);
//! - publish: the used element and the used index go to guest memory first, then `entry[head] = 0`, then
//!   `used_idx`. A crash between the two leaves `used_idx` behind the ring's; [`QueueLog::repair`] clears
//!   the entries of the heads published in between, read back from the used ring.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"VDUSEST1";
const VERSION: u32 = 2;
const HEADER: usize = 4096;
const CONFIG_AREA: usize = 4096;
const QUEUE_HEADER: usize = 64;

/// Byte offsets in the header page.
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const DEVICE_ID: usize = 12;
    pub const NUM_QUEUES: usize = 16;
    pub const QUEUE_SIZE: usize = 20;
    pub const CONFIG_LEN: usize = 24;
    pub const STATUS: usize = 28;
    pub const FEATURES: usize = 32;
    pub const DRIVER_FEATURES: usize = 40;
    pub const PID: usize = 48;
    pub const SERVINGS: usize = 56;
    pub const DEVICE_KIND: usize = 64;
    pub const BACKEND: usize = 128;
}

/// Longest device kind and backend identity (bytes; longer ones are cut).
const KIND_LEN: usize = 64;
const BACKEND_LEN: usize = 512;

/// What the state file records about the device itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateInfo {
    pub device_id: u32,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Features offered (device and transport bits).
    pub features: u64,
    pub config: Vec<u8>,
}

/// A state file's description of its device (see [`StateFile::inspect`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSummary {
    pub device_id: u32,
    pub num_queues: u16,
    pub queue_size: u16,
    /// The status the device acknowledged last.
    pub status: u8,
    /// The last server's process id.
    pub pid: u32,
    /// How many servers have served the device (1 + takeovers).
    pub servings: u64,
    pub kind: String,
    /// The backend's identity; empty: its data died with the server.
    pub backend: String,
}

/// An open, mapped state file.
pub struct StateFile {
    ptr: *mut u8,
    len: usize,
    path: PathBuf,
    num_queues: u16,
    queue_size: u16,
    file: File,
}

// SAFETY: the mapping is shared memory accessed only through atomics and byte copies at fixed offsets.
unsafe impl Send for StateFile {}
// SAFETY: as above.
unsafe impl Sync for StateFile {}

fn queue_stride(queue_size: u16) -> usize {
    (QUEUE_HEADER + 8 * usize::from(queue_size)).div_ceil(64) * 64
}

/// The size of a state file for this queue layout.
pub fn file_len(num_queues: u16, queue_size: u16) -> usize {
    HEADER + CONFIG_AREA + usize::from(num_queues) * queue_stride(queue_size)
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl StateFile {
    /// Creates (or truncates) the state file of a new device.
    pub fn create(path: &Path, info: &StateInfo) -> std::io::Result<Arc<Self>> {
        if info.config.len() > CONFIG_AREA {
            return Err(invalid("config space too large for the state file"));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Self::create_in(file, path, info)
    }

    /// Like [`create`](Self::create), in a file the caller opened (a memfd: a vhost-user inflight region);
    /// `label` names it in messages.
    pub fn create_in(file: File, label: &Path, info: &StateInfo) -> std::io::Result<Arc<Self>> {
        if info.config.len() > CONFIG_AREA {
            return Err(invalid("config space too large for the state file"));
        }
        let path = label;
        file.set_len(0)?;
        let len = file_len(info.num_queues, info.queue_size);
        // Allocated, not sparse: a store into a hole of a full tmpfs would be a SIGBUS on the data path.
        // SAFETY: posix_fallocate on a file we own; it only fails.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
        let state = Self::map(file, path, len, info.num_queues, info.queue_size)?;
        state.put_u32(off::VERSION, VERSION);
        state.put_u32(off::DEVICE_ID, info.device_id);
        state.put_u32(off::NUM_QUEUES, u32::from(info.num_queues));
        state.put_u32(off::QUEUE_SIZE, u32::from(info.queue_size));
        state.put_u32(off::CONFIG_LEN, info.config.len() as u32);
        state.put_u64(off::FEATURES, info.features);
        state.put_u32(off::PID, std::process::id());
        state.put_u64(off::SERVINGS, 1);
        // SAFETY: the config area lies inside the mapping and the length was checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(info.config.as_ptr(), state.ptr.add(HEADER), info.config.len())
        };
        // The magic goes last: a file without it is not a state file (a crash during creation).
        // SAFETY: the magic's 8 bytes lie inside the header page.
        unsafe { std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), state.ptr.add(off::MAGIC), MAGIC.len()) };
        Ok(Arc::new(state))
    }

    /// Opens the state file of an existing device (after a crash), checking its format.
    pub fn open(path: &Path) -> std::io::Result<Arc<Self>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Self::open_in(file, path)
    }

    /// Like [`open`](Self::open), for a file the caller opened (a vhost-user inflight region handed back
    /// by the client); `label` names it in messages.
    pub fn open_in(file: File, label: &Path) -> std::io::Result<Arc<Self>> {
        let path = label;
        let actual = file.metadata()?.len() as usize;
        if actual < HEADER + CONFIG_AREA {
            return Err(invalid(format!(
                "{} is too short for a state file",
                path.display()
            )));
        }
        let mut head = [0u8; 24];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)?;
        if &head[..8] != MAGIC {
            return Err(invalid(format!("{} is not a vduse state file", path.display())));
        }
        let version = u32::from_ne_bytes(head[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(invalid(format!(
                "{}: state file version {version}, expected {VERSION}",
                path.display()
            )));
        }
        let num_queues = u32::from_ne_bytes(head[16..20].try_into().unwrap_or_default());
        let queue_size = u32::from_ne_bytes(head[20..24].try_into().unwrap_or_default());
        let (Ok(num_queues), Ok(queue_size)) = (u16::try_from(num_queues), u16::try_from(queue_size)) else {
            return Err(invalid("state file has an impossible queue layout"));
        };
        let len = file_len(num_queues, queue_size);
        if actual != len {
            return Err(invalid(format!(
                "{}: size {actual}, expected {len}",
                path.display()
            )));
        }
        Ok(Arc::new(Self::map(file, path, len, num_queues, queue_size)?))
    }

    /// What a state file says about its device, read without changing it (for `vduse list`).
    pub fn inspect(path: &Path) -> std::io::Result<StateSummary> {
        let file = File::open(path)?;
        let mut head = vec![0u8; HEADER];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)?;
        if &head[..8] != MAGIC {
            return Err(invalid(format!("{} is not a vduse state file", path.display())));
        }
        let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_ne_bytes(head[o..o + 8].try_into().unwrap_or_default());
        let str_at = |o: usize, cap: usize| {
            let raw = &head[o..o + cap];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(cap);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let version = u32_at(off::VERSION);
        if version != VERSION {
            return Err(invalid(format!(
                "{}: state file version {version}, expected {VERSION}",
                path.display()
            )));
        }
        Ok(StateSummary {
            device_id: u32_at(off::DEVICE_ID),
            num_queues: u32_at(off::NUM_QUEUES) as u16,
            queue_size: u32_at(off::QUEUE_SIZE) as u16,
            status: u32_at(off::STATUS) as u8,
            pid: u32_at(off::PID),
            servings: u64_at(off::SERVINGS),
            kind: str_at(off::DEVICE_KIND, KIND_LEN),
            backend: str_at(off::BACKEND, BACKEND_LEN),
        })
    }

    fn map(file: File, path: &Path, len: usize, num_queues: u16, queue_size: u16) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of the whole file, which has exactly `len` bytes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            path: path.to_owned(),
            num_queues,
            queue_size,
            file,
        })
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: in bounds and aligned (checked above; the mapping is page aligned); the mapping lives as
        // long as `self`.
        unsafe { &*(self.ptr.add(offset) as *const AtomicU32) }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: as in `u32_at`.
        unsafe { &*(self.ptr.add(offset) as *const AtomicU64) }
    }

    fn put_u32(&self, offset: usize, v: u32) {
        self.u32_at(offset).store(v, Ordering::Release);
    }

    fn get_u32(&self, offset: usize) -> u32 {
        self.u32_at(offset).load(Ordering::Acquire)
    }

    fn put_u64(&self, offset: usize, v: u64) {
        self.u64_at(offset).store(v, Ordering::Release);
    }

    fn get_u64(&self, offset: usize) -> u64 {
        self.u64_at(offset).load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file the state lives in.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn info(&self) -> StateInfo {
        let config_len = (self.get_u32(off::CONFIG_LEN) as usize).min(CONFIG_AREA);
        let mut config = vec![0u8; config_len];
        // SAFETY: the config area lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(HEADER), config.as_mut_ptr(), config_len) };
        StateInfo {
            device_id: self.get_u32(off::DEVICE_ID),
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            features: self.get_u64(off::FEATURES),
            config,
        }
    }

    /// Records the status the device acknowledged last.
    pub fn set_status(&self, status: u8) {
        self.put_u32(off::STATUS, u32::from(status));
    }

    pub fn status(&self) -> u8 {
        self.get_u32(off::STATUS) as u8
    }

    pub fn set_driver_features(&self, features: u64) {
        self.put_u64(off::DRIVER_FEATURES, features);
    }

    pub fn driver_features(&self) -> u64 {
        self.get_u64(off::DRIVER_FEATURES)
    }

    /// Updates the config bytes (online resize changes the capacity).
    pub fn set_config(&self, offset: usize, data: &[u8]) {
        let len = self.get_u32(off::CONFIG_LEN) as usize;
        if offset
            .checked_add(data.len())
            .is_some_and(|end| end <= len.min(CONFIG_AREA))
        {
            // SAFETY: in bounds of the config area (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(HEADER + offset), data.len())
            };
        }
    }

    /// The process that serves the device (the last one that created or opened the file).
    pub fn pid(&self) -> u32 {
        self.get_u32(off::PID)
    }

    /// This process takes the device over: it becomes the recorded server, one more serving.
    pub fn begin_serving(&self) {
        self.put_u32(off::PID, std::process::id());
        self.put_u64(off::SERVINGS, self.get_u64(off::SERVINGS) + 1);
    }

    /// How many servers have served this device (1 after creation, +1 per take-over).
    pub fn servings(&self) -> u64 {
        self.get_u64(off::SERVINGS)
    }

    /// A free-form tag of the model (e.g. "blk"), for tools that take the device over.
    /// Records the device model's short name ("blk").
    pub fn set_kind(&self, kind: &str) {
        self.put_str(off::DEVICE_KIND, KIND_LEN, kind);
    }

    pub fn kind(&self) -> String {
        self.get_str(off::DEVICE_KIND, KIND_LEN)
    }

    /// Records what stores the device's data, as a stable identity (empty: data that dies with the
    /// server, which cannot be taken over).
    pub fn set_backend(&self, backend: &str) {
        self.put_str(off::BACKEND, BACKEND_LEN, backend);
    }

    pub fn backend(&self) -> String {
        self.get_str(off::BACKEND, BACKEND_LEN)
    }

    fn put_str(&self, offset: usize, cap: usize, value: &str) {
        let bytes = value.as_bytes();
        let n = bytes.len().min(cap - 1);
        assert!(offset + cap <= HEADER);
        // SAFETY: `cap` bytes at `offset` lie inside the header page (asserted above).
        unsafe {
            std::ptr::write_bytes(self.ptr.add(offset), 0, cap);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), n);
        }
    }

    fn get_str(&self, offset: usize, cap: usize) -> String {
        let mut raw = vec![0u8; cap];
        assert!(offset + cap <= HEADER);
        // SAFETY: as in `put_str`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), raw.as_mut_ptr(), cap) };
        let end = raw.iter().position(|&b| b == 0).unwrap_or(cap);
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }

    /// The log of queue `index`.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueLog> {
        (index < self.num_queues).then(|| QueueLog {
            file: self.clone(),
            base: HEADER + CONFIG_AREA + usize::from(index) * queue_stride(self.queue_size),
            size: self.queue_size,
        })
    }

    /// Deletes the file (the device is gone for good).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from the successful mmap in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The in-flight log of one queue.
#[derive(Clone)]
pub struct QueueLog {
    file: Arc<StateFile>,
    base: usize,
    size: u16,
}

mod qoff {
    pub const USED_IDX: usize = 0;
    pub const NEXT_AVAIL: usize = 4;
    pub const COUNTER: usize = 8;
}

impl QueueLog {
    fn entry(&self, head: u16) -> Option<&AtomicU64> {
        (head < self.size).then(|| self.file.u64_at(self.base + QUEUE_HEADER + 8 * usize::from(head)))
    }

    /// Request `head` was popped: it is in flight from now on.
    pub fn begin(&self, head: u16) {
        let counter = self.file.u64_at(self.base + qoff::COUNTER);
        let n = counter.load(Ordering::Relaxed) + 1;
        counter.store(n, Ordering::Relaxed);
        if let Some(e) = self.entry(head) {
            e.store(n, Ordering::Release);
        }
    }

    /// Request `head` is in the used ring (call after the used index was published).
    pub fn end(&self, head: u16) {
        if let Some(e) = self.entry(head) {
            e.store(0, Ordering::Release);
        }
    }

    /// The used index the log has seen published (call after [`end`](Self::end) of what it covers).
    pub fn set_used_idx(&self, idx: u16) {
        self.file
            .u32_at(self.base + qoff::USED_IDX)
            .store(u32::from(idx), Ordering::Release);
    }

    pub fn used_idx(&self) -> u16 {
        self.file
            .u32_at(self.base + qoff::USED_IDX)
            .load(Ordering::Acquire) as u16
    }

    /// The avail index up to which the device has taken requests.
    pub fn set_next_avail(&self, idx: u16) {
        self.file
            .u32_at(self.base + qoff::NEXT_AVAIL)
            .store(u32::from(idx), Ordering::Release);
    }

    pub fn next_avail(&self) -> u16 {
        self.file
            .u32_at(self.base + qoff::NEXT_AVAIL)
            .load(Ordering::Acquire) as u16
    }

    /// Forgets every request (the driver reset the queue).
    pub fn clear(&self) {
        for head in 0..self.size {
            self.end(head);
        }
        self.set_used_idx(0);
        self.set_next_avail(0);
    }

    /// Fixes up a crash between publishing and logging: heads published after the log's `used_idx` (up to
    /// the ring's `ring_used`) are not in flight. `head_at(k)` reads the used ring's element `k`.
    pub fn repair(&self, ring_used: u16, mut head_at: impl FnMut(u16) -> Option<u16>) {
        let mut k = self.used_idx();
        // At most a ring's worth can be published without the log seeing it.
        let mut budget = self.size;
        while k != ring_used && budget > 0 {
            if let Some(head) = head_at(k) {
                self.end(head);
            }
            k = k.wrapping_add(1);
            budget -= 1;
        }
        self.set_used_idx(ring_used);
    }

    /// The heads in flight, in the order they were popped.
    pub fn in_flight(&self) -> Vec<u16> {
        let mut v: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|h| {
                let c = self.entry(h)?.load(Ordering::Acquire);
                (c != 0).then_some((c, h))
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StateInfo {
        StateInfo {
            device_id: 2,
            num_queues: 2,
            queue_size: 8,
            features: 0x3_0000_0000,
            config: vec![1, 2, 3, 4],
        }
    }

    #[test]
    fn a_crash_after_publishing_is_repaired_from_the_used_ring() {
        let dir = std::env::temp_dir().join(format!("vduse-state-{}", std::process::id()));
        let path = dir.join("dev0");
        let state = StateFile::create(&path, &info()).unwrap();
        state.set_status(0xf);
        state.set_kind("blk");
        state.set_backend("file:8:1234");
        let log = state.queue(1).unwrap();
        for head in [5, 2, 7] {
            log.begin(head);
        }
        // Head 2 was published (used ring index 0) but the process died before logging it.
        drop(log);
        drop(state);
        let summary = StateFile::inspect(&path).unwrap();
        assert_eq!(
            (summary.kind.as_str(), summary.backend.as_str(), summary.servings),
            ("blk", "file:8:1234", 1),
            "inspect reads without counting a serving"
        );
        let state = StateFile::open(&path).unwrap();
        assert_eq!(state.info(), info());
        assert_eq!(state.backend(), "file:8:1234");
        assert_eq!(state.servings(), 1, "opening is not serving");
        state.begin_serving();
        assert_eq!(state.status(), 0xf);
        assert_eq!(state.kind(), "blk");
        assert_eq!(state.servings(), 2);
        let log = state.queue(1).unwrap();
        assert_eq!(log.in_flight(), vec![5, 2, 7]);
        log.repair(1, |k| (k == 0).then_some(2));
        assert_eq!(
            log.in_flight(),
            vec![5, 7],
            "in pop order, without the published one"
        );
        assert_eq!(log.used_idx(), 1);
        assert!(state.queue(2).is_none());
        state.remove();
        assert!(StateFile::open(&path).is_err());
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn files_that_are_not_state_files_are_refused() {
        let path = std::env::temp_dir().join(format!("vduse-notstate-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 9000]).unwrap();
        assert_eq!(
            StateFile::open(&path).err().unwrap().kind(),
            std::io::ErrorKind::InvalidData
        );
        let _ = std::fs::remove_file(&path);
    }
}
