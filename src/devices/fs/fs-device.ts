import { release } from 'node:os'

import { kernelAtLeast } from '../../control'
import { VduseError, asError } from '../../errors'
import type { FsCounters, RequestSource } from '../../transport/source'
import type { RequestBatch } from '../../transport/batch'
import { VirtioDevice, type VirtioDeviceEvents, type VirtioDeviceOptions } from '../../virtio/device'
import {
  PassthroughMount,
  errnoOf,
  isEntry,
  isMountEntry,
  type MountEntry,
  type Attr,
  type DirEntry,
  type Entry,
  type FileIo,
  type FileSystem,
  type FsContext,
  type Maybe,
  type OpenResult,
  type SetAttr,
  type StatFs,
} from './filesystem'
import {
  ATTR_OUT,
  DIRENT_BASE,
  DIRENTPLUS_BASE,
  E,
  ENTRY_OUT,
  FATTR,
  FOPEN,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_ROOT_ID,
  INIT,
  INIT_OUT,
  IN_HEADER,
  NAME_MAX,
  OP,
  OPEN_OUT,
  OUT_HEADER,
  PATH_MAX,
  STATFS_OUT,
  S_IFBLK,
  S_IFCHR,
  S_IFDIR,
  S_IFIFO,
  S_IFLNK,
  S_IFMT,
  S_IFREG,
  S_IFSOCK,
  XATTR_NAME_MAX,
  XATTR_SIZE_MAX,
  direntSize,
  direntType,
  encodeAttr,
  encodeEntry,
  splitSeconds,
} from './fuse'

/** The virtio device id of a file system. */
export const VIRTIO_ID_FS = 26
const CONFIG_BYTES = 40
const TAG_BYTES = 36
const PAGE = 4096
/** Arguments of one request that are parsed (not streamed like a write's data): an xattr value fits. */
const ARGS_MAX = XATTR_SIZE_MAX + 2 * (NAME_MAX + 1) + 64
/** File types a node may have. */
const VALID_TYPES = new Set([S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK])
/** What the driver takes for "nothing to do" after an ENOSYS: answered so when the file system lacks it. */
const NOTHING_TO_DO = new Set<number>([OP.FSYNC, OP.FSYNCDIR, OP.FLUSH, OP.SYNCFS])
/** Never answered ENOSYS: the driver would turn them off for the whole session. */
const NEVER_ENOSYS = new Set<number>([OP.OPEN, OP.OPENDIR, OP.CREATE])
/** Host directories one tree may mount: each takes its share of the process's descriptors. */
const MAX_MOUNTS = 64
/** RENAME_NOREPLACE | RENAME_EXCHANGE; RENAME_WHITEOUT is refused. */
const RENAME_FLAGS = 1 | 2

export interface FsDeviceOptions<H = unknown> extends Omit<VirtioDeviceOptions, 'recover' | 'stateDir'> {
  /** The tag the driver mounts (`mount -t virtiofs TAG /mnt`): 1–36 bytes of UTF-8. */
  tag: string
  /**
   * The file system to serve, in TypeScript. Give this or `sharedDir`.
   */
  fs?: FileSystem<H>
  /**
   * Share this host directory instead, served natively (Rust, on the queues' threads: no JavaScript per
   * request). Every name the driver sends is resolved beneath the directory, one component at a time
   * relative to its parent's file descriptor; symlinks are never followed on the host. Needs a native
   * transport (VDUSE or vhost-user). `entryTimeout`, `attrTimeout` and `requestTimeoutMs` are for a
   * TypeScript `fs`; here `cache` decides.
   */
  sharedDir?: string
  /**
   * What the driver may cache (`sharedDir`): `never` (every access asks the host; direct I/O),
   * `auto` (default: names and attributes for 1 s, data until the file changes), `always` (a day;
   * only the driver changes the directory).
   */
  cache?: 'never' | 'auto' | 'always'
  /** Extended attributes the driver sees (`sharedDir`): `off`, `user` (default: `user.*` only), `all`. */
  xattr?: 'off' | 'user' | 'all'
  /**
   * Let the driver create character and block device nodes in `sharedDir` (default false: EPERM). The
   * driver creates files as the uid it names, root included: share a directory mounted `nosuid,nodev`.
   */
  allowDevices?: boolean
  /**
   * Let lookups in `sharedDir` enter file systems mounted inside it (default false: a mount point answers
   * EACCES). procfs, sysfs and the kernel's other own file systems are never entered.
   */
  crossMounts?: boolean
  /** Request queues besides the high-priority one (default 1, at most 64). */
  requestQueues?: number
  /** Ring size per queue, a power of two (default 256). */
  queueSize?: number
  /** Default entry and attribute cache time given to the driver (seconds, default 1). */
  entryTimeout?: number
  attrTimeout?: number
  /** Largest read or write the driver may send (bytes, a multiple of 4096 up to 1 MiB; default 1 MiB). */
  maxWrite?: number
  /** Nodes the driver may know at once (default 1,048,576); further lookups fail with ENFILE. */
  maxNodes?: number
  /** Open files and directories at once (default 65,536); further opens fail with EMFILE. */
  maxHandles?: number
  /** Refuse every change with EROFS. */
  readOnly?: boolean
  /**
   * Longest a file-system call may take (ms; default 0: no limit). The request is then answered with
   * ETIMEDOUT and its `ctx.signal` aborts; what the call returns later is dropped (a node it returns is
   * forgotten, a handle released).
   */
  requestTimeoutMs?: number
  /** Let the driver cache writes and send them later (FUSE_WRITEBACK_CACHE; default false). */
  writebackCache?: boolean
}

/** Counters of the virtio-fs model. */
export interface FsStats {
  /** Requests received, by all queues. */
  requests: number
  /** Requests answered with an error. */
  errors: number
  /** Requests refused as malformed (bad lengths, names, node ids or handles). */
  malformed: number
  /** Requests answered ENOSYS (operations the file system does not implement). */
  unsupported: number
  /** FUSE sessions the driver started (mounts). */
  sessions: number
  /** Nodes the driver knows now, and open handles. */
  nodes: number
  handles: number
  /** A shared directory only: file data moved, and the node and handle limits in force. */
  bytesRead?: number
  bytesWritten?: number
  /** A shared directory only: FSYNC, FSYNCDIR and SYNCFS done on the host. */
  syncs?: number
  maxNodes?: number
  maxHandles?: number
}

export interface FsDeviceEvents extends VirtioDeviceEvents {
  /** The driver started a FUSE session (a mount): protocol version and granted flags. */
  session: [info: { major: number; minor: number; flags: number; maxWrite: number }]
}

interface Handle {
  ino: number
  dir: boolean
  value: unknown
  /** Calls running with it: a release waits for them (a handle may be an fd a write still uses). */
  busy: number
  /** Released (by the driver, or the session ended): the file system hears of it once `busy` is 0. */
  closing: boolean
}

/**
 * One request while a file-system call serves it: its context (`FsContext`) and, for reads and writes,
 * its data (`FileIo`). Pooled: valid until the call's result is answered.
 */
class Call implements FsContext, FileIo {
  ticket = 0
  uniqueLo = 0
  uniqueHi = 0
  writable = 0
  opcode = 0
  nodeid = 0
  uid = 0
  gid = 0
  pid = 0
  offset = 0
  length = 0
  /** Where a write's data starts in the readable buffers. */
  dataAt = 0
  answered = false
  /** In the pool: no request owns it. */
  pooled = false
  /** The open handle this call uses (kept open until the call is over). */
  handle: Handle | undefined
  /** An open, create or opendir counted against `maxHandles` until it is answered or dies. */
  opening = false
  timer: NodeJS.Timeout | undefined
  #controller: AbortController | undefined
  #aborted: VduseError | undefined

  constructor(readonly source: RequestSource) {}

  /** Made on first use; one asked for after the abort is born aborted. */
  get signal(): AbortSignal {
    if (!this.#controller) {
      this.#controller = new AbortController()
      if (this.#aborted) this.#controller.abort(this.#aborted)
    }
    return this.#controller.signal
  }

  abort(reason: string): void {
    if (this.#aborted) return
    this.#aborted = new VduseError(reason, { code: 'ERR_VDUSE_FENCED' })
    this.#controller?.abort(this.#aborted)
  }

  reset(): void {
    this.pooled = false
    this.handle = undefined
    this.opening = false
    this.answered = false
    this.#controller = undefined
    this.#aborted = undefined
    this.timer = undefined
  }

  copyFrom(source: Uint8Array, sourceOffset = 0, length = this.length, at = 0): boolean {
    if (!fits(source, sourceOffset, length, at, this.length)) return false
    return this.source.write(this.ticket, OUT_HEADER + at, source, sourceOffset, length) === length
  }

  copyTo(target: Uint8Array, targetOffset = 0, length = this.length, at = 0): boolean {
    if (!fits(target, targetOffset, length, at, this.length)) return false
    return this.source.read(this.ticket, this.dataAt + at, target, targetOffset, length) === length
  }
}

function fits(buffer: Uint8Array, offset: number, length: number, at: number, limit: number): boolean {
  return (
    Number.isInteger(offset) &&
    Number.isInteger(length) &&
    Number.isInteger(at) &&
    offset >= 0 &&
    length >= 0 &&
    at >= 0 &&
    at + length <= limit &&
    offset + length <= buffer.length
  )
}

/** A request refused before the file system sees it: answered with `errno`. */
class Refused extends Error {
  constructor(readonly errno: number) {
    super('refused request')
  }
}

/** A malformed request (no driver sends it): refused, and counted as malformed. */
class Malformed extends Refused {}

function isPromise<T>(x: Maybe<T>): x is Promise<T> {
  return typeof (x as { then?: unknown } | null)?.then === 'function'
}

/**
 * A virtio-fs device (Linux 6.15+): serves a `FileSystem` written in TypeScript to the kernel's virtiofs
 * driver (`mount -t virtiofs TAG /mnt`) or, attached to vhost-vdpa, to a VM. Speaks FUSE 7.38 as the
 * driver sends it: one high-priority queue (FORGET, INTERRUPT) and `requestQueues` request queues.
 *
 * Every request is checked before the file system sees it (see `FileSystem`); the device answers the
 * driver exactly once per request, and never after a reset fenced it. Memory is bounded: nodes the
 * driver knows (`maxNodes`), open handles (`maxHandles`), requests (the rings).
 */
/** The TypeScript file system of a device that shares a directory natively: never asked anything. */
const NATIVE_ONLY: FileSystem = {
  lookup: () => refusedNative(),
  getattr: () => refusedNative(),
  readdir: () => refusedNative(),
  read: () => refusedNative(),
}

function refusedNative(): never {
  throw new VduseError('this device shares a directory natively: its requests never reach JavaScript', {
    code: 'ERR_VDUSE_NATIVE',
  })
}

export class FsDevice<H = unknown> extends VirtioDevice<FsDeviceEvents> {
  readonly tag: string
  /** The host directory shared natively (`sharedDir`), if this device shares one. */
  readonly sharedDir: string | undefined
  readonly #stats: FsStats = {
    requests: 0,
    errors: 0,
    malformed: 0,
    unsupported: 0,
    sessions: 0,
    nodes: 0,
    handles: 0,
  }
  readonly #fs: FileSystem<H>
  readonly #cache: 'never' | 'auto' | 'always'
  readonly #xattr: 'off' | 'user' | 'all'
  readonly #allowDevices: boolean
  readonly #crossMounts: boolean
  readonly #requestQueues: number
  readonly #queueSize: number
  readonly #entryTimeout: number
  readonly #attrTimeout: number
  readonly #maxWrite: number
  readonly #maxNodes: number
  readonly #maxHandles: number
  readonly #readOnly: boolean
  readonly #timeoutMs: number
  readonly #writeback: boolean
  /** The flags the session's INIT granted. */
  #initFlags = 0
  /** Host directories of `fs.mounts()`, by index in `fsMounts` (served natively). */
  readonly #mounts: Map<PassthroughMount, number>
  /** Lookup counts of the nodes the driver knows (the root is always known and never counted). */
  readonly #nodes = new Map<number, number>()
  readonly #handles = new Map<number, Handle>()
  #nextHandle = 1
  /** Opens under way, counted against `maxHandles`. */
  #opening = 0
  /** Calls waiting on the file system, by ticket. */
  readonly #pending = new Map<number, Call>()
  readonly #pool: Call[] = []
  /** A FUSE session is up (INIT answered, no DESTROY or reset since). */
  #session = false
  #maxRead = 0
  /** Scratch for a request's arguments and for replies: parsed and written synchronously. */
  readonly #args = Buffer.alloc(ARGS_MAX)
  readonly #out: Buffer
  readonly #plusInos: number[] = []
  readonly #unsentInos = new Set<number>()

  static async create<H = unknown>(options: FsDeviceOptions<H>): Promise<FsDevice<H>> {
    const device = new FsDevice<H>(options)
    if (options.transport === undefined && !kernelAtLeast(release(), 6, 15)) {
      throw new VduseError(`VDUSE allows virtio-fs devices from Linux 6.15; this is ${release()}`, {
        code: 'ERR_VDUSE_UNAVAILABLE',
        hint: 'boot a newer kernel (Debian: trixie-backports), or serve the file system in-process',
      })
    }
    await device.prepare()
    device.#start()
    await device.opened()
    return device
  }

  private constructor(options: FsDeviceOptions<H>) {
    // No handover: the FUSE session (nodes, open handles) lives in this process.
    super({ ...options, stateDir: null, recover: false })
    const bad = (message: string): VduseError => new VduseError(message, { code: 'ERR_VDUSE_INVALID_CONFIG' })
    const tagBytes = Buffer.byteLength(options.tag ?? '')
    if (
      typeof options.tag !== 'string' ||
      tagBytes < 1 ||
      tagBytes > TAG_BYTES ||
      /[\0\n]/.test(options.tag)
    ) {
      throw bad(`tag must be 1–${TAG_BYTES} bytes of UTF-8 without NUL or newline (the driver refuses those)`)
    }
    const fs = options.fs
    const shared = options.sharedDir
    if ((fs === undefined) === (shared === undefined)) {
      throw bad(
        'give either fs (a TypeScript file system) or sharedDir (a host directory), not both or neither',
      )
    }
    if (shared !== undefined) {
      if (typeof shared !== 'string' || shared.length === 0 || shared.includes('\0')) {
        throw bad('sharedDir must be the path of a host directory')
      }
      if (!this.nativeTransport) {
        throw new VduseError('a shared directory is served natively: it needs VDUSE or vhost-user', {
          code: 'ERR_VDUSE_UNAVAILABLE',
          hint: 'use the default transport or vhostUser(); serve a MemoryFs in-process instead',
        })
      }
      if (options.requestTimeoutMs !== undefined) throw bad('requestTimeoutMs is for a TypeScript fs')
    } else if (!fs || typeof fs.lookup !== 'function' || typeof fs.getattr !== 'function') {
      throw bad('fs must be a FileSystem (lookup, getattr, readdir, read, …)')
    } else if (typeof fs.readdir !== 'function' || typeof fs.read !== 'function') {
      throw bad('fs must implement readdir() and read()')
    }
    const cache = options.cache ?? 'auto'
    if (!['never', 'auto', 'always'].includes(cache)) throw bad('cache must be never, auto or always')
    const xattr = options.xattr ?? 'user'
    if (!['off', 'user', 'all'].includes(xattr)) throw bad('xattr must be off, user or all')
    if (cache === 'never' && options.writebackCache) {
      throw bad('writebackCache needs a cache policy other than never')
    }
    this.#cache = cache
    this.#xattr = xattr
    this.#allowDevices = options.allowDevices ?? false
    this.#crossMounts = options.crossMounts ?? false
    this.tag = options.tag
    this.sharedDir = shared
    // A shared directory's requests never reach JavaScript (native serving); the TypeScript path has an
    // empty file system then, which only ever sees session ends with nothing to forget.
    this.#fs = fs ?? (NATIVE_ONLY as FileSystem<H>)
    // Host directories mounted in the tree: read once, served natively from the device's creation.
    const mounts = fs?.mounts ? [...new Set(fs.mounts())] : []
    if (mounts.some((m) => !PassthroughMount.is(m)))
      throw bad('fs.mounts() must return PassthroughMount objects')
    if (mounts.length > MAX_MOUNTS)
      throw bad(`at most ${MAX_MOUNTS} host directories may be mounted in one tree`)
    // Without create the driver falls back, for every tree, to MKNOD then OPEN (an O_CREAT open of a
    // read-only mode then fails for non-root under the mounts too). Read-only answers EROFS first.
    if (mounts.length > 0 && typeof fs?.create !== 'function' && !options.readOnly)
      throw bad('a file system with mounts must implement create()')
    for (const m of mounts) {
      const cache = m.options.cache ?? 'auto'
      if (!['never', 'auto', 'always'].includes(cache))
        throw bad(`mount ${m.dir}: cache must be never, auto or always`)
      if (cache === 'never' && options.writebackCache) {
        throw bad(`mount ${m.dir}: cache never cannot be served with writebackCache (the session's)`)
      }
    }
    if (mounts.length > 0 && !this.nativeTransport) {
      throw new VduseError(
        'host directories mounted in the tree are served natively: it needs VDUSE or vhost-user',
        {
          code: 'ERR_VDUSE_UNAVAILABLE',
          hint: 'use the default transport or vhostUser(), or a file system without mounts in-process',
        },
      )
    }
    this.#mounts = new Map(mounts.map((m, i) => [m, i]))
    this.#requestQueues = intOption(options.requestQueues, 1, 1, 64, 'requestQueues')
    // The driver needs more than its four header descriptors per request (and WARNs at mount otherwise).
    const queueSize = intOption(options.queueSize, 256, 16, 32768, 'queueSize')
    if (queueSize & (queueSize - 1)) throw bad('queueSize must be a power of two from 16 to 32768')
    this.#queueSize = queueSize
    this.#entryTimeout = secondsOption(options.entryTimeout, 'entryTimeout')
    this.#attrTimeout = secondsOption(options.attrTimeout, 'attrTimeout')
    this.#maxWrite = intOption(options.maxWrite, 1 << 20, PAGE, 1 << 20, 'maxWrite')
    if (this.#maxWrite % PAGE !== 0) throw bad('maxWrite must be a multiple of 4096')
    this.#maxNodes = intOption(options.maxNodes, 1 << 20, 16, 1 << 24, 'maxNodes')
    this.#maxHandles = intOption(options.maxHandles, 65_536, 4, 1 << 20, 'maxHandles')
    this.#timeoutMs = intOption(options.requestTimeoutMs, 0, 0, 3_600_000, 'requestTimeoutMs')
    this.#readOnly = options.readOnly ?? false
    this.#writeback = options.writebackCache ?? false
    // Replies: a header and the largest fixed reply (an entry and an open file), or a directory listing.
    this.#out = Buffer.alloc(OUT_HEADER + Math.max(this.#maxWrite, XATTR_SIZE_MAX, PATH_MAX))
  }

  #start(): void {
    const config = Buffer.alloc(CONFIG_BYTES)
    config.write(this.tag, 0, TAG_BYTES, 'utf8')
    config.writeUInt32LE(this.#requestQueues, TAG_BYTES)
    this.open({
      deviceId: VIRTIO_ID_FS,
      features: 0n,
      config,
      numQueues: 1 + this.#requestQueues,
      queueSize: this.#queueSize,
      // Headers and arguments, then a page per 4 KiB of data, then the reply's header and struct.
      maxSegments: this.#maxWrite / PAGE + 8,
      kind: 'fs',
      ...(this.sharedDir === undefined
        ? {}
        : {
            fsShare: {
              dir: this.sharedDir,
              cache: this.#cache,
              writeback: this.#writeback,
              readOnly: this.#readOnly,
              xattr: this.#xattr,
              maxNodes: this.#maxNodes,
              maxHandles: this.#maxHandles,
              allowDevices: this.#allowDevices,
              crossMounts: this.#crossMounts,
              maxWrite: this.#maxWrite,
            },
          }),
      ...(this.#mounts.size === 0
        ? {}
        : {
            fsMounts: [...this.#mounts.keys()].map(({ options: m }) => ({
              dir: m.dir,
              cache: m.cache ?? 'auto',
              // The session's: the driver caches writes under the mount too when it was granted.
              writeback: this.#writeback,
              readOnly: this.#readOnly || (m.readOnly ?? false),
              xattr: m.xattr ?? 'user',
              ...(m.maxNodes === undefined ? {} : { maxNodes: m.maxNodes }),
              ...(m.maxHandles === undefined ? {} : { maxHandles: m.maxHandles }),
              allowDevices: m.allowDevices ?? false,
              crossMounts: m.crossMounts ?? false,
              maxWrite: this.#maxWrite,
            })),
          }),
    })
  }

  /**
   * Counters of each host directory mounted in the tree (`fs.mounts()`, in that order), from the native
   * servers; empty without mounts.
   */
  get mountStats(): FsStats[] {
    return (this.source?.fsMountCounters?.() ?? []).map(nativeStats)
  }

  /**
   * Counters of the model. For a shared directory they come from the native server (and `bytesRead`,
   * `bytesWritten` and the limits in force are there too).
   */
  get stats(): FsStats {
    const n = this.sharedDir === undefined ? undefined : this.source?.fsCounters?.()
    return n ? nativeStats(n) : this.#stats
  }

  get requestQueues(): number {
    return this.#requestQueues
  }

  // ---- the request path ----

  protected handleRequest(batch: RequestBatch, i: number): void {
    this.#stats.requests++
    const call = this.#pool.pop() ?? new Call(this.source)
    call.reset()
    try {
      this.#parse(batch, i, call)
    } catch (err) {
      if (err instanceof Malformed) this.#malformed(call, err.errno)
      else if (err instanceof Refused) this.#error(call, err.errno)
      else this.#failed(call, err)
    } finally {
      if (!this.#pending.has(call.ticket)) this.#release(call)
    }
  }

  #parse(batch: RequestBatch, i: number, call: Call): void {
    const ticket = batch.ticket(i)
    call.ticket = ticket
    call.writable = batch.writableBytes(i)
    const readable = batch.readableBytes(i)
    const v = batch.view
    const h = batch.headOffset(i)
    if (batch.headLength(i) < IN_HEADER) {
      call.uniqueLo = call.uniqueHi = 0
      return this.#malformed(call, E.EINVAL)
    }
    const len = v.getUint32(h, true)
    call.opcode = v.getUint32(h + 4, true)
    call.uniqueLo = v.getUint32(h + 8, true)
    call.uniqueHi = v.getUint32(h + 12, true)
    const nodeLo = v.getUint32(h + 16, true)
    const nodeHi = v.getUint32(h + 20, true)
    call.uid = v.getUint32(h + 24, true)
    call.gid = v.getUint32(h + 28, true)
    call.pid = v.getUint32(h + 32, true)
    const extLen = v.getUint16(h + 36, true)
    // The driver states the request's length: it must be what it gave. Extensions were never granted.
    if (len !== readable || extLen !== 0 || nodeHi >= 0x20_0000) return this.#malformed(call, E.EINVAL)
    call.nodeid = nodeHi * 0x1_0000_0000 + nodeLo
    this.#dispatch(call, len - IN_HEADER)
  }

  #dispatch(call: Call, argLen: number): void {
    const op = call.opcode
    if (op === OP.FORGET || op === OP.BATCH_FORGET) return this.#forget(call, argLen)
    if (op === OP.INTERRUPT) return this.#interrupt(call, argLen)
    if (op === OP.INIT) return this.#init(call, argLen)
    if (!this.#session) return this.#error(call, E.EIO)
    if (op === OP.DESTROY) return this.#destroy(call)
    if (op === OP.WRITE) return this.#write(call, argLen)
    if (argLen > ARGS_MAX) throw new Malformed(E.EINVAL)
    const a = this.#args
    if (argLen > 0 && this.source.read(call.ticket, IN_HEADER, a, 0, argLen) !== argLen)
      return this.#drop(call)
    const fs = this.#fs
    const ino = this.#node(call.nodeid)
    switch (op) {
      case OP.LOOKUP: {
        const name = names(a, 0, argLen, 1)[0]!
        return this.#run(call, () => fs.lookup(ino, name, call), this.#replyEntry)
      }
      case OP.GETATTR: {
        need(argLen, 16)
        const handle = a.readUInt32LE(0) & 1 ? this.#handleOr(a, 8, ino) : undefined
        return this.#run(call, () => fs.getattr(ino, call, handle), this.#replyAttr)
      }
      case OP.SETATTR: {
        need(argLen, 88)
        if (this.#readOnly) return this.#error(call, E.EROFS)
        const valid = a.readUInt32LE(0)
        const handle = valid & FATTR.FH ? this.#handleOr(a, 8, ino) : undefined
        const changes = setattrOf(a, valid)
        if (!fs.setattr) return this.#unsupported(call)
        return this.#run(call, () => fs.setattr!(ino, changes, call, handle), this.#replyAttr)
      }
      case OP.READLINK:
        if (!fs.readlink) return this.#unsupported(call)
        return this.#run(call, () => fs.readlink!(ino, call), this.#replyBytes)
      case OP.SYMLINK: {
        const [name, target] = names(a, 0, argLen, 2, true)
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.symlink) return this.#unsupported(call)
        return this.#run(call, () => fs.symlink!(ino, name!, target!, call), this.#replyEntry)
      }
      case OP.MKNOD: {
        need(argLen, 16)
        const mode = a.readUInt32LE(0)
        const rdev = a.readUInt32LE(4)
        const name = names(a, 16, argLen, 1)[0]!
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.mknod) return this.#unsupported(call)
        return this.#run(call, () => fs.mknod!(ino, name, mode, rdev, call), this.#replyEntry)
      }
      case OP.MKDIR: {
        need(argLen, 8)
        const mode = a.readUInt32LE(0)
        const name = names(a, 8, argLen, 1)[0]!
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.mkdir) return this.#unsupported(call)
        return this.#run(call, () => fs.mkdir!(ino, name, mode, call), this.#replyEntry)
      }
      case OP.UNLINK:
      case OP.RMDIR: {
        const name = names(a, 0, argLen, 1)[0]!
        if (this.#readOnly) return this.#error(call, E.EROFS)
        const method = op === OP.UNLINK ? fs.unlink : fs.rmdir
        if (!method) return this.#unsupported(call)
        return this.#run(call, () => method.call(fs, ino, name, call), this.#replyEmpty)
      }
      case OP.RENAME:
      case OP.RENAME2: {
        const fixed = op === OP.RENAME ? 8 : 16
        need(argLen, fixed)
        const newParent = this.#node(readU64(a, 0))
        const flags = op === OP.RENAME2 ? a.readUInt32LE(8) : 0
        const [name, newName] = names(a, fixed, argLen, 2)
        if (flags & ~RENAME_FLAGS || flags === RENAME_FLAGS) return this.#error(call, E.EINVAL)
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.rename) return op === OP.RENAME2 ? this.#lacking(call, false) : this.#unsupported(call)
        return this.#run(
          call,
          () => fs.rename!(ino, name!, newParent, newName!, flags, call),
          this.#replyEmpty,
        )
      }
      case OP.LINK: {
        need(argLen, 8)
        const target = this.#node(readU64(a, 0))
        const name = names(a, 8, argLen, 1)[0]!
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.link) return this.#unsupported(call)
        return this.#run(call, () => fs.link!(target, ino, name, call), this.#replyEntry)
      }
      case OP.OPEN:
      case OP.OPENDIR: {
        need(argLen, 8)
        const flags = a.readUInt32LE(0)
        const dir = op === OP.OPENDIR
        // O_WRONLY, O_RDWR, O_TRUNC on a read-only file system.
        if (this.#readOnly && (flags & 3 || flags & 0o1000)) return this.#error(call, E.EROFS)
        const method = dir ? fs.opendir : fs.open
        return this.#open(call, ino, dir, method ? () => method.call(fs, ino, flags, call) : () => undefined)
      }
      case OP.READ: {
        need(argLen, 40)
        const handle = this.#handle(a, 0, ino, false, call)
        const offset = readPos(a, 8)
        const size = a.readUInt32LE(16)
        if (size > this.#maxRead) throw new Malformed(E.EINVAL)
        // Past 2^53 no file has data: end of file.
        if (offset + size > Number.MAX_SAFE_INTEGER) return this.#replyWithData(call, 0)
        call.offset = offset
        call.length = Math.min(size, Math.max(0, call.writable - OUT_HEADER))
        // The data path calls the file system directly: no closure per request.
        let r: Maybe<number | Uint8Array>
        try {
          r = fs.read(ino, call, handle.value as H, call)
        } catch (err) {
          return this.#failed(call, err)
        }
        return this.#then(call, r, this.#replyRead)
      }
      case OP.STATFS:
        if (!fs.statfs) return this.#run(call, () => ({}), this.#replyStatfs)
        return this.#run(call, () => fs.statfs!(ino, call), this.#replyStatfs)
      case OP.RELEASE:
      case OP.RELEASEDIR: {
        need(argLen, 24)
        const dir = op === OP.RELEASEDIR
        const fh = readU64(a, 0)
        const handle = this.#handle(a, 0, ino, dir)
        this.#handles.delete(fh)
        this.#stats.handles = this.#handles.size
        handle.closing = true
        const method = dir ? fs.releasedir : fs.release
        // A driver releases a handle no call of it still uses; a hostile one may not: then the release
        // is answered now, and the file system hears of it when the last call is over.
        if (!method || handle.busy > 0) return this.#replyEmpty(call)
        return this.#run(call, () => method.call(fs, ino, handle.value as H), this.#replyEmpty)
      }
      case OP.FSYNC:
      case OP.FSYNCDIR: {
        need(argLen, 16)
        const dir = op === OP.FSYNCDIR
        const handle = this.#handle(a, 0, ino, dir, call)
        const datasync = (a.readUInt32LE(8) & 1) !== 0
        const method = dir ? fs.fsyncdir : fs.fsync
        if (!method) return this.#lacking(call, true)
        return this.#run(
          call,
          () => method.call(fs, ino, datasync, handle.value as H, call),
          this.#replyEmpty,
        )
      }
      case OP.FLUSH: {
        need(argLen, 24)
        const handle = this.#handle(a, 0, ino, false, call)
        if (!fs.flush) return this.#lacking(call, true)
        return this.#run(call, () => fs.flush!(ino, handle.value as H, call), this.#replyEmpty)
      }
      case OP.SETXATTR: {
        need(argLen, 8)
        const size = a.readUInt32LE(0)
        const flags = a.readUInt32LE(4)
        const end = a.indexOf(0, 8)
        if (end < 0 || end >= argLen) throw new Malformed(E.EINVAL)
        const name = xattrName(a, 8, end)
        if (size > XATTR_SIZE_MAX || end + 1 + size !== argLen) throw new Malformed(E.EINVAL)
        if (flags & ~3) return this.#error(call, E.EINVAL)
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.setxattr) return this.#lacking(call, false)
        // The value outlives this synchronous parse: it gets its own buffer.
        const value = Buffer.from(a.subarray(end + 1, end + 1 + size))
        return this.#run(call, () => fs.setxattr!(ino, name, value, flags, call), this.#replyEmpty)
      }
      case OP.GETXATTR: {
        need(argLen, 8)
        const size = a.readUInt32LE(0)
        const end = a.indexOf(0, 8)
        if (end < 0 || end + 1 !== argLen) throw new Malformed(E.EINVAL)
        const name = xattrName(a, 8, end)
        call.length = size
        if (!fs.getxattr) return this.#lacking(call, false)
        return this.#run(call, () => fs.getxattr!(ino, name, call), this.#replyXattr)
      }
      case OP.LISTXATTR: {
        need(argLen, 8)
        call.length = a.readUInt32LE(0)
        if (!fs.listxattr) return this.#lacking(call, false)
        return this.#run(call, () => fs.listxattr!(ino, call), this.#replyXattrList)
      }
      case OP.REMOVEXATTR: {
        const end = a.indexOf(0, 0)
        if (end < 0 || end + 1 !== argLen) throw new Malformed(E.EINVAL)
        const name = xattrName(a, 0, end)
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.removexattr) return this.#lacking(call, false)
        return this.#run(call, () => fs.removexattr!(ino, name, call), this.#replyEmpty)
      }
      case OP.READDIR:
      case OP.READDIRPLUS: {
        need(argLen, 40)
        const handle = this.#handle(a, 0, ino, true, call)
        const offset = readU64(a, 8)
        const size = a.readUInt32LE(16)
        call.offset = offset
        call.length = Math.min(size, this.#maxWrite, Math.max(0, call.writable - OUT_HEADER))
        const plus = op === OP.READDIRPLUS
        return this.#run(
          call,
          () => fs.readdir(ino, offset, handle.value as H, call),
          plus ? this.#replyDirPlus : this.#replyDir,
        )
      }
      case OP.ACCESS: {
        need(argLen, 8)
        const mask = a.readUInt32LE(0)
        if (mask & ~7) return this.#error(call, E.EINVAL)
        if (this.#readOnly && mask & 2) return this.#error(call, E.EROFS)
        if (!fs.access) return this.#unsupported(call)
        return this.#run(call, () => fs.access!(ino, mask, call), this.#replyEmpty)
      }
      case OP.CREATE: {
        need(argLen, 16)
        const flags = a.readUInt32LE(0)
        const mode = a.readUInt32LE(4)
        const name = names(a, 16, argLen, 1)[0]!
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.create) return this.#unsupported(call)
        return this.#open(call, ino, false, () => fs.create!(ino, name, mode, flags, call))
      }
      case OP.FALLOCATE: {
        need(argLen, 32)
        const handle = this.#handle(a, 0, ino, false, call)
        const offset = readPos(a, 8)
        const length = readPos(a, 16)
        const mode = a.readUInt32LE(24)
        if (length === 0) return this.#error(call, E.EINVAL)
        if (offset + length > Number.MAX_SAFE_INTEGER) return this.#error(call, E.EFBIG)
        if (this.#readOnly) return this.#error(call, E.EROFS)
        if (!fs.fallocate) return this.#lacking(call, false)
        return this.#run(
          call,
          () => fs.fallocate!(ino, mode, offset, length, handle.value as H, call),
          this.#replyEmpty,
        )
      }
      case OP.LSEEK: {
        need(argLen, 24)
        const handle = this.#handle(a, 0, ino, false, call)
        const offset = readPos(a, 8)
        const whence = a.readUInt32LE(16)
        if (whence > 4) return this.#error(call, E.EINVAL)
        if (offset > Number.MAX_SAFE_INTEGER) return this.#error(call, E.ENXIO)
        if (!fs.lseek) {
          if (this.#mounts.size === 0) return this.#unsupported(call)
          // What the driver would do itself after an ENOSYS — which would also make it do so for the
          // mounts, whose files have holes: the whole file is data (only SEEK_DATA/SEEK_HOLE come here).
          return this.#run(
            call,
            () => fs.getattr(ino, call, handle.value as H),
            (c, attr: Attr) => {
              if (offset >= attr.size || whence < 3) return this.#error(c, whence < 3 ? E.EINVAL : E.ENXIO)
              this.#replyOffset(c, whence === 3 ? offset : attr.size)
            },
          )
        }
        return this.#run(
          call,
          () => fs.lseek!(ino, offset, whence, handle.value as H, call),
          this.#replyOffset,
        )
      }
      case OP.COPY_FILE_RANGE:
        // Not offered to file systems here: the driver copies through read and write instead — after an
        // EOPNOTSUPP for this one copy, after an ENOSYS for every tree (the mounts' own copies included).
        return this.#lacking(call, false)
      case OP.SYNCFS:
        // Nothing here to sync (no file-system method for it); the mounts sync their own superblocks.
        return this.#lacking(call, true)
      default:
        return this.#unsupported(call)
    }
  }

  /**
   * An operation the file system lacks. With host directories mounted, never ENOSYS where the driver then
   * stops sending it for the whole connection — the mounts too (an ENOSYS SYNCFS would leave their data
   * unsynced for good): success where ENOSYS means "nothing to do" (`fsync`, `flush`, `syncfs`), else
   * EOPNOTSUPP, what the driver's callers see after an ENOSYS anyway.
   */
  #lacking(call: Call, nothingToDo: boolean): void {
    if (this.#mounts.size === 0) return this.#unsupported(call)
    if (nothingToDo) return this.#replyEmpty(call)
    this.#stats.unsupported++
    // RENAME2: EINVAL is what renameat2's callers see for flags a file system cannot honour.
    this.#error(call, call.opcode === OP.RENAME2 ? E.EINVAL : E.EOPNOTSUPP)
  }

  /** The node id of a request, if the driver was told of it. */
  #node(nodeid: number): number {
    if (nodeid === FUSE_ROOT_ID || this.#nodes.has(nodeid)) return nodeid
    throw new Malformed(E.ESTALE)
  }

  /** The open handle whose id is at `a[at]`: one of node `ino`, of the right kind; `call` now uses it. */
  #handle(a: Buffer, at: number, ino: number, dir: boolean, call?: Call): Handle {
    const handle = this.#handles.get(readU64(a, at))
    if (!handle || handle.ino !== ino || handle.dir !== dir) throw new Malformed(E.EBADF)
    if (call) {
      call.handle = handle
      handle.busy++
    }
    return handle
  }

  /** The file system hears that a handle is closed — once no call uses it any more. */
  #close(handle: Handle): void {
    handle.closing = true
    if (handle.busy > 0) return
    const fs = this.#fs
    this.#quietly(() =>
      handle.dir
        ? fs.releasedir?.(handle.ino, handle.value as H)
        : fs.release?.(handle.ino, handle.value as H),
    )
  }

  /** GETATTR's optional handle: a stale one is ignored (the attributes are the node's anyway). */
  #handleOr(a: Buffer, at: number, ino: number): H | undefined {
    const handle = this.#handles.get(readU64(a, at))
    return handle && handle.ino === ino ? (handle.value as H) : undefined
  }

  #init(call: Call, argLen: number): void {
    if (argLen < 16) throw new Malformed(E.EINVAL)
    const n = Math.min(argLen, 24)
    if (this.source.read(call.ticket, IN_HEADER, this.#args, 0, n) !== n) return this.#drop(call)
    const major = this.#args.readUInt32LE(0)
    const minor = this.#args.readUInt32LE(4)
    const readahead = this.#args.readUInt32LE(8)
    const offered = this.#args.readUInt32LE(12)
    if (major !== FUSE_KERNEL_VERSION) {
      // Older majors are not spoken; a newer one is told ours (and must come back with it).
      if (major < FUSE_KERNEL_VERSION) return this.#error(call, E.EPROTO)
      const out = this.#out.fill(0, OUT_HEADER, OUT_HEADER + INIT_OUT)
      out.writeUInt32LE(FUSE_KERNEL_VERSION, OUT_HEADER)
      out.writeUInt32LE(FUSE_KERNEL_MINOR_VERSION, OUT_HEADER + 4)
      return void this.#reply(call, INIT_OUT)
    }
    // A new session: whatever the driver knew of the last one is gone.
    this.#endSession()
    let want: number =
      INIT.ASYNC_READ |
      INIT.BIG_WRITES |
      INIT.DO_READDIRPLUS |
      INIT.READDIRPLUS_AUTO |
      INIT.PARALLEL_DIROPS |
      INIT.MAX_PAGES |
      INIT.CACHE_SYMLINKS |
      // O_DIRECT requests of one file may be in flight together (libaio at a queue depth).
      INIT.ASYNC_DIO
    if (this.#writeback && !this.#readOnly) want |= INIT.WRITEBACK_CACHE
    // O_TRUNC reaches open() then; without open(), the driver truncates with SETATTR itself.
    if (this.#fs.open) want |= INIT.ATOMIC_O_TRUNC
    // Mount points are answered as submounts: without them the driver would see one superblock with
    // two trees' inode numbers (and move files across them by rename).
    if (this.#mounts.size > 0) {
      if (!(offered & INIT.SUBMOUNTS)) {
        this.report(
          new VduseError('the driver does not offer FUSE_SUBMOUNTS: mounted host directories stay hidden', {
            code: 'ERR_VDUSE_UNAVAILABLE',
          }),
        )
      }
      want |= INIT.SUBMOUNTS
      // A mount's `auto` cache drops file data the host changed (connection-wide, harmless here).
      if ([...this.#mounts.keys()].some((m) => (m.options.cache ?? 'auto') === 'auto')) {
        want |= INIT.AUTO_INVAL_DATA
      }
    }
    const flags = (offered & want) >>> 0
    const maxWrite = this.#maxWrite
    this.#maxRead = flags & INIT.MAX_PAGES ? maxWrite : 32 * PAGE
    const info = { major, minor, maxWrite }
    const fs = this.#fs
    this.#run(
      call,
      () => fs.init?.(info),
      () => {
        const out = this.#out.fill(0, OUT_HEADER, OUT_HEADER + INIT_OUT)
        const o = OUT_HEADER
        out.writeUInt32LE(FUSE_KERNEL_VERSION, o)
        out.writeUInt32LE(FUSE_KERNEL_MINOR_VERSION, o + 4)
        out.writeUInt32LE(readahead, o + 8)
        out.writeUInt32LE(flags, o + 12)
        out.writeUInt16LE(64, o + 16) // max_background
        out.writeUInt16LE(48, o + 18) // congestion_threshold
        out.writeUInt32LE(maxWrite, o + 20)
        out.writeUInt32LE(1, o + 24) // time_gran: nanoseconds
        out.writeUInt16LE(flags & INIT.MAX_PAGES ? maxWrite / PAGE : 0, o + 28)
        if (this.#reply(call, INIT_OUT)) {
          this.#session = true
          this.#initFlags = flags
          this.#stats.sessions++
          const info = { major, minor: Math.min(minor, FUSE_KERNEL_MINOR_VERSION), flags, maxWrite }
          // A listener that throws must not look like a failed INIT: the driver has its answer.
          this.#quietly(() => void this.emit('session', info))
        }
      },
    )
  }

  #destroy(call: Call): void {
    // A DESTROY a reset fenced must not end the session that followed it.
    if (!this.source.isLive(call.ticket)) return this.#drop(call)
    this.#endSession()
    const fs = this.#fs
    this.#run(call, () => fs.destroy?.(), this.#replyEmpty)
  }

  /** Forgets every node and closes every handle of the session the driver ended. */
  #endSession(): void {
    this.#session = false
    const fs = this.#fs
    const handles = [...this.#handles.values()]
    this.#handles.clear()
    this.#stats.handles = 0
    // Calls still running keep their handle until they are over.
    for (const h of handles) this.#close(h)
    const nodes = [...this.#nodes.keys()]
    this.#nodes.clear()
    this.#stats.nodes = 0
    for (const ino of nodes) this.#quietly(() => fs.forget?.(ino))
  }

  /** Runs a file-system call whose answer nobody waits for; a failure is reported, never thrown. */
  #quietly(fn: () => Maybe<void>): void {
    try {
      const r = fn()
      if (isPromise(r)) r.catch((err: unknown) => this.report(err))
    } catch (err) {
      this.report(err)
    }
  }

  #forget(call: Call, argLen: number): void {
    // FORGET and BATCH_FORGET are never answered: the buffer goes back empty.
    const a = this.#args
    if (call.opcode === OP.FORGET) {
      if (argLen === 8 && this.source.read(call.ticket, IN_HEADER, a, 0, 8) === 8) {
        this.#unref(call.nodeid, readCount(a, 0))
      } else this.#stats.malformed++
      return this.#complete(call, 0)
    }
    if (argLen < 8 || this.source.read(call.ticket, IN_HEADER, a, 0, 8) !== 8) {
      this.#stats.malformed++
      return this.#complete(call, 0)
    }
    const count = a.readUInt32LE(0)
    if (count * 16 !== argLen - 8) {
      this.#stats.malformed++
      return this.#complete(call, 0)
    }
    // In chunks of the scratch buffer: a batch is as long as the driver made it.
    const chunk = Math.floor(ARGS_MAX / 16)
    for (let done = 0; done < count; done += chunk) {
      const n = Math.min(chunk, count - done) * 16
      if (this.source.read(call.ticket, IN_HEADER + 8 + done * 16, a, 0, n) !== n) break
      for (let k = 0; k < n; k += 16) this.#unref(readPos(a, k), readCount(a, k + 8))
    }
    this.#complete(call, 0)
  }

  /** The driver gave back `count` lookups of `nodeid`. */
  #unref(nodeid: number, count: number): void {
    const have = this.#nodes.get(nodeid)
    if (have === undefined) return
    if (count < have) {
      this.#nodes.set(nodeid, have - count)
      return
    }
    this.#nodes.delete(nodeid)
    this.#stats.nodes = this.#nodes.size
    const fs = this.#fs
    this.#quietly(() => fs.forget?.(nodeid))
  }

  #interrupt(call: Call, argLen: number): void {
    const a = this.#args
    if (argLen === 8 && this.source.read(call.ticket, IN_HEADER, a, 0, 8) === 8) {
      const lo = a.readUInt32LE(0)
      const hi = a.readUInt32LE(4)
      for (const c of this.#pending.values()) {
        if (c.uniqueLo === lo && c.uniqueHi === hi) c.abort('the driver interrupted the request')
      }
    } else this.#stats.malformed++
    this.#complete(call, 0)
  }

  #write(call: Call, argLen: number): void {
    if (argLen < 40) throw new Malformed(E.EINVAL)
    const a = this.#args
    if (this.source.read(call.ticket, IN_HEADER, a, 0, 40) !== 40) return this.#drop(call)
    const ino = this.#node(call.nodeid)
    const handle = this.#handle(a, 0, ino, false, call)
    const offset = readPos(a, 8)
    const size = a.readUInt32LE(16)
    if (size > this.#maxWrite || size !== argLen - 40) throw new Malformed(E.EINVAL)
    if (this.#readOnly) return this.#error(call, E.EROFS)
    if (offset + size > Number.MAX_SAFE_INTEGER) return this.#error(call, E.EFBIG)
    const fs = this.#fs as FileSystem<H> & Required<Pick<FileSystem<H>, 'write'>>
    if (!fs.write) return this.#unsupported(call)
    call.offset = offset
    call.length = size
    call.dataAt = IN_HEADER + 40
    let r: Maybe<number>
    try {
      r = fs.write(ino, call, handle.value as H, call)
    } catch (err) {
      return this.#failed(call, err)
    }
    this.#then(call, r, this.#replyWrite)
  }

  #open(call: Call, ino: number, dir: boolean, fn: () => Maybe<OpenResult<H> | void>): void {
    if (this.#handles.size + this.#opening >= this.#maxHandles) return this.#error(call, E.EMFILE)
    this.#opening++
    call.opening = true
    const settle = (): void => this.#opened(call)
    this.#run(
      call,
      () => {
        let r: Maybe<OpenResult<H> | void>
        try {
          r = fn()
        } catch (err) {
          settle()
          throw err
        }
        if (isPromise(r)) return r.finally(settle)
        settle()
        return r
      },
      (c, result) => this.#replyOpen(c, ino, dir, result),
    )
  }

  // ---- running file-system calls ----

  /**
   * Runs `fn` for `call` and answers with `done(call, value)` — now if it returns a value, when its
   * promise settles otherwise. Errors answer with their errno (EIO for those that name none).
   */
  #run<T>(call: Call, fn: () => Maybe<T>, done: (call: Call, value: T) => void): void {
    let r: Maybe<T>
    try {
      r = fn()
    } catch (err) {
      return this.#failed(call, err)
    }
    this.#then(call, r, done)
  }

  /** Answers with `done(call, value)` once `r` is a value: now, or when the promise settles. */
  #then<T>(call: Call, r: Maybe<T>, done: (call: Call, value: T) => void): void {
    if (!isPromise(r)) return this.#done(call, r, done)
    this.#pending.set(call.ticket, call)
    if (this.#timeoutMs > 0) {
      call.timer = setTimeout(() => {
        call.abort('the request timed out')
        this.#opened(call)
        this.#error(call, E.ETIMEDOUT)
      }, this.#timeoutMs)
    }
    r.then(
      (value) => {
        this.#settled(call)
        this.#done(call, value, done)
        this.#release(call)
      },
      (err: unknown) => {
        this.#settled(call)
        this.#failed(call, err)
        this.#release(call)
      },
    )
  }

  #done<T>(call: Call, value: T, done: (call: Call, value: T) => void): void {
    try {
      done(call, value)
    } catch (err) {
      // The file system returned something that cannot be encoded (a negative size, a missing field).
      this.#failed(call, err)
    }
  }

  #settled(call: Call): void {
    if (call.timer) clearTimeout(call.timer)
    this.#pending.delete(call.ticket)
  }

  #failed(call: Call, err: unknown): void {
    const errno = errnoOf(err)
    if (errno === undefined) {
      const error = asError(err)
      try {
        this.emit('requestError', error)
      } catch (listenerError) {
        queueMicrotask(() => {
          throw listenerError
        })
      }
    }
    if (errno === E.ENOSYS) {
      // After an ENOSYS to OPEN or OPENDIR the driver stops opening for the whole session (and every
      // read or write then names no handle here): never sent for those.
      if (NEVER_ENOSYS.has(call.opcode)) return this.#error(call, E.EOPNOTSUPP)
      // A method may say ENOSYS itself: with mounts, never as such (see `#lacking`).
      if (this.#mounts.size > 0) return this.#lacking(call, NOTHING_TO_DO.has(call.opcode))
    }
    this.#error(call, errno ?? E.EIO)
  }

  /** An open no longer counts against `maxHandles` as under way (it settled, timed out or died). */
  #opened(call: Call): void {
    if (!call.opening) return
    call.opening = false
    this.#opening--
  }

  /** The call is over (answered, and no file-system call holds it): back to the pool, once. */
  #release(call: Call): void {
    if (call.pooled) return
    const handle = call.handle
    if (handle) {
      call.handle = undefined
      if (--handle.busy === 0 && handle.closing) this.#close(handle)
    }
    this.#opened(call)
    if (this.#pool.length >= 1024) return
    call.pooled = true
    this.#pool.push(call)
  }

  // ---- answers ----

  /** Sends the reply in `#out[16, 16+length)` with a header; false if the driver will not see it. */
  #reply(call: Call, length: number, error = 0): boolean {
    if (call.answered) return false
    call.answered = true
    if (call.writable < OUT_HEADER) {
      this.#stats.malformed++
      this.completions.complete(call.ticket, 0, -1)
      return false
    }
    if (OUT_HEADER + length > call.writable) {
      // The driver left no room for the answer: an error fits.
      this.#stats.malformed++
      length = 0
      error = E.EINVAL
    }
    if (error !== 0) this.#stats.errors++
    return this.#answer(call, OUT_HEADER + length, error, OUT_HEADER + length) && error === 0
  }

  /**
   * Writes the out header (and the rest of the first `bytes` of `#out`) to the driver and completes
   * with `total` bytes used; false if the request died first.
   */
  #answer(call: Call, total: number, error: number, bytes: number): boolean {
    const out = this.#out
    out.writeUInt32LE(total, 0)
    out.writeInt32LE(-error, 4)
    out.writeUInt32LE(call.uniqueLo, 8)
    out.writeUInt32LE(call.uniqueHi, 12)
    if (this.source.write(call.ticket, 0, out, 0, bytes) !== bytes) return false
    this.completions.complete(call.ticket, total, -1)
    return true
  }

  #error(call: Call, errno: number): void {
    this.#reply(call, 0, errno)
  }

  #unsupported(call: Call): void {
    this.#stats.unsupported++
    this.#error(call, E.ENOSYS)
  }

  #malformed(call: Call, errno: number): void {
    this.#stats.malformed++
    this.#error(call, errno)
  }

  /** Completes without a reply (FORGET, INTERRUPT). */
  #complete(call: Call, used: number): void {
    call.answered = true
    this.completions.complete(call.ticket, used, -1)
  }

  /** The request died while it was being parsed (fenced): nothing to answer. */
  #drop(call: Call): void {
    call.answered = true
  }

  readonly #replyEmpty = (call: Call): void => {
    this.#reply(call, 0)
  }

  readonly #replyAttr = (call: Call, attr: Attr): void => {
    const out = this.#out
    const [s, ns] = splitSeconds(this.#attrTimeout)
    out.writeBigUInt64LE(s, OUT_HEADER)
    out.writeUInt32LE(ns, OUT_HEADER + 8)
    out.writeUInt32LE(0, OUT_HEADER + 12)
    encodeAttr(out, OUT_HEADER + 16, attr)
    this.#reply(call, ATTR_OUT)
  }

  /** Encodes an entry at `at` of `#out`; returns its node id (0: the driver may not learn more nodes). */
  #entryAt(at: number, value: Entry | Attr): number {
    const entry: Entry = isEntry(value) ? value : { attr: value }
    const ino = entry.attr.ino
    if (!Number.isSafeInteger(ino) || ino < 1) throw new RangeError(`the file system returned node id ${ino}`)
    // What the driver would drop without a FORGET (fuse_valid_type, fuse_invalid_attr) never goes out.
    if (!VALID_TYPES.has(entry.attr.mode & S_IFMT)) {
      throw new RangeError(`the file system returned mode 0o${entry.attr.mode.toString(8)} for node ${ino}`)
    }
    if (!Number.isSafeInteger(entry.attr.size) || entry.attr.size < 0) {
      throw new RangeError(`the file system returned size ${entry.attr.size} for node ${ino}`)
    }
    encodeEntry(
      this.#out,
      at,
      ino,
      entry.attr,
      entry.entryTimeout ?? this.#entryTimeout,
      entry.attrTimeout ?? this.#attrTimeout,
      entry.generation ?? 0,
    )
    return ino
  }

  /** Whether the driver may learn node `ino` now (it knows it already, or there is room). */
  #room(ino: number): boolean {
    return ino === FUSE_ROOT_ID || this.#nodes.has(ino) || this.#nodes.size < this.#maxNodes
  }

  /** The driver learned node `ino` (one more lookup of it). */
  #ref(ino: number): void {
    if (ino === FUSE_ROOT_ID) return
    this.#nodes.set(ino, (this.#nodes.get(ino) ?? 0) + 1)
    this.#stats.nodes = this.#nodes.size
  }

  /**
   * A node the file system returned did not reach the driver. Unless the driver knows it by then, it is
   * forgotten — decided after this turn, so that a reply naming it that is about to go out (another
   * request's, or a second entry of the same listing) is counted first.
   */
  #unsent(ino: number): void {
    if (ino === FUSE_ROOT_ID || !this.#fs.forget) return
    if (this.#unsentInos.size === 0) setImmediate(() => this.#forgetUnsent())
    this.#unsentInos.add(ino)
  }

  #forgetUnsent(): void {
    const fs = this.#fs
    for (const ino of this.#unsentInos) {
      if (!this.#nodes.has(ino)) this.#quietly(() => fs.forget?.(ino))
    }
    this.#unsentInos.clear()
  }

  readonly #replyEntry = (call: Call, value: Entry | Attr | MountEntry): void => {
    if (isMountEntry(value)) return this.#replyMount(call, value)
    const ino = this.#entryAt(OUT_HEADER, value)
    if (!this.#room(ino)) {
      this.#unsent(ino)
      return this.#error(call, E.ENFILE)
    }
    if (this.#reply(call, ENTRY_OUT)) this.#ref(ino)
    else this.#unsent(ino)
  }

  /** A LOOKUP of a mount point: the native side answers with the mounted directory's root. */
  #replyMount(call: Call, value: MountEntry): void {
    const index = this.#mounts.get(value.mount)
    if (call.opcode !== OP.LOOKUP) throw new RangeError('only lookup may return a mount')
    if (index === undefined) {
      throw new RangeError(`the file system returned a mount (${value.mount.dir}) its mounts() did not list`)
    }
    if (!(this.#session && this.#initFlags & INIT.SUBMOUNTS)) {
      // Without submounts the driver would take the mounted root for a node of this tree: it stays hidden.
      return this.#error(call, E.EACCES)
    }
    const answer = this.source.fsAnswerMount
    if (!answer) throw new RangeError('this transport cannot answer a mount point')
    if (call.answered) return
    call.answered = true
    try {
      // The name is this tree's: it stays valid as long as this tree's names do.
      answer.call(this.source, call.ticket, call.writable, index, this.#entryTimeout)
    } catch (err) {
      call.answered = false
      throw err
    }
  }

  #replyOpen(
    call: Call,
    ino: number,
    dir: boolean,
    result: (OpenResult<H> & { entry?: Entry | Attr }) | void,
  ): void {
    const r = result ?? {}
    let flags = 0
    if (r.directIo) flags |= FOPEN.DIRECT_IO
    if (r.keepCache) flags |= FOPEN.KEEP_CACHE
    if (r.nonSeekable) flags |= FOPEN.NONSEEKABLE
    if (r.cacheDir && dir) flags |= FOPEN.CACHE_DIR
    const created = call.opcode === OP.CREATE
    let length = OPEN_OUT
    let at = OUT_HEADER
    let node = ino
    const release = (): void => {
      const fs = this.#fs
      this.#quietly(() => (dir ? fs.releasedir?.(node, r.handle) : fs.release?.(node, r.handle)))
    }
    if (created) {
      if (!r.entry) throw new TypeError('create() must return { entry }')
      node = this.#entryAt(OUT_HEADER, r.entry)
      const mode = isEntry(r.entry) ? r.entry.attr.mode : r.entry.mode
      if ((mode & S_IFMT) !== S_IFREG) {
        release()
        this.#unsent(node)
        throw new RangeError('create() returned a node that is not a regular file')
      }
      if (!this.#room(node)) {
        release()
        this.#unsent(node)
        return this.#error(call, E.ENFILE)
      }
      length += ENTRY_OUT
      at += ENTRY_OUT
    }
    const fh = this.#nextHandle++
    const out = this.#out
    out.writeBigUInt64LE(BigInt(fh), at)
    out.writeUInt32LE(flags, at + 8)
    out.writeInt32LE(0, at + 12)
    if (this.#reply(call, length)) {
      if (created) this.#ref(node)
      this.#handles.set(fh, { ino: node, dir, value: r.handle, busy: 0, closing: false })
      this.#stats.handles = this.#handles.size
    } else {
      // Nobody will release it: the driver never learned of it.
      release()
      if (created) this.#unsent(node)
    }
  }

  readonly #replyRead = (call: Call, result: number | Uint8Array): void => {
    let n: number
    if (typeof result === 'number') {
      if (!Number.isInteger(result) || result < 0 || result > call.length) {
        throw new RangeError(`read() returned ${result} for a read of ${call.length} bytes`)
      }
      n = result
    } else {
      n = Math.min(result.length, call.length)
      if (n > 0 && !call.copyFrom(result, 0, n)) return this.#drop(call)
    }
    this.#replyWithData(call, n)
  }

  /** Answers with `n` bytes already written after the header (a read). */
  #replyWithData(call: Call, n: number): void {
    if (call.answered) return
    call.answered = true
    this.#answer(call, OUT_HEADER + n, 0, OUT_HEADER)
  }

  readonly #replyWrite = (call: Call, written: number): void => {
    if (!Number.isInteger(written) || written < 0 || written > call.length) {
      throw new RangeError(`write() returned ${written} for a write of ${call.length} bytes`)
    }
    this.#out.writeUInt32LE(written, OUT_HEADER)
    this.#out.writeUInt32LE(0, OUT_HEADER + 4)
    this.#reply(call, 8)
  }

  readonly #replyOffset = (call: Call, offset: number): void => {
    if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`lseek() returned ${offset}`)
    this.#out.writeBigUInt64LE(BigInt(offset), OUT_HEADER)
    this.#reply(call, 8)
  }

  readonly #replyBytes = (call: Call, value: string | Uint8Array): void => {
    const bytes = typeof value === 'string' ? Buffer.from(value) : value
    if (bytes.length > PATH_MAX) throw new RangeError('readlink() returned more than 4096 bytes')
    this.#out.set(bytes, OUT_HEADER)
    this.#reply(call, bytes.length)
  }

  readonly #replyXattr = (call: Call, value: Uint8Array): void => {
    if (value.length > XATTR_SIZE_MAX) throw new RangeError('getxattr() returned more than 64 KiB')
    this.#sized(call, value)
  }

  readonly #replyXattrList = (call: Call, list: string[]): void => {
    const bytes = Buffer.from(list.map((n) => `${n}\0`).join(''))
    if (bytes.length > XATTR_SIZE_MAX) throw new RangeError('listxattr() returned more than 64 KiB')
    this.#sized(call, bytes)
  }

  /** An xattr answer: its size when asked with size 0, ERANGE when it does not fit, the bytes otherwise. */
  #sized(call: Call, bytes: Uint8Array): void {
    if (call.length === 0) {
      this.#out.writeUInt32LE(bytes.length, OUT_HEADER)
      this.#out.writeUInt32LE(0, OUT_HEADER + 4)
      return void this.#reply(call, 8)
    }
    if (bytes.length > call.length) return this.#error(call, E.ERANGE)
    this.#out.set(bytes, OUT_HEADER)
    this.#reply(call, bytes.length)
  }

  readonly #replyStatfs = (call: Call, s: StatFs): void => {
    const out = this.#out.fill(0, OUT_HEADER, OUT_HEADER + STATFS_OUT)
    const o = OUT_HEADER
    out.writeBigUInt64LE(BigInt(s.blocks ?? 0), o)
    out.writeBigUInt64LE(BigInt(s.bfree ?? 0), o + 8)
    out.writeBigUInt64LE(BigInt(s.bavail ?? 0), o + 16)
    out.writeBigUInt64LE(BigInt(s.files ?? 0), o + 24)
    out.writeBigUInt64LE(BigInt(s.ffree ?? 0), o + 32)
    out.writeUInt32LE(s.bsize ?? 4096, o + 40)
    out.writeUInt32LE(s.namelen ?? NAME_MAX, o + 44)
    out.writeUInt32LE(s.frsize ?? s.bsize ?? 4096, o + 48)
    this.#reply(call, STATFS_OUT)
  }

  readonly #replyDir = (call: Call, entries: Iterable<DirEntry>): void => {
    this.#listing(call, entries, false)
  }

  readonly #replyDirPlus = (call: Call, entries: Iterable<DirEntry>): void => {
    this.#listing(call, entries, true)
  }

  /**
   * Encodes as many entries as fit the driver's buffer, after the header. Every node the file system
   * returned with attributes is counted if this listing names it to the driver, and forgotten otherwise
   * (decided once the reply went out: the same node may appear twice, as hard links).
   */
  #listing(call: Call, entries: Iterable<DirEntry>, plus: boolean): void {
    const out = this.#out
    const limit = call.length
    const named = this.#plusInos
    named.length = 0
    const returned: number[] = []
    let used = 0
    try {
      for (const e of entries) {
        const nameBytes = Buffer.byteLength(e.name)
        if (nameBytes === 0 || nameBytes > NAME_MAX || e.name.includes('/') || e.name.includes('\0')) {
          throw new RangeError(`readdir() returned the name ${JSON.stringify(e.name)}`)
        }
        if (!Number.isSafeInteger(e.offset) || e.offset < 1) {
          throw new RangeError(`readdir() returned the offset ${e.offset} (cookies are ≥ 1)`)
        }
        if (!Number.isSafeInteger(e.ino) || e.ino < 1)
          throw new RangeError(`readdir() returned inode ${e.ino}`)
        const size = direntSize(nameBytes, plus)
        if (used + size > limit) {
          if (e.attr) returned.push(e.attr.ino)
          break
        }
        let at = OUT_HEADER + used
        if (plus) {
          const dot = e.name === '.' || e.name === '..'
          // Without attributes, for '.' and '..', or where a host directory is mounted, the entry names
          // no node (the driver looks it up: a node here would hide the mount).
          if (e.attr && !dot && e.mount === undefined && e.attr.ino === e.ino && this.#room(e.ino)) {
            this.#entryAt(at, { attr: e.attr })
            named.push(e.ino)
          } else {
            if (e.attr) returned.push(e.attr.ino)
            out.fill(0, at, at + ENTRY_OUT)
          }
          at += ENTRY_OUT
        } else if (e.attr) returned.push(e.attr.ino) // a plain listing names no nodes
        out.writeBigUInt64LE(BigInt(e.ino), at)
        out.writeBigUInt64LE(BigInt(e.offset), at + 8)
        out.writeUInt32LE(nameBytes, at + 16)
        out.writeUInt32LE(direntType(e.mode), at + 20)
        const written = out.write(e.name, at + DIRENT_BASE, nameBytes, 'utf8')
        out.fill(0, at + DIRENT_BASE + written, OUT_HEADER + used + size)
        used += size
      }
    } catch (err) {
      for (const ino of named) this.#unsent(ino)
      for (const ino of returned) this.#unsent(ino)
      throw err
    }
    if (this.#reply(call, used)) for (const ino of named) this.#ref(ino)
    else for (const ino of named) this.#unsent(ino)
    for (const ino of returned) this.#unsent(ino)
  }

  // ---- lifecycle ----

  protected inFlight(): number {
    return this.#pending.size
  }

  protected override onFenced(): void {
    // Calls whose requests died: their answers will be dropped. They stop counting, and hear of it.
    for (const [ticket, call] of this.#pending) {
      if (this.isLive(ticket)) continue
      this.#pending.delete(ticket)
      if (call.timer) clearTimeout(call.timer)
      this.#opened(call)
      call.abort('the driver reset the device')
    }
  }

  protected override onReset(): void {
    this.#endSession()
  }

  protected async shutdown(): Promise<void> {
    for (const call of this.#pending.values()) {
      if (call.timer) clearTimeout(call.timer)
      call.abort('the device is closing')
    }
    this.#pending.clear()
    this.#endSession()
  }
}

function intOption(
  value: number | undefined,
  fallback: number,
  min: number,
  max: number,
  name: string,
): number {
  const v = value ?? fallback
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new VduseError(`${name} must be an integer from ${min} to ${max}`, {
      code: 'ERR_VDUSE_INVALID_CONFIG',
    })
  }
  return v
}

function secondsOption(value: number | undefined, name: string): number {
  const v = value ?? 1
  if (!Number.isFinite(v) || v < 0 || v > 1e9) {
    throw new VduseError(`${name} must be a number of seconds ≥ 0`, { code: 'ERR_VDUSE_INVALID_CONFIG' })
  }
  return v
}

function need(argLen: number, bytes: number): void {
  if (argLen < bytes) throw new Malformed(E.EINVAL)
}

/** A u64 id the driver sent (a node id, a handle): past 2^53 none of ours can match. */
function readU64(b: Buffer, at: number): number {
  const hi = b.readUInt32LE(at + 4)
  if (hi >= 0x20_0000) throw new Malformed(E.EINVAL)
  return hi * 0x1_0000_0000 + b.readUInt32LE(at)
}

/** A u64 position or size: past 2^53 it is a legitimate value no file here reaches — `Infinity`. */
function readPos(b: Buffer, at: number): number {
  const hi = b.readUInt32LE(at + 4)
  return hi >= 0x20_0000 ? Infinity : hi * 0x1_0000_0000 + b.readUInt32LE(at)
}

/** `stats` of a natively served directory, from the binding's counters. */
function nativeStats(n: FsCounters): FsStats {
  return {
    requests: n.requests,
    errors: n.errors,
    malformed: n.malformed,
    unsupported: n.unsupported,
    sessions: n.sessions,
    nodes: n.nodes,
    handles: n.handles,
    bytesRead: n.bytesRead,
    bytesWritten: n.bytesWritten,
    syncs: n.syncs,
    maxNodes: n.maxNodes,
    maxHandles: n.maxHandles,
  }
}

/** A u64 count (nlookup): larger than any count can be, so clamped. */
function readCount(b: Buffer, at: number): number {
  return Math.min(readPos(b, at), Number.MAX_SAFE_INTEGER)
}

/**
 * `count` NUL-terminated names from `a[at, end)`, which they must fill exactly. Directory entry names
 * must be 1–255 bytes without '/' and not '.' or '..'; with `target`, the second is a symlink target
 * (1–4095 bytes).
 */
function names(a: Buffer, at: number, end: number, count: number, target = false): string[] {
  const out: string[] = []
  let p = at
  for (let k = 0; k < count; k++) {
    const nul = a.indexOf(0, p)
    if (nul < 0 || nul >= end) throw new Malformed(E.EINVAL)
    const len = nul - p
    const isTarget = target && k === 1
    if (len === 0) throw new Malformed(isTarget ? E.ENOENT : E.EINVAL)
    // Linux sends names up to 1024 bytes (FUSE_NAME_MAX): a longer one than a directory holds is an answer.
    if (len > (isTarget ? PATH_MAX - 1 : NAME_MAX)) throw new Refused(E.ENAMETOOLONG)
    const bytes = a.subarray(p, nul)
    if (!isTarget && bytes.includes(0x2f)) throw new Malformed(E.EINVAL)
    const s = utf8(bytes)
    if (!isTarget && (s === '.' || s === '..')) throw new Malformed(E.EINVAL)
    out.push(s)
    p = nul + 1
  }
  if (p !== end) throw new Malformed(E.EINVAL)
  return out
}

function xattrName(a: Buffer, at: number, nul: number): string {
  const len = nul - at
  if (len === 0) throw new Malformed(E.EINVAL)
  if (len > XATTR_NAME_MAX) throw new Refused(E.ERANGE)
  return utf8(a.subarray(at, nul))
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true })

/**
 * A name as a string. Names are strings in the FileSystem API, so bytes that are not UTF-8 (which
 * Linux allows) are refused with EILSEQ rather than mangled into another name.
 */
function utf8(bytes: Buffer): string {
  try {
    return STRICT_UTF8.decode(bytes)
  } catch {
    throw new Refused(E.EILSEQ)
  }
}

function setattrOf(a: Buffer, valid: number): SetAttr {
  const c: SetAttr = {}
  if (valid & FATTR.MODE) c.mode = a.readUInt32LE(68)
  if (valid & FATTR.UID) c.uid = a.readUInt32LE(76)
  if (valid & FATTR.GID) c.gid = a.readUInt32LE(80)
  if (valid & FATTR.SIZE) {
    c.size = readPos(a, 16)
    if (c.size > Number.MAX_SAFE_INTEGER) throw new Refused(E.EFBIG)
  }
  if (valid & FATTR.ATIME) c.atime = valid & FATTR.ATIME_NOW ? 'now' : timeAt(a, 32, 56)
  if (valid & FATTR.MTIME) c.mtime = valid & FATTR.MTIME_NOW ? 'now' : timeAt(a, 40, 60)
  if (valid & FATTR.CTIME) c.ctime = timeAt(a, 48, 64)
  return c
}

/** A time the driver sets; one a number cannot hold exactly is refused (EOVERFLOW), never rounded. */
function timeAt(a: Buffer, secAt: number, nsecAt: number): { sec: number; nsec: number } {
  const sec = a.readBigInt64LE(secAt)
  const nsec = a.readUInt32LE(nsecAt)
  if (sec > BigInt(Number.MAX_SAFE_INTEGER) || sec < BigInt(Number.MIN_SAFE_INTEGER) || nsec >= 1e9) {
    throw new Refused(E.EOVERFLOW)
  }
  return { sec: Number(sec), nsec }
}
