// virtio-fs over the in-process transport: the FUSE codec, MemoryFs, a hostile driver, bounds, lifecycle.
import test from 'ava'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { JsonFs } from '../examples/json-fs'

import {
  FsDevice,
  FsError,
  InProcessTransport,
  MemoryFs,
  PassthroughMount,
  STATUS,
  loadFsPlugin,
  vhostUser,
  type FileSystem,
} from '../src'
import { OP, cstr, entryOf, fhOf, fsSetup } from './helpers/fuse-driver'

const setup = fsSetup('fs')
const ROOT = 1
const E = {
  ENOENT: 2,
  EIO: 5,
  EBADF: 9,
  EEXIST: 17,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
}
const MORE = { ERANGE: 34, ENOSYS: 38, ENOTEMPTY: 39, ENODATA: 61, ETIMEDOUT: 110, ESTALE: 116, EROFS: 30 }

test('a shared directory is served natively: refused in-process, options checked, a missing directory named', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-share-'))
  const inProcess = new InProcessTransport()
  await t.throwsAsync(FsDevice.create({ name: 's0', tag: 's', sharedDir: dir, transport: inProcess }), {
    code: 'ERR_VDUSE_UNAVAILABLE',
  })
  await t.throwsAsync(
    FsDevice.create({ name: 's0', tag: 's', sharedDir: dir, fs: new MemoryFs(), transport: inProcess }),
    { code: 'ERR_VDUSE_INVALID_CONFIG', message: /not both or neither/ },
  )
  await t.throwsAsync(FsDevice.create({ name: 's0', tag: 's', transport: inProcess }), {
    code: 'ERR_VDUSE_INVALID_CONFIG',
  })
  const sock = join(dir, '..', `vduse-share-${process.pid}.sock`)
  await t.throwsAsync(
    FsDevice.create({
      name: 's0',
      tag: 's',
      sharedDir: dir,
      cache: 'never',
      writebackCache: true,
      transport: vhostUser(sock),
    }),
    { code: 'ERR_VDUSE_INVALID_CONFIG', message: /writebackCache/ },
  )
  await t.throwsAsync(
    FsDevice.create({ name: 's0', tag: 's', sharedDir: join(dir, 'missing'), transport: vhostUser(sock) }),
    { code: 'ERR_VDUSE_NOT_FOUND' },
  )
  // Over vhost-user the native model serves it; its counters are the native server's.
  const device = await FsDevice.create({ name: 's0', tag: 's', sharedDir: dir, transport: vhostUser(sock) })
  try {
    t.is(device.sharedDir, dir)
    t.like(device.stats, { requests: 0, sessions: 0, nodes: 0, handles: 0 })
    t.true((device.stats.maxNodes ?? 0) >= 1024)
  } finally {
    await device.close()
  }
  t.like(device.stats, { requests: 0 }, 'counters stay readable after close')
})

test('host directories mounted in a MemoryFs: mount() rules, lookup and readdir of a mount point, served natively only', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-mount-'))
  const fs = new MemoryFs()
  const ctx = { uid: 0, gid: 0, pid: 1, signal: new AbortController().signal }
  const data = new PassthroughMount({ dir })
  t.throws(() => new PassthroughMount({ dir: '' }), { instanceOf: TypeError })
  const full = fs.mkdir(ROOT, 'full', 0o755, ctx)
  fs.mknod(full.ino, 'f', 0o100644, 0, ctx)
  for (const [path, code] of [
    ['relative', 'EINVAL'],
    ['/', 'EINVAL'],
    ['/a/../b', 'EINVAL'],
    ['/missing/data', 'ENOENT'],
    ['/full', 'EBUSY'],
  ] as const) {
    t.throws(() => fs.mount(path, data), { instanceOf: FsError, code }, path)
  }
  fs.mount('/data', data)
  t.throws(() => fs.mount('/again', data), { code: 'EBUSY' }, 'one place per mount')
  t.deepEqual([...fs.mounts()], [data])
  t.deepEqual(fs.lookup(ROOT, 'data'), { mount: data })
  const listed = [...fs.readdir(ROOT, 2)].find((e) => e.name === 'data')
  t.truthy(listed)
  t.is(listed!.attr, undefined, 'a mount point names no node of the TypeScript tree (READDIRPLUS: nodeid 0)')
  t.is(listed!.mount, data, 'and says so: the device names no node there whatever attr says')
  t.throws(() => fs.mount('/later', new PassthroughMount({ dir })), { code: 'EBUSY' }, 'mounts were read')
  t.throws(() => fs.rmdir(ROOT, 'data'), { code: 'EBUSY' })
  t.throws(() => fs.rename(ROOT, 'data', ROOT, 'moved', 0), { code: 'EBUSY' })
  t.throws(() => fs.rename(ROOT, 'full', ROOT, 'data', 0), { code: 'EBUSY' })

  // Mounts are served natively: refused in-process; over vhost-user the native side sets them up.
  await t.throwsAsync(FsDevice.create({ name: 'm0', tag: 'm', fs, transport: new InProcessTransport() }), {
    code: 'ERR_VDUSE_UNAVAILABLE',
  })
  const sock = join(dir, '..', `vduse-mount-${process.pid}.sock`)
  const missing = new MemoryFs()
  missing.mount('/data', new PassthroughMount({ dir: join(dir, 'missing') }))
  await t.throwsAsync(FsDevice.create({ name: 'm0', tag: 'm', fs: missing, transport: vhostUser(sock) }), {
    code: 'ERR_VDUSE_NOT_FOUND',
  })
  const bad = new MemoryFs()
  bad.mount('/data', new PassthroughMount({ dir, cache: 'never' }))
  await t.throwsAsync(
    FsDevice.create({ name: 'm0', tag: 'm', fs: bad, writebackCache: true, transport: vhostUser(sock) }),
    { code: 'ERR_VDUSE_INVALID_CONFIG' },
  )
  // Without create(), the driver would stop sending CREATE for every tree, the mounts too.
  const noCreate: FileSystem = {
    lookup: () => ({ mount: data }),
    getattr: () => fs.getattr(ROOT),
    readdir: () => [],
    read: () => 0,
    mounts: () => [data],
  }
  await t.throwsAsync(FsDevice.create({ name: 'm0', tag: 'm', fs: noCreate, transport: vhostUser(sock) }), {
    code: 'ERR_VDUSE_INVALID_CONFIG',
    message: /create/,
  })
  const device = await FsDevice.create({ name: 'm0', tag: 'm', fs, transport: vhostUser(sock) })
  try {
    t.is(device.mountStats.length, 1)
    t.like(device.mountStats[0], { requests: 0, sessions: 0, nodes: 0, handles: 0 })
    t.true((device.mountStats[0]!.maxNodes ?? 0) >= 1024)
  } finally {
    await device.close()
  }
  t.is(device.mountStats.length, 1, 'counters stay readable after close')
})

test('an ENOSYS thrown by open() reaches the driver as EOPNOTSUPP: ENOSYS would turn opens off for the session', async (t) => {
  class NoOpen extends MemoryFs {
    override open(): never {
      throw new FsError('ENOSYS')
    }
  }
  const { device, driver } = await setup(new NoOpen())
  await driver.init()
  const node = entryOf(await driver.create(ROOT, 'f')).nodeid
  t.is((await driver.open(node)).error, -95)
  await device.close()
})

test('INIT negotiates 7.38 with max_pages; the config space holds the tag and queue count', async (t) => {
  const { device, transport, driver } = await setup(new MemoryFs(), { requestQueues: 2 })
  t.is(transport.config.toString('utf8', 0, 4), 'test')
  t.is(transport.config.readUInt32LE(36), 2)
  t.is(transport.config.length, 40)
  const sessions: unknown[] = []
  device.on('session', (s) => sessions.push(s))
  const r = await driver.init()
  t.is(r.error, 0)
  t.is(r.data.readUInt32LE(0), 7)
  t.is(r.data.readUInt32LE(4), 38)
  t.is(r.data.readUInt32LE(20), 1 << 20, 'max_write')
  t.is(r.data.readUInt16LE(28), 256, 'max_pages')
  t.truthy(r.data.readUInt32LE(12) & (1 << 13), 'DO_READDIRPLUS granted')
  t.falsy(r.data.readUInt32LE(12) & (1 << 16), 'no writeback cache unless asked')
  t.is(sessions.length, 1)
  await device.close()
})

test('MemoryFs: create, write, read back, stat, sparse tail reads as zeros', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  await driver.init()
  const c = await driver.create(ROOT, 'a.txt')
  const node = entryOf(c).nodeid
  const fh = fhOf(c, true)
  const data = Buffer.from('hello, virtio-fs')
  const w = await driver.write(node, fh, 0, data)
  t.is(w.error, 0)
  t.is(w.data.readUInt32LE(0), data.length)
  const r = await driver.read(node, fh, 0, 4096)
  t.deepEqual(r.data, data)
  t.is((await driver.read(node, fh, 7, 5)).data.toString(), 'virti')
  t.is((await driver.read(node, fh, 100, 10)).data.length, 0, 'past EOF: no bytes')
  // Extend by truncate: the new tail reads as zeros.
  const setattr = Buffer.alloc(88)
  setattr.writeUInt32LE(1 << 3, 0)
  setattr.writeBigUInt64LE(100_000n, 16)
  const s = await driver.call(OP.SETATTR, node, [setattr], 104)
  t.is(s.error, 0)
  t.is(Number(s.data.readBigUInt64LE(16 + 8)), 100_000)
  const tail = await driver.read(node, fh, 90_000, 8192)
  t.is(tail.data.length, 8192)
  t.true(tail.data.every((b) => b === 0))
  t.is((await driver.release(node, fh)).error, 0)
  await device.close()
})

test('MemoryFs: directories list with stable cookies; READDIRPLUS carries entries', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  await driver.init()
  const dir = entryOf(await driver.mkdir(ROOT, 'd')).nodeid
  for (let i = 0; i < 300; i++) entryOf(await driver.create(dir, `file-${i}`))
  const fh = fhOf(await driver.open(dir, 0, true))
  const names: string[] = []
  let offset = 0
  for (;;) {
    const batch = await driver.readdir(dir, fh, offset, 1024)
    if (batch.length === 0) break
    names.push(...batch.map((e) => e.name))
    offset = batch[batch.length - 1]!.off
  }
  t.is(names.length, 302)
  t.deepEqual(names.slice(0, 2), ['.', '..'])
  t.is(new Set(names).size, 302, 'no entry twice across calls')
  const plus = await driver.readdir(dir, fh, 0, 4096, true)
  t.is(plus[0]!.nodeid, 0, "'.' names no node")
  t.true(plus.slice(2).every((e) => e.nodeid === e.ino && e.ino > 1))
  t.is(device.stats.nodes, 1 + 300, 'entries with attributes were counted as lookups')
  t.is((await driver.release(dir, fh, true)).error, 0)
  await device.close()
})

test('MemoryFs: rename semantics (replace, NOREPLACE, EXCHANGE, into own subtree, non-empty dir)', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  await driver.init()
  const a = entryOf(await driver.mkdir(ROOT, 'a')).nodeid
  const b = entryOf(await driver.mkdir(a, 'b')).nodeid
  entryOf(await driver.create(ROOT, 'f'))
  entryOf(await driver.create(ROOT, 'g'))
  entryOf(await driver.create(b, 'inside'))
  t.is((await driver.rename(ROOT, 'a', b, 'loop')).error, -E.EINVAL, 'a directory into its own subtree')
  t.is((await driver.rename(ROOT, 'f', ROOT, 'g', 1)).error, -E.EEXIST, 'NOREPLACE')
  t.is((await driver.rename(ROOT, 'f', ROOT, 'a')).error, -E.EISDIR)
  t.is((await driver.rename(a, 'b', ROOT, 'f')).error, -E.ENOTDIR)
  entryOf(await driver.mkdir(ROOT, 'full'))
  const full = entryOf(await driver.lookup(ROOT, 'full')).nodeid
  entryOf(await driver.create(full, 'x'))
  t.is((await driver.rename(a, 'b', ROOT, 'full')).error, -MORE.ENOTEMPTY)
  t.is((await driver.rename(ROOT, 'f', ROOT, 'g')).error, 0, 'replace')
  t.is((await driver.lookup(ROOT, 'f')).error, -E.ENOENT)
  t.is((await driver.rename(ROOT, 'g', a, 'b', 2)).error, 0, 'EXCHANGE a file and a directory')
  t.is(entryOf(await driver.lookup(ROOT, 'g')).nodeid, b)
  const root = entryOf(await driver.lookup(a, 'b'))
  t.is(root.mode & 0o170000, 0o100000)
  t.is((await driver.rename(ROOT, 'nope', ROOT, 'x', 2)).error, -E.ENOENT)
  await device.close()
})

test('MemoryFs: hard links, symlinks, unlink while open, forget frees', async (t) => {
  const fs = new MemoryFs()
  const { device, driver } = await setup(fs)
  await driver.init()
  const c = await driver.create(ROOT, 'f')
  const f = entryOf(c).nodeid
  const fh = fhOf(c, true)
  await driver.write(f, fh, 0, Buffer.alloc(10_000, 7))
  const linkArgs = Buffer.alloc(8)
  linkArgs.writeBigUInt64LE(BigInt(f))
  const l = entryOf(await driver.call(OP.LINK, ROOT, [linkArgs, cstr('g')], 128))
  t.is(l.nodeid, f)
  t.is(l.nlink, 2)
  const s = entryOf(await driver.call(OP.SYMLINK, ROOT, [cstr('s'), cstr('/far/away')], 128))
  t.is((await driver.call(OP.READLINK, s.nodeid, [], 4096)).data.toString(), '/far/away')
  const nodes = fs.nodeCount
  t.is((await driver.unlink(ROOT, 'f')).error, 0)
  t.is((await driver.unlink(ROOT, 'g')).error, 0)
  t.is(fs.nodeCount, nodes, 'unlinked but open and known: kept')
  t.is((await driver.read(f, fh, 0, 16)).data[0], 7, 'still readable through the open handle')
  await driver.release(f, fh)
  t.is(fs.nodeCount, nodes, 'still known to the driver')
  const held = fs.bytes
  await driver.forget(f, 3) // create + link + … — more than it had: the count just ends
  t.is(fs.nodeCount, nodes - 1, 'forgotten: freed')
  t.is(held - fs.bytes, 65536 + 256, 'its data chunk and the node given back')
  await device.close()
})

test('MemoryFs: xattrs with the size protocol (size query, ERANGE, ENODATA, CREATE/REPLACE)', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  await driver.init()
  const f = entryOf(await driver.create(ROOT, 'f')).nodeid
  t.is((await driver.setxattr(f, 'user.k', Buffer.from('value'))).error, 0)
  t.is((await driver.setxattr(f, 'user.k', Buffer.from('v2'), 1)).error, -E.EEXIST)
  t.is((await driver.setxattr(f, 'user.none', Buffer.from('v'), 2)).error, -MORE.ENODATA)
  t.is((await driver.setxattr(f, 'bogus.k', Buffer.from('v'))).error, -95, 'unknown namespace: EOPNOTSUPP')
  const size = await driver.getxattr(f, 'user.k', 0)
  t.is(size.data.readUInt32LE(0), 5)
  t.is((await driver.getxattr(f, 'user.k', 2)).error, -MORE.ERANGE)
  t.is((await driver.getxattr(f, 'user.k', 64)).data.toString(), 'value')
  t.is((await driver.getxattr(f, 'user.none', 64)).error, -MORE.ENODATA)
  const list = await driver.call(OP.LISTXATTR, f, [Buffer.from([64, 0, 0, 0, 0, 0, 0, 0])], 64)
  t.is(list.data.toString(), 'user.k\0')
  t.is((await driver.call(OP.REMOVEXATTR, f, [cstr('user.k')], 0)).error, 0)
  await device.close()
})

test('a hostile driver gets errnos, never a crash: headers, lengths, names, node ids, handles', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  t.is((await driver.lookup(ROOT, 'x')).error, -E.EIO, 'before INIT')
  await driver.init()
  // A header shorter than fuse_in_header.
  t.is((await driver.raw([Buffer.alloc(20)], [16])).error, -E.EINVAL)
  // len says more than was given.
  const h = driver.header(OP.GETATTR, ROOT, 16)
  h.writeUInt32LE(4000, 0)
  t.is((await driver.raw([h, Buffer.alloc(16)], [16, 104])).error, -E.EINVAL)
  // Extensions never granted.
  const ext = driver.header(OP.GETATTR, ROOT, 16)
  ext.writeUInt16LE(1, 36)
  t.is((await driver.raw([ext, Buffer.alloc(16)], [16, 104])).error, -E.EINVAL)
  t.is((await driver.call(999, ROOT, [], 16)).error, -MORE.ENOSYS, 'unknown opcode')
  t.is((await driver.getattr(12345)).error, -MORE.ESTALE, 'a forged node id')
  t.is((await driver.getattr(2 ** 60)).error, -E.EINVAL, 'a node id past 2^53')
  t.is((await driver.lookup(ROOT, 'a/b')).error, -E.EINVAL, "a '/' in a name")
  t.is((await driver.lookup(ROOT, '..')).error, -E.EINVAL)
  t.is((await driver.lookup(ROOT, 'x'.repeat(256))).error, -36, 'ENAMETOOLONG')
  t.is((await driver.call(OP.LOOKUP, ROOT, [Buffer.from('no-nul')], 128)).error, -E.EINVAL, 'no NUL')
  t.is((await driver.call(OP.LOOKUP, ROOT, [cstr('a'), Buffer.from('trailing')], 128)).error, -E.EINVAL)
  const f = entryOf(await driver.create(ROOT, 'f'))
  t.is((await driver.read(f.nodeid, 777n, 0, 16)).error, -E.EBADF, 'a forged handle')
  const fh = fhOf(await driver.open(f.nodeid))
  t.is((await driver.read(ROOT, fh, 0, 16)).error, -E.EBADF, 'a handle of another node')
  t.is((await driver.read(f.nodeid, fh, 0, 2 << 20)).error, -E.EINVAL, 'a read past max_read')
  // A write whose size field disagrees with its data.
  const w = Buffer.alloc(40)
  w.writeBigUInt64LE(fh, 0)
  w.writeUInt32LE(100, 16)
  t.is((await driver.call(OP.WRITE, f.nodeid, [w, Buffer.alloc(10)], 8)).error, -E.EINVAL)
  // A reply buffer too small for an entry: an error header still fits.
  t.is((await driver.call(OP.LOOKUP, ROOT, [cstr('f')], 8)).error, -E.EINVAL)
  // No room even for a header: answered empty.
  t.is((await driver.raw([driver.header(OP.GETATTR, ROOT, 16), Buffer.alloc(16)], [8])).used, 0)
  // A BATCH_FORGET whose count does not match its length is ignored (never answered).
  const bf = Buffer.alloc(8)
  bf.writeUInt32LE(1000, 0)
  t.is((await driver.call(OP.BATCH_FORGET, 0, [bf], 0, 0)).used, 0)
  t.true(device.stats.malformed >= 14)
  t.is((await driver.getattr(f.nodeid)).error, 0, 'still serving')
  await device.close()
})

test('bounds: nodes the driver may know and open handles are limited', async (t) => {
  const { device, driver } = await setup(new MemoryFs(), { maxNodes: 16, maxHandles: 4 })
  await driver.init()
  const results: number[] = []
  for (let i = 0; i < 20; i++) results.push((await driver.mkdir(ROOT, `d${i}`)).error)
  t.is(results.filter((e) => e === 0).length, 16)
  t.true(results.slice(16).every((e) => e === -E.ENFILE))
  t.is(device.stats.nodes, 16)
  const opened: number[] = []
  for (let i = 0; i < 6; i++) opened.push((await driver.open(ROOT, 0, true)).error)
  t.deepEqual(opened, [0, 0, 0, 0, -E.EMFILE, -E.EMFILE])
  await device.close()
})

test('read-only: every change is refused with EROFS', async (t) => {
  const { device, driver } = await setup(new MemoryFs(), { readOnly: true })
  await driver.init()
  t.is((await driver.mkdir(ROOT, 'd')).error, -MORE.EROFS)
  t.is((await driver.create(ROOT, 'f')).error, -MORE.EROFS)
  t.is((await driver.open(ROOT, 0, true)).error, 0)
  await device.close()
})

/** Every method of a MemoryFs, bound: to override some in a plain object. */
function bound(fs: MemoryFs): FileSystem {
  const out: Record<string, unknown> = {}
  for (const key of Object.getOwnPropertyNames(MemoryFs.prototype)) {
    const v = (fs as unknown as Record<string, unknown>)[key]
    if (key !== 'constructor' && typeof v === 'function') out[key] = (v as () => unknown).bind(fs)
  }
  return out as unknown as FileSystem
}

/** A MemoryFs that records what it is told to forget. */
class Gated extends MemoryFs {
  forgotten: number[] = []
  override forget(ino: number): void {
    this.forgotten.push(ino)
    super.forget(ino)
  }
}

test('a handler that throws answers EIO and is reported; FsError and fs codes answer their errno', async (t) => {
  const fs: FileSystem = {
    lookup(_p, name) {
      if (name === 'boom') throw new Error('bug')
      if (name === 'code') throw Object.assign(new Error('x'), { code: 'EACCES' })
      throw new FsError('ENOENT')
    },
    getattr: () => {
      throw new FsError('EIO')
    },
    readdir: () => [],
    read: () => 0,
  }
  const { device, driver } = await setup(fs)
  const errors: Error[] = []
  device.on('requestError', (e) => errors.push(e))
  await driver.init()
  t.is((await driver.lookup(ROOT, 'boom')).error, -E.EIO)
  t.is(errors.length, 1)
  t.is((await driver.lookup(ROOT, 'code')).error, -13)
  t.is((await driver.lookup(ROOT, 'x')).error, -E.ENOENT)
  t.is(errors.length, 1, 'errno errors are answers, not failures')
  t.is((await driver.call(OP.MKDIR, ROOT, [Buffer.alloc(8), cstr('d')], 128)).error, -MORE.ENOSYS)
  await device.close()
})

test('a reset with a hanging call: fenced, never answered, its late result is forgotten; the next session is clean', async (t) => {
  const fs = new Gated()
  let release: () => void = () => {}
  let gate = false
  const slow: FileSystem = {
    ...bound(fs),
    lookup: async (p, n, ctx) => {
      if (!gate) return fs.lookup(p, n)
      await new Promise<void>((r) => (release = r))
      t.true(ctx.signal.aborted, 'the call heard of the reset')
      return fs.lookup(p, n)
    },
  }
  const { device, transport, driver } = await setup(slow, { drainTimeoutMs: 100 })
  await driver.init()
  entryOf(await driver.create(ROOT, 'f'))
  t.is(device.stats.nodes, 1)
  gate = true
  const pending = driver.lookup(ROOT, 'f')
  await new Promise((r) => setImmediate(r))
  t.is(transport.reset(), 1, 'one request fenced')
  t.true((await pending).fenced)
  t.is(device.stats.nodes, 0, 'the session ended: its nodes are forgotten')
  t.true(fs.forgotten.length >= 1)
  const before = fs.forgotten.length
  release()
  const deadline = Date.now() + 5000
  while (fs.forgotten.length === before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
  t.is(fs.forgotten.length, before + 1, 'the late lookup result never reached the driver: forgotten')
  transport.start()
  t.truthy(device.status & STATUS.DRIVER_OK)
  await driver.init()
  t.is((await driver.getattr(2)).error, -MORE.ESTALE, 'nodes of the old session are unknown to the new one')
  await device.close()
})

test('requestTimeoutMs: a call past its deadline answers ETIMEDOUT; the handle it opens late is released', async (t) => {
  let released = 0
  const fs = new MemoryFs()
  const slow: FileSystem<string> = {
    lookup: (p, n) => fs.lookup(p, n),
    getattr: (i) => fs.getattr(i),
    readdir: () => [],
    read: () => 0,
    opendir: async () => {
      await new Promise((r) => setTimeout(r, 200))
      return { handle: 'late' }
    },
    releasedir: (_ino, handle) => {
      if (handle === 'late') released++
    },
  }
  const { device, driver } = await setup(slow, { requestTimeoutMs: 50 })
  await driver.init()
  const r = await driver.open(ROOT, 0, true)
  t.is(r.error, -MORE.ETIMEDOUT)
  await new Promise((r) => setTimeout(r, 300))
  t.is(released, 1)
  t.is(device.stats.handles, 0)
  await device.close()
})

test('INIT again ends the session: handles released, nodes forgotten', async (t) => {
  const fs = new Gated()
  const { device, driver } = await setup(fs)
  await driver.init()
  const c = await driver.create(ROOT, 'f')
  t.is(device.stats.handles, 1)
  t.is(device.stats.nodes, 1)
  await driver.init()
  t.is(device.stats.handles, 0)
  t.is(device.stats.nodes, 0)
  t.deepEqual(fs.forgotten, [entryOf(c).nodeid])
  await device.close()
})

test('options are checked', async (t) => {
  const fs = new MemoryFs()
  await t.throwsAsync(setup(fs, { tag: '' }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await t.throwsAsync(setup(fs, { tag: 'x'.repeat(37) }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await t.throwsAsync(setup(fs, { maxWrite: 5000 }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await t.throwsAsync(setup(fs, { requestQueues: 0 }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await t.throwsAsync(setup({} as FileSystem), { code: 'ERR_VDUSE_INVALID_CONFIG' })
})

test('the JsonFs example serves a read-only tree from a JSON object', async (t) => {
  const { device, driver } = await setup(new JsonFs({ etc: { hostname: 'box', port: 8080 }, readme: 'hi' }))
  await driver.init()
  const etc = entryOf(await driver.lookup(ROOT, 'etc'))
  t.is(etc.mode & 0o170000, 0o040000)
  const host = entryOf(await driver.lookup(etc.nodeid, 'hostname'))
  const fh = fhOf(await driver.open(host.nodeid, 0))
  t.is((await driver.read(host.nodeid, fh, 0, 100)).data.toString(), 'box')
  const port = entryOf(await driver.lookup(etc.nodeid, 'port'))
  t.is(port.size, 4)
  const dh = fhOf(await driver.open(etc.nodeid, 0, true))
  t.deepEqual(
    (await driver.readdir(etc.nodeid, dh)).map((e) => e.name),
    ['hostname', 'port'],
  )
  t.is((await driver.lookup(ROOT, 'nope')).error, -E.ENOENT)
  t.is((await driver.mkdir(ROOT, 'd')).error, -MORE.ENOSYS, 'read-only by having no mkdir')
  await device.close()
})

test('a file-system plugin loads with loadFsPlugin; a module that returns no file system is refused', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'fsplugin-'))
  writeFileSync(join(dir, 'tree.json'), JSON.stringify({ a: 'b' }))
  const fs = await loadFsPlugin(
    '../examples/json-fs.ts',
    { name: 'p', tag: 'p', readOnly: true, args: [join(dir, 'tree.json')] },
    __dirname,
  )
  t.is(typeof fs.lookup, 'function')
  writeFileSync(join(dir, 'bad.mjs'), 'export default () => ({ lookup() {} })')
  await t.throwsAsync(loadFsPlugin('./bad.mjs', { name: 'p', tag: 'p', readOnly: false, args: [] }, dir), {
    code: 'ERR_VDUSE_INVALID_CONFIG',
    message: /did not return a file system/,
  })
})

test('names that are not UTF-8 are refused with EILSEQ (never mangled into another name)', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  await driver.init()
  const bad = Buffer.from([0xe9, 0])
  t.is((await driver.call(OP.LOOKUP, ROOT, [bad], 128)).error, -84)
  const args = Buffer.alloc(16)
  args.writeUInt32LE(0o100644, 4)
  t.is((await driver.call(OP.CREATE, ROOT, [args, bad], 144)).error, -84)
  t.is(device.stats.malformed, 0, 'a legitimate name the API cannot carry, not a malformed request')
  await device.close()
})

test('values past 2^53: huge times EOVERFLOW, huge sizes EFBIG, reads there end the file', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  await driver.init()
  const c = await driver.create(ROOT, 'f')
  const f = entryOf(c).nodeid
  const fh = fhOf(c, true)
  const times = Buffer.alloc(88)
  times.writeUInt32LE(1 << 5, 0) // MTIME
  times.writeBigInt64LE(2n ** 63n - 1n, 40)
  t.is((await driver.call(OP.SETATTR, f, [times], 104)).error, -75)
  const size = Buffer.alloc(88)
  size.writeUInt32LE(1 << 3, 0)
  size.writeBigUInt64LE(2n ** 60n, 16)
  t.is((await driver.call(OP.SETATTR, f, [size], 104)).error, -27)
  const read = Buffer.alloc(40)
  read.writeBigUInt64LE(fh, 0)
  read.writeBigUInt64LE(2n ** 60n, 8)
  read.writeUInt32LE(4096, 16)
  const r = await driver.call(OP.READ, f, [read], 4096)
  t.is(r.error, 0)
  t.is(r.data.length, 0)
  t.is((await driver.getattr(f)).error, 0, 'the file is still fine')
  t.is(device.stats.malformed, 0)
  await device.close()
})

test('READDIRPLUS at the buffer edge with two hard links: the node is counted once, never forgotten while known', async (t) => {
  const fs = new MemoryFs()
  const { device, driver } = await setup(fs)
  await driver.init()
  const d = entryOf(await driver.mkdir(ROOT, 'd')).nodeid
  const c = await driver.create(d, 'a')
  const f = entryOf(c).nodeid
  await driver.release(f, fhOf(c, true))
  const linkArgs = Buffer.alloc(8)
  linkArgs.writeBigUInt64LE(BigInt(f))
  entryOf(await driver.call(OP.LINK, d, [linkArgs, cstr('b')], 128))
  await driver.forget(f, 2) // the driver forgets it: only the listing below names it again
  await new Promise((r) => setImmediate(r))
  const dh = fhOf(await driver.open(d, 0, true))
  // '.', '..' and 'a' fit (3 × 152 bytes); 'b' does not.
  const listed = await driver.readdir(d, dh, 0, 3 * 160, true)
  t.deepEqual(
    listed.map((e) => e.name),
    ['.', '..', 'a'],
  )
  await new Promise((r) => setImmediate(r))
  t.is(device.stats.nodes, 2, 'd and the file')
  await driver.unlink(d, 'a')
  await driver.unlink(d, 'b')
  const before = fs.nodeCount
  t.is((await driver.getattr(f)).error, 0, 'unlinked but known to the driver: still there')
  await driver.forget(f, 1)
  await new Promise((r) => setImmediate(r))
  t.is(fs.nodeCount, before - 1)
  await device.close()
})

test('xattr values up to 64 KiB are answered with a small maxWrite; queue sizes and tags the driver refuses are refused here', async (t) => {
  const { device, driver } = await setup(new MemoryFs(), { maxWrite: 4096 })
  await driver.init()
  const f = entryOf(await driver.create(ROOT, 'f')).nodeid
  const value = Buffer.alloc(60_000, 7)
  t.is((await driver.setxattr(f, 'user.big', value)).error, 0)
  const got = await driver.getxattr(f, 'user.big', 65536)
  t.is(got.error, 0)
  t.true(got.data.equals(value))
  await device.close()
  await t.throwsAsync(setup(new MemoryFs(), { queueSize: 8 }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await t.throwsAsync(setup(new MemoryFs(), { tag: 'a\nb' }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
})

test('errors that name no errno answer EIO, whatever was thrown', async (t) => {
  const fs: FileSystem = {
    lookup(_p, name) {
      if (name === 'proto') throw Object.assign(new Error('x'), { code: 'constructor' })
      if (name === 'null') throw Object.create(null)
      throw null
    },
    getattr: () => ({}) as never,
    readdir: () => [],
    read: () => 0,
  }
  const { device, driver } = await setup(fs)
  const errors: Error[] = []
  device.on('requestError', (e) => errors.push(e))
  await driver.init()
  t.is((await driver.lookup(ROOT, 'proto')).error, -E.EIO)
  t.is((await driver.lookup(ROOT, 'null')).error, -E.EIO)
  t.is((await driver.lookup(ROOT, 'other')).error, -E.EIO)
  t.is(errors.length, 3)
  t.is((await driver.getattr(ROOT)).error, -E.EIO, 'attributes that cannot be encoded')
  await device.close()
})

test('opens that hang and time out stop counting against maxHandles', async (t) => {
  const fs = new MemoryFs()
  const slow: FileSystem = { ...bound(fs), opendir: () => new Promise(() => {}) }
  const { device, driver } = await setup(slow, { maxHandles: 4, requestTimeoutMs: 30 })
  await driver.init()
  for (let i = 0; i < 4; i++) t.is((await driver.open(ROOT, 0, true)).error, -MORE.ETIMEDOUT)
  const f = entryOf(await driver.create(ROOT, 'f'))
  t.is((await driver.open(f.nodeid, 0)).error, 0, 'room again once the hung ones timed out')
  await device.close()
})

test('a session that ends while a read runs: its handle is released only after the read returns', async (t) => {
  const fs = new MemoryFs()
  const events: string[] = []
  let finish: () => void = () => {}
  const slow: FileSystem = {
    ...bound(fs),
    read: async (ino, io, handle, ctx) => {
      events.push('read started')
      await new Promise<void>((r) => (finish = r))
      events.push('read done')
      return fs.read(ino, io, handle as never)
    },
    release: (ino, handle) => {
      events.push('release')
      fs.release(ino, handle as never)
    },
  }
  const { device, driver } = await setup(slow)
  await driver.init()
  const c = await driver.create(ROOT, 'f')
  const reading = driver.read(entryOf(c).nodeid, fhOf(c, true), 0, 10)
  await new Promise((r) => setImmediate(r))
  await driver.init() // a new session: the old one's handles are released…
  t.deepEqual(events, ['read started'], '…but not under the running read')
  finish()
  await reading
  await new Promise((r) => setImmediate(r))
  t.deepEqual(events, ['read started', 'read done', 'release'])
  await device.close()
})

test('MemoryFs: sparse files cost what is written; the byte budget covers symlinks, xattrs and names', async (t) => {
  const fs = new MemoryFs({ maxBytes: 16 << 20 })
  const { device, driver } = await setup(fs)
  await driver.init()
  const base = fs.bytes
  const c = await driver.create(ROOT, 'sparse')
  const f = entryOf(c).nodeid
  const fh = fhOf(c, true)
  t.is((await driver.write(f, fh, 900 << 20, Buffer.from('x'))).error, 0)
  t.true(fs.bytes - base < 1 << 20, `${fs.bytes - base} bytes for one byte at 900 MiB`)
  t.is(
    (await driver.read(f, fh, 500 << 20, 4096)).data.every((b) => b === 0),
    true,
  )
  // Appending until the budget runs out: ENOSPC, never past it.
  let errors = 0
  for (let i = 0; i < 40 && errors === 0; i++) {
    errors = -(await driver.write(f, fh, i << 20, Buffer.alloc(1 << 20, 1))).error
  }
  t.is(errors, 28, 'ENOSPC')
  t.true(fs.bytes <= 16 << 20)
  await driver.release(f, fh)
  t.is((await driver.unlink(ROOT, 'sparse')).error, 0)
  await driver.forget(f, 1)
  await new Promise((r) => setImmediate(r))
  t.is(fs.bytes, base, 'all of it given back')
  for (let i = 0; i < 50; i++) {
    const s = entryOf(await driver.call(OP.SYMLINK, ROOT, [cstr(`s${i}`), cstr('t'.repeat(4000))], 128))
    await driver.unlink(ROOT, `s${i}`)
    await driver.forget(s.nodeid, 1)
  }
  await new Promise((r) => setImmediate(r))
  t.is(fs.bytes, base, 'symlink targets are counted and given back')
  const g = entryOf(await driver.create(ROOT, 'g')).nodeid
  t.is((await driver.setxattr(g, 'user.a', Buffer.alloc(60_000))).error, 0)
  t.is(
    (await driver.setxattr(g, 'user.b', Buffer.alloc(10_000))).error,
    -28,
    'at most 64 KiB of xattrs per node',
  )
  await device.close()
})

test('MemoryFs: O_TRUNC truncates whatever the access mode; ATOMIC_O_TRUNC only when open() exists', async (t) => {
  const { device, driver } = await setup(new MemoryFs())
  const init = await driver.init()
  t.truthy(init.data.readUInt32LE(12) & (1 << 3))
  const c = await driver.create(ROOT, 'f')
  const f = entryOf(c).nodeid
  await driver.write(f, fhOf(c, true), 0, Buffer.from('content'))
  t.is((await driver.open(f, 0o1000)).error, 0) // O_RDONLY | O_TRUNC
  t.is(entryOf(await driver.lookup(ROOT, 'f')).size, 0)
  await device.close()
  const json = await setup(new JsonFs({ a: 'b' }))
  const r = await json.driver.init()
  t.falsy(r.data.readUInt32LE(12) & (1 << 3), 'no open(): the driver truncates with SETATTR')
  await json.device.close()
})
