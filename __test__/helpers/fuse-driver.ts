// A tiny virtio-fs driver over the in-process transport: FUSE requests laid out as Linux's virtiofs
// driver lays them out (in header + arguments readable; out header + reply writable).
import { FUSE_OP as OP, FsDevice, InProcessTransport, type FileSystem, type FsDeviceOptions } from '../../src'

export { OP }

export interface Reply {
  /** Negative errno, or 0. */
  error: number
  /** The reply after the out header (as long as the header's `len` says). */
  data: Buffer
  used: number
  fenced: boolean
  /** The out header's unique. */
  unique: bigint
  len: number
}

export function fsSetup(prefix: string) {
  let n = 0
  return async <H>(fs: FileSystem<H>, extra: Partial<FsDeviceOptions<H>> = {}) => {
    const transport = new InProcessTransport(64 << 20)
    const device = await FsDevice.create<H>({ name: `${prefix}${n++}`, tag: 'test', fs, transport, ...extra })
    device.unref()
    transport.start()
    return { device, transport, driver: new FuseDriver(transport) }
  }
}

export function cstr(s: string): Buffer {
  return Buffer.from(`${s}\0`)
}

function u32s(...values: number[]): Buffer {
  const b = Buffer.alloc(values.length * 4)
  values.forEach((v, i) => b.writeUInt32LE(v >>> 0, i * 4))
  return b
}

function u64(v: number | bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64LE(BigInt(v))
  return b
}

export interface Dirent {
  ino: number
  off: number
  type: number
  name: string
  nodeid?: number
}

export class FuseDriver {
  #unique = 1n
  constructor(readonly transport: InProcessTransport) {}

  header(
    opcode: number,
    nodeid: number,
    argBytes: number,
    extra: { unique?: bigint; uid?: number } = {},
  ): Buffer {
    const h = Buffer.alloc(40)
    h.writeUInt32LE(40 + argBytes, 0)
    h.writeUInt32LE(opcode, 4)
    h.writeBigUInt64LE(extra.unique ?? this.#unique++, 8)
    h.writeBigUInt64LE(BigInt(nodeid), 16)
    h.writeUInt32LE(extra.uid ?? 0, 24)
    return h
  }

  /** Sends a request: header + `args`; `replyBytes` of room after the out header. */
  async call(
    opcode: number,
    nodeid: number,
    args: Buffer[] = [],
    replyBytes = 4096,
    queue = 1,
  ): Promise<Reply> {
    const argBytes = args.reduce((s, a) => s + a.length, 0)
    const unique = this.#unique
    const res = await this.transport.request(
      [this.header(opcode, nodeid, argBytes), ...args],
      replyBytes > 0 ? [16, replyBytes] : [16],
      queue,
    )
    return parseReply(res.writable, res.used, res.fenced, unique)
  }

  /** Sends raw buffers as they are (hostile requests). */
  async raw(readable: Buffer[], writable: number[], queue = 1): Promise<Reply> {
    const res = await this.transport.request(readable, writable, queue)
    return parseReply(res.writable, res.used, res.fenced, 0n)
  }

  async init(maxPages = true): Promise<Reply> {
    const flags =
      (1 << 0) |
      (1 << 3) |
      (1 << 5) |
      (1 << 13) |
      (1 << 14) |
      (1 << 18) |
      (maxPages ? 1 << 22 : 0) |
      (1 << 23)
    return this.call(OP.INIT, 0, [u32s(7, 46, 131072, flags, 0), Buffer.alloc(44)], 64)
  }

  lookup(parent: number, name: string): Promise<Reply> {
    return this.call(OP.LOOKUP, parent, [cstr(name)], 128)
  }

  getattr(ino: number): Promise<Reply> {
    return this.call(OP.GETATTR, ino, [Buffer.alloc(16)], 104)
  }

  mkdir(parent: number, name: string, mode = 0o755): Promise<Reply> {
    return this.call(OP.MKDIR, parent, [u32s(mode, 0o022), cstr(name)], 128)
  }

  create(parent: number, name: string, mode = 0o644, flags = 0o102): Promise<Reply> {
    return this.call(OP.CREATE, parent, [u32s(flags, mode, 0o022, 0), cstr(name)], 144)
  }

  open(ino: number, flags = 2, dir = false): Promise<Reply> {
    return this.call(dir ? OP.OPENDIR : OP.OPEN, ino, [u32s(flags, 0)], 16)
  }

  release(ino: number, fh: bigint, dir = false): Promise<Reply> {
    return this.call(dir ? OP.RELEASEDIR : OP.RELEASE, ino, [u64(fh), u32s(0, 0), u64(0)], 0)
  }

  write(ino: number, fh: bigint, offset: number, data: Buffer): Promise<Reply> {
    return this.call(OP.WRITE, ino, [u64(fh), u64(offset), u32s(data.length, 0), u64(0), u32s(0, 0), data], 8)
  }

  read(ino: number, fh: bigint, offset: number, size: number): Promise<Reply> {
    return this.call(OP.READ, ino, [u64(fh), u64(offset), u32s(size, 0), u64(0), u32s(0, 0)], size)
  }

  async readdir(ino: number, fh: bigint, offset = 0, size = 4096, plus = false): Promise<Dirent[]> {
    const r = await this.call(
      plus ? OP.READDIRPLUS : OP.READDIR,
      ino,
      [u64(fh), u64(offset), u32s(size, 0), u64(0), u32s(0, 0)],
      size,
    )
    if (r.error) throw new Error(`readdir: ${r.error}`)
    return parseDirents(r.data, plus)
  }

  unlink(parent: number, name: string, dir = false): Promise<Reply> {
    return this.call(dir ? OP.RMDIR : OP.UNLINK, parent, [cstr(name)], 0)
  }

  rename(parent: number, name: string, newParent: number, newName: string, flags = 0): Promise<Reply> {
    if (flags === 0) return this.call(OP.RENAME, parent, [u64(newParent), cstr(name), cstr(newName)], 0)
    return this.call(OP.RENAME2, parent, [u64(newParent), u32s(flags, 0), cstr(name), cstr(newName)], 0)
  }

  forget(ino: number, nlookup: number): Promise<Reply> {
    return this.call(OP.FORGET, ino, [u64(nlookup)], 0, 0)
  }

  getxattr(ino: number, name: string, size: number): Promise<Reply> {
    return this.call(OP.GETXATTR, ino, [u32s(size, 0), cstr(name)], Math.max(size, 8))
  }

  setxattr(ino: number, name: string, value: Buffer, flags = 0): Promise<Reply> {
    return this.call(OP.SETXATTR, ino, [u32s(value.length, flags), cstr(name), value], 0)
  }
}

function parseReply(writable: Buffer[], used: number, fenced: boolean, unique: bigint): Reply {
  const all = Buffer.concat(writable)
  const len = used >= 16 ? all.readUInt32LE(0) : 0
  const error = used >= 16 ? all.readInt32LE(4) : 0
  return {
    error,
    data: all.subarray(16, Math.max(16, len)),
    used,
    fenced,
    unique: used >= 16 ? all.readBigUInt64LE(8) : unique,
    len,
  }
}

export function parseDirents(b: Buffer, plus: boolean): Dirent[] {
  const out: Dirent[] = []
  let at = 0
  while (at < b.length) {
    const nodeid = plus ? Number(b.readBigUInt64LE(at)) : undefined
    const d = plus ? at + 128 : at
    const namelen = b.readUInt32LE(d + 16)
    out.push({
      ino: Number(b.readBigUInt64LE(d)),
      off: Number(b.readBigUInt64LE(d + 8)),
      type: b.readUInt32LE(d + 20),
      name: b.toString('utf8', d + 24, d + 24 + namelen),
      ...(nodeid === undefined ? {} : { nodeid }),
    })
    at = d + ((24 + namelen + 7) & ~7)
  }
  return out
}

/** The node id and attributes of an entry reply (`fuse_entry_out`). */
export function entryOf(r: Reply): {
  nodeid: number
  ino: number
  mode: number
  size: number
  nlink: number
} {
  if (r.error) throw new Error(`expected an entry, got errno ${-r.error}`)
  return {
    nodeid: Number(r.data.readBigUInt64LE(0)),
    ino: Number(r.data.readBigUInt64LE(40)),
    size: Number(r.data.readBigUInt64LE(48)),
    mode: r.data.readUInt32LE(40 + 60),
    nlink: r.data.readUInt32LE(40 + 64),
  }
}

/** The file handle of an open or create reply. */
export function fhOf(r: Reply, created = false): bigint {
  if (r.error) throw new Error(`expected an open file, got errno ${-r.error}`)
  return r.data.readBigUInt64LE(created ? 128 : 0)
}
