// Failure paths that must fail closed, over the in-process transport (and the native batch server without
// a kernel): a write whose request died never reaches the backend with bytes the driver did not write for
// it; a backend call that outlives its request (timed out, fenced) never lands after a newer write to the
// same bytes; a handover never leaves a write of the old server running; close and resize are bounded and
// serialised; views of a SharedArrayBuffer are refused.
import test from 'ava'
import { getEventListeners } from 'node:events'

import {
  BlockDevice,
  InProcessTransport,
  MemoryBackend,
  VirtioDevice,
  type BlockBackend,
  type BlockIo,
} from '../src'
import type { RequestBatch } from '../src/transport/batch'
import type { Transport } from '../src/transport/source'
import { BlkDriver, blkSetup, header, S, T } from './helpers/blk-driver'
import { loopbackTransport } from './helpers/loopback'

let n = 0
const SIZE = 1 << 20

const setup = blkSetup('fc')

const tick = (): Promise<void> => new Promise((r) => setImmediate(r))
async function until(what: string, check: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 2))
  }
}

/** A promise and its resolver. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void
  const promise = new Promise<void>((r) => (open = r))
  return { promise, open }
}

/**
 * Storage in memory whose writes take their data through `io.buffers` (a backend that needs Buffers of
 * its own) and wait, each, for a gate the test opens — the late half of a slow network write.
 */
function slowBackend() {
  const data = Buffer.alloc(SIZE, 0x11)
  const log: string[] = []
  const gates: Array<{ byte: number; open: () => void }> = []
  const backend: BlockBackend = {
    size: SIZE,
    // Storage a successor could reach again: a handover is possible.
    id: 'test:slow',
    read(io) {
      io.copyFrom(data.subarray(io.offset, io.offset + io.length))
    },
    async write(io: BlockIo) {
      const first = io.buffers[0]![0]!
      log.push(`start ${first.toString(16)}`)
      const g = gate()
      gates.push({ byte: first, open: g.open })
      await g.promise
      io.forEach((buf, start, length, at) => buf.copy(data, at, start, start + length))
      log.push(`end ${first.toString(16)}`)
    },
  }
  const open = (byte: number): void => {
    for (const g of gates.filter((g) => g.byte === byte)) g.open()
  }
  return { backend, data, log, gates, open }
}

test('item 14: a write whose request died before its data was copied never reaches the backend', async (t) => {
  const seen: number[] = []
  const held: BlockIo[] = []
  const go = gate()
  const backend: BlockBackend = {
    size: SIZE,
    read() {},
    async write(io) {
      held.push(io)
      await go.promise
      // The backend asks for the data only now (a socket that became writable, say).
      seen.push(io.buffers[0]![0]!)
    },
  }
  const { device, transport, driver } = await setup(backend)
  // One write goes through, so a pooled bounce buffer holds its bytes (0x77)…
  const first = driver.write(0, Buffer.alloc(4096, 0x77))
  await until('the first write', () => held.length === 1)
  go.open()
  t.is((await first).status, S.OK)
  t.deepEqual(seen, [0x77])
  // …then a write of 0x22 that the driver resets away before the backend copies its data.
  const second = gate()
  backend.write = async (io) => {
    held.push(io)
    await second.promise
    try {
      seen.push(io.buffers[0]![0]!)
    } catch (err) {
      seen.push(-1)
      t.is((err as { code?: string }).code, 'ERR_VDUSE_FENCED')
      throw err
    }
  }
  const fenced = transport.request([header(T.OUT, 8), Buffer.alloc(4096, 0x22)], [1])
  await until('the second write', () => held.length === 2)
  t.is(transport.reset(), 1)
  t.true((await fenced).fenced)
  second.open()
  await until('the backend looked', () => seen.length === 2)
  t.deepEqual(seen, [0x77, -1], 'neither the previous request’s bytes nor anything else reached it')
  t.throws(() => held[1]!.forEach(() => {}), { code: 'ERR_VDUSE_FENCED' })
  t.false(held[1]!.copyTo(Buffer.alloc(4096)), 'copyTo says the request is gone')
  transport.start()
  await device.close()
})

test('item 5: a timed-out write still running in the backend never lands after a newer write', async (t) => {
  const { backend, data, log, open } = slowBackend()
  const { device, driver } = await setup(backend, { requestTimeoutMs: 50 })
  const errors: string[] = []
  device.on('requestError', (e) => errors.push(e.message))
  // The first write times out: the driver gets IOERR and writes the same sector again.
  t.is((await driver.write(0, Buffer.alloc(4096, 0xa1))).status, S.IOERR)
  const second = driver.write(0, Buffer.alloc(4096, 0xb2))
  await new Promise((r) => setTimeout(r, 30))
  t.deepEqual(log, ['start a1'], 'the newer write waits for the ghost on its bytes')
  open(0xa1)
  await until('the newer write to start', () => log.includes('start b2'))
  open(0xb2)
  t.is((await second).status, S.OK)
  t.deepEqual(log, ['start a1', 'end a1', 'start b2', 'end b2'])
  t.true(
    data.subarray(0, 4096).every((b) => b === 0xb2),
    'the acknowledged write is what is stored',
  )
  t.true(errors.some((m) => /timed out/.test(m)))
  await device.close()
})

test('item 5: a write fenced by a reset while its backend call runs never lands after the next session’s write', async (t) => {
  const { backend, data, log, open } = slowBackend()
  const { device, transport, driver } = await setup(backend)
  const fenced = transport.request([header(T.OUT, 16), Buffer.alloc(4096, 0xc3)], [1])
  await until('the write to start', () => log.length === 1)
  t.is(transport.reset(), 1)
  t.true((await fenced).fenced)
  transport.start()
  // A read elsewhere is not held up; a write on the ghost's bytes is.
  t.is((await driver.read(64, 4096)).status, S.OK)
  const next = driver.write(16, Buffer.alloc(4096, 0xd4))
  await new Promise((r) => setTimeout(r, 30))
  t.deepEqual(log, ['start c3'])
  open(0xc3)
  await until('the next write to start', () => log.includes('start d4'))
  open(0xd4)
  t.is((await next).status, S.OK)
  t.true(data.subarray(16 * 512, 16 * 512 + 4096).every((b) => b === 0xd4))
  await device.close()
})

test('item 5: a handover waits for the backend and is called off — device still serving — when it does not answer', async (t) => {
  const { backend, log, open } = slowBackend()
  const { device, transport, driver } = await setup(backend, { drainTimeoutMs: 100 })
  const stuck = driver.write(0, Buffer.alloc(4096, 0xe5))
  await until('the write to start', () => log.length === 1)
  const refused = await device.release().then(
    () => undefined,
    (e: { code?: string }) => e,
  )
  t.is(refused?.code, 'ERR_VDUSE_BUSY', 'a call of this server could land after the successor')
  t.false(device.closed)
  t.false(transport.released)
  // Still serving: the stuck write finishes, and new requests are served.
  open(0xe5)
  t.is((await stuck).status, S.OK)
  const next = driver.write(8, Buffer.alloc(4096, 0xf6))
  await until('the next write', () => log.includes('start f6'))
  open(0xf6)
  t.is((await next).status, S.OK)
  // Now nothing runs: the handover goes through.
  await device.release()
  t.true(transport.released)
})

test('item 5: requests that arrive while a handover is decided are left to the successor, or served if it is called off', async (t) => {
  const { backend, log, open } = slowBackend()
  const { device, driver } = await setup(backend, { drainTimeoutMs: 150 })
  const stuck = driver.write(0, Buffer.alloc(4096, 0x31))
  await until('the write to start', () => log.length === 1)
  const release = device.release().catch((e: Error) => e)
  await tick()
  const during = driver.write(8, Buffer.alloc(4096, 0x42))
  await new Promise((r) => setTimeout(r, 30))
  t.false(log.includes('start 42'), 'nothing new starts while the handover is decided')
  t.is(((await release) as { code?: string }).code, 'ERR_VDUSE_BUSY')
  await until('the held write to start', () => log.includes('start 42'))
  open(0x31)
  open(0x42)
  t.is((await stuck).status, S.OK)
  t.is((await during).status, S.OK)
  await device.close()
})

test('item 15: close() bounds the final flush; the device is gone and the failure is reported', async (t) => {
  const backend: BlockBackend = {
    size: SIZE,
    read() {},
    write() {},
    flush: () => new Promise<void>(() => {}),
  }
  const { device } = await setup(backend, { requestTimeoutMs: 100 })
  const closed = new Promise<void>((r) => device.once('close', () => r()))
  const err = await device.close().then(
    () => undefined,
    (e: { code?: string; message: string }) => e,
  )
  t.is(err?.code, 'ERR_VDUSE_TIMEOUT', 'never a success: acknowledged writes may not be durable')
  t.regex(err!.message, /final flush/)
  await closed
  t.true(device.closed)
})

test('item 15: a closed device lets go of its AbortSignal', async (t) => {
  const controller = new AbortController()
  const backend: BlockBackend = { size: SIZE, read() {}, write() {} }
  const { device } = await setup(backend, { signal: controller.signal })
  t.is(getEventListeners(controller.signal, 'abort').length, 1)
  await device.close()
  t.is(getEventListeners(controller.signal, 'abort').length, 0, 'no listener keeps the device alive')
})

test('item 16: resizes run one at a time, and a shrink waits for writes past the new end', async (t) => {
  const { backend, log, open } = slowBackend()
  const sizes: number[] = []
  const resizing: Array<() => void> = []
  backend.resize = async (size: number) => {
    log.push(`resize ${size}`)
    await new Promise<void>((r) => resizing.push(r))
    sizes.push(size)
  }
  const { device, driver } = await setup(backend, { drainTimeoutMs: 2000 })
  // A write near the end is running when the device shrinks below it.
  const tail = driver.write(2000, Buffer.alloc(4096, 0x7a))
  await until('the tail write', () => log.length === 1)
  const shrink = device.resize(512 << 10)
  const grow = device.resize(768 << 10)
  await new Promise((r) => setTimeout(r, 30))
  t.deepEqual(log, ['start 7a'], 'the shrink waits for the write past its new end')
  t.is((await driver.write(1500, Buffer.alloc(512))).status, S.IOERR, 'past the new end: refused at once')
  open(0x7a)
  t.is((await tail).status, S.OK)
  await until('the shrink', () => resizing.length === 1)
  t.deepEqual(log, ['start 7a', 'end 7a', 'resize 524288'], 'then the storage shrinks')
  resizing.shift()!()
  await shrink
  await until('the grow', () => resizing.length === 1)
  t.deepEqual(sizes, [512 << 10], 'the second resize started only after the first finished')
  resizing.shift()!()
  await grow
  t.deepEqual(sizes, [512 << 10, 768 << 10])
  t.is(device.size, 768 << 10)
  await device.close()
})

test('item 16: a shrink whose writes past the new end do not finish is refused and changes nothing', async (t) => {
  const { backend, log, open } = slowBackend()
  backend.resize = () => {
    log.push('resize')
  }
  const { device, driver } = await setup(backend, { drainTimeoutMs: 60 })
  const tail = driver.write(2000, Buffer.alloc(4096, 0x6b))
  await until('the tail write', () => log.length === 1)
  const err = await device.resize(512 << 10).then(
    () => undefined,
    (e: { code?: string }) => e,
  )
  t.is(err?.code, 'ERR_VDUSE_TIMEOUT')
  t.is(device.size, SIZE, 'the size stands')
  t.false(log.includes('resize'), 'the storage was not touched')
  open(0x6b)
  t.is((await tail).status, S.OK)
  await device.close()
})

test('item 11: the native copies refuse views of a SharedArrayBuffer', async (t) => {
  const seen: Array<string | undefined> = []
  const { transport, loopback } = loopbackTransport(16)
  class Probe extends VirtioDevice {
    protected handleRequest(batch: RequestBatch, i: number): void {
      const ticket = batch.ticket(i)
      for (const copy of [
        () => batch.read(ticket, 0, new Uint8Array(new SharedArrayBuffer(16))),
        () => batch.write(ticket, 0, new Uint8Array(new SharedArrayBuffer(16))),
      ]) {
        try {
          copy()
          seen.push(undefined)
        } catch (err) {
          seen.push((err as { code?: string }).code)
        }
      }
      t.is(batch.read(ticket, 0, new Uint8Array(16)), 16, 'a plain array is fine')
      batch.complete(ticket, 1, 0)
    }
    protected inFlight(): number {
      return 0
    }
    protected async shutdown(): Promise<void> {}
  }
  const device = new (Probe as unknown as new (o: object) => Probe)({ name: 'sab', transport })
  ;(device as unknown as { open(init: object): void }).open({
    deviceId: 2,
    features: 0n,
    config: Buffer.alloc(0),
    numQueues: 1,
    queueSize: 16,
    maxSegments: 3,
  })
  device.unref()
  await loopback().run(1, 1)
  t.deepEqual(seen, ['ERR_VDUSE_INVALID_ARGUMENT', 'ERR_VDUSE_INVALID_ARGUMENT'])
  await device.close()
})

test('a handover that cannot happen (no state file) changes nothing: the device serves on and closes', async (t) => {
  const inner = new InProcessTransport()
  const transport: Transport = {
    open(init, arrays, onBatch, onEvent) {
      return { ...inner.open(init, arrays, onBatch, onEvent), releasable: () => false }
    },
  }
  const backend: BlockBackend = { size: SIZE, read() {}, write() {} }
  const device = await BlockDevice.create({ name: `fc${n++}`, backend, transport })
  device.unref()
  inner.start()
  const err = await device.release().then(
    () => undefined,
    (e: { code?: string }) => e,
  )
  t.is(err?.code, 'ERR_VDUSE_NOT_RECOVERABLE')
  t.false(device.closed, 'nothing was stopped')
  t.is((await new BlkDriver(inner).write(0, Buffer.alloc(512))).status, S.OK, 'still serving')
  await device.close()
  t.true(device.closed)
})

test('a handover waits for a resize under way', async (t) => {
  const { backend } = slowBackend()
  const order: string[] = []
  let finish!: () => void
  backend.resize = async () => {
    order.push('resize start')
    await new Promise<void>((r) => (finish = r))
    order.push('resize end')
  }
  const { device, transport } = await setup(backend, { drainTimeoutMs: 2000 })
  const grow = device.resize(2 * SIZE)
  await until('the resize', () => order.length === 1)
  const release = device.release().then(() => order.push('released'))
  await new Promise((r) => setTimeout(r, 30))
  t.deepEqual(order, ['resize start'], 'the handover waits')
  finish()
  await grow
  await release
  t.deepEqual(order, ['resize start', 'resize end', 'released'])
  t.true(transport.released)
})

test('a handover of a device whose data dies with this server (no backend identity) is refused; it keeps serving', async (t) => {
  const { device, transport, driver } = await setup(new MemoryBackend(SIZE))
  const err = await device.release().then(
    () => undefined,
    (e: { code?: string; message?: string }) => e,
  )
  t.is(err?.code, 'ERR_VDUSE_NOT_RECOVERABLE')
  t.regex(err?.message ?? '', /no identity/)
  t.false(transport.released)
  t.false(device.closed)
  t.is((await driver.write(0, Buffer.alloc(512, 1))).status, S.OK, 'still serving')
  await device.close()
})
