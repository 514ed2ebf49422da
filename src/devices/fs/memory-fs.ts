import {
  FsError,
  type DirEntry,
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
const O_ACCMODE = 3
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

interface Child {
  ino: number
  cookie: number
}

class Node {
  nlink: number
  size = 0
  /** File data (its length is the capacity), a symlink's target. */
  data: Buffer = EMPTY
  atime: Timespec
  mtime: Timespec
  ctime: Timespec
  readonly xattrs = new Map<string, Buffer>()
  /** A directory's entries, in creation order (a renamed entry moves to the end). */
  entries: Map<string, Child> | undefined
  nextCookie = FIRST_COOKIE
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
    this.nlink = (mode & S_IFMT) === S_IFDIR ? 2 : 1
    if ((mode & S_IFMT) === S_IFDIR) this.entries = new Map()
  }

  get isDir(): boolean {
    return (this.mode & S_IFMT) === S_IFDIR
  }
}

const EMPTY = Buffer.alloc(0)

function now(): Timespec {
  const ms = Date.now()
  return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1e6 }
}

export interface MemoryFsOptions {
  /** Most bytes of file data held (default 1 GiB): writes past it fail with ENOSPC. */
  maxBytes?: number
  /** Most nodes (default 1,048,576): creating more fails with ENOSPC. */
  maxNodes?: number
  /** Owner of the root directory (default: uid and gid 0) and its mode (default 0o755). */
  rootUid?: number
  rootGid?: number
  rootMode?: number
}

/**
 * A complete file system in memory: regular files (sparse reads, holes punched), directories, symlinks,
 * hard links, device nodes, FIFOs and sockets, extended attributes, POSIX rename semantics (replace,
 * RENAME_NOREPLACE, RENAME_EXCHANGE), and unlinked files that live on while open or known to the driver.
 * Its data lives as long as the object: serve it again after a remount and it is all still there.
 */
export class MemoryFs implements FileSystem<Node> {
  readonly #nodes = new Map<number, Node>()
  #nextIno = ROOT + 1
  #bytes = 0
  readonly #maxBytes: number
  readonly #maxNodes: number

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
  }

  /** Bytes of file data held. */
  get bytes(): number {
    return this.#bytes
  }

  /** Nodes held (the root, linked ones, and unlinked ones still open or known to the driver). */
  get nodeCount(): number {
    return this.#nodes.size
  }

  // ---- names ----

  lookup(parent: number, name: string): Attr {
    const child = this.#child(this.#dir(parent), name)
    if (!child) throw new FsError('ENOENT')
    return this.#known(child)
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

  setattr(ino: number, c: SetAttr, ctx: FsContext): Attr {
    const node = this.#node(ino)
    if (c.size !== undefined) {
      if (node.isDir) throw new FsError('EISDIR')
      if ((node.mode & S_IFMT) !== S_IFREG) throw new FsError('EINVAL')
      this.#resize(node, c.size)
      node.mtime = now()
    }
    if (c.mode !== undefined) node.mode = (node.mode & S_IFMT) | (c.mode & 0o7777)
    if (c.uid !== undefined) node.uid = c.uid
    if (c.gid !== undefined) node.gid = c.gid
    if (c.atime !== undefined) node.atime = c.atime === 'now' ? now() : c.atime
    if (c.mtime !== undefined) node.mtime = c.mtime === 'now' ? now() : c.mtime
    node.ctime = c.ctime ?? now()
    void ctx
    return attrOf(node)
  }

  readlink(ino: number): Buffer {
    const node = this.#node(ino)
    if ((node.mode & S_IFMT) !== S_IFLNK) throw new FsError('EINVAL')
    return node.data
  }

  symlink(parent: number, name: string, target: string, ctx: FsContext): Attr {
    const node = this.#create(parent, name, S_IFLNK | 0o777, ctx)
    node.data = Buffer.from(target)
    node.size = node.data.length
    return this.#known(node)
  }

  mknod(parent: number, name: string, mode: number, rdev: number, ctx: FsContext): Attr {
    const type = mode & S_IFMT
    const ok = [S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK, 0]
    if (!ok.includes(type)) throw new FsError('EINVAL')
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
    if (flags & RENAME_EXCHANGE) {
      if (!target) throw new FsError('ENOENT')
      if (node.isDir && this.#isWithin(newParent, node.ino)) throw new FsError('EINVAL')
      if (target.isDir && this.#isWithin(parent, target.ino)) throw new FsError('EINVAL')
      from.entries!.get(name)!.ino = target.ino
      to.entries!.get(newName)!.ino = node.ino
      if (node.isDir !== target.isDir && from !== to) {
        const [dirSide, otherSide] = node.isDir ? [to, from] : [from, to]
        dirSide.nlink++
        otherSide.nlink--
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
    if (target) {
      this.#removeEntry(to, newName)
      if (target.isDir) {
        to.nlink--
        target.nlink = 0
      } else target.nlink--
      this.#maybeFree(target)
    }
    this.#removeEntry(from, name)
    this.#addEntry(to, newName, node.ino)
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
    dir.mtime = dir.ctime = now()
    return this.#known(node)
  }

  // ---- files ----

  open(ino: number, flags: number): { handle: Node } {
    const node = this.#node(ino)
    if (node.isDir && (flags & O_ACCMODE) !== 0) throw new FsError('EISDIR')
    if (flags & O_TRUNC && (flags & O_ACCMODE) !== 0 && (node.mode & S_IFMT) === S_IFREG && node.size > 0) {
      this.#resize(node, 0)
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
      const opened = this.open(existing.ino, flags)
      return { handle: opened.handle, entry: this.#known(existing) }
    }
    const node = this.#create(parent, name, S_IFREG | (mode & 0o7777), ctx)
    node.opens++
    return { handle: node, entry: this.#known(node) }
  }

  read(ino: number, io: FileIo, handle: Node | undefined): number {
    const node = handle ?? this.#node(ino)
    if (io.offset >= node.size) return 0
    const n = Math.min(io.length, node.size - io.offset)
    // Bytes past the buffer (a file extended by truncate or fallocate) read as zeros.
    const stored = Math.max(0, Math.min(n, node.data.length - io.offset))
    if (stored > 0 && !io.copyFrom(node.data, io.offset, stored, 0)) return 0
    for (let at = stored; at < n; at += ZEROES.length) {
      if (!io.copyFrom(ZEROES, 0, Math.min(ZEROES.length, n - at), at)) return 0
    }
    return n
  }

  write(ino: number, io: FileIo, handle: Node | undefined): number {
    const node = handle ?? this.#node(ino)
    const end = io.offset + io.length
    this.#reserve(node, end)
    if (!io.copyTo(node.data, io.offset, io.length, 0)) throw new FsError('EIO')
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
    if ((node.mode & S_IFMT) !== S_IFREG) throw new FsError('ENODEV')
    const end = offset + length
    const keep = (mode & FALLOC_FL_KEEP_SIZE) !== 0
    if (mode & FALLOC_FL_PUNCH_HOLE) {
      if (!keep) throw new FsError('EOPNOTSUPP')
      node.data.fill(0, Math.min(offset, node.data.length), Math.min(end, node.data.length))
    } else if (mode & FALLOC_FL_ZERO_RANGE) {
      this.#reserve(node, end)
      node.data.fill(0, offset, end)
      if (!keep && end > node.size) node.size = end
    } else if ((mode & ~FALLOC_FL_KEEP_SIZE) === 0) {
      this.#reserve(node, end)
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
    if (whence === 0) return offset
    if (whence === 2) return node.size + offset
    throw new FsError('EINVAL')
  }

  // ---- directories ----

  opendir(ino: number): void {
    this.#dir(ino)
  }

  *readdir(ino: number, offset: number): Generator<DirEntry> {
    const dir = this.#dir(ino)
    if (offset < 1) yield { name: '.', ino, mode: S_IFDIR, offset: 1 }
    if (offset < 2) yield { name: '..', ino: dir.parent, mode: S_IFDIR, offset: 2 }
    for (const [name, child] of dir.entries!) {
      if (child.cookie <= offset) continue
      const node = this.#nodes.get(child.ino)!
      yield { name, ino: child.ino, mode: node.mode, offset: child.cookie, attr: this.#known(node) }
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
    let bits = node.mode & 0o7
    if (ctx.uid === 0) {
      // root may read and write anything, and execute what anyone may execute.
      if (mask & 1 && !node.isDir && (node.mode & 0o111) === 0) throw new FsError('EACCES')
      return
    }
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
    const has = node.xattrs.has(name)
    if (flags & XATTR_CREATE && has) throw new FsError('EEXIST')
    if (flags & XATTR_REPLACE && !has) throw new FsError('ENODATA')
    node.xattrs.set(name, value)
    node.ctime = now()
  }

  listxattr(ino: number): string[] {
    return [...this.#node(ino).xattrs.keys()]
  }

  removexattr(ino: number, name: string): void {
    const node = this.#node(ino)
    if (!node.xattrs.delete(name)) throw new FsError('ENODATA')
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
    const c = dir.entries!.get(name)
    return c ? this.#nodes.get(c.ino) : undefined
  }

  #known(node: Node): Attr {
    node.known = true
    return attrOf(node)
  }

  #create(parent: number, name: string, mode: number, ctx: FsContext, rdev = 0): Node {
    const dir = this.#dir(parent)
    if (dir.entries!.has(name)) throw new FsError('EEXIST')
    if (this.#nodes.size >= this.#maxNodes) throw new FsError('ENOSPC')
    // New nodes belong to the caller; in a set-group-ID directory, to its group (and subdirectories inherit it).
    const sgid = (dir.mode & 0o2000) !== 0
    const node = new Node(this.#nextIno++, mode, ctx.uid, sgid ? dir.gid : ctx.gid, rdev)
    if (sgid && node.isDir) node.mode |= 0o2000
    this.#nodes.set(node.ino, node)
    this.#addEntry(dir, name, node.ino)
    return node
  }

  #addEntry(dir: Node, name: string, ino: number): void {
    dir.entries!.set(name, { ino, cookie: dir.nextCookie++ })
    dir.mtime = dir.ctime = now()
  }

  #removeEntry(dir: Node, name: string): void {
    dir.entries!.delete(name)
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

  /** A node nobody can reach any more goes, with its data. */
  #maybeFree(node: Node): void {
    if (node.nlink > 0 || node.opens > 0 || node.known || node.ino === ROOT) return
    this.#bytes -= node.data.length
    node.data = EMPTY
    this.#nodes.delete(node.ino)
  }

  /** Room for `end` bytes of data; ENOSPC past the limit. */
  #reserve(node: Node, end: number): void {
    if (end <= node.data.length) return
    if (end > Number.MAX_SAFE_INTEGER || end > 0x7fff_ffff) throw new FsError('EFBIG')
    const capacity = Math.min(Math.max(end, Math.floor(node.data.length * 1.5), 4096), 0x7fff_ffff)
    const grow = capacity - node.data.length
    if (this.#bytes + grow > this.#maxBytes) {
      if (this.#bytes + end - node.data.length > this.#maxBytes) throw new FsError('ENOSPC')
      return this.#reallocate(node, end)
    }
    this.#reallocate(node, capacity)
  }

  #reallocate(node: Node, capacity: number): void {
    const next = Buffer.alloc(capacity)
    node.data.copy(next, 0, 0, Math.min(node.size, capacity, node.data.length))
    this.#bytes += capacity - node.data.length
    node.data = next
  }

  /** Truncates or extends (with zeros) to `size`. */
  #resize(node: Node, size: number): void {
    if (size > 0x7fff_ffff) throw new FsError('EFBIG')
    if (size < node.size) {
      // Bytes cut off must read as zeros if the file grows again.
      node.data.fill(0, Math.min(size, node.data.length), Math.min(node.size, node.data.length))
      if (size < node.data.length / 4) this.#reallocate(node, size)
    }
    node.size = size
  }
}

const ZEROES = Buffer.alloc(64 * 1024)

function attrOf(n: Node): Attr {
  return {
    ino: n.ino,
    mode: n.mode,
    nlink: n.nlink,
    uid: n.uid,
    gid: n.gid,
    // A directory's size counts its entries, as tmpfs does (20 bytes each, '.' and '..' included).
    size: n.entries ? 20 * (n.entries.size + 2) : n.size,
    blocks: Math.ceil(Math.min(n.size, n.data.length) / 512),
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
