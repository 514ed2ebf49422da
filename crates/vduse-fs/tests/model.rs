//! `FsModel` on real split rings (the core's rig): requests popped from a queue, served, completed with
//! the reply's length; a write fenced between two chunks stops there; a new driver session forgets all.

mod common;

use common::{init_args, le, name, request, Driver, TempDir, VecIo};
use std::sync::Arc;
use vduse_core::model::{Completer, DeviceModel};
use vduse_core::queue::{Budget, Gone, RequestBatch};
use vduse_core::rig::{desc, offer, used, Rig};
use vduse_fs::abi::op;
use vduse_fs::{Config, FsModel, PassthroughFs, ReqIo, Server};
use vm_memory::{Bytes, GuestAddress};

const NEXT: u32 = 1;
const WRITE: u32 = 2;
const REQ: u64 = 0x10_000;
const REPLY: u64 = 0x80_000;

/// Writes a request of `opcode` with `args` where the chain's readable descriptor points; its length.
fn write_request(rig: &Rig, unique: u64, opcode: u32, node: u64, args: &[u8]) -> u32 {
    let b = request(opcode, unique, node, args);
    rig.map.write_slice(&b, GuestAddress(REQ)).unwrap();
    b.len() as u32
}

struct Device {
    rig: Rig,
    ring: vduse_core::rig::DriverRing,
    model: FsModel,
    completer: Completer,
    batch: RequestBatch,
    unique: u64,
}

impl Device {
    fn new(dir: &std::path::Path) -> Self {
        let rig = Rig::new();
        let (ring, q) = rig.queue(300, false);
        let fs = PassthroughFs::new(Config::new(dir)).unwrap();
        Self {
            model: FsModel::new(Arc::new(Server::new(fs, 1 << 20))),
            completer: Completer::new(q),
            rig,
            ring,
            batch: RequestBatch::default(),
            unique: 0,
        }
    }

    /// One request through the queue: (errno, reply payload).
    fn call(&mut self, opcode: u32, node: u64, args: &[u8], room: u32) -> (i32, Vec<u8>) {
        self.unique += 1;
        let from = self.ring.used_idx();
        let len = write_request(&self.rig, self.unique, opcode, node, args);
        // One chain: the request (readable), then room for the reply (writable).
        let table = [(0, desc(REQ, len, NEXT, 1)), (1, desc(REPLY, room, WRITE, 0))];
        offer(&self.ring, &table, &[0]);
        self.completer.queue().pop(Budget::default(), &mut self.batch);
        self.model.handle(1, &self.batch, &self.completer);
        let done = used(&self.ring, from);
        assert_eq!(done.len(), 1, "answered once");
        let len = done[0].1 as usize;
        if len == 0 {
            return (0, vec![]);
        }
        let mut out = vec![0u8; len];
        self.rig.map.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
        assert_eq!(
            u32::from_le_bytes(out[..4].try_into().unwrap()) as usize,
            len,
            "header length = used length"
        );
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), self.unique);
        (
            -i32::from_le_bytes(out[4..8].try_into().unwrap()),
            out[16..].to_vec(),
        )
    }
}

#[test]
fn requests_on_a_ring_are_served_and_completed_with_their_reply() {
    let dir = TempDir::new("model");
    let mut d = Device::new(&dir.0);
    assert_eq!(d.call(op::INIT, 0, &init_args(), 80).0, 0);
    let mut a = le(&[libc::O_RDWR as u64, 0o644, 0, 0], &[4, 4, 4, 4]);
    a.extend(name("f"));
    let (e, r) = d.call(op::CREATE, 1, &a, 16 + 144);
    assert_eq!(e, 0);
    let fh = u64::from_le_bytes(r[128..136].try_into().unwrap());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut w = le(&[fh, 0, data.len() as u64, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    w.extend_from_slice(&data);
    let (e, r) = d.call(op::WRITE, 0, &w, 24);
    assert_eq!((e, u32::from_le_bytes(r[..4].try_into().unwrap())), (0, 300_000));
    assert_eq!(std::fs::read(dir.0.join("f")).unwrap(), data);
    let rd = le(&[fh, 0, 300_000, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    let (e, r) = d.call(op::READ, 0, &rd, 16 + 300_000);
    assert_eq!(e, 0);
    assert_eq!(r, data, "read back through the ring (pinned or staged)");
    // A reply with no room: completed empty, never beyond the buffer.
    let (e, r) = d.call(op::GETATTR, 1, &[0; 16], 8);
    assert_eq!((e, r.len()), (0, 0));
    // A new driver session (a reset, then DRIVER_OK): the next request finds nothing of the last one.
    d.model.started(0);
    assert_eq!(
        d.call(op::GETATTR, 1, &[0; 16], 120).0,
        libc::EIO,
        "no session until INIT"
    );
    assert_eq!(
        d.model.server().fs().counts(),
        (0, 0),
        "every fd of the last session closed"
    );
}

/// Plain buffers whose request is fenced once `reads_left` reads have been served.
struct Fencing {
    inner: VecIo,
    reads_left: usize,
}

impl ReqIo for Fencing {
    fn readable(&self) -> usize {
        self.inner.readable()
    }
    fn writable(&self) -> usize {
        self.inner.writable()
    }
    fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<usize, Gone> {
        if self.reads_left == 0 {
            return Err(Gone);
        }
        self.reads_left -= 1;
        self.inner.read(offset, dst)
    }
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<usize, Gone> {
        self.inner.write(offset, src)
    }
}

#[test]
fn a_write_fenced_between_chunks_stops_there_and_is_not_answered() {
    let dir = TempDir::new("fenced");
    let mut d = Driver::mounted(Config::new(&dir.0));
    let (_, fh) = d.create(1, "f", libc::O_RDWR as u32, 0o644).unwrap();
    let size = 600 * 1024;
    let mut input = Vec::new();
    input.extend_from_slice(&((40 + 40 + size) as u32).to_le_bytes());
    input.extend_from_slice(&op::WRITE.to_le_bytes());
    input.extend_from_slice(&[0u8; 32]);
    input.extend(le(&[fh, 0, size as u64, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]));
    input.extend(std::iter::repeat_n(0x5a, size));
    let head = input[..64].to_vec();
    // The write's header is read, then its first 256 KiB chunk; the fence comes before the second.
    let mut io = Fencing {
        inner: VecIo {
            input,
            output: vec![0; 24],
        },
        reads_left: 2,
    };
    assert_eq!(d.server.handle(&mut io, &head, &mut d.scratch), Err(Gone));
    let on_disk = std::fs::read(dir.0.join("f")).unwrap();
    assert_eq!(on_disk.len(), 256 * 1024, "only what was read before the fence");
    assert!(on_disk.iter().all(|&b| b == 0x5a));
    assert!(io.inner.output.iter().all(|&b| b == 0), "no reply written");
}

#[test]
fn a_write_straight_from_the_ring_lands_whole_and_a_fenced_one_not_at_all() {
    let dir = TempDir::new("pinned");
    let mut d = Device::new(&dir.0);
    assert_eq!(d.call(op::INIT, 0, &init_args(), 80).0, 0);
    let mut a = le(&[libc::O_RDWR as u64, 0o644, 0, 0], &[4, 4, 4, 4]);
    a.extend(name("f"));
    let (_, r) = d.call(op::CREATE, 1, &a, 16 + 144);
    let fh = u64::from_le_bytes(r[128..136].try_into().unwrap());
    // 1 MiB in one chain: on ext4 or tmpfs, a page-cache file, so pinned and written in one pwritev.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut w = le(&[fh, 4096, data.len() as u64, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    w.extend_from_slice(&data);
    let (e, r) = d.call(op::WRITE, 0, &w, 24);
    assert_eq!((e, u32::from_le_bytes(r[..4].try_into().unwrap())), (0, 1 << 20));
    let on_disk = std::fs::read(dir.0.join("f")).unwrap();
    assert_eq!(on_disk.len(), 4096 + (1 << 20));
    assert_eq!(&on_disk[4096..], &data[..]);
    let fs = d.model.server().fs();
    let page_cache = fs.handle(fh).unwrap().zero_copy();
    assert_eq!(
        fs.handle(fh).unwrap().zero_copy_writes(),
        page_cache,
        "a page-cache file: straight from the buffers"
    );
    // Opened O_SYNC: the write waits for the disk inside the call, so never with the buffers pinned.
    let mut a = le(
        &[(libc::O_RDWR | libc::O_SYNC) as u64, 0o644, 0, 0],
        &[4, 4, 4, 4],
    );
    a.extend(name("s"));
    let (_, r) = d.call(op::CREATE, 1, &a, 16 + 144);
    let sync_fh = u64::from_le_bytes(r[128..136].try_into().unwrap());
    assert!(!d.model.server().fs().handle(sync_fh).unwrap().zero_copy_writes());
    if !page_cache {
        eprintln!("the temp dir is not on a page-cache file system: these writes were staged");
    }
    let mut w = le(&[sync_fh, 0, 8192, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    w.extend(std::iter::repeat_n(0x77, 8192));
    let (e, r) = d.call(op::WRITE, 0, &w, 24);
    assert_eq!((e, u32::from_le_bytes(r[..4].try_into().unwrap())), (0, 8192));
    assert_eq!(std::fs::read(dir.0.join("s")).unwrap(), vec![0x77; 8192]);

    // Popped, then the queue reset before the model gets to it: the ticket is dead, nothing is written
    // from the driver's memory and nothing is answered.
    d.unique += 1;
    let mut w = le(&[fh, 0, 8192, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    w.extend(std::iter::repeat_n(0xEE, 8192));
    let len = write_request(&d.rig, d.unique, op::WRITE, 0, &w);
    let from = d.ring.used_idx();
    offer(
        &d.ring,
        &[(0, desc(REQ, len, NEXT, 1)), (1, desc(REPLY, 24, WRITE, 0))],
        &[0],
    );
    let q = d.completer.queue().clone();
    q.pop(Budget::default(), &mut d.batch);
    assert_eq!(d.batch.len(), 1);
    let (fenced, _maps) = q.stop();
    assert_eq!(fenced, 1);
    d.model.handle(1, &d.batch, &d.completer);
    assert!(
        used(&d.ring, from).is_empty(),
        "a fenced request is never answered"
    );
    let on_disk = std::fs::read(dir.0.join("f")).unwrap();
    assert!(
        on_disk[..4096].iter().all(|&b| b == 0),
        "nothing of the fenced write landed"
    );
    assert_eq!(&on_disk[4096..8192], &data[..4096]);
}
