//! `FsRouter`: host directories mounted inside another server's tree. Requests are told apart by node id
//! alone; what crosses trees fails with EXDEV; BATCH_FORGET is split; the mounts' sessions follow the
//! INIT and DESTROY the other server answers; on a real ring, the other server's requests stay in
//! flight, forwarded, while the mounts' are answered.

mod common;

use std::sync::Arc;

use common::{init_args, le, name, request, TempDir, VecIo};
use vduse_core::model::{Completer, DeviceModel};
use vduse_core::queue::{Budget, Done, RequestBatch};
use vduse_core::rig::{desc, offer, used, Rig};
use vduse_fs::abi::{self, op};
use vduse_fs::router::{mount_id_base, Routed, OTHER_IDS_END};
use vduse_fs::{Config, FsRouter, PassthroughFs, Scratch, Server};
use vm_memory::{Bytes, GuestAddress};

fn mount(dir: &TempDir, index: usize) -> Arc<Server> {
    let mut cfg = Config::new(&dir.0);
    cfg.id_base = mount_id_base(index);
    Arc::new(Server::new(PassthroughFs::new(cfg).unwrap(), 1 << 20))
}

struct Bench {
    router: FsRouter,
    scratch: Scratch,
    unique: u64,
}

/// (routed, errno, payload).
type Sent = (Routed, i32, Vec<u8>);

impl Bench {
    fn new(dirs: &[&TempDir]) -> Self {
        let mounts = dirs.iter().enumerate().map(|(i, d)| mount(d, i)).collect();
        Self {
            router: FsRouter::new(mounts, 2).unwrap(),
            scratch: Scratch::default(),
            unique: 0,
        }
    }

    fn send(&mut self, opcode: u32, node: u64, args: &[u8]) -> Sent {
        self.unique += 1;
        let input = request(opcode, self.unique, node, args);
        let head = input[..input.len().min(64)].to_vec();
        let mut io = VecIo {
            input,
            output: vec![0; 4096],
        };
        let routed = self.router.route(&mut io, &head, &mut self.scratch);
        let errno = -i32::from_le_bytes(io.output[4..8].try_into().unwrap());
        let used = match routed {
            Routed::Answered(Ok(n)) => n as usize,
            _ => 0,
        };
        let payload = io.output[16.min(used)..used].to_vec();
        (routed, errno, payload)
    }

    fn init(&mut self) {
        assert_eq!(
            self.send(op::INIT, 0, &init_args()).0,
            Routed::Forward,
            "the session is the other server's"
        );
    }

    fn lookup(&mut self, parent: u64, n: &str) -> (i32, u64) {
        let (r, errno, p) = self.send(op::LOOKUP, parent, &name(n));
        assert!(matches!(r, Routed::Answered(Ok(_))), "{r:?}");
        (
            errno,
            if errno == 0 {
                u64::from_le_bytes(p[..8].try_into().unwrap())
            } else {
                0
            },
        )
    }
}

fn answered(errno: i32) -> impl Fn(&Sent) -> bool {
    move |s: &Sent| matches!(s.0, Routed::Answered(Ok(_))) && s.1 == errno
}

#[test]
fn requests_go_by_node_id_and_nothing_crosses_trees() {
    let (a, b) = (TempDir::new("router-a"), TempDir::new("router-b"));
    std::fs::write(a.0.join("f"), b"in a").unwrap();
    std::fs::create_dir(a.0.join("d")).unwrap();
    let mut t = Bench::new(&[&a, &b]);
    let (root_a, root_b) = (mount_id_base(0) + 1, mount_id_base(1) + 1);

    // Nothing of a mount is served before the other server's INIT.
    assert!(answered(libc::EIO)(&t.send(op::GETATTR, root_a, &[0; 16])));
    t.init();

    // The mount point's LOOKUP, answered for the other server: the root, flagged as a submount.
    let mut io = VecIo {
        input: request(op::LOOKUP, 77, 1, &name("data")),
        output: vec![0; 4096],
    };
    let head = io.input.clone();
    let n = t.router.answer_mount(0, &mut io, &head, (7, 0)).unwrap() as usize;
    assert_eq!(n, 16 + abi::ENTRY_OUT);
    assert_eq!(u64::from_le_bytes(io.output[8..16].try_into().unwrap()), 77);
    assert_eq!(u64::from_le_bytes(io.output[16..24].try_into().unwrap()), root_a);
    let attr_flags = u32::from_le_bytes(io.output[n - 4..n].try_into().unwrap());
    assert_eq!(attr_flags, abi::ATTR_SUBMOUNT);
    let entry_valid = u64::from_le_bytes(io.output[32..40].try_into().unwrap());
    assert_eq!(entry_valid, 7, "the name's validity is the other tree's");
    // A mount that does not exist, or not a LOOKUP: errors.
    let n = t.router.answer_mount(5, &mut io, &head, (7, 0)).unwrap() as usize;
    assert_eq!(
        (n, i32::from_le_bytes(io.output[4..8].try_into().unwrap())),
        (16, -libc::ENOENT)
    );

    // Inside a mount: served here, with ids of its own range.
    let (errno, f) = t.lookup(root_a, "f");
    assert_eq!(errno, 0);
    assert!(f > root_a && f < mount_id_base(1), "{f:#x}");
    let (_, d) = t.lookup(root_a, "d");
    // The other server's nodes, and malformed headers: forwarded.
    assert_eq!(t.send(op::GETATTR, 1, &[0; 16]).0, Routed::Forward);
    assert_eq!(
        t.send(op::GETATTR, OTHER_IDS_END - 1, &[0; 16]).0,
        Routed::Forward
    );
    assert_eq!(t.send(op::INTERRUPT, 0, &[0; 8]).0, Routed::Forward);
    let mut io = VecIo {
        input: vec![1, 2, 3],
        output: vec![0; 64],
    };
    assert_eq!(
        t.router.route(&mut io, &[1, 2, 3], &mut Scratch::default()),
        Routed::Forward
    );
    // Ids of no tree: ESTALE, never forwarded (the other server would take them for its own).
    assert!(answered(libc::ESTALE)(&t.send(
        op::GETATTR,
        OTHER_IDS_END,
        &[0; 16]
    )));
    assert!(answered(libc::ESTALE)(&t.send(
        op::GETATTR,
        mount_id_base(2) + 1,
        &[0; 16]
    )));
    assert_eq!(
        t.send(op::FORGET, mount_id_base(2) + 1, &le(&[1], &[8])).0,
        Routed::Answered(Ok(0))
    );

    // Renames, links and copies across trees: EXDEV, both ways, and between two mounts.
    let rename = |to: u64, from: &str, new: &str| {
        let mut v = le(&[to], &[8]);
        v.extend(name(from));
        v.extend(name(new));
        v
    };
    assert!(answered(libc::EXDEV)(&t.send(
        op::RENAME,
        root_a,
        &rename(1, "f", "g")
    )));
    assert!(answered(libc::EXDEV)(&t.send(
        op::RENAME,
        1,
        &rename(root_a, "x", "f")
    )));
    assert!(answered(libc::EXDEV)(&t.send(
        op::RENAME,
        root_a,
        &rename(root_b, "f", "g")
    )));
    let mut r2 = le(&[root_b, 0], &[8, 8]);
    r2.extend(name("f"));
    r2.extend(name("g"));
    assert!(answered(libc::EXDEV)(&t.send(op::RENAME2, root_a, &r2)));
    let mut link = le(&[f], &[8]);
    link.extend(name("l"));
    assert!(answered(libc::EXDEV)(&t.send(op::LINK, 1, &link)));
    let mut link = le(&[5], &[8]);
    link.extend(name("l"));
    assert!(answered(libc::EXDEV)(&t.send(op::LINK, root_a, &link)));
    let copy = le(&[0, 0, 1, 0, 0, 4096, 0], &[8, 8, 8, 8, 8, 8, 8]);
    assert!(answered(libc::EXDEV)(&t.send(op::COPY_FILE_RANGE, f, &copy)));
    assert!(a.0.join("f").exists() && !b.0.join("g").exists());
    // Within one mount: done.
    assert!(answered(0)(&t.send(op::RENAME, root_a, &rename(d, "f", "g"))));
    assert_eq!(std::fs::read(a.0.join("d/g")).unwrap(), b"in a");
    assert_eq!(
        t.router
            .counters()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        9
    );
}

#[test]
fn batch_forget_is_split_and_sessions_follow_init_and_destroy() {
    let a = TempDir::new("router-forget");
    for f in ["x", "y"] {
        std::fs::write(a.0.join(f), b"").unwrap();
    }
    let mut t = Bench::new(&[&a]);
    let root = mount_id_base(0) + 1;
    t.init();
    let (_, x) = t.lookup(root, "x");
    let (_, y) = t.lookup(root, "y");
    let nodes = |t: &Bench| t.router.mounts()[0].fs().counts().0;
    assert_eq!(nodes(&t), 2);
    let batch = |entries: &[(u64, u64)]| {
        let mut v = le(&[entries.len() as u64, 0], &[4, 4]);
        for &(id, n) in entries {
            v.extend(le(&[id, n], &[8, 8]));
        }
        v
    };
    // Only the mount's nodes: forgotten here, nothing forwarded.
    assert_eq!(
        t.send(op::BATCH_FORGET, 0, &batch(&[(x, 1)])).0,
        Routed::Answered(Ok(0))
    );
    assert_eq!(nodes(&t), 1);
    // Mixed: the mount's part forgotten here, and forwarded for the other server's.
    assert_eq!(
        t.send(op::BATCH_FORGET, 0, &batch(&[(7, 1), (y, 1)])).0,
        Routed::Forward
    );
    assert_eq!(nodes(&t), 0);
    // A count that does not match the length: the other server answers it as malformed.
    let mut bad = batch(&[(7, 1)]);
    bad[0] = 9;
    assert_eq!(t.send(op::BATCH_FORGET, 0, &bad).0, Routed::Forward);

    // DESTROY (forwarded) ends the mount's session: its nodes go, its requests fail until the next INIT.
    let (_, x) = t.lookup(root, "x");
    assert_eq!(nodes(&t), 1);
    assert_eq!(t.send(op::DESTROY, 0, &[]).0, Routed::Forward);
    assert_eq!(nodes(&t), 0);
    assert!(answered(libc::EIO)(&t.send(op::GETATTR, root, &[0; 16])));
    t.init();
    assert!(answered(0)(&t.send(op::GETATTR, root, &[0; 16])));
    assert!(
        answered(libc::ESTALE)(&t.send(op::GETATTR, x, &[0; 16])),
        "ids never come back"
    );
    // A driver reset: the next request finds the old session gone, and a mount point is not answered
    // with a root of it.
    let (_, x) = t.lookup(root, "x");
    t.router.started(0);
    let mut io = VecIo {
        input: request(op::LOOKUP, 9, 1, &name("data")),
        output: vec![0; 4096],
    };
    let head = io.input.clone();
    assert_eq!(t.router.answer_mount(0, &mut io, &head, (1, 0)), Ok(16));
    assert_eq!(
        i32::from_le_bytes(io.output[4..8].try_into().unwrap()),
        -libc::EIO
    );
    assert!(answered(libc::EIO)(&t.send(op::GETATTR, x, &[0; 16])));
    assert_eq!(nodes(&t), 0);
}

#[test]
fn a_mount_never_answers_enosys_for_what_the_driver_would_turn_off_for_every_tree() {
    let a = TempDir::new("router-xattr");
    let mut cfg = Config::new(&a.0);
    cfg.id_base = mount_id_base(0);
    cfg.xattr = vduse_fs::XattrPolicy::Off;
    let server = Arc::new(Server::new(PassthroughFs::new(cfg).unwrap(), 1 << 20));
    let mut t = Bench {
        router: FsRouter::new(vec![server], 2).unwrap(),
        scratch: Scratch::default(),
        unique: 0,
    };
    t.init();
    let mut get = le(&[64, 0], &[4, 4]);
    get.extend(name("user.x"));
    assert!(answered(libc::EOPNOTSUPP)(&t.send(
        op::GETXATTR,
        mount_id_base(0) + 1,
        &get
    )));
}

#[test]
fn mounts_must_use_their_own_ids() {
    let a = TempDir::new("router-ids");
    let plain = Arc::new(Server::new(
        PassthroughFs::new(Config::new(&a.0)).unwrap(),
        1 << 20,
    ));
    assert!(FsRouter::new(vec![plain], 2).is_err());
    assert!(FsRouter::new(vec![], 2).is_err());
    assert!(FsRouter::new(vec![mount(&a, 1)], 2).is_err());
    let mut cfg = Config::new(&a.0);
    cfg.id_base = 12345;
    assert!(PassthroughFs::new(cfg).is_err());
}

const NEXT: u32 = 1;
const WRITE: u32 = 2;

#[test]
fn on_a_ring_the_other_servers_requests_stay_in_flight_forwarded() {
    let a = TempDir::new("router-ring");
    std::fs::write(a.0.join("f"), b"x").unwrap();
    let rig = Rig::new();
    let (ring, q) = rig.queue(300, false);
    let router = FsRouter::new(vec![mount(&a, 0)], 2).unwrap();
    let completer = Completer::new(q.clone());
    let mut batch = RequestBatch::default();
    let root = mount_id_base(0) + 1;
    // Three chains at once: INIT (forwarded), a LOOKUP in the mount, a GETATTR of the other tree.
    let mut init = le(&[7, 38, 65536, 0], &[4, 4, 4, 4]);
    init.resize(64, 0);
    let reqs = [
        request(op::INIT, 1, 0, &init),
        request(op::LOOKUP, 2, root, &name("f")),
        request(op::GETATTR, 3, 1, &[0; 16]),
    ];
    let mut table = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let at = 0x10_000 + i as u64 * 0x1000;
        rig.map.write_slice(r, GuestAddress(at)).unwrap();
        let d = (i * 2) as u16;
        table.push((d, desc(at, r.len() as u32, NEXT, d + 1)));
        table.push((d + 1, desc(0x80_000 + i as u64 * 0x1000, 512, WRITE, 0)));
    }
    offer(&ring, &table, &[0, 2, 4]);
    let from = ring.used_idx();
    q.pop(Budget::default(), &mut batch);
    // INIT first in the batch: the LOOKUP after it is served (the driver never sends one before INIT's
    // answer; a ring in order shows the mount is up by the time INIT has passed).
    router.handle(1, &batch, &completer);
    let done = used(&ring, from);
    assert_eq!(done.len(), 1, "only the mount's request is answered: {done:?}");
    assert_eq!(done[0].0, 2, "the LOOKUP's chain head");
    let fwd = &router.forwards()[1];
    let mut got = Vec::new();
    assert!(!fwd.take(16, &mut got));
    assert_eq!(got.len(), 2);
    assert_eq!(fwd.wake_fd().read().unwrap(), 1, "one wake for the batch");
    assert_eq!(&got[0].header()[..8], &reqs[0][..8]);
    assert_eq!(got[1].header(), &reqs[2][..]);
    // The other server answers through the ticket, like any model.
    let reply = [0u8; 16];
    assert_eq!(
        q.write_request(got[1].ticket, vduse_core::queue::Owner::Model, 0, &reply),
        Ok(16)
    );
    q.complete_all([Done::new(got[1].ticket, 16, None)]);
    let done = used(&ring, from);
    assert_eq!(done.len(), 2);
    assert_eq!(done[1], (4, 16));
}
