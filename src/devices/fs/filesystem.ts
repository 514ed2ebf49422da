// The file-system API a virtio-fs device serves: inode-level, like libfuse's low-level API and
// fuse-backend-rs's `FileSystem`, in Node's idiom — methods return values or promises, errors are thrown.
import { constants } from 'node:os'

import { E, type Attr, type ErrnoName } from './fuse'

export type { Attr, Timespec } from './fuse'

/**
 * Who asks, and a signal that aborts when the answer stops mattering (a driver reset, a timeout): stop
 * working on it — a write must not be applied after it aborted (the driver may send it again). Valid
 * until the call's result is answered.
 */
export interface FsContext {
  uid: number
  gid: number
  pid: number
  signal: AbortSignal
}

/** A node the driver may now refer to by `attr.ino` (its node id). */
export interface Entry {
  attr: Attr
  /** How long the driver may cache the name → node mapping (seconds; default: the device's). */
  entryTimeout?: number
  /** How long the driver may cache the attributes (seconds; default: the device's). */
  attrTimeout?: number
  /** Tells a reused inode number apart from its previous life (NFS export; default 0). */
  generation?: number
}

const BRAND = Symbol.for('vduse.PassthroughMount')

/** How a {@link PassthroughMount} serves its host directory (as `FsDevice`'s `sharedDir` options). */
export interface PassthroughMountOptions {
  /** The host directory. */
  dir: string
  /** What the driver may cache: `never`, `auto` (default) or `always` (see `FsDeviceOptions.cache`). */
  cache?: 'never' | 'auto' | 'always'
  /** Refuse every change under it with EROFS (the device's `readOnly` applies too). */
  readOnly?: boolean
  /** Extended attributes the driver sees: `off`, `user` (default) or `all`. */
  xattr?: 'off' | 'user' | 'all'
  /** Let the driver create device nodes under it (default false: EPERM). */
  allowDevices?: boolean
  /** Let lookups enter file systems mounted under it (default false: EACCES). */
  crossMounts?: boolean
  /** Nodes the driver may know in it at once (default 1,048,576; lowered to fit the fd limit). */
  maxNodes?: number
  /** Open files and directories in it at once (default 65,536; lowered to fit the fd limit). */
  maxHandles?: number
}

/**
 * A host directory a TypeScript file system hands over to the native path: its `lookup` returns
 * `{ mount }` for the name where it is mounted, and the driver then mounts the directory there (a
 * submount: its own `st_dev`; renames and links across it fail with EXDEV). Every request under it is
 * served in Rust on the queues' threads, with the same confinement as `sharedDir` — no JavaScript runs
 * for it. The file system lists its mounts in `mounts()` before the device is created. Needs a native
 * transport (VDUSE or vhost-user).
 */
export class PassthroughMount {
  readonly options: Readonly<PassthroughMountOptions>

  /**
   * Whether `x` is a PassthroughMount — also one made by another copy of this package (a plugin's),
   * which `instanceof` would not recognise.
   */
  static is(x: unknown): x is PassthroughMount {
    return typeof x === 'object' && x !== null && (x as Record<symbol, unknown>)[BRAND] === true
  }

  constructor(options: PassthroughMountOptions) {
    Object.defineProperty(this, BRAND, { value: true })
    const dir = options?.dir
    if (typeof dir !== 'string' || dir.length === 0 || dir.includes('\0')) {
      throw new TypeError('a PassthroughMount needs dir, the path of a host directory')
    }
    this.options = Object.freeze({ ...options })
  }

  get dir(): string {
    return this.options.dir
  }
}

/** What `lookup` returns for the name where a host directory is mounted. */
export interface MountEntry {
  mount: PassthroughMount
}

/** Whether a `lookup` answer is a mount point. */
export function isMountEntry(x: unknown): x is MountEntry {
  return typeof x === 'object' && x !== null && PassthroughMount.is((x as MountEntry).mount)
}

/** What `open`, `opendir` and `create` may return: a handle of the file system's choosing, and cache hints. */
export interface OpenResult<H> {
  /** Handed back to `read`, `write`, `release`, … for this open file. */
  handle?: H
  /** Bypass the page cache: every read and write reaches the file system (FOPEN_DIRECT_IO). */
  directIo?: boolean
  /** Keep cached data from earlier opens (FOPEN_KEEP_CACHE). */
  keepCache?: boolean
  /** The file has no positions (FOPEN_NONSEEKABLE). */
  nonSeekable?: boolean
  /** Cache the directory's entries (FOPEN_CACHE_DIR, opendir only). */
  cacheDir?: boolean
}

/** Changes `setattr` applies; only the present fields change. */
export interface SetAttr {
  mode?: number
  uid?: number
  gid?: number
  /** Truncate or extend to this size. */
  size?: number
  /** A time, or `'now'`. */
  atime?: Attr['atime'] | 'now'
  mtime?: Attr['mtime'] | 'now'
  ctime?: Attr['ctime']
}

/** One directory entry; `offset` is the cookie that resumes the listing after it. */
export interface DirEntry {
  name: string
  ino: number
  /** File type bits (S_IFDIR, …) or a full mode. */
  mode: number
  offset: number
  /**
   * The entry's attributes, when they are at hand: the driver then learns the node without a `lookup`
   * (READDIRPLUS). An entry with attributes counts as a lookup (see `forget`).
   */
  attr?: Attr
  /**
   * Set where a host directory is mounted (the name `lookup` answers with `{ mount }`): the entry then
   * names no node, whatever `attr` says, so that the driver looks the name up and finds the mount.
   */
  mount?: PassthroughMount
}

/** `statfs` answer; missing counts read as 0, `bsize`/`frsize` default to 4096, `namelen` to 255. */
export interface StatFs {
  blocks?: number
  bfree?: number
  bavail?: number
  files?: number
  ffree?: number
  bsize?: number
  namelen?: number
  frsize?: number
}

/**
 * The data of one read or write. Move it with `copyFrom` (a read: into the driver's buffers) and
 * `copyTo` (a write: out of them) — one native copy, no allocation — as `BlockIo` does.
 */
export interface FileIo {
  /** Byte position in the file. */
  readonly offset: number
  /** Bytes asked for (a read) or given (a write). */
  readonly length: number
  /**
   * A read: copies `length` bytes of `source` from `sourceOffset` to byte `at` of the reply. A read
   * answers how many bytes it produced (short at end of file). False: the request is gone, or the range
   * is outside the request or `source`.
   */
  copyFrom(source: Uint8Array, sourceOffset?: number, length?: number, at?: number): boolean
  /** A write: copies `length` bytes of the data from byte `at` into `target` at `targetOffset`. */
  copyTo(target: Uint8Array, targetOffset?: number, length?: number, at?: number): boolean
}

/** What `init` tells the file system about the session the driver started. */
export interface FsInitInfo {
  /** Protocol version the driver speaks (`7.46` as `{ major: 7, minor: 46 }`). */
  major: number
  minor: number
  /** Largest write the driver will send, in bytes. */
  maxWrite: number
}

/** A value, or a promise of one. */
export type Maybe<T> = T | Promise<T>

/**
 * A file system a `FsDevice` serves. Node ids are the file system's inode numbers (`Attr.ino`); the root
 * is node 1. Every method may return a promise. To fail, throw an `FsError` (or any error whose `code`
 * is an errno name such as `'ENOENT'`, as Node's `fs` errors are); anything else fails the request with
 * EIO and is reported (`requestError`). A missing optional method answers ENOSYS (the driver then
 * stops asking for FLUSH, FSYNC, xattrs, …), except `open`/`opendir`/`release`/`releasedir`, which
 * succeed without a handle.
 *
 * The device validates what the driver sends before a method is called: names (no '/', no NUL, not
 * '.' or '..', at most 255 bytes), node ids (only ones the driver was told of), handles (only open
 * ones), sizes and offsets. It counts lookups: every node the file system returns — from `lookup`,
 * `create`, `mkdir`, `mknod`, `symlink`, `link`, or a `readdir` entry with `attr` — is either passed to
 * the driver and counted, or not; `forget(ino)` is called once the driver holds no reference to it (or
 * never got it), and when a session ends. A removed node's data may go then.
 */
export interface FileSystem<H = unknown> {
  /** A driver (re)started a session: a new mount. Nodes and handles of an earlier one were forgotten. */
  init?(info: FsInitInfo): Maybe<void>
  /** The driver ended the session (unmount). */
  destroy?(): Maybe<void>
  /** A node, or `{ mount }` where a host directory of `mounts()` is mounted. */
  lookup(parent: number, name: string, ctx: FsContext): Maybe<Entry | Attr | MountEntry>
  /**
   * The host directories `lookup` may return (`{ mount }`), read once when the device is created: the
   * device serves them natively from then on.
   */
  mounts?(): Iterable<PassthroughMount>
  /** The driver forgot node `ino` entirely (every lookup of it was given back). */
  forget?(ino: number): void
  getattr(ino: number, ctx: FsContext, handle?: H): Maybe<Attr>
  setattr?(ino: number, changes: SetAttr, ctx: FsContext, handle?: H): Maybe<Attr>
  readlink?(ino: number, ctx: FsContext): Maybe<string | Uint8Array>
  symlink?(parent: number, name: string, target: string, ctx: FsContext): Maybe<Entry | Attr>
  mknod?(parent: number, name: string, mode: number, rdev: number, ctx: FsContext): Maybe<Entry | Attr>
  mkdir?(parent: number, name: string, mode: number, ctx: FsContext): Maybe<Entry | Attr>
  unlink?(parent: number, name: string, ctx: FsContext): Maybe<void>
  rmdir?(parent: number, name: string, ctx: FsContext): Maybe<void>
  /** `flags`: 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2). */
  rename?(
    parent: number,
    name: string,
    newParent: number,
    newName: string,
    flags: number,
    ctx: FsContext,
  ): Maybe<void>
  link?(ino: number, newParent: number, newName: string, ctx: FsContext): Maybe<Entry | Attr>
  /** `flags`: the open(2) flags (O_ACCMODE, O_TRUNC, O_APPEND, …). */
  open?(ino: number, flags: number, ctx: FsContext): Maybe<OpenResult<H> | void>
  /** Produces up to `io.length` bytes at `io.offset` with `io.copyFrom` and returns how many (or returns the bytes). */
  read(ino: number, io: FileIo, handle: H | undefined, ctx: FsContext): Maybe<number | Uint8Array>
  /** Consumes `io.length` bytes with `io.copyTo`; returns how many were written. */
  write?(ino: number, io: FileIo, handle: H | undefined, ctx: FsContext): Maybe<number>
  flush?(ino: number, handle: H | undefined, ctx: FsContext): Maybe<void>
  release?(ino: number, handle: H | undefined): Maybe<void>
  fsync?(ino: number, datasync: boolean, handle: H | undefined, ctx: FsContext): Maybe<void>
  opendir?(ino: number, flags: number, ctx: FsContext): Maybe<OpenResult<H> | void>
  /**
   * The entries after cookie `offset` (0: from the start, `.` and `..` included), in a stable order. The
   * device takes as many as fit the driver's buffer: return a lazy iterable (a generator) for big
   * directories.
   */
  readdir(ino: number, offset: number, handle: H | undefined, ctx: FsContext): Maybe<Iterable<DirEntry>>
  releasedir?(ino: number, handle: H | undefined): Maybe<void>
  fsyncdir?(ino: number, datasync: boolean, handle: H | undefined, ctx: FsContext): Maybe<void>
  statfs?(ino: number, ctx: FsContext): Maybe<StatFs>
  /** `mask`: R_OK | W_OK | X_OK, or F_OK. */
  access?(ino: number, mask: number, ctx: FsContext): Maybe<void>
  create?(
    parent: number,
    name: string,
    mode: number,
    flags: number,
    ctx: FsContext,
  ): Maybe<OpenResult<H> & { entry: Entry | Attr }>
  /** The value (throw ENODATA when there is none). */
  getxattr?(ino: number, name: string, ctx: FsContext): Maybe<Uint8Array>
  /** `flags`: XATTR_CREATE (1), XATTR_REPLACE (2). */
  setxattr?(ino: number, name: string, value: Buffer, flags: number, ctx: FsContext): Maybe<void>
  listxattr?(ino: number, ctx: FsContext): Maybe<string[]>
  removexattr?(ino: number, name: string, ctx: FsContext): Maybe<void>
  /** `mode`: 0, FALLOC_FL_KEEP_SIZE (1), FALLOC_FL_PUNCH_HOLE (2) | KEEP_SIZE, … */
  fallocate?(
    ino: number,
    mode: number,
    offset: number,
    length: number,
    handle: H | undefined,
    ctx: FsContext,
  ): Maybe<void>
  /** SEEK_SET/CUR/END as for lseek(2), SEEK_DATA (3), SEEK_HOLE (4); returns the new position. */
  lseek?(ino: number, offset: number, whence: number, handle: H | undefined, ctx: FsContext): Maybe<number>
}

/** An error a file system throws to answer a request with an errno. */
export class FsError extends Error {
  readonly errno: number
  constructor(
    readonly code: ErrnoName,
    message?: string,
  ) {
    super(message ?? code)
    this.name = 'FsError'
    this.errno = E[code]
  }
}

/** The positive errno an error stands for, or undefined when it names none. */
export function errnoOf(err: unknown): number | undefined {
  if (err instanceof FsError) return err.errno
  const code = (err as { code?: unknown } | null)?.code
  if (typeof code === 'string') {
    // Own names only: 'constructor' or '__proto__' name no errno.
    if (Object.hasOwn(E, code)) return E[code as ErrnoName]
    const n: unknown = Object.hasOwn(constants.errno, code)
      ? (constants.errno as Record<string, unknown>)[code]
      : undefined
    if (typeof n === 'number' && Number.isInteger(n) && n > 0) return n
  }
  return undefined
}

/** Whether `x` is an `Entry` rather than a bare `Attr`. */
export function isEntry(x: Entry | Attr): x is Entry {
  return (x as Entry).attr !== undefined
}
