//! A driver in a test: raw FUSE requests over plain buffers to a `Server` sharing a fresh directory.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use vduse_core::queue::Gone;
use vduse_fs::abi::op;
use vduse_fs::{Config, PassthroughFs, ReqIo, Scratch, Server};

pub struct VecIo {
    pub input: Vec<u8>,
    pub output: Vec<u8>,
}

impl ReqIo for VecIo {
    fn readable(&self) -> usize {
        self.input.len()
    }
    fn writable(&self) -> usize {
        self.output.len()
    }
    fn read(&mut self, offset: usize, dst: &mut [u8]) -> Result<usize, Gone> {
        let src = self.input.get(offset..).unwrap_or_default();
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<usize, Gone> {
        let dst = self.output.get_mut(offset..).unwrap_or_default();
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vduse-fs-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Driver {
    pub server: Server,
    pub scratch: Scratch,
    unique: u64,
    pub uid: u32,
    pub gid: u32,
}

/// A reply: the errno (0 for success) and the payload after the header.
#[derive(Debug)]
pub struct Reply {
    pub errno: i32,
    pub data: Vec<u8>,
    pub used: u32,
}

impl Reply {
    pub fn ok(self) -> Vec<u8> {
        assert_eq!(self.errno, 0, "expected success");
        self.data
    }
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.data[at..at + 8].try_into().unwrap())
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.data[at..at + 4].try_into().unwrap())
    }
}

pub fn name(n: &str) -> Vec<u8> {
    let mut v = n.as_bytes().to_vec();
    v.push(0);
    v
}

/// A request: the 40-byte header (its length what is given, uid/gid/pid 0) then `args`.
pub fn request(opcode: u32, unique: u64, node: u64, args: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&((40 + args.len()) as u32).to_le_bytes());
    b.extend_from_slice(&opcode.to_le_bytes());
    b.extend_from_slice(&unique.to_le_bytes());
    b.extend_from_slice(&node.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    b.extend_from_slice(args);
    b
}

/// INIT's arguments as a 7.38 driver offering every flag sends them.
pub fn init_args() -> Vec<u8> {
    let mut a = le(&[7, 38, 65536, 0xffff_ffff], &[4, 4, 4, 4]);
    a.resize(64, 0);
    a
}

pub fn le(parts: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut v = Vec::new();
    for (x, w) in parts.iter().zip(widths) {
        v.extend_from_slice(&x.to_le_bytes()[..*w]);
    }
    v
}

impl Driver {
    pub fn new(cfg: Config) -> Self {
        let fs = PassthroughFs::new(cfg).expect("share");
        Self {
            server: Server::new(fs, 1 << 20),
            scratch: Scratch::default(),
            unique: 0,
            uid: 0,
            gid: 0,
        }
    }

    /// A started session (INIT answered).
    pub fn mounted(cfg: Config) -> Self {
        let mut d = Self::new(cfg);
        d.init();
        d
    }

    pub fn init(&mut self) -> Reply {
        let mut a = le(&[7, 38, 65536, 0xffff_ffff], &[4, 4, 4, 4]);
        a.resize(64, 0);
        let r = self.call(op::INIT, 0, &a, 16 + 64);
        assert_eq!(r.errno, 0);
        r
    }

    /// Sends a request; the header says exactly the length given unless `len` overrides it.
    pub fn raw(
        &mut self,
        opcode: u32,
        node: u64,
        args: &[u8],
        room: usize,
        len: Option<u32>,
    ) -> Result<Reply, Gone> {
        self.unique += 2;
        let mut input = Vec::new();
        let total = (40 + args.len()) as u32;
        input.extend_from_slice(&len.unwrap_or(total).to_le_bytes());
        input.extend_from_slice(&opcode.to_le_bytes());
        input.extend_from_slice(&self.unique.to_le_bytes());
        input.extend_from_slice(&node.to_le_bytes());
        input.extend_from_slice(&self.uid.to_le_bytes());
        input.extend_from_slice(&self.gid.to_le_bytes());
        input.extend_from_slice(&1u32.to_le_bytes());
        input.extend_from_slice(&[0u8; 4]);
        input.extend_from_slice(args);
        let head = input[..input.len().min(64)].to_vec();
        let mut io = VecIo {
            input,
            output: vec![0xAA; room],
        };
        let used = self.server.handle(&mut io, &head, &mut self.scratch)?;
        if used == 0 {
            return Ok(Reply {
                errno: 0,
                data: vec![],
                used,
            });
        }
        let out = &io.output;
        let len = u32::from_le_bytes(out[..4].try_into().unwrap());
        assert_eq!(len, used, "the header's length is what was used");
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), self.unique);
        let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
        Ok(Reply {
            errno: -err,
            data: out[16..used as usize].to_vec(),
            used,
        })
    }

    pub fn call(&mut self, opcode: u32, node: u64, args: &[u8], room: usize) -> Reply {
        self.raw(opcode, node, args, room, None)
            .expect("plain buffers are never fenced")
    }

    pub fn lookup(&mut self, parent: u64, n: &str) -> Result<u64, i32> {
        let r = self.call(op::LOOKUP, parent, &name(n), 16 + 128);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.u64_at(0))
    }

    /// Mode and size from an entry or attr reply at `attr_at`.
    pub fn attr_mode(r: &Reply, attr_at: usize) -> u32 {
        r.u32_at(attr_at + 60)
    }

    pub fn mkdir(&mut self, parent: u64, n: &str, mode: u32) -> Result<u64, i32> {
        let mut a = le(&[u64::from(mode), 0], &[4, 4]);
        a.extend(name(n));
        let r = self.call(op::MKDIR, parent, &a, 16 + 128);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.u64_at(0))
    }

    /// CREATE: (node, fh).
    pub fn create(&mut self, parent: u64, n: &str, flags: u32, mode: u32) -> Result<(u64, u64), i32> {
        let mut a = le(&[u64::from(flags), u64::from(mode), 0, 0], &[4, 4, 4, 4]);
        a.extend(name(n));
        let r = self.call(op::CREATE, parent, &a, 16 + 128 + 16);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok((r.u64_at(0), r.u64_at(128)))
    }

    pub fn open(&mut self, node: u64, flags: u32) -> Result<u64, i32> {
        let r = self.call(op::OPEN, node, &le(&[u64::from(flags), 0], &[4, 4]), 32);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.u64_at(0))
    }

    pub fn opendir(&mut self, node: u64) -> Result<u64, i32> {
        let r = self.call(op::OPENDIR, node, &le(&[0, 0], &[4, 4]), 32);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.u64_at(0))
    }

    pub fn write(&mut self, fh: u64, pos: u64, data: &[u8]) -> Result<u32, i32> {
        let mut a = le(&[fh, pos, data.len() as u64, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
        a.extend_from_slice(data);
        let r = self.call(op::WRITE, 0, &a, 24);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.u32_at(0))
    }

    pub fn read(&mut self, fh: u64, pos: u64, size: u32) -> Result<Vec<u8>, i32> {
        let a = le(&[fh, pos, u64::from(size), 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
        let r = self.call(op::READ, 0, &a, 16 + size as usize);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.data)
    }

    pub fn release(&mut self, fh: u64, dir: bool) {
        let r = self.call(
            if dir { op::RELEASEDIR } else { op::RELEASE },
            0,
            &le(&[fh, 0, 0], &[8, 8, 8]),
            16,
        );
        assert_eq!(r.errno, 0);
    }

    pub fn forget(&mut self, node: u64, n: u64) {
        let r = self.call(op::FORGET, node, &n.to_le_bytes(), 0);
        assert_eq!(r.used, 0);
    }

    /// READDIR(PLUS) from `offset`: (name, next offset, nodeid if plus).
    pub fn readdir(
        &mut self,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> Result<Vec<(String, u64, u64)>, i32> {
        let a = le(&[fh, offset, u64::from(size), 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
        let r = self.call(
            if plus { op::READDIRPLUS } else { op::READDIR },
            0,
            &a,
            16 + size as usize,
        );
        if r.errno != 0 {
            return Err(r.errno);
        }
        let mut out = Vec::new();
        let mut at = 0;
        let d = &r.data;
        while at < d.len() {
            let (node, base) = if plus {
                (u64::from_le_bytes(d[at..at + 8].try_into().unwrap()), at + 128)
            } else {
                (0, at)
            };
            let off = u64::from_le_bytes(d[base + 8..base + 16].try_into().unwrap());
            let len = u32::from_le_bytes(d[base + 16..base + 20].try_into().unwrap()) as usize;
            let n = String::from_utf8_lossy(&d[base + 24..base + 24 + len]).into_owned();
            out.push((n, off, node));
            at = (base + 24 + len).next_multiple_of(8);
        }
        Ok(out)
    }
}
