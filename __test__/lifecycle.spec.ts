// The request lifecycle over the in-process transport: what happens to requests that outlive their
// moment (timed out, fenced by a reset), to models that throw, and to requests larger than a batch.
import test from 'ava'

import {
  InProcessTransport,
  MemoryBackend,
  VirtioDevice,
  type BlockBackend,
  type BlockIo,
  type RequestBatch,
} from '../src'
import { blkSetup, header, S, T } from './helpers/blk-driver'

let n = 0

const setup = blkSetup('lc')

/** A backend whose reads wait until released; released reads then write 0x5a through every path. */
function holdingBackend() {
  const held: BlockIo[] = []
  const releases: Array<() => void> = []
  const backend: BlockBackend = {
    size: 1 << 20,
    read: (io) => {
      held.push(io)
      return new Promise<void>((resolve) => releases.push(resolve))
    },
    write: () => {},
  }
  /** The late backend: tries every way to land its data, then resolves. Returns what copyFrom said. */
  const releaseAll = (): boolean[] => {
    const copied = held.map((io) => {
      io.forEach((buf, start, length) => buf.fill(0x5a, start, start + length))
      return io.copyFrom(Buffer.alloc(io.length, 0x5a))
    })
    for (const r of releases.splice(0)) r()
    return copied
  }
  return { backend, held, releaseAll }
}

function untouched(transport: InProcessTransport, at: number, length: number): boolean {
  return transport.memory.subarray(at, at + length).every((b) => b === 0xee)
}

test('a timed-out request is answered IOERR, and the late backend result never reaches guest memory', async (t) => {
  const { backend, held, releaseAll } = holdingBackend()
  const { device, driver, transport } = await setup(backend, { requestTimeoutMs: 40 })
  const res = await driver.transport.request([header(T.IN, 0)], [4096, 1])
  t.false(res.fenced)
  t.is(res.writable[1]![0], S.IOERR)
  t.is(device.stats.timeouts, 1)
  t.true(held[0]!.signal.aborted, 'the backend was told')
  t.deepEqual(releaseAll(), [false], 'copyFrom refuses: the request is gone')
  await new Promise((r) => setImmediate(r))
  t.true(
    untouched(transport, res.writableAt[0]!, 4096),
    'neither the bounce view nor copyFrom reached the buffer',
  )
  t.is((await driver.write(0, Buffer.alloc(512))).status, S.OK, 'the device keeps serving')
  await device.close()
})

test('a reset fences requests held by the backend: signals abort, late results are dropped', async (t) => {
  const { backend, held, releaseAll } = holdingBackend()
  const { device, transport } = await setup(backend)
  const resets: number[] = []
  device.on('reset', () => resets.push(Date.now()))
  const pending = [0, 8, 16].map((sector) => transport.request([header(T.IN, sector)], [4096, 1]))
  while (held.length < 3) await new Promise((r) => setImmediate(r))
  t.is(transport.reset(), 3)
  const results = await Promise.all(pending)
  t.true(results.every((r) => r.fenced))
  t.is(resets.length, 1)
  t.true(held.every((io) => io.signal.aborted))
  t.deepEqual(releaseAll(), [false, false, false])
  await new Promise((r) => setImmediate(r))
  for (const r of results) t.true(untouched(transport, r.writableAt[0]!, 4096))
  t.is(device.counters().fenced, 3)
  // The driver starts again; the device serves the new life.
  transport.start()
  const memory = new MemoryBackend(1 << 20)
  const fresh = await setup(memory)
  t.is((await fresh.driver.read(0, 512)).status, S.OK)
  await Promise.all([device.close(), fresh.device.close()])
})

/** A device that throws on every request whose first byte is 0xff, and completes the others twice. */
class Clumsy extends VirtioDevice {
  served = 0
  static async make(transport: InProcessTransport): Promise<Clumsy> {
    const d = new Clumsy({ name: `clumsy${n++}`, transport, batchSize: 4 })
    d.open({
      deviceId: 2,
      features: 0n,
      config: Buffer.alloc(8),
      numQueues: 1,
      queueSize: 64,
      maxSegments: 512,
    })
    d.unref()
    return d
  }
  protected handleRequest(batch: RequestBatch, i: number): void {
    if (batch.heads[batch.headOffset(i)] === 0xff) throw new Error('model bug')
    const t = batch.ticket(i)
    // Echo the readable bytes' count into the first writable bytes, then complete — twice.
    const out = Buffer.alloc(4)
    out.writeUInt32LE(batch.readableBytes(i))
    batch.write(t, 0, out)
    batch.complete(t, 4)
    batch.complete(t, 4)
    this.served++
  }
  protected inFlight(): number {
    return 0
  }
  protected async shutdown(): Promise<void> {}
}

test('a model that throws fails only that request; duplicate completions are dropped', async (t) => {
  const transport = new InProcessTransport()
  const device = await Clumsy.make(transport)
  transport.start()
  const errors: string[] = []
  device.on('requestError', (e) => errors.push(e.message))
  const reqs = [0x01, 0xff, 0x02, 0xff, 0x03].map((b) => transport.request([Buffer.from([b, 0, 0, 0])], [8]))
  const res = await Promise.all(reqs)
  t.deepEqual(
    res.map((r) => r.used),
    [4, 0, 4, 0, 4],
  )
  t.deepEqual(errors, ['model bug', 'model bug'])
  t.is(device.served, 3)
  t.is(device.counters().staleCompletions, 3, 'each second completion was dropped, never another request')
  await device.close()
})

test('requests larger than a batch, and more requests than a batch holds, are all served', async (t) => {
  const transport = new InProcessTransport(32 << 20)
  const device = await Clumsy.make(transport)
  transport.start()
  // 300 readable pieces in one request; 20 requests at once with a batch of 4.
  const big = transport.request(
    Array.from({ length: 300 }, () => Buffer.alloc(512, 1)),
    [8],
  )
  const many = Array.from({ length: 20 }, () => transport.request([Buffer.alloc(16, 7)], [8]))
  const [b, ...m] = await Promise.all([big, ...many])
  t.is(b!.writable[0]!.readUInt32LE(0), 300 * 512)
  t.true(m.every((r) => r.used === 4 && r.writable[0]!.readUInt32LE(0) === 16))
  await device.close()
})

test('a memory backend moves data with one native copy per request (no views)', async (t) => {
  const backend = new MemoryBackend(1 << 20)
  const { device, driver } = await setup(backend)
  const data = Buffer.alloc(64 << 10)
  for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff
  t.is((await driver.write(100, data)).status, S.OK)
  const back = await driver.read(100, data.length)
  t.deepEqual(back.data, data)
  await device.close()
})
