//! The FUSE wire format as the Linux virtio-fs driver speaks it (`include/uapi/linux/fuse.h`): opcodes,
//! flags, sizes, and a bounds-checked reader and writer for the little-endian structs. Nothing here
//! trusts a length the driver sent: every read is checked against the bytes that arrived.

/// The protocol major version, and the minor this device speaks (the kernel adapts to an older one).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 38;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;
pub const ATTR_BYTES: usize = 88;
pub const ENTRY_OUT: usize = 40 + ATTR_BYTES;
pub const ATTR_OUT: usize = 16 + ATTR_BYTES;
pub const OPEN_OUT: usize = 16;
pub const STATFS_OUT: usize = 80;
pub const INIT_OUT: usize = 64;
pub const DIRENT_BASE: usize = 24;
pub const DIRENTPLUS_BASE: usize = ENTRY_OUT + DIRENT_BASE;
pub const NAME_MAX: usize = 255;
pub const PATH_MAX: usize = 4096;
pub const XATTR_SIZE_MAX: usize = 65536;
/// Arguments of one request that are parsed (not streamed like a write's data): an xattr value fits.
pub const ARGS_MAX: usize = XATTR_SIZE_MAX + 2 * (NAME_MAX + 1) + 64;

/// FUSE opcodes this device knows.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
}

/// `fuse_init_out.flags` this device may grant.
pub mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    /// The server clears setuid/setgid bits and capabilities on write, truncate and open with
    /// O_TRUNC by a caller without CAP_FSETID (the driver says so per request); the driver then need
    /// not ask for `security.capability` before every write.
    pub const HANDLE_KILLPRIV_V2: u32 = 1 << 28;
    /// Entries with [`ATTR_SUBMOUNT`](super::ATTR_SUBMOUNT) are mount points: the driver mounts a
    /// superblock of their own there (own `st_dev`; renames and links across it fail with EXDEV).
    pub const SUBMOUNTS: u32 = 1 << 27;
}

/// `fuse_attr.flags`: this directory is the root of a submount (with [`init::SUBMOUNTS`]).
pub const ATTR_SUBMOUNT: u32 = 1 << 0;

/// `fuse_write_in.write_flags`: clear setuid/setgid (HANDLE_KILLPRIV_V2).
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fuse_open_in.open_flags` / `fuse_create_in.open_flags`: the same, for an open with O_TRUNC.
pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1;
    pub const KEEP_CACHE: u32 = 2;
    pub const CACHE_DIR: u32 = 8;
}

/// `fuse_setattr_in.valid`.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is set.
pub const GETATTR_FH: u32 = 1;
/// `fuse_fsync_in.fsync_flags`: data only.
pub const FSYNC_FDATASYNC: u32 = 1;

/// The request header (`fuse_in_header`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
}

impl InHeader {
    /// Parses the first [`IN_HEADER`] bytes; `None` if fewer arrived.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let mut r = Reader::new(b.get(..IN_HEADER)?);
        Some(Self {
            len: r.u32().ok()?,
            opcode: r.u32().ok()?,
            unique: r.u64().ok()?,
            nodeid: r.u64().ok()?,
            uid: r.u32().ok()?,
            gid: r.u32().ok()?,
            pid: r.u32().ok()?,
            total_extlen: r.u16().ok()?,
        })
    }
}

/// Why the arguments of a request could not be parsed: answered EINVAL and counted as malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// Reads little-endian fields and NUL-terminated names out of a request's arguments.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).ok_or(Malformed)?;
        let s = self.b.get(self.at..end).ok_or(Malformed)?;
        self.at = end;
        Ok(s)
    }
    pub fn skip(&mut self, n: usize) -> Result<(), Malformed> {
        self.bytes(n).map(|_| ())
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    /// The bytes up to the next NUL (which is consumed); none there: malformed.
    pub fn cstr(&mut self) -> Result<&'a [u8], Malformed> {
        let rest = self.b.get(self.at..).ok_or(Malformed)?;
        let n = rest.iter().position(|&c| c == 0).ok_or(Malformed)?;
        self.at += n + 1;
        Ok(&rest[..n])
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.b.get(self.at..).unwrap_or_default();
        self.at = self.b.len();
        r
    }
}

/// Whether `n` names one entry of a directory (what a lookup relative to its parent may resolve).
pub fn valid_name(n: &[u8]) -> bool {
    !n.is_empty() && n.len() <= NAME_MAX && !n.contains(&b'/') && n != b"." && n != b".."
}

/// Appends little-endian fields to a reply.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Pads with zeroes to a multiple of 8 bytes (directory entries).
    pub fn align8(&mut self) -> &mut Self {
        let n = self.buf.len().next_multiple_of(8);
        self.buf.resize(n, 0);
        self
    }

    /// `struct fuse_attr` from a host `stat`.
    pub fn attr(&mut self, st: &libc::stat) -> &mut Self {
        self.u64(st.st_ino)
            .u64(st.st_size as u64)
            .u64(st.st_blocks as u64)
            .i64(st.st_atime)
            .i64(st.st_mtime)
            .i64(st.st_ctime)
            .u32(st.st_atime_nsec as u32)
            .u32(st.st_mtime_nsec as u32)
            .u32(st.st_ctime_nsec as u32)
            .u32(st.st_mode)
            .u32(st.st_nlink as u32)
            .u32(st.st_uid)
            .u32(st.st_gid)
            .u32(encode_dev(st.st_rdev))
            .u32(st.st_blksize as u32)
            .u32(0)
    }

    /// `struct fuse_entry_out`.
    pub fn entry(&mut self, nodeid: u64, st: &libc::stat, valid: Validity) -> &mut Self {
        self.u64(nodeid)
            .u64(0)
            .u64(valid.entry.0)
            .u64(valid.attr.0)
            .u32(valid.entry.1)
            .u32(valid.attr.1)
            .attr(st)
    }
}

/// How long the driver may cache a name and a node's attributes: (seconds, nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Validity {
    pub entry: (u64, u32),
    pub attr: (u64, u32),
}

/// The kernel's "new" 32-bit device number encoding (`new_encode_dev`) the driver decodes `rdev` with.
pub fn encode_dev(dev: libc::dev_t) -> u32 {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// The inverse of [`encode_dev`], for MKNOD.
pub fn decode_dev(dev: u32) -> libc::dev_t {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Size of a directory entry holding a name of `name` bytes, padded to 8 bytes.
pub fn dirent_size(name: usize, plus: bool) -> usize {
    ((if plus { DIRENTPLUS_BASE } else { DIRENT_BASE }) + name).next_multiple_of(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_round_trip() {
        for (ma, mi) in [(0, 0), (8, 1), (259, 3), (4095, 0xfffff), (1, 256)] {
            let d = libc::makedev(ma, mi);
            assert_eq!(decode_dev(encode_dev(d)), d, "{ma}:{mi}");
        }
    }

    #[test]
    fn names_are_one_component() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", &[b'x'; 256]] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in [&b"a"[..], b"...", b".hidden", &[b'x'; 255]] {
            assert!(valid_name(good));
        }
        let mut r = Reader::new(b"abc");
        assert_eq!(r.cstr(), Err(Malformed), "no NUL");
        let mut r = Reader::new(b"a\0b\0");
        assert_eq!(r.cstr(), Ok(&b"a"[..]));
        assert_eq!(r.cstr(), Ok(&b"b"[..]));
        assert_eq!(r.cstr(), Err(Malformed));
    }

    #[test]
    fn attr_is_88_bytes_and_entry_128() {
        // SAFETY: an all-zero stat is a valid value.
        let st: libc::stat = unsafe { std::mem::zeroed() };
        let mut w = Writer::default();
        w.attr(&st);
        assert_eq!(w.buf.len(), ATTR_BYTES);
        let mut w = Writer::default();
        w.entry(5, &st, Validity::default());
        assert_eq!(w.buf.len(), ENTRY_OUT);
    }
}
