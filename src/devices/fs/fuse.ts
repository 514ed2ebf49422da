// The FUSE wire format as the Linux virtio-fs driver speaks it (include/uapi/linux/fuse.h): opcodes,
// flags, and encoders for the reply structures. Little-endian, as on every host VDUSE runs on.

/** The protocol major version, and the minor this device speaks (the kernel adapts to an older one). */
export const FUSE_KERNEL_VERSION = 7
export const FUSE_KERNEL_MINOR_VERSION = 38
/** The root directory's node id. */
export const FUSE_ROOT_ID = 1

/** FUSE opcodes. */
export const OP = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
  SYNCFS: 50,
} as const

/** `fuse_init_out.flags` (and `flags2` << 32) this device may grant. */
export const INIT = {
  ASYNC_READ: 1 << 0,
  ATOMIC_O_TRUNC: 1 << 3,
  BIG_WRITES: 1 << 5,
  AUTO_INVAL_DATA: 1 << 12,
  DO_READDIRPLUS: 1 << 13,
  READDIRPLUS_AUTO: 1 << 14,
  ASYNC_DIO: 1 << 15,
  WRITEBACK_CACHE: 1 << 16,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  CACHE_SYMLINKS: 1 << 23,
  /** Entries flagged as submounts get a superblock of their own in the driver (host directories mounted in the tree). */
  SUBMOUNTS: 1 << 27,
} as const

/** `fuse_open_out.open_flags`. */
export const FOPEN = { DIRECT_IO: 1, KEEP_CACHE: 2, NONSEEKABLE: 4, CACHE_DIR: 8 } as const

/** `fuse_setattr_in.valid`. */
export const FATTR = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  FH: 1 << 6,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
  LOCKOWNER: 1 << 9,
  CTIME: 1 << 10,
  KILL_SUIDGID: 1 << 11,
} as const

export const IN_HEADER = 40
export const OUT_HEADER = 16
export const ATTR_BYTES = 88
export const ENTRY_OUT = 40 + ATTR_BYTES
export const ATTR_OUT = 16 + ATTR_BYTES
export const OPEN_OUT = 16
export const STATFS_OUT = 80
export const INIT_OUT = 64
export const DIRENT_BASE = 24
export const DIRENTPLUS_BASE = ENTRY_OUT + DIRENT_BASE
/** Longest name in a directory, as Linux has it. */
export const NAME_MAX = 255
/** Longest symlink target and xattr name list we accept. */
export const PATH_MAX = 4096
export const XATTR_NAME_MAX = 255
export const XATTR_SIZE_MAX = 65536

/** File type bits of `mode` (S_IFMT) and the types. */
export const S_IFMT = 0o170000
export const S_IFSOCK = 0o140000
export const S_IFLNK = 0o120000
export const S_IFREG = 0o100000
export const S_IFBLK = 0o060000
export const S_IFDIR = 0o040000
export const S_IFCHR = 0o020000
export const S_IFIFO = 0o010000

/** A node's attributes as the driver sees them (`struct fuse_attr`); times in seconds + nanoseconds. */
export interface Attr {
  ino: number
  /** Type and permission bits (S_IFREG | 0o644, …). */
  mode: number
  nlink: number
  uid: number
  gid: number
  size: number
  /** 512-byte blocks allocated (default: size rounded up). */
  blocks?: number
  rdev?: number
  /** Preferred I/O size (default 4096). */
  blksize?: number
  atime: Timespec
  mtime: Timespec
  ctime: Timespec
}

/** A time: whole seconds since the epoch and nanoseconds. */
export interface Timespec {
  sec: number
  nsec: number
}

/** Writes `struct fuse_attr` at `at`. */
export function encodeAttr(b: Buffer, at: number, a: Attr): void {
  b.writeBigUInt64LE(BigInt(a.ino), at)
  b.writeBigUInt64LE(BigInt(a.size), at + 8)
  b.writeBigUInt64LE(BigInt(a.blocks ?? Math.ceil(a.size / 512)), at + 16)
  b.writeBigInt64LE(BigInt(a.atime.sec), at + 24)
  b.writeBigInt64LE(BigInt(a.mtime.sec), at + 32)
  b.writeBigInt64LE(BigInt(a.ctime.sec), at + 40)
  b.writeUInt32LE(a.atime.nsec, at + 48)
  b.writeUInt32LE(a.mtime.nsec, at + 52)
  b.writeUInt32LE(a.ctime.nsec, at + 56)
  b.writeUInt32LE(a.mode >>> 0, at + 60)
  b.writeUInt32LE(a.nlink >>> 0, at + 64)
  b.writeUInt32LE(a.uid >>> 0, at + 68)
  b.writeUInt32LE(a.gid >>> 0, at + 72)
  b.writeUInt32LE((a.rdev ?? 0) >>> 0, at + 76)
  b.writeUInt32LE(a.blksize ?? 4096, at + 80)
  b.writeUInt32LE(0, at + 84)
}

/** Splits a validity in seconds into `[sec, nsec]`. */
export function splitSeconds(s: number): [bigint, number] {
  const whole = Math.floor(s)
  return [BigInt(whole), Math.round((s - whole) * 1e9)]
}

/** Writes `struct fuse_entry_out` at `at`. */
export function encodeEntry(
  b: Buffer,
  at: number,
  nodeid: number,
  attr: Attr,
  entryValid: number,
  attrValid: number,
  generation = 0,
): void {
  const [es, en] = splitSeconds(entryValid)
  const [as, an] = splitSeconds(attrValid)
  b.writeBigUInt64LE(BigInt(nodeid), at)
  b.writeBigUInt64LE(BigInt(generation), at + 8)
  b.writeBigUInt64LE(es, at + 16)
  b.writeBigUInt64LE(as, at + 24)
  b.writeUInt32LE(en, at + 32)
  b.writeUInt32LE(an, at + 36)
  encodeAttr(b, at + 40, attr)
}

/** Size of a directory entry (`fuse_dirent`) holding a name of `nameBytes`, padded to 8 bytes. */
export function direntSize(nameBytes: number, plus: boolean): number {
  return ((plus ? DIRENTPLUS_BASE : DIRENT_BASE) + nameBytes + 7) & ~7
}

/** The `d_type` of a mode (DT_REG, DT_DIR, …). */
export function direntType(mode: number): number {
  return (mode & S_IFMT) >>> 12
}

/** Linux errno numbers the device answers with (the host's, from `os.constants` where present). */
export const E = {
  EPERM: 1,
  ENOENT: 2,
  ENXIO: 6,
  EIO: 5,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  EXDEV: 18,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  EFBIG: 27,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  EMLINK: 31,
  ERANGE: 34,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOTEMPTY: 39,
  ELOOP: 40,
  ENODATA: 61,
  EPROTO: 71,
  EOVERFLOW: 75,
  EILSEQ: 84,
  EOPNOTSUPP: 95,
  ETIMEDOUT: 110,
  ESTALE: 116,
} as const
export type ErrnoName = keyof typeof E

export { OP as FUSE_OP }
/** File type bits of `Attr.mode`. */
export const S_IF = {
  FMT: S_IFMT,
  SOCK: S_IFSOCK,
  LNK: S_IFLNK,
  REG: S_IFREG,
  BLK: S_IFBLK,
  DIR: S_IFDIR,
  CHR: S_IFCHR,
  FIFO: S_IFIFO,
} as const
