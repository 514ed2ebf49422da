// Backend capabilities (declared, nbdkit-style), FileBackend's image locks and block-device detection, and
// the in-process transport's simulated faults — all on the host, over the in-process transport.
import test from 'ava'
import { execFile, spawn } from 'node:child_process'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

import {
  BlockDevice,
  FileBackend,
  InProcessTransport,
  MemoryBackend,
  STATUS,
  VduseError,
  type BlockBackend,
  type BlockIo,
} from '../src'
import { BlkDriver, blkSetup, header, range, S, T } from './helpers/blk-driver'

const run = promisify(execFile)

const setup = blkSetup('c')

/** A backend whose calls wait until released, recording what was asked. */
function gatedBackend(extra: Partial<BlockBackend> = {}) {
  const calls: Array<{ io: BlockIo; release: () => void }> = []
  let active = 0
  let most = 0
  const backend: BlockBackend = {
    size: 1 << 20,
    read: (io) =>
      new Promise<void>((resolve) => {
        active++
        most = Math.max(most, active)
        calls.push({
          io,
          release: () => {
            active--
            resolve()
          },
        })
      }),
    write: () => {},
    ...extra,
  }
  return { backend, calls, most: () => most }
}

const tick = () => new Promise((r) => setImmediate(r))

test('declared capabilities decide the features, not just which methods exist', async (t) => {
  const mem = new MemoryBackend(1 << 20)
  const off = await setup({
    size: mem.size,
    read: (io) => mem.read(io),
    write: (io) => mem.write(io),
    flush: () => mem.flush(),
    discard: (o, l) => mem.discard(o, l),
    writeZeroes: (o, l) => mem.writeZeroes(o, l),
    capabilities: { flush: false, discard: false, writeZeroes: true, writeZeroesUnmap: false },
  })
  t.deepEqual([...off.device.offeredFeatures].sort(), ['BLK_SIZE', 'SEG_MAX', 'TOPOLOGY', 'WRITE_ZEROES'])
  t.is(off.transport.config[56], 0, 'write_zeroes_may_unmap follows writeZeroesUnmap')
  t.is((await off.driver.simple(T.DISCARD, [range(0, 8)])).status, S.UNSUPP)
  t.is((await off.driver.simple(T.WRITE_ZEROES, [range(0, 8)])).status, S.OK)
  await off.device.close()
  // Declaring what the backend cannot do is a configuration error, not a runtime surprise.
  const err = await t.throwsAsync(
    setup({ size: 4096, read: () => {}, write: () => {}, capabilities: { discard: true } }),
    { instanceOf: VduseError },
  )
  t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG')
  t.regex(err?.message ?? '', /no discard\(\)/)
})

test('block sizes: the backend sets the minimum, and topology reaches the config space', async (t) => {
  const caps = { logicalBlockSize: 4096 as const, physicalBlockSize: 16384, optimalIoSize: 65536 }
  const backend = (): BlockBackend => ({ size: 1 << 20, read: () => {}, write: () => {}, capabilities: caps })
  const { device, transport } = await setup(backend())
  t.is(device.logicalBlockSize, 4096, 'the default follows the backend')
  const c = transport.config
  t.is(c.readUInt32LE(20), 4096, 'blk_size')
  t.is(c[24], 2, 'physical_block_exp: 16384 = 4096 << 2')
  t.is(c.readUInt32LE(28), 16, 'opt_io_size in logical blocks')
  const driver = new BlkDriver(transport)
  t.is((await driver.read(8, 4096)).status, S.OK)
  t.is((await driver.read(1, 4096)).status, S.IOERR, 'an offset inside a logical block')
  t.is((await driver.read(0, 512)).status, S.IOERR, 'less than a logical block')
  await device.close()
  const err = await t.throwsAsync(setup(backend(), { logicalBlockSize: 512 }), { instanceOf: VduseError })
  t.regex(err?.message ?? '', /4096-byte blocks/)
  await t.throwsAsync(setup({ ...backend(), capabilities: { physicalBlockSize: 1000 } }), {
    message: /physicalBlockSize/,
  })
})

test('fua: asked on every write when the backend can FUA but not flush', async (t) => {
  const seen: boolean[] = []
  const make = (flush: boolean): BlockBackend => ({
    size: 1 << 20,
    read: () => {},
    write: (io) => {
      seen.push(io.fua === true)
    },
    capabilities: { fua: true },
    ...(flush ? { flush: () => {} } : {}),
  })
  const a = await setup(make(false))
  t.false(a.device.offeredFeatures.includes('FLUSH'))
  await a.driver.write(0, Buffer.alloc(512))
  const b = await setup(make(true))
  await b.driver.write(0, Buffer.alloc(512))
  t.deepEqual(seen, [true, false])
  await a.device.close()
  await b.device.close()
})

test('maxInFlight: calls beyond the limit wait their turn, in order', async (t) => {
  const g = gatedBackend({ capabilities: { maxInFlight: 2 } })
  const { device, driver } = await setup(g.backend)
  const reads = [0, 1, 2, 3, 4].map((sector) => driver.read(sector, 512))
  await tick()
  t.is(g.calls.length, 2, 'only two calls started')
  for (let released = 0; released < 5; released++) {
    g.calls[released]!.release()
    await tick()
    await tick()
  }
  for (const r of await Promise.all(reads)) t.is(r.status, S.OK)
  t.is(g.most(), 2, 'never more than two at once')
  t.deepEqual(
    g.calls.map((c) => c.io.offset / 512),
    [0, 1, 2, 3, 4],
    'every request reached the backend once, in arrival order',
  )
  await device.close()
})

test('maxInFlight: a call whose request timed out keeps its place until the backend returns from it', async (t) => {
  const g = gatedBackend({ capabilities: { maxInFlight: 1 } })
  const { device, driver } = await setup(g.backend, { requestTimeoutMs: 50 })
  t.is((await driver.read(0, 512)).status, S.IOERR, 'answered at its deadline')
  const next = driver.read(1, 512)
  await new Promise((r) => setTimeout(r, 20))
  t.is(g.calls.length, 1, 'the backend is still busy with the first call: the next one waits')
  g.calls[0]!.release()
  await tick()
  await tick()
  t.is(g.calls.length, 2, 'and starts once it returned')
  g.calls[1]!.release()
  t.is((await next).status, S.OK)
  t.is(g.most(), 1)
  await device.close()
})

test('maxInFlight: a request fenced while waiting never reaches the backend; one that waits too long times out', async (t) => {
  const g = gatedBackend({ capabilities: { maxInFlight: 1 } })
  const { device, transport, driver } = await setup(g.backend)
  const first = transport.request([header(T.IN, 0)], [512, 1])
  const second = transport.request([header(T.IN, 1)], [512, 1])
  await tick()
  t.is(g.calls.length, 1)
  t.is(transport.reset(), 2)
  t.true((await first).fenced)
  t.true((await second).fenced)
  t.true(g.calls[0]!.io.signal.aborted, 'the running call is told')
  g.calls[0]!.release()
  await tick()
  await tick()
  t.is(g.calls.length, 1, 'the waiting one was dropped, not started')
  await device.close()

  const slow = gatedBackend({ capabilities: { maxInFlight: 1 } })
  const s = await setup(slow.backend, { requestTimeoutMs: 50 })
  const [x, y] = await Promise.all([s.driver.read(0, 512), s.driver.read(1, 512)])
  t.is(x.status, S.IOERR)
  t.is(y.status, S.IOERR, 'the waiting request timed out too')
  t.is(s.device.stats.timeouts, 2)
  t.is(slow.calls.length, 1, 'the waiting one never started')
  await s.device.close()
})

test('maxInFlight: nothing waiting reaches the backend after close; fenced waiters let the process exit', async (t) => {
  let closed = false
  let lateCalls = 0
  const releases: Array<() => void> = []
  const backend: BlockBackend = {
    size: 1 << 20,
    read: () => {
      if (closed) lateCalls++
      return new Promise<void>((r) => releases.push(r))
    },
    write: () => {},
    flush: () => {},
    capabilities: { maxInFlight: 1 },
  }
  const { device, transport } = await setup(backend, { drainTimeoutMs: 50 })
  void transport.request([header(T.IN, 0)], [512, 1])
  void transport.request([header(T.IN, 1)], [512, 1])
  await tick()
  await device.close()
  closed = true
  releases[0]!()
  await new Promise((r) => setTimeout(r, 50))
  t.is(lateCalls, 0, 'the waiting request never started after the final flush')

  // A child process whose waiting request was fenced must exit by itself (no sweeper left referenced).
  const script = `
    const { BlockDevice, InProcessTransport } = require('./src')
    const { header } = require('./__test__/helpers/blk-driver')
    ;(async () => {
      const releases = []
      const backend = { size: 1 << 20, read: () => new Promise((r) => releases.push(r)), write: () => {},
        capabilities: { maxInFlight: 1 } }
      const transport = new InProcessTransport()
      const device = await BlockDevice.create({ name: 'x', backend, transport, requestTimeoutMs: 60000 })
      device.unref()
      transport.start()
      void transport.request([header(0, 0)], [512, 1])
      void transport.request([header(0, 1)], [512, 1])
      await new Promise((r) => setImmediate(r))
      transport.reset()
      releases[0]()
    })()`
  const started = Date.now()
  await run(process.execPath, ['--import', 'tsx', '-e', script], {
    cwd: join(__dirname, '..'),
    timeout: 20_000,
  })
  t.true(Date.now() - started < 15_000, 'exited on its own')
})

test('simulated faults: remap fences in-flight requests and tells the backend; renegotiation; broken', async (t) => {
  const g = gatedBackend()
  const { device, transport } = await setup(g.backend)
  const pending = transport.request([header(T.IN, 0)], [512, 1])
  await tick()
  const drained: unknown[] = []
  device.on('drained', (d) => drained.push(d))
  t.is(transport.remap(), 1)
  t.true((await pending).fenced)
  t.true(g.calls[0]!.io.signal.aborted, 'an IOTLB change aborts the backend call')
  t.like(drained[0], { reason: 'iotlb', fenced: 1 })
  t.false(g.calls[0]!.io.copyFrom(Buffer.alloc(512)), 'its memory is out of reach')
  g.calls[0]!.release()
  t.truthy(device.status & STATUS.DRIVER_OK, 'the device keeps running')

  const readies: bigint[] = []
  device.on('ready', (f) => readies.push(f))
  transport.renegotiate(0n)
  t.is(readies.length, 1)
  t.is(device.negotiatedBlkFeatures.length, 0, 'the driver accepted nothing this time')

  const broken = new Promise<VduseError>((resolve) => device.once('broken', resolve))
  transport.breakDevice()
  t.is((await broken).code, 'ERR_VDUSE_BROKEN')
  await device.close()
})

test('FileBackend locks images: a writer excludes others, readers share, lock: false opts out', async (t) => {
  const path = join(mkdtempSync(join(tmpdir(), 'vduse-lock-')), 'disk.img')
  const writer = await FileBackend.open(path, { size: 1 << 20 })
  const err = await t.throwsAsync(FileBackend.open(path), { instanceOf: VduseError })
  t.is(err?.code, 'ERR_VDUSE_BUSY')
  t.regex(err?.message ?? '', /open for writing/)
  t.regex(err?.hint ?? '', /read-only/)
  await t.throwsAsync(FileBackend.open(path, { readOnly: true }), { message: /in use/ })
  const unlocked = await FileBackend.open(path, { lock: false })
  await unlocked.close()
  await writer.close()
  const r1 = await FileBackend.open(path, { readOnly: true })
  const r2 = await FileBackend.open(path, { readOnly: true })
  await t.throwsAsync(FileBackend.open(path), { message: /does not let others write/ })
  await r1.close()
  await r2.close()
  const again = await FileBackend.open(path)
  await again.close()
})

test('FileBackend and QEMU see each other’s image locks', async (t) => {
  try {
    await run('qemu-img', ['--version'])
  } catch {
    t.fail('qemu-img is missing: scripts/test installs qemu-utils')
    return
  }
  const path = join(mkdtempSync(join(tmpdir(), 'vduse-qlock-')), 'disk.img')
  writeFileSync(path, Buffer.alloc(1 << 20))
  const ours = await FileBackend.open(path)
  const q = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', path]).catch((e: { stderr: string }) => e)
  t.regex(
    (q as { stderr?: string }).stderr ?? '',
    /Failed to get "write" lock/,
    'qemu-io cannot write an image we serve',
  )
  await ours.close()
  // qemu-nbd holding the image for writing: our open is refused.
  const sock = join(tmpdir(), `vduse-qlock-${process.pid}.sock`)
  const nbd = spawn('qemu-nbd', ['-f', 'raw', '-k', sock, path], { stdio: 'ignore' })
  try {
    let refused: unknown
    for (let i = 0; i < 100 && refused === undefined; i++) {
      await new Promise((r) => setTimeout(r, 50))
      try {
        const b = await FileBackend.open(path)
        await b.close()
      } catch (e) {
        refused = e
      }
    }
    t.true(refused instanceof VduseError, 'refused while qemu-nbd has it open')
    t.is((refused as VduseError).code, 'ERR_VDUSE_BUSY')
  } finally {
    nbd.kill()
  }
})
