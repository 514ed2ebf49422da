import test from 'ava'
import { execFile } from 'node:child_process'
import { mkdtempSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

import {
  BLK_FEATURES,
  BlockDevice,
  FileBackend,
  InProcessTransport,
  MemoryBackend,
  NullBackend,
  VduseError,
  AbortError,
  type BlockBackend,
  type BlockIo,
} from '../src'
import { blkSetup, range, S, T } from './helpers/blk-driver'

const setup = blkSetup('t')

test('features follow what the backend can do', async (t) => {
  const mem = await setup(new MemoryBackend(1 << 20))
  t.deepEqual([...mem.device.offeredFeatures].sort(), [
    'BLK_SIZE',
    'DISCARD',
    'FLUSH',
    'SEG_MAX',
    'TOPOLOGY',
    'WRITE_ZEROES',
  ])
  const nul = await setup(new NullBackend(1 << 20), { queues: 2 })
  t.deepEqual([...nul.device.offeredFeatures].sort(), ['BLK_SIZE', 'FLUSH', 'MQ', 'SEG_MAX', 'TOPOLOGY'])
  const ro = await setup(new MemoryBackend(1 << 20), { readOnly: true })
  t.true(ro.device.offeredFeatures.includes('RO'))
  t.false(ro.device.offeredFeatures.includes('DISCARD'))
  t.false(ro.device.offeredFeatures.includes('WRITE_ZEROES'))
  const negotiated = ro.transport.offeredFeatures
  t.true(BLK_FEATURES.has(negotiated, 'RO'))
  t.not(negotiated & (1n << 32n), 0n, 'VERSION_1')
  t.not(negotiated & (1n << 33n), 0n, 'ACCESS_PLATFORM')
  for (const s of [mem, nul, ro]) await s.device.close()
})

test('the config space describes the disk', async (t) => {
  const { device, transport } = await setup(new MemoryBackend(8 << 20), {
    queues: 3,
    logicalBlockSize: 4096,
    queueSize: 128,
  })
  const c = transport.config
  t.is(c.length, 60)
  t.is(c.readBigUInt64LE(0), BigInt((8 << 20) / 512), 'capacity in 512-byte sectors')
  t.is(c.readUInt32LE(12), 126, 'seg_max = queue size - 2')
  t.is(c.readUInt32LE(20), 4096, 'blk_size')
  t.is(c.readUInt16LE(34), 3, 'num_queues')
  t.is(c.readUInt32LE(44), 8, 'discard alignment in sectors')
  t.is(c[56], 1, 'write zeroes may unmap')
  t.deepEqual(device.negotiatedBlkFeatures.sort(), [...device.offeredFeatures].sort())
  await device.close()
})

test('writes are read back byte for byte, in several buffers and on several queues', async (t) => {
  const backend = new MemoryBackend(1 << 20)
  const { device, driver, transport } = await setup(backend, { queues: 2 })
  const data = Buffer.alloc(8192)
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff
  t.deepEqual(await driver.write(16, data, 1), { status: S.OK, used: 1 })
  t.deepEqual(backend.contents.subarray(16 * 512, 16 * 512 + 8192), data)
  const back = await driver.read(16, 8192)
  t.is(back.status, S.OK)
  t.is(back.used, 8193, 'data + status byte')
  t.deepEqual(back.data, data)
  // Data split across three buffers, header split across two.
  const hdr = Buffer.alloc(16)
  hdr.writeUInt32LE(T.OUT, 0)
  hdr.writeBigUInt64LE(2n, 8)
  const res = await transport.request(
    [hdr.subarray(0, 5), hdr.subarray(5), Buffer.alloc(512, 1), Buffer.alloc(1024, 2)],
    [1],
  )
  t.is(res.writable[0]![0], S.OK)
  t.deepEqual(
    backend.contents.subarray(1024, 1024 + 1536),
    Buffer.concat([Buffer.alloc(512, 1), Buffer.alloc(1024, 2)]),
  )
  await device.close()
})

test('requests outside the disk, misaligned, or of unknown type get IOERR / UNSUPP and the device keeps serving', async (t) => {
  const { device, driver } = await setup(new MemoryBackend(1 << 20))
  t.is((await driver.read(2048, 512)).status, S.IOERR, 'past the end')
  t.is((await driver.read(2047, 1024)).status, S.IOERR, 'runs past the end')
  t.is((await driver.read(2 ** 60, 512)).status, S.IOERR, 'absurd sector')
  t.is((await driver.read(0, 100)).status, S.IOERR, 'not whole sectors')
  t.deepEqual(await driver.simple(99), { status: S.UNSUPP, used: 1, data: Buffer.from([S.UNSUPP]) })
  t.is((await driver.read(0, 512)).status, S.OK)
  t.is(device.stats.unsupported, 1)
  await device.close()
})

test('a request without a status byte or header is answered without touching memory', async (t) => {
  const { device, transport } = await setup(new MemoryBackend(1 << 20))
  t.is((await transport.request([Buffer.alloc(16)], [])).used, 0, 'no writable buffer at all')
  const res = await transport.request([Buffer.alloc(4)], [1])
  t.is(res.writable[0]![0], S.IOERR, 'header too short')
  t.is(device.stats.malformed, 2)
  await device.close()
})

test('GET_ID returns the serial', async (t) => {
  const { device, driver } = await setup(new NullBackend(1 << 20), { serial: 'disk-0042' })
  const res = await driver.simple(T.GET_ID, [], 20)
  t.is(res.status, S.OK)
  t.is(res.used, 21)
  t.is(res.data.toString('utf8').replace(/\0+$/, ''), 'disk-0042')
  await t.throwsAsync(
    BlockDevice.create({
      name: 'x',
      backend: new NullBackend(512),
      serial: 'x'.repeat(21),
      transport: new InProcessTransport(),
    }),
    {
      instanceOf: VduseError,
    },
  )
  await device.close()
})

test('discard and write-zeroes reach the backend; unmap on discard is UNSUPP', async (t) => {
  const backend = new MemoryBackend(1 << 20)
  backend.contents.fill(0xab)
  const { device, driver } = await setup(backend)
  t.is((await driver.simple(T.DISCARD, [range(0, 8)])).status, S.OK)
  t.true(backend.contents.subarray(0, 4096).every((b) => b === 0))
  t.is(backend.contents[4096], 0xab)
  t.is((await driver.simple(T.WRITE_ZEROES, [range(8, 8, 1), range(32, 1)])).status, S.OK)
  t.true(backend.contents.subarray(4096, 8192).every((b) => b === 0))
  t.true(backend.contents.subarray(32 * 512, 33 * 512).every((b) => b === 0))
  t.is((await driver.simple(T.DISCARD, [range(0, 8, 1)])).status, S.UNSUPP)
  t.is((await driver.simple(T.DISCARD, [range(2047, 8)])).status, S.IOERR, 'out of range')
  t.is((await driver.simple(T.DISCARD, [])).status, S.IOERR, 'no ranges')
  const nul = await setup(new NullBackend(1 << 20))
  t.is((await nul.driver.simple(T.DISCARD, [range(0, 8)])).status, S.UNSUPP, 'backend without discard')
  await device.close()
  await nul.device.close()
})

test('a read-only device refuses writes', async (t) => {
  const backend = new MemoryBackend(1 << 20)
  const { device, driver } = await setup(backend, { readOnly: true })
  t.is((await driver.write(0, Buffer.alloc(512, 9))).status, S.IOERR)
  t.is(backend.contents[0], 0)
  t.is((await driver.read(0, 512)).status, S.OK)
  await device.close()
})

test('a backend that throws or rejects yields IOERR for that request only', async (t) => {
  let fail = 0
  const mem = new MemoryBackend(1 << 20)
  const flaky: BlockBackend = {
    size: mem.size,
    read: (io: BlockIo) => {
      if (fail === 1) throw new Error('sync boom')
      if (fail === 2) return Promise.reject(new Error('async boom'))
      return mem.read(io)
    },
    write: (io: BlockIo) => mem.write(io),
  }
  const { device, driver } = await setup(flaky)
  const errors: Error[] = []
  device.on('requestError', (e) => errors.push(e))
  fail = 1
  t.is((await driver.read(0, 512)).status, S.IOERR)
  fail = 2
  t.is((await driver.read(0, 512)).status, S.IOERR)
  fail = 0
  t.is((await driver.read(0, 512)).status, S.OK)
  t.deepEqual(
    errors.map((e) => e.message),
    ['sync boom', 'async boom'],
  )
  await device.close()
})

test('a backend that hangs yields IOERR after the request timeout, and its buffers are revoked', async (t) => {
  let hung: BlockIo | undefined
  const backend: BlockBackend = {
    size: 1 << 20,
    read: (io) => {
      hung = io
      return new Promise(() => {})
    },
    write: () => {},
  }
  const { device, driver } = await setup(backend, { requestTimeoutMs: 50 })
  const res = await driver.read(0, 512)
  t.is(res.status, S.IOERR)
  t.is(device.stats.timeouts, 1)
  t.true((hung as unknown as { signal: AbortSignal }).signal.aborted)
  await device.close()
})

test('resize updates the capacity and raises a config interrupt', async (t) => {
  const backend = new MemoryBackend(1 << 20)
  const { device, transport, driver } = await setup(backend)
  await driver.write(0, Buffer.alloc(512, 5))
  await device.resize(2 << 20)
  t.is(device.size, 2 << 20)
  t.is(transport.config.readBigUInt64LE(0), BigInt((2 << 20) / 512))
  t.is(transport.configInterrupts, 1)
  t.is((await driver.read(4000, 512)).status, S.OK, 'the new space is usable')
  t.is(backend.contents[0], 5, 'data kept')
  await t.throwsAsync(device.resize(1000), { instanceOf: VduseError })
  await t.throwsAsync((await setup(new NullBackend(4096))).device.resize(8192), {
    message: /cannot be resized/,
  })
  await device.close()
})

test('file backend: data lands in the file, flush works, discard punches holes', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-file-'))
  const path = join(dir, 'disk.img')
  const backend = await FileBackend.open(path, { size: 4 << 20 })
  const { device, driver } = await setup(backend)
  t.true(device.offeredFeatures.includes('FLUSH'))
  const data = Buffer.alloc(1 << 20, 0x77)
  t.is((await driver.write(0, data)).status, S.OK)
  t.is((await driver.simple(T.FLUSH)).status, S.OK)
  t.deepEqual(readFileSync(path).subarray(0, 1 << 20), data)
  const before = statSync(path).blocks
  t.is((await driver.simple(T.DISCARD, [range(0, 2048)])).status, S.OK)
  t.true(statSync(path).blocks < before, 'blocks were deallocated')
  t.true(
    readFileSync(path)
      .subarray(0, 1 << 20)
      .every((b) => b === 0),
  )
  t.is(
    (await driver.read(0, 4096)).data.every((b) => b === 0),
    true,
  )
  await device.close()
  await backend.close()
})

test('close flushes, is idempotent, and AbortSignal / asyncDispose close too', async (t) => {
  let flushes = 0
  const mem = new MemoryBackend(1 << 20)
  const backend: BlockBackend = {
    size: mem.size,
    read: (io) => mem.read(io),
    write: (io) => mem.write(io),
    flush: () => void flushes++,
  }
  const { device } = await setup(backend)
  await Promise.all([device.close(), device.close()])
  t.is(flushes, 1)
  t.true(device.closed)
  t.throws(() => (device as unknown as { assertOpen(): void }).assertOpen(), {
    instanceOf: VduseError,
    code: 'ERR_VDUSE_CLOSED',
  } as never)

  const ac = new AbortController()
  const second = await setup(new NullBackend(4096), { signal: ac.signal })
  const closed = new Promise<void>((resolve) => second.device.once('close', resolve))
  ac.abort()
  await closed
  t.true(second.device.closed)

  const third = await setup(new NullBackend(4096))
  await third.device[Symbol.asyncDispose]()
  t.true(third.device.closed)
})

test('an already aborted signal rejects with an AbortError; a failed close on abort is reported as an event', async (t) => {
  const aborted = AbortSignal.abort(new Error('changed my mind'))
  const transport = new InProcessTransport()
  const err = await t.throwsAsync(
    BlockDevice.create({ name: 'ab', backend: new NullBackend(4096), transport, signal: aborted }),
    { instanceOf: AbortError },
  )
  t.is(err?.name, 'AbortError')
  t.is((err as AbortError).code, 'ABORT_ERR')
  t.is((err?.cause as Error).message, 'changed my mind')
  const { device } = await setup(new NullBackend(4096))
  await t.throwsAsync(device.attach({ signal: aborted }), { instanceOf: AbortError })
  await t.throwsAsync(device.detach({ signal: aborted }), { instanceOf: AbortError })
  await device.close()

  // The abort closes the device; its backend's flush fails: an 'error' event, not an unhandled rejection.
  const ac = new AbortController()
  const failing: BlockBackend = {
    size: 4096,
    read: () => {},
    write: () => {},
    flush: () => Promise.reject(new Error('disk gone')),
  }
  const { device: d2 } = await setup(failing, { signal: ac.signal })
  const reported = new Promise<Error>((resolve) => d2.once('error', resolve))
  ac.abort()
  t.regex((await reported).message, /disk gone/)
})

test('bad options are refused with ERR_VDUSE_INVALID_CONFIG', async (t) => {
  const transport = new InProcessTransport()
  for (const extra of [
    { backend: new NullBackend(1000) },
    { backend: new NullBackend(4096), logicalBlockSize: 1024 as 512 },
    { backend: new NullBackend(4096), queueSize: 100 },
    { backend: new NullBackend(4096), queues: 0 },
    { backend: {} as BlockBackend },
  ]) {
    const err = await t.throwsAsync(BlockDevice.create({ name: 'bad', transport, ...extra }), {
      instanceOf: VduseError,
    })
    t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG')
  }
})

test('pollUs is validated', async (t) => {
  for (const pollUs of [-1, 1.5, 5000, 'fast' as 'auto']) {
    await t.throwsAsync(
      BlockDevice.create({
        name: `poll${pollUs}`,
        backend: new MemoryBackend(1 << 20),
        transport: new InProcessTransport(),
        pollUs,
      }),
      { code: 'ERR_VDUSE_INVALID_CONFIG' },
    )
  }
  for (const pollUs of [0, 1000, 'auto' as const]) {
    const d = await BlockDevice.create({
      name: `poll${pollUs}`,
      backend: new MemoryBackend(1 << 20),
      transport: new InProcessTransport(),
      pollUs,
    })
    await d.close()
  }
  t.pass()
})

test('models, backends and the in-process transport work without the native binary (it loads lazily)', async (t) => {
  // A child process in which loading the native loader fails, as on a platform without a prebuilt binary.
  const script = `
    const Module = require('node:module')
    const load = Module._load
    Module._load = function (request, parent, isMain) {
      if (/[\\\\/]index\\.js$/.test(Module._resolveFilename(request, parent)) && !request.includes('dist')) {
        throw new Error('no native binary for this platform')
      }
      return load.apply(this, arguments)
    }
    const { BlockDevice, InProcessTransport, MemoryBackend } = require(${JSON.stringify(join(__dirname, '../dist/index.js'))})
    ;(async () => {
      const transport = new InProcessTransport()
      const device = await BlockDevice.create({ name: 'nobin', backend: new MemoryBackend(1 << 20), transport })
      transport.start()
      const h = Buffer.alloc(16); h.writeUInt32LE(1, 0)
      const w = await transport.request([h, Buffer.alloc(512, 7)], [1])
      const r = await transport.request([Buffer.alloc(16)], [512, 1])
      await device.close()
      console.log(JSON.stringify({ write: w.writable[0][0], read: r.writable[0][0] }))
    })().catch((e) => { console.error(e); process.exit(1) })
  `
  const { stdout } = await promisify(execFile)(process.execPath, ['-e', script])
  t.deepEqual(JSON.parse(stdout), { write: 0, read: 7 })
})
