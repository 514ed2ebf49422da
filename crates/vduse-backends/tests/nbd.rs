//! The native NBD transmission phase against real servers (qemu-nbd, nbdkit) over UNIX sockets: data
//! round-trips through concurrent senders, structured replies (holes) are assembled, errors come back
//! as errnos, and a server that dies hands every command in flight back exactly once.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vduse_backends::nbd::conn::{Command, ConnError, Connection, Receiver};
use vduse_backends::nbd::proto::*;

mod servers;
use servers::*;

/// A test's command: its id and where read data lands.
struct Cmd {
    id: u64,
    data: Vec<u8>,
}

enum Event {
    Done(u64, Vec<u8>, u32),
    Lost(Vec<u64>, String),
}

struct Events(Mutex<Sender<Event>>);

impl Receiver<Cmd> for Events {
    fn data(&self, cmd: &mut Cmd, at: u32, bytes: &[u8]) {
        cmd.data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }
    fn zeroes(&self, cmd: &mut Cmd, at: u32, len: u32) {
        cmd.data[at as usize..(at + len) as usize].fill(0);
    }
    fn done(&self, cmd: Cmd, error: u32) {
        let _ = self.0.lock().unwrap().send(Event::Done(cmd.id, cmd.data, error));
    }
    fn lost(&self, orphans: Vec<Cmd>, why: ConnError) {
        let ids = orphans.iter().map(|c| c.id).collect();
        let _ = self.0.lock().unwrap().send(Event::Lost(ids, why.to_string()));
    }
}

fn connect(sock: &Path) -> (Arc<Connection<Cmd>>, std::sync::mpsc::Receiver<Event>, u64) {
    let (s, size, _) = handshake(sock);
    let (tx, rx) = channel();
    let conn = Connection::start(OwnedFd::from(s), true, Arc::new(Events(Mutex::new(tx)))).unwrap();
    (conn, rx, size)
}

fn cmd(command: u16, offset: u64, length: u32) -> Command {
    Command {
        command,
        flags: 0,
        offset,
        length,
    }
}

fn next(rx: &std::sync::mpsc::Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("an answer within 30 s")
}

#[test]
fn writes_from_concurrent_senders_read_back_with_holes_assembled() {
    let server = qemu_nbd("rw", 64 << 20);
    let (conn, rx, size) = connect(&server.sock);
    assert_eq!(size, 64 << 20);
    // Four threads write 64 blocks of 64 KiB each, interleaved on one connection.
    let senders: Vec<_> = (0..4u64)
        .map(|t| {
            let conn = conn.clone();
            std::thread::spawn(move || {
                for k in 0..64u64 {
                    let id = t * 64 + k;
                    let data = pattern(id, 64 << 10);
                    let c = Cmd { id, data: Vec::new() };
                    conn.send(
                        cmd(CMD_WRITE, id * (64 << 10), 64 << 10),
                        &[&data[..1000], &data[1000..]],
                        c,
                    )
                    .map_err(|(_, e)| e)
                    .unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let mut acked = 0;
    while acked < 256 {
        match next(&rx) {
            Event::Done(_, _, 0) => acked += 1,
            Event::Done(id, _, e) => panic!("write {id} failed: errno {e}"),
            Event::Lost(_, why) => panic!("lost: {why}"),
        }
    }
    conn.send(
        cmd(CMD_FLUSH, 0, 0),
        &[],
        Cmd {
            id: 1000,
            data: Vec::new(),
        },
    )
    .map_err(|(_, e)| e)
    .unwrap();
    assert!(matches!(next(&rx), Event::Done(1000, _, 0)));
    // Reads of 1 MiB spanning written data and a never-written (sparse) tail: qemu-nbd answers the tail
    // as a hole chunk.
    for r in 0..17u64 {
        let c = Cmd {
            id: r,
            data: vec![0xee; 1 << 20],
        };
        conn.send(cmd(CMD_READ, r << 20, 1 << 20), &[], c)
            .map_err(|(_, e)| e)
            .unwrap();
    }
    for _ in 0..17 {
        let Event::Done(r, data, 0) = next(&rx) else {
            panic!("a read failed")
        };
        for (k, block) in data.chunks(64 << 10).enumerate() {
            let id = r * 16 + k as u64;
            if id < 256 {
                assert!(block == pattern(id, 64 << 10), "block {id}");
            } else {
                assert!(block.iter().all(|&b| b == 0), "block {id} is a hole");
            }
        }
    }
    assert_eq!(conn.in_flight(), 0);
    conn.disconnect();
    assert!(matches!(next(&rx), Event::Lost(ids, _) if ids.is_empty()));
}

#[test]
fn a_server_error_comes_back_as_its_errno() {
    // nbdkit's error filter fails every read with EIO.
    let server = nbdkit(
        "err",
        &[
            "--filter=error",
            "memory",
            "16M",
            "error=EIO",
            "error-pread-rate=100%",
        ],
    );
    let (conn, rx, _) = connect(&server.sock);
    conn.send(
        cmd(CMD_READ, 0, 4096),
        &[],
        Cmd {
            id: 1,
            data: vec![0; 4096],
        },
    )
    .map_err(|(_, e)| e)
    .unwrap();
    let Event::Done(1, data, errno) = next(&rx) else {
        panic!("no answer")
    };
    assert_eq!(errno, 5);
    assert!(
        data.iter().all(|&b| b == 0),
        "nothing delivered for a failed read"
    );
    // The connection is still usable.
    conn.send(
        cmd(CMD_WRITE, 0, 4),
        &[b"abcd"],
        Cmd {
            id: 2,
            data: Vec::new(),
        },
    )
    .map_err(|(_, e)| e)
    .unwrap();
    assert!(matches!(next(&rx), Event::Done(2, _, 0)));
}

#[test]
fn a_server_that_dies_hands_every_command_in_flight_back_once_and_takes_no_more() {
    // Every command takes 2 s: all are in flight when the server is killed.
    let mut server = nbdkit(
        "die",
        &["--filter=delay", "memory", "16M", "rdelay=2", "wdelay=2"],
    );
    let (conn, rx, _) = connect(&server.sock);
    for id in 0..8u64 {
        let (c, len) = if id % 2 == 0 {
            (CMD_READ, 4096)
        } else {
            (CMD_WRITE, 0)
        };
        let payload = [0u8; 4096];
        let parts: &[&[u8]] = if c == CMD_WRITE { &[&payload] } else { &[] };
        conn.send(
            cmd(c, id * 4096, 4096),
            parts,
            Cmd {
                id,
                data: vec![0; len],
            },
        )
        .map_err(|(_, e)| e)
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(conn.in_flight(), 8);
    server.child.kill().unwrap();
    match next(&rx) {
        Event::Lost(ids, why) => {
            assert_eq!(ids, (0..8).collect::<Vec<_>>(), "oldest first");
            assert!(why.contains("closed"), "{why}");
        }
        Event::Done(id, _, _) => panic!("{id} answered by a dead server"),
    }
    assert!(conn.ended());
    // Nothing more is taken: the command comes straight back.
    let Err((c, _)) = conn.send(
        cmd(CMD_FLUSH, 0, 0),
        &[],
        Cmd {
            id: 99,
            data: Vec::new(),
        },
    ) else {
        panic!("a dead connection took a command")
    };
    assert_eq!(c.id, 99);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "nothing answered twice"
    );
}

#[test]
fn close_cuts_a_slow_command_and_hands_it_back() {
    let server = nbdkit("cut", &["--filter=delay", "memory", "16M", "delay-trim=30"]);
    let (conn, rx, _) = connect(&server.sock);
    conn.send(
        cmd(CMD_TRIM, 0, 1 << 20),
        &[],
        Cmd {
            id: 7,
            data: Vec::new(),
        },
    )
    .map_err(|(_, e)| e)
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(conn.silent_for() >= Duration::from_millis(150));
    let t = Instant::now();
    conn.close("a test cut it");
    match next(&rx) {
        Event::Lost(ids, why) => {
            assert_eq!(ids, vec![7]);
            assert!(why.contains("a test cut it"));
        }
        Event::Done(..) => panic!("answered after the cut"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(server);
}
