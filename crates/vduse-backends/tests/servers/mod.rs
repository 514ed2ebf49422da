//! Real NBD servers for the tests (qemu-nbd, nbdkit) on UNIX sockets, and the handshake the library
//! leaves to its caller.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vduse-nbd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn wait_for(sock: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < end,
            "the server never listened on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// qemu-nbd serving a sparse raw image of `size` bytes (several clients at once, multi-conn).
pub fn qemu_nbd(tag: &str, size: u64) -> Server {
    let dir = tempdir(tag);
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let sock = dir.join("nbd.sock");
    let child = Process::new("qemu-nbd")
        .args([
            "--format=raw",
            "--persistent",
            "--shared=8",
            "--cache=writeback",
            "--socket",
        ])
        .arg(&sock)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-nbd (apt install qemu-utils)");
    // A probe connection may count against --shared: it closes at once.
    wait_for(&sock);
    Server { child, dir, sock }
}

/// nbdkit with `args` (plugin, filters), foreground, on a UNIX socket.
pub fn nbdkit(tag: &str, args: &[&str]) -> Server {
    let dir = tempdir(tag);
    let sock = dir.join("nbd.sock");
    let child = spawn_nbdkit(&sock, args);
    Server { child, dir, sock }
}

/// Starts nbdkit on `sock` (a stale socket file of a killed one is removed first); returns once it
/// listens.
pub fn spawn_nbdkit(sock: &Path, args: &[&str]) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Process::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nbdkit (apt install nbdkit)");
    wait_for(sock);
    child
}

/// The handshake (the library leaves it to its caller): fixed newstyle, structured replies, NBD_OPT_GO
/// on the default export. Returns the socket in transmission mode, the export size and flags.
pub fn handshake(sock: &Path) -> (UnixStream, u64, u16) {
    let mut s = UnixStream::connect(sock).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[0..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let option = |s: &mut UnixStream, opt: u32, data: &[u8]| {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend(opt.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        s.write_all(&m).unwrap();
    };
    let reply = |s: &mut UnixStream| -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0; len];
        s.read_exact(&mut d).unwrap();
        (u32::from_be_bytes(h[12..16].try_into().unwrap()), d)
    };
    option(&mut s, 8, &[]); // NBD_OPT_STRUCTURED_REPLY
    assert_eq!(reply(&mut s).0, 1, "structured replies");
    option(&mut s, 7, &[0, 0, 0, 0, 0, 0]); // NBD_OPT_GO, export "", no info requests
    let (mut size, mut flags) = (0, 0);
    loop {
        let (kind, d) = reply(&mut s);
        match kind {
            3 if u16::from_be_bytes([d[0], d[1]]) == 0 => {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            3 => {}
            1 => break,
            other => panic!("NBD_OPT_GO refused: {other:#x}"),
        }
    }
    (s, size, flags)
}

/// Deterministic bytes for block `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
