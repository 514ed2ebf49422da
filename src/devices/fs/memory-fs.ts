import {
  FsError,
  PassthroughMount,
  type DirEntry,
  type MountEntry,
  type FileIo,
  type FileSystem,
  type FsContext,
  type SetAttr,
  type StatFs,
} from './filesystem'
import {
  S_IFBLK,
  S_IFCHR,
  S_IFDIR,
  S_IFIFO,
  S_IFLNK,
  S_IFMT,
  S_IFREG,
  S_IFSOCK,
  type Attr,
  type Timespec,
} from './fuse'

const ROOT = 1
/** The context of the server's own creations (a mount point). */
const NEVER = new AbortController().signal
const O_TRUNC = 0o1000
const O_EXCL = 0o200
const XATTR_CREATE = 1
const XATTR_REPLACE = 2
const FALLOC_FL_KEEP_SIZE = 1
const FALLOC_FL_PUNCH_HOLE = 2
const FALLOC_FL_ZERO_RANGE = 0x10
const SEEK_DATA = 3
const SEEK_HOLE = 4
const RENAME_NOREPLACE = 1
const RENAME_EXCHANGE = 2
/** Cookies 1 and 2 are '.' and '..'; entries get 3 onwards. */
const FIRST_COOKIE = 3
/** File data is kept in chunks of this size, allocated when first written: sparse files stay small. */
const CHUNK = 64 * 1024
/** Largest file (bytes): like ext4's 16 TiB, well inside the numbers a double holds exactly. */
const MAX_FILE = 2 ** 44
/** What a node, a directory entry and an extended attribute cost beyond their bytes (for `maxBytes`). */
const NODE_COST = 256
const ENTRY_COST = 64
/** Extended attributes per node, names and values together (as ext4 allows in one block, but larger). */
const XATTR_NODE_MAX = 64 * 1024

interface Child {
  name: string
  ino: number
  cookie: number
  gone: boolean
}

/** A directory's entries: by name, and in cookie order for listings (removed ones are tombstones). */
class Entries {
  readonly byName = new Map<string, Child>()
  list: Child[] = []
  nextCookie = FIRST_COOKIE
  #tombs = 0

  get size(): number {
    return this.byName.size
  }

  add(name: string, ino: number): void {
    const c: Child = { name, ino, cookie: this.nextCookie++, gone: false }
    this.byName.set(name, c)
    this.list.push(c)
  }

  remove(name: string): void {
    const c = this.byName.get(name)
    if (!c) return
    this.byName.delete(name)
    c.gone = true
    // Compacting keeps listing cost proportional to the live entries; cookies do not change.
    if (++this.#tombs > 32 && this.#tombs > this.list.length / 2) {
      this.list = this.list.filter((x) => !x.gone)
      this.#tombs = 0
    }
  }

  /** Live entries with a cookie above `offset`, in order: a binary search, then a walk. */
  *after(offset: number): Generator<Child> {
    const list = this.list
    let lo = 0
    let hi = list.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (list[mid]!.cookie <= offset) lo = mid + 1
      else hi = mid
    }
    for (let i = lo; i < list.length; i++) if (!list[i]!.gone) yield list[i]!
  }
}

class Node {
  nlink: number
  size = 0
  /** A regular file's data, by chunk index; a missing chunk reads as zeros. */
  chunks: Map<number, Buffer> | undefined
  /** A symlink's target. */
  target: Buffer | undefined
  atime: Timespec
  mtime: Timespec
  ctime: Timespec
  readonly xattrs = new Map<string, Buffer>()
  xattrBytes = 0
  entries: Entries | undefined
  /** A host directory mounted here (an empty directory of ours underneath, never shown). */
  mount: PassthroughMount | undefined
  /** A directory's parent. */
  parent = ROOT
  /** The driver may refer to it (returned, not forgotten). */
  known = false
  opens = 0

  constructor(
    readonly ino: number,
    public mode: number,
    public uid: number,
    public gid: number,
    public rdev = 0,
  ) {
    const t = now()
    this.atime = t
    this.mtime = t
    this.ctime = t
    const type = mode & S_IFMT
    this.nlink = type === S_IFDIR ? 2 : 1
    if (type === S_IFDIR) this.entries = new Entries()
    if (type === S_IFREG) this.chunks = new Map()
  }

  get isDir(): boolean {
    return this.entries !== undefined
  }
}

function now(): Timespec {
  const ms = Date.now()
  return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1e6 }
}

export interface MemoryFsOptions {
  /**
   * Most bytes held (default 1 GiB): file data in 64 KiB chunks as written (holes cost nothing), symlink
   * targets, extended attributes, names, and a little per node. Past it, changes fail with ENOSPC.
   */
  maxBytes?: number
  /** Most nodes (default 1,048,576): creating more fails with ENOSPC. */
  maxNodes?: number
  /** Owner of the root directory (default: uid and gid 0) and its mode (default 0o755). */
  rootUid?: number
  rootGid?: number
  rootMode?: number
}

/**
 * A complete file system in memory: regular files (sparse: data in 64 KiB chunks as written, holes
 * punched), directories, symlinks, hard links, device nodes, FIFOs and sockets, extended attributes,
 * POSIX rename semantics (replace, RENAME_NOREPLACE, RENAME_EXCHANGE), and unlinked files that live on
 * while open or known to the driver. Everything it holds counts against `maxBytes`. Its data lives as
 * long as the object: serve it again after a remount and it is all still there.
 *
 * It checks no permissions beyond `access()`: the virtiofs driver checks them itself (it mounts with
 * `default_permissions`) from the modes and owners it is given.
 */
export class MemoryFs implements FileSystem<Node> {
  readonly #nodes = new Map<number, Node>()
  #nextIno = ROOT + 1
  #bytes = 0
  readonly #maxBytes: number
  readonly #maxNodes: number
  readonly #mounts = new Set<PassthroughMount>()
  #mountsRead = false

  constructor(options: MemoryFsOptions = {}) {
    this.#maxBytes = options.maxBytes ?? 1 << 30
    this.#maxNodes = options.maxNodes ?? 1 << 20
    const root = new Node(
      ROOT,
      S_IFDIR | (options.rootMode ?? 0o755),
      options.rootUid ?? 0,
      options.rootGid ?? 0,
    )
    root.known = true
    this.#nodes.set(ROOT, root)
    this.#bytes = NODE_COST
  }

  /** Bytes held (see `maxBytes`). */
  get bytes(): number {
    return this.#bytes
  }

  /** Nodes held (the root, linked ones, and unlinked ones still open or known to the driver). */
  get nodeCount(): number {
    return this.#nodes.size
  }

  // ---- names ----

  lookup(parent: number, name: string): Attr | MountEntry {
    const child = this.#child(this.#dir(parent), name)
    if (!child) throw new FsError('ENOENT')
    if (child.mount) return { mount: child.mount }
    return this.#known(child)
  }

  /**
   * Mounts host directory `mount` at `path` (absolute; its parent must be a directory here, and `path`
   * nothing yet or an empty directory): the driver sees the host directory there, served natively (see
   * `PassthroughMount`). Mount before the device is created (it reads `mounts()` then). The mount point
   * cannot be removed or renamed (EBUSY), as on Linux.
   */
  mount(path: string, mount: PassthroughMount): void {
    if (!PassthroughMount.is(mount)) throw new TypeError('mount() needs a PassthroughMount')
    if (this.#mountsRead) {
      throw new FsError('EBUSY', 'mount() before the device is created: it reads the mounts then')
    }
    const parts = typeof path === 'string' && path.startsWith('/') ? path.split('/').filter(Boolean) : []
    if (
      parts.length === 0 ||
      parts.some((p) => p === '.' || p === '..' || Buffer.byteLength(p) > 255 || p.includes('\0'))
    ) {
      throw new FsError(
        'EINVAL',
        `mount() needs an absolute path below the root, not ${JSON.stringify(path)}`,
      )
    }
    if (this.#mounts.has(mount)) throw new FsError('EBUSY', `${mount.dir} is mounted already`)
    let dir = this.#nodes.get(ROOT)!
    for (const p of parts.slice(0, -1)) {
      const next = this.#child(dir, p)
      if (!next?.isDir || next.mount) throw new FsError('ENOENT', `${path}: no directory ${p} to mount in`)
      dir = next
    }
    const name = parts[parts.length - 1]!
    let node = this.#child(dir, name)
    if (node && (!node.isDir || node.mount || node.entries!.size > 0)) {
      throw new FsError('EBUSY', `${path} is not an empty directory`)
    }
    if (!node) {
      // A directory of ours underneath, made as mkdir makes one (the driver never sees it).
      const ctx = { uid: dir.uid, gid: dir.gid, pid: 0, signal: NEVER }
      node = this.#create(dir.ino, name, S_IFDIR | 0o755, ctx)
      node.parent = dir.ino
      dir.nlink++
    }
    node.mount = mount
    this.#mounts.add(mount)
  }

  /** The mounts (a device reads them when it is created; `mount()` is refused from then on). */
  mounts(): Iterable<PassthroughMount> {
    this.#mountsRead = true
    return [...this.#mounts]
  }

  forget(ino: number): void {
    const node = this.#nodes.get(ino)
    if (!node || ino === ROOT) return
    node.known = false
    this.#maybeFree(node)
  }

  getattr(ino: number): Attr {
    return attrOf(this.#node(ino))
  }

  setattr(ino: number, c: SetAttr): Attr {
    const node = this.#node(ino)
    if (c.size !== undefined) {
      if (node.isDir) throw new FsError('EISDIR')
      if (!node.chunks) throw new FsError('EINVAL')
      this.#truncate(node, c.size)
      node.mtime = now()
    }
    if (c.mode !== undefined) node.mode = (node.mode & S_IFMT) | (c.mode & 0o7777)
    if (c.uid !== undefined) node.uid = c.uid
    if (c.gid !== undefined) node.gid = c.gid
    if (c.atime !== undefined) node.atime = c.atime === 'now' ? now() : c.atime
    if (c.mtime !== undefined) node.mtime = c.mtime === 'now' ? now() : c.mtime
    node.ctime = c.ctime ?? now()
    return attrOf(node)
  }

  readlink(ino: number): Buffer {
    const node = this.#node(ino)
    if (!node.target) throw new FsError('EINVAL')
    return node.target
  }

  symlink(parent: number, name: string, target: string, ctx: FsContext): Attr {
    const bytes = Buffer.from(target)
    this.#charge(bytes.length)
    const node = this.#create(parent, name, S_IFLNK | 0o777, ctx)
    node.target = bytes
    node.size = bytes.length
    return this.#known(node)
  }

  mknod(parent: number, name: string, mode: number, rdev: number, ctx: FsContext): Attr {
    const type = mode & S_IFMT
    if (![S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK, 0].includes(type)) throw new FsError('EINVAL')
    return this.#known(this.#create(parent, name, (type || S_IFREG) | (mode & 0o7777), ctx, rdev))
  }

  mkdir(parent: number, name: string, mode: number, ctx: FsContext): Attr {
    const dir = this.#dir(parent)
    const node = this.#create(parent, name, S_IFDIR | (mode & 0o7777), ctx)
    node.parent = parent
    dir.nlink++
    return this.#known(node)
  }

  unlink(parent: number, name: string): void {
    const dir = this.#dir(parent)
    const node = this.#child(dir, name)
    if (!node) throw new FsError('ENOENT')
    if (node.isDir) throw new FsError('EISDIR')
    this.#removeEntry(dir, name)
    node.nlink--
    node.ctime = now()
    this.#maybeFree(node)
  }

  rmdir(parent: number, name: string): void {
    const dir = this.#dir(parent)
    const node = this.#child(dir, name)
    if (!node) throw new FsError('ENOENT')
    if (!node.isDir) throw new FsError('ENOTDIR')
    if (node.mount) throw new FsError('EBUSY')
    if (node.entries!.size > 0) throw new FsError('ENOTEMPTY')
    this.#removeEntry(dir, name)
    dir.nlink--
    node.nlink = 0
    this.#maybeFree(node)
  }

  rename(parent: number, name: string, newParent: number, newName: string, flags: number): void {
    const from = this.#dir(parent)
    const to = this.#dir(newParent)
    const node = this.#child(from, name)
    if (!node) throw new FsError('ENOENT')
    const target = this.#child(to, newName)
    if (node.mount || target?.mount) throw new FsError('EBUSY')
    if (flags & RENAME_EXCHANGE) {
      if (!target) throw new FsError('ENOENT')
      if (node.isDir && this.#isWithin(newParent, node.ino)) throw new FsError('EINVAL')
      if (target.isDir && this.#isWithin(parent, target.ino)) throw new FsError('EINVAL')
      from.entries!.byName.get(name)!.ino = target.ino
      to.entries!.byName.get(newName)!.ino = node.ino
      if (node.isDir !== target.isDir && from !== to) {
        // The directory among the two changes parent: link counts follow it.
        const [gains, loses] = node.isDir ? [to, from] : [from, to]
        gains.nlink++
        loses.nlink--
      }
      if (node.isDir) node.parent = newParent
      if (target.isDir) target.parent = parent
      this.#touch(from, to, node, target)
      return
    }
    if (target === node) return // the same file under both names: nothing happens
    if (target) {
      if (flags & RENAME_NOREPLACE) throw new FsError('EEXIST')
      if (node.isDir && !target.isDir) throw new FsError('ENOTDIR')
      if (!node.isDir && target.isDir) throw new FsError('EISDIR')
      if (target.isDir && target.entries!.size > 0) throw new FsError('ENOTEMPTY')
    }
    if (node.isDir && this.#isWithin(newParent, node.ino)) throw new FsError('EINVAL')
    if (!target) this.#charge(ENTRY_COST + Buffer.byteLength(newName))
    if (target) {
      this.#removeEntry(to, newName)
      if (target.isDir) {
        to.nlink--
        target.nlink = 0
      } else target.nlink--
      this.#maybeFree(target)
    }
    this.#removeEntry(from, name)
    this.#addEntry(to, newName, node.ino, true)
    if (node.isDir) {
      from.nlink--
      to.nlink++
      node.parent = newParent
    }
    this.#touch(from, to, node, target)
  }

  link(ino: number, newParent: number, newName: string): Attr {
    const node = this.#node(ino)
    if (node.isDir) throw new FsError('EPERM')
    const dir = this.#dir(newParent)
    if (this.#child(dir, newName)) throw new FsError('EEXIST')
    this.#addEntry(dir, newName, ino)
    node.nlink++
    node.ctime = now()
    return this.#known(node)
  }

  // ---- files ----

  open(ino: number, flags: number): { handle: Node } {
    const node = this.#node(ino)
    // Linux truncates on O_TRUNC whatever the access mode (it asks for write permission first).
    if (flags & O_TRUNC && node.chunks && node.size > 0) {
      this.#truncate(node, 0)
      node.mtime = node.ctime = now()
    }
    node.opens++
    return { handle: node }
  }

  create(
    parent: number,
    name: string,
    mode: number,
    flags: number,
    ctx: FsContext,
  ): { handle: Node; entry: Attr } {
    const existing = this.#child(this.#dir(parent), name)
    if (existing) {
      if (flags & O_EXCL) throw new FsError('EEXIST')
      if (!existing.chunks) throw new FsError(existing.isDir ? 'EISDIR' : 'EEXIST')
      const opened = this.open(existing.ino, flags)
      return { handle: opened.handle, entry: this.#known(existing) }
    }
    const node = this.#create(parent, name, S_IFREG | (mode & 0o7777), ctx)
    node.opens++
    return { handle: node, entry: this.#known(node) }
  }

  read(ino: number, io: FileIo, handle: Node | undefined): number {
    const node = handle ?? this.#node(ino)
    const chunks = node.chunks
    if (!chunks) throw new FsError(node.isDir ? 'EISDIR' : 'EINVAL')
    if (io.offset >= node.size) return 0
    const n = Math.min(io.length, node.size - io.offset)
    for (let at = 0; at < n;) {
      const pos = io.offset + at
      const index = Math.floor(pos / CHUNK)
      const within = pos - index * CHUNK
      const k = Math.min(CHUNK - within, n - at)
      const chunk = chunks.get(index) ?? ZEROES
      if (!io.copyFrom(chunk, chunk === ZEROES ? 0 : within, k, at)) return 0
      at += k
    }
    return n
  }

  write(ino: number, io: FileIo, handle: Node | undefined): number {
    const node = handle ?? this.#node(ino)
    const chunks = node.chunks
    if (!chunks) throw new FsError(node.isDir ? 'EISDIR' : 'EINVAL')
    const end = io.offset + io.length
    if (end > MAX_FILE) throw new FsError('EFBIG')
    this.#allocate(node, io.offset, end)
    for (let at = 0; at < io.length;) {
      const pos = io.offset + at
      const index = Math.floor(pos / CHUNK)
      const within = pos - index * CHUNK
      const k = Math.min(CHUNK - within, io.length - at)
      if (!io.copyTo(chunks.get(index)!, within, k, at)) throw new FsError('EIO')
      at += k
    }
    if (end > node.size) node.size = end
    node.mtime = node.ctime = now()
    return io.length
  }

  release(_ino: number, handle: Node | undefined): void {
    if (!handle) return
    handle.opens--
    this.#maybeFree(handle)
  }

  flush(): void {}
  fsync(): void {}
  fsyncdir(): void {}

  fallocate(ino: number, mode: number, offset: number, length: number, handle: Node | undefined): void {
    const node = handle ?? this.#node(ino)
    if (!node.chunks) throw new FsError('ENODEV')
    const end = offset + length
    if (end > MAX_FILE) throw new FsError('EFBIG')
    const keep = (mode & FALLOC_FL_KEEP_SIZE) !== 0
    if (mode & FALLOC_FL_PUNCH_HOLE) {
      if (!keep || mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) throw new FsError('EOPNOTSUPP')
      this.#zero(node, offset, Math.min(end, node.size))
    } else if (mode & FALLOC_FL_ZERO_RANGE) {
      if (mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) throw new FsError('EOPNOTSUPP')
      this.#zero(node, offset, Math.min(end, node.size))
      this.#allocate(node, offset, end)
      if (!keep && end > node.size) node.size = end
    } else if ((mode & ~FALLOC_FL_KEEP_SIZE) === 0) {
      this.#allocate(node, offset, end)
      if (!keep && end > node.size) node.size = end
    } else throw new FsError('EOPNOTSUPP')
    node.mtime = node.ctime = now()
  }

  lseek(ino: number, offset: number, whence: number, handle: Node | undefined): number {
    const node = handle ?? this.#node(ino)
    if (whence === SEEK_DATA || whence === SEEK_HOLE) {
      if (offset >= node.size) throw new FsError('ENXIO')
      return whence === SEEK_DATA ? offset : node.size
    }
    throw new FsError('EINVAL') // SEEK_SET/CUR/END never leave the driver
  }

  // ---- directories ----

  opendir(ino: number): void {
    this.#dir(ino)
  }

  *readdir(ino: number, offset: number): Generator<DirEntry> {
    const dir = this.#dir(ino)
    if (offset < 1) yield { name: '.', ino, mode: S_IFDIR, offset: 1 }
    if (offset < 2) yield { name: '..', ino: dir.parent, mode: S_IFDIR, offset: 2 }
    for (const child of dir.entries!.after(offset)) {
      const node = this.#nodes.get(child.ino)!
      // A mount point names no node of ours: the driver looks it up (and finds the mount).
      yield node.mount
        ? { name: child.name, ino: child.ino, mode: S_IFDIR, offset: child.cookie, mount: node.mount }
        : { name: child.name, ino: child.ino, mode: node.mode, offset: child.cookie, attr: this.#known(node) }
    }
  }

  statfs(): StatFs {
    const blocks = Math.floor(this.#maxBytes / 4096)
    const free = Math.max(0, blocks - Math.ceil(this.#bytes / 4096))
    return {
      blocks,
      bfree: free,
      bavail: free,
      files: this.#maxNodes,
      ffree: this.#maxNodes - this.#nodes.size,
      bsize: 4096,
      frsize: 4096,
      namelen: 255,
    }
  }

  access(ino: number, mask: number, ctx: FsContext): void {
    const node = this.#node(ino)
    if (mask === 0) return
    if (ctx.uid === 0) {
      // root may read and write anything, and execute what anyone may execute.
      if (mask & 1 && !node.isDir && (node.mode & 0o111) === 0) throw new FsError('EACCES')
      return
    }
    let bits = node.mode & 0o7
    if (ctx.uid === node.uid) bits = (node.mode >> 6) & 7
    else if (ctx.gid === node.gid) bits = (node.mode >> 3) & 7
    if ((bits & mask) !== mask) throw new FsError('EACCES')
  }

  // ---- extended attributes ----

  getxattr(ino: number, name: string): Buffer {
    const value = this.#node(ino).xattrs.get(name)
    if (!value) throw new FsError('ENODATA')
    return value
  }

  setxattr(ino: number, name: string, value: Buffer, flags: number): void {
    checkXattrName(name)
    const node = this.#node(ino)
    const old = node.xattrs.get(name)
    if (flags & XATTR_CREATE && old) throw new FsError('EEXIST')
    if (flags & XATTR_REPLACE && !old) throw new FsError('ENODATA')
    const cost = (old ? 0 : Buffer.byteLength(name)) + value.length - (old?.length ?? 0)
    if (node.xattrBytes + cost > XATTR_NODE_MAX) throw new FsError('ENOSPC')
    this.#charge(cost)
    node.xattrBytes += cost
    node.xattrs.set(name, value)
    node.ctime = now()
  }

  listxattr(ino: number): string[] {
    return [...this.#node(ino).xattrs.keys()]
  }

  removexattr(ino: number, name: string): void {
    const node = this.#node(ino)
    const old = node.xattrs.get(name)
    if (!old) throw new FsError('ENODATA')
    node.xattrs.delete(name)
    const cost = Buffer.byteLength(name) + old.length
    node.xattrBytes -= cost
    this.#bytes -= cost
    node.ctime = now()
  }

  // ---- internals ----

  #node(ino: number): Node {
    const node = this.#nodes.get(ino)
    if (!node) throw new FsError('ESTALE')
    return node
  }

  #dir(ino: number): Node {
    const node = this.#node(ino)
    if (!node.isDir) throw new FsError('ENOTDIR')
    if (node.nlink === 0) throw new FsError('ENOENT') // removed, still someone's cwd
    return node
  }

  #child(dir: Node, name: string): Node | undefined {
    const c = dir.entries!.byName.get(name)
    return c ? this.#nodes.get(c.ino) : undefined
  }

  #known(node: Node): Attr {
    node.known = true
    return attrOf(node)
  }

  /** Takes `n` bytes of the budget (ENOSPC past `maxBytes`); a negative `n` gives some back. */
  #charge(n: number): void {
    if (n > 0 && this.#bytes + n > this.#maxBytes) throw new FsError('ENOSPC')
    this.#bytes += n
  }

  #create(parent: number, name: string, mode: number, ctx: FsContext, rdev = 0): Node {
    const dir = this.#dir(parent)
    if (dir.entries!.byName.has(name)) throw new FsError('EEXIST')
    if (this.#nodes.size >= this.#maxNodes) throw new FsError('ENOSPC')
    this.#charge(NODE_COST)
    // New nodes belong to the caller; in a set-group-ID directory, to its group (and subdirectories inherit it).
    const sgid = (dir.mode & 0o2000) !== 0
    const node = new Node(this.#nextIno++, mode, ctx.uid, sgid ? dir.gid : ctx.gid, rdev)
    if (sgid && node.isDir) node.mode |= 0o2000
    try {
      this.#addEntry(dir, name, node.ino)
    } catch (err) {
      this.#bytes -= NODE_COST
      throw err
    }
    this.#nodes.set(node.ino, node)
    return node
  }

  /** Adds an entry (its cost charged, unless `charged` already). */
  #addEntry(dir: Node, name: string, ino: number, charged = false): void {
    if (!charged) this.#charge(ENTRY_COST + Buffer.byteLength(name))
    dir.entries!.add(name, ino)
    dir.mtime = dir.ctime = now()
  }

  #removeEntry(dir: Node, name: string): void {
    dir.entries!.remove(name)
    this.#bytes -= ENTRY_COST + Buffer.byteLength(name)
    dir.mtime = dir.ctime = now()
  }

  #touch(from: Node, to: Node, a: Node, b: Node | undefined): void {
    const t = now()
    from.mtime = from.ctime = to.mtime = to.ctime = a.ctime = t
    if (b) b.ctime = t
  }

  /** Whether directory `ino` is `ancestor` or below it. */
  #isWithin(ino: number, ancestor: number): boolean {
    for (let at = ino; ;) {
      if (at === ancestor) return true
      if (at === ROOT) return false
      at = this.#nodes.get(at)!.parent
    }
  }

  /** A node nobody can reach any more goes, with what it holds. */
  #maybeFree(node: Node): void {
    if (node.nlink > 0 || node.opens > 0 || node.known || node.ino === ROOT) return
    this.#bytes -= NODE_COST + (node.chunks?.size ?? 0) * CHUNK + (node.target?.length ?? 0) + node.xattrBytes
    node.chunks?.clear()
    this.#nodes.delete(node.ino)
  }

  /** Chunks for bytes `[start, end)`; ENOSPC (and nothing allocated) past the budget. */
  #allocate(node: Node, start: number, end: number): void {
    const chunks = node.chunks!
    const first = Math.floor(start / CHUNK)
    const last = Math.ceil(end / CHUNK)
    let missing = 0
    for (let i = first; i < last; i++) if (!chunks.has(i)) missing++
    if (missing === 0) return
    this.#charge(missing * CHUNK)
    for (let i = first; i < last; i++) if (!chunks.has(i)) chunks.set(i, Buffer.alloc(CHUNK))
  }

  /** Bytes `[start, end)` read as zeros again; whole chunks are given back. */
  #zero(node: Node, start: number, end: number): void {
    const chunks = node.chunks!
    for (let pos = start; pos < end;) {
      const index = Math.floor(pos / CHUNK)
      const within = pos - index * CHUNK
      const k = Math.min(CHUNK - within, end - pos)
      const chunk = chunks.get(index)
      if (chunk && k === CHUNK) {
        chunks.delete(index)
        this.#bytes -= CHUNK
      } else chunk?.fill(0, within, within + k)
      pos += k
    }
  }

  /** Truncates (what is cut off reads as zeros if the file grows again) or extends (a hole). */
  #truncate(node: Node, size: number): void {
    if (size > MAX_FILE) throw new FsError('EFBIG')
    if (size < node.size) {
      this.#zero(node, size, Math.ceil(node.size / CHUNK) * CHUNK)
      // Chunks wholly past the end go even if a partial zeroing left them allocated.
      for (const index of node.chunks!.keys()) {
        if (index * CHUNK >= size) {
          node.chunks!.delete(index)
          this.#bytes -= CHUNK
        }
      }
    }
    node.size = size
  }
}

const ZEROES = Buffer.alloc(CHUNK)

function attrOf(n: Node): Attr {
  return {
    ino: n.ino,
    mode: n.mode,
    nlink: n.nlink,
    uid: n.uid,
    gid: n.gid,
    // A directory's size counts its entries, as tmpfs does (20 bytes each, '.' and '..' included).
    size: n.entries ? 20 * (n.entries.size + 2) : n.size,
    blocks: ((n.chunks?.size ?? 0) * CHUNK) / 512,
    rdev: n.rdev,
    blksize: 4096,
    atime: n.atime,
    mtime: n.mtime,
    ctime: n.ctime,
  }
}

function checkXattrName(name: string): void {
  // The namespaces Linux knows; POSIX ACLs (system.posix_acl_*) are not kept.
  if (!/^(user|trusted|security)\./.test(name) || name.indexOf('.') === name.length - 1) {
    throw new FsError('EOPNOTSUPP')
  }
}
