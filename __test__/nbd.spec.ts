// The NBD backend against real servers (qemu-nbd, nbdkit) started by the test, over UNIX sockets and TCP,
// through a BlockDevice on the in-process transport (the same model the kernel path serves).
import test from 'ava'
import { randomBytes } from 'node:crypto'
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import { execFile } from 'node:child_process'
import { Socket, createServer } from 'node:net'
import { join } from 'node:path'

import { BlockDevice, InProcessTransport, NbdBackend, parseNbdUri, VduseError } from '../src'
import { BlkDriver, header, range, S, T } from './helpers/blk-driver'
import { dir, freePort, nbdkit, qemuNbd, socketPath } from './helpers/nbd-server'

let n = 0

function image(size: number, fill?: Buffer): string {
  const path = join(dir, `img${n++}.raw`)
  writeFileSync(path, fill ?? Buffer.alloc(size))
  return path
}

async function serve(backend: NbdBackend, extra: Partial<Parameters<typeof BlockDevice.create>[0]> = {}) {
  const transport = new InProcessTransport()
  const device = await BlockDevice.create({
    name: `nbd${n++}`,
    backend,
    transport,
    logicalBlockSize: backend.blockSize,
    ...extra,
  })
  device.unref()
  transport.start()
  return { device, driver: new BlkDriver(transport) }
}

async function expectCode(
  t: { is: (a: unknown, b: unknown, m?: string) => void },
  p: Promise<unknown>,
  code: string,
) {
  try {
    await p
    t.is('resolved', code)
  } catch (err) {
    t.is((err as VduseError).code, code, (err as Error).message)
  }
}

test('NBD URIs: TCP, UNIX sockets, and clear errors for the rest', (t) => {
  t.deepEqual(parseNbdUri('nbd://example.com/disk'), { host: 'example.com', port: 10809, export: 'disk' })
  t.deepEqual(parseNbdUri('nbd://[::1]:7000/a%20b'), { host: '::1', port: 7000, export: 'a b' })
  t.deepEqual(parseNbdUri('nbd://h'), { host: 'h', port: 10809, export: '' })
  t.deepEqual(parseNbdUri('nbd+unix:///vol?socket=/run/n.sock'), { socket: '/run/n.sock', export: 'vol' })
  for (const [uri, why] of [
    ['nbds://h/x', /TLS/],
    ['nbd+unix:///x', /socket=/],
    ['nbd+vsock://3:10809/', /unsupported scheme/],
    ['http://h/', /unsupported scheme/],
    ['not a uri', /not a URI/],
  ] as const) {
    const err = t.throws(() => parseNbdUri(uri), { instanceOf: VduseError })
    t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG')
    t.regex(err!.message, why)
  }
})

test('qemu-nbd over a UNIX socket: handshake, features, data lands in the image', async (t) => {
  const size = 8 << 20
  const file = image(size)
  const srv = await qemuNbd(file, { path: socketPath() })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri)
  t.is(backend.size, size)
  t.false(backend.readOnly)
  t.true(backend.info.structuredReplies)
  t.is(backend.id, `nbd:${srv.uri}`)
  const { device, driver } = await serve(backend)
  t.deepEqual([...device.offeredFeatures].sort(), [
    'BLK_SIZE',
    'DISCARD',
    'FLUSH',
    'SEG_MAX',
    'TOPOLOGY',
    'WRITE_ZEROES',
  ])
  const data = randomBytes(64 << 10)
  t.is((await driver.write(2048, data)).status, S.OK)
  t.is((await driver.simple(T.FLUSH)).status, S.OK)
  const back = await driver.read(2048, data.length)
  t.is(back.status, S.OK)
  t.true(back.data.equals(data))
  t.true(
    readFileSync(file)
      .subarray(2048 * 512, 2048 * 512 + data.length)
      .equals(data),
    'in the image',
  )
  // A read of never-written space comes back as zeroes (qemu-nbd answers it with a hole chunk).
  const hole = await driver.read(8192, 128 << 10)
  t.true(hole.data.equals(Buffer.alloc(128 << 10)))
  // Write-zeroes (with and without unmap) and discard reach the server.
  t.is((await driver.simple(T.WRITE_ZEROES, [range(2048, 16, 0)])).status, S.OK)
  t.is((await driver.simple(T.WRITE_ZEROES, [range(2064, 16, 1)])).status, S.OK)
  t.true(
    readFileSync(file)
      .subarray(2048 * 512, 2080 * 512)
      .equals(Buffer.alloc(32 * 512)),
  )
  t.true(
    readFileSync(file)
      .subarray(2080 * 512, 2080 * 512 + 512)
      .equals(data.subarray(16384, 16384 + 512)),
  )
  t.is((await driver.simple(T.DISCARD, [range(4096, 64)])).status, S.OK)
  await device.close()
  await backend.close()
})

test('nbdkit over TCP: a server limit on the payload splits large requests; reads and writes agree', async (t) => {
  // blocksize-policy advertises the limits to clients: 4 KiB minimum, 64 KiB maximum payload.
  const limited = await nbdkit(
    { port: await freePort() },
    ['memory', 'size=16M', 'blocksize-minimum=4096', 'blocksize-preferred=65536', 'blocksize-maximum=65536'],
    { filters: ['blocksize-policy'] },
  )
  t.teardown(() => limited.kill())
  const backend = await NbdBackend.connect(limited.uri)
  t.is(backend.info.maxBlockSize, 65536)
  t.is(backend.blockSize, 4096, 'the server minimum becomes the logical block size')
  const { device, driver } = await serve(backend)
  const data = randomBytes(1 << 20)
  t.is((await driver.write(8, data)).status, S.OK, '1 MiB in 16 commands')
  const back = await driver.read(8, data.length)
  t.is(back.status, S.OK)
  t.true(back.data.equals(data))
  // Many requests in flight at once on one connection.
  const writes = Array.from({ length: 64 }, (_, i) => driver.write(4096 + i * 8, Buffer.alloc(4096, i + 1)))
  t.true((await Promise.all(writes)).every((r) => r.status === S.OK))
  const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => driver.read(4096 + i * 8, 4096)))
  t.true(reads.every((r, i) => r.status === S.OK && r.data.equals(Buffer.alloc(4096, i + 1))))
  await device.close()
  await backend.close()
})

test('multi-conn: several connections when the server allows it, one when it does not', async (t) => {
  const file = image(4 << 20)
  const shared = await qemuNbd(file, { path: socketPath() }, { shared: 8 })
  t.teardown(() => shared.kill())
  const multi = await NbdBackend.connect(shared.uri, { connections: 4 })
  t.truthy(multi.info.flags & 256, 'qemu-nbd --shared=8 allows multi-conn')
  t.is(multi.connections, 4)
  const { device, driver } = await serve(multi, { queues: 4 })
  const writes = Array.from({ length: 128 }, (_, i) => driver.write(i * 8, Buffer.alloc(4096, i), i % 4))
  t.true((await Promise.all(writes)).every((r) => r.status === S.OK))
  const sent = multi.commandsSent
  t.is(sent.length, 4)
  t.true(
    sent.every((n) => n >= 16),
    `requests spread over the connections: ${sent.join(', ')}`,
  )
  t.is((await driver.simple(T.FLUSH)).status, S.OK, 'one flush covers every connection')
  const img = readFileSync(file)
  for (let i = 0; i < 128; i++) t.true(img.subarray(i * 4096, (i + 1) * 4096).equals(Buffer.alloc(4096, i)))
  await device.close()
  await multi.close()

  const single = await qemuNbd(image(1 << 20), { path: socketPath() }, { shared: 1 })
  t.teardown(() => single.kill())
  const one = await NbdBackend.connect(single.uri, { connections: 4 })
  t.falsy(one.info.flags & 256)
  t.is(one.connections, 1)
  await one.close()
})

test('a server killed and restarted mid-I/O: requests are resent, no acknowledged write is lost', async (t) => {
  const size = 16 << 20
  const file = image(size)
  const path = socketPath()
  let srv = await qemuNbd(file, { path })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 20_000 })
  const events: string[] = []
  backend.on('disconnected', () => events.push('disconnected'))
  backend.on('reconnected', () => events.push('reconnected'))
  const { device, driver } = await serve(backend)
  const acked = new Map<number, Buffer>()
  let stop = false
  // Writers keep 32 writes in flight over distinct 4 KiB blocks, each with new data, and record what the
  // device acknowledged; readers check what they read back matches the last acknowledged write.
  const writer = async (w: number): Promise<void> => {
    for (let round = 0; !stop; round++) {
      const block = w * 64 + (round % 64)
      const data = randomBytes(4096)
      const r = await driver.write(block * 8, data)
      t.is(r.status, S.OK)
      if (r.status === S.OK) acked.set(block, data)
    }
  }
  const writers = Array.from({ length: 32 }, (_, w) => writer(w))
  for (let kill = 0; kill < 3; kill++) {
    await new Promise((r) => setTimeout(r, 300))
    await srv.kill()
    await new Promise((r) => setTimeout(r, 200 + kill * 200))
    const back = new Promise((resolve) => backend.once('reconnected', resolve))
    srv = await qemuNbd(file, { path })
    await back
  }
  await new Promise((r) => setTimeout(r, 300))
  stop = true
  await Promise.all(writers)
  t.true(events.filter((e) => e === 'reconnected').length >= 3, events.join(','))
  t.true(acked.size > 100)
  for (const [block, data] of acked) {
    const r = await driver.read(block * 8, 4096)
    t.true(r.status === S.OK && r.data.equals(data), `block ${block}`)
  }
  const img = readFileSync(file)
  for (const [block, data] of acked) t.true(img.subarray(block * 4096, (block + 1) * 4096).equals(data))
  await device.close()
  await backend.close()
})

test('refused exports, unreachable servers and read-only exports get typed errors', async (t) => {
  const file = image(1 << 20)
  const named = await qemuNbd(file, { path: socketPath() }, { name: 'disk0' })
  t.teardown(() => named.kill())
  const wrong = named.uri.replace('/disk0?', '/nope?')
  await expectCode(t, NbdBackend.connect(wrong), 'ERR_VDUSE_REFUSED')
  await expectCode(
    t,
    NbdBackend.connect(`nbd+unix:///?socket=${join(dir, 'absent.sock')}`),
    'ERR_VDUSE_UNREACHABLE',
  )
  await expectCode(t, NbdBackend.connect(`nbd://127.0.0.1:${await freePort()}/`), 'ERR_VDUSE_UNREACHABLE')
  // Something that is not an NBD server at all.
  const http = createServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n'))
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r))
  t.teardown(() => http.close())
  const port = (http.address() as { port: number }).port
  await expectCode(t, NbdBackend.connect(`nbd://127.0.0.1:${port}/`), 'ERR_VDUSE_PROTOCOL')

  const ro = await qemuNbd(
    image(1 << 20, Buffer.alloc(1 << 20, 7)),
    { path: socketPath() },
    { readOnly: true },
  )
  t.teardown(() => ro.kill())
  const backend = await NbdBackend.connect(ro.uri)
  t.true(backend.readOnly)
  t.is(backend.discard, undefined)
  t.is(backend.writeZeroes, undefined)
  const { device, driver } = await serve(backend)
  t.true(device.offeredFeatures.includes('RO'))
  t.is((await driver.write(0, Buffer.alloc(512))).status, S.IOERR)
  t.true((await driver.read(0, 4096)).data.equals(Buffer.alloc(4096, 7)))
  await device.close()
  await backend.close()
})

test('a server that stays away: requests fail after the reconnect timeout, and serving resumes when it is back', async (t) => {
  const file = image(1 << 20)
  const path = socketPath()
  let srv = await qemuNbd(file, { path })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 600 })
  const unavailable: number[] = []
  backend.on('unavailable', (e) => unavailable.push(e.failed))
  const { device, driver } = await serve(backend)
  await srv.kill()
  const r = await driver.write(0, Buffer.alloc(4096, 1))
  t.is(r.status, S.IOERR, 'after 600 ms without a server')
  t.true(unavailable.length >= 1)
  // Past the timeout, a request fails at once instead of waiting again.
  const started = Date.now()
  t.is((await driver.read(0, 512)).status, S.IOERR)
  t.true(Date.now() - started < 400)
  const back = new Promise((resolve) => backend.once('reconnected', resolve))
  srv = await qemuNbd(file, { path })
  await back
  t.is((await driver.write(0, Buffer.alloc(4096, 2))).status, S.OK)
  t.true(readFileSync(file).subarray(0, 4096).equals(Buffer.alloc(4096, 2)))
  await device.close()
  await backend.close()
})

test('an export that shrank is not reconnected to; one that grew is', async (t) => {
  const path = socketPath()
  let srv = await qemuNbd(image(2 << 20), { path })
  t.teardown(() => srv.kill())
  const grown = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 5000 })
  const g = await serve(grown)
  await srv.kill()
  srv = await qemuNbd(image(4 << 20), { path })
  t.is((await g.driver.read(0, 4096)).status, S.OK, 'a grown export serves the blocks the device has')
  t.is(grown.size, 2 << 20)
  await g.device.close()
  await grown.close()
  await srv.kill()
  srv = await qemuNbd(image(2 << 20), { path })
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 800 })
  const failures: string[] = []
  backend.on('reconnectFailed', (e) => failures.push(e.error.code))
  const { device, driver } = await serve(backend)
  await srv.kill()
  srv = await qemuNbd(image(1 << 20), { path })
  t.is((await driver.read(0, 4096)).status, S.IOERR)
  t.true(failures.includes('ERR_VDUSE_MISMATCH'), failures.join(','))
  // The final flush cannot happen: close says so, and the device is gone all the same.
  await t.throwsAsync(device.close(), { code: 'ERR_VDUSE_UNREACHABLE' })
  await backend.close()
})

/** A hand-written server that does the handshake right, then answers every command with `reply`. */
interface NbdRequest {
  cookie: Buffer
  type: number
  offset: number
  length: number
}

async function rogue(
  reply: (cookie: Buffer, socket: Socket, request: NbdRequest) => void,
  opts: { silent?: boolean; flood?: boolean } = {},
): Promise<{ uri: string; close(): void }> {
  const server = createServer((s) => {
    s.on('error', () => {})
    if (opts.silent) return // accepts, never speaks
    if (opts.flood) {
      const junk = Buffer.alloc(1 << 20, 0x41)
      junk.write('NBDMAGICIHAVEOPT', 'latin1')
      junk.writeUInt16BE(3, 16)
      const more = (): void => {
        if (!s.destroyed && s.write(junk)) setImmediate(more)
        else if (!s.destroyed) s.once('drain', more)
      }
      return more()
    }
    const hello = Buffer.alloc(18)
    hello.write('NBDMAGICIHAVEOPT', 'latin1')
    hello.writeUInt16BE(3, 16)
    s.write(hello)
    let buf = Buffer.alloc(0)
    let phase = 0
    s.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d])
      if (phase === 0 && buf.length >= 4) {
        buf = buf.subarray(4)
        phase = 1
      }
      while (phase === 1 && buf.length >= 16) {
        const opt = buf.readUInt32BE(8)
        const len = buf.readUInt32BE(12)
        if (buf.length < 16 + len) return
        buf = buf.subarray(16 + len)
        const rep = (type: number, data = Buffer.alloc(0)) => {
          const h = Buffer.alloc(20)
          h.writeUInt32BE(0x0003e889, 0)
          h.writeUInt32BE(0x045565a9, 4)
          h.writeUInt32BE(opt, 8)
          h.writeUInt32BE(type, 12)
          h.writeUInt32BE(data.length, 16)
          s.write(Buffer.concat([h, data]))
        }
        if (opt === 8) rep(1)
        else if (opt === 7) {
          const info = Buffer.alloc(12)
          info.writeUInt32BE(1 << 20, 6) // size 1 MiB
          info.writeUInt16BE(1, 10) // HAS_FLAGS only: no flush at close
          rep(3, info)
          rep(1)
          phase = 2
        } else rep(0x80000001)
      }
      while (phase === 2 && buf.length >= 28) {
        const type = buf.readUInt16BE(6)
        const request = {
          cookie: Buffer.from(buf.subarray(8, 16)),
          type,
          offset: Number(buf.readBigUInt64BE(16)),
          length: buf.readUInt32BE(24),
        }
        if (type === 1 && buf.length < 28 + request.length) return
        reply(request.cookie, s, request)
        buf = buf.subarray(28 + (type === 1 ? buf.readUInt32BE(24) : 0))
      }
    })
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  const port = (server.address() as { port: number }).port
  return { uri: `nbd://127.0.0.1:${port}/`, close: () => server.close() }
}

test('a server that breaks the protocol loses its connection; the request fails, nothing is written', async (t) => {
  // Read data for a range outside the request.
  const bad = await rogue((cookie, s) => {
    const h = Buffer.alloc(20 + 8 + 512)
    h.writeUInt32BE(0x668e33ef, 0)
    h.writeUInt16BE(1, 4) // DONE
    h.writeUInt16BE(1, 6) // OFFSET_DATA
    cookie.copy(h, 8)
    h.writeUInt32BE(8 + 512, 16)
    h.writeUInt32BE(0, 20)
    h.writeUInt32BE(900 << 10, 24) // offset 900 KiB: not what was asked
    s.write(h)
  })
  t.teardown(() => bad.close())
  const backend = await NbdBackend.connect(bad.uri, { reconnectTimeoutMs: 300 })
  const lost: string[] = []
  backend.on('disconnected', (e) => lost.push((e.error as VduseError).code))
  const { device, driver } = await serve(backend)
  const r = await driver.read(0, 512)
  t.is(r.status, S.IOERR)
  t.true(r.data.equals(Buffer.alloc(512, 0xee)), 'nothing landed in the buffer')
  t.is(lost[0], 'ERR_VDUSE_PROTOCOL')
  await device.close()
  await backend.close()

  // A reply to a cookie that was never sent.
  const liar = await rogue((_cookie, s) => {
    const h = Buffer.alloc(16)
    h.writeUInt32BE(0x67446698, 0)
    h.writeUInt32BE(12345, 12)
    s.write(h)
  })
  t.teardown(() => liar.close())
  const b2 = await NbdBackend.connect(liar.uri, { reconnectTimeoutMs: 300 })
  const lost2: string[] = []
  b2.on('disconnected', (e) => lost2.push((e.error as VduseError).code))
  const s2 = await serve(b2)
  t.is((await s2.driver.read(0, 512)).status, S.IOERR)
  t.is(lost2[0], 'ERR_VDUSE_PROTOCOL')
  await s2.device.close()
  await b2.close()
})

test('a server error fails that request only; a hung connection is replaced and the request resent', async (t) => {
  // nbdkit's error filter fails every write; reads still work.
  const errs = await nbdkit(
    { path: socketPath() },
    ['memory', 'size=1M', 'error-pwrite-rate=1', 'error=ENOSPC'],
    {
      filters: ['error'],
    },
  )
  t.teardown(() => errs.kill())
  const backend = await NbdBackend.connect(errs.uri)
  const { device, driver } = await serve(backend)
  const failures: VduseError[] = []
  device.on('requestError', (e) => failures.push(e as VduseError))
  t.is((await driver.write(0, Buffer.alloc(4096, 1))).status, S.IOERR)
  t.is(failures[0]?.errno, -28, failures[0]?.message)
  t.is((await driver.read(0, 4096)).status, S.OK)
  t.is(backend.connections, 1, 'a server error is not a connection error')
  await device.close()
  await backend.close()

  // The delay filter holds every read for 2 s, the liveness probe's too: the connection answers nothing
  // for twice hangTimeoutMs and counts as hung.
  const slow = await nbdkit({ path: socketPath() }, ['memory', 'size=1M', 'rdelay=2'], { filters: ['delay'] })
  t.teardown(() => slow.kill())
  const b2 = await NbdBackend.connect(slow.uri, { hangTimeoutMs: 300, reconnectTimeoutMs: 3000 })
  let lost = 0
  b2.on('disconnected', () => lost++)
  const s2 = await serve(b2)
  t.is((await s2.driver.read(0, 4096)).status, S.IOERR, 'resent until the reconnect timeout, then failed')
  t.true(lost >= 2, `${lost} connections given up as hung`)
  // Its final flush may find the server still "unreachable" (every connection cut): said, not hidden.
  await s2.device.close().catch((e: VduseError) => t.is(e.code, 'ERR_VDUSE_UNREACHABLE'))
  await b2.close()
})

/** A structured reply chunk. */
function chunk(cookie: Buffer, type: number, payload: Buffer, done: boolean): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(0x668e33ef, 0)
  h.writeUInt16BE(done ? 1 : 0, 4)
  h.writeUInt16BE(type, 6)
  cookie.copy(h, 8)
  h.writeUInt32BE(payload.length, 16)
  return Buffer.concat([h, payload])
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(BigInt(n))
  return b
}

/** The device's contents in the rogue servers below: byte i is (i * 7) & 0xff. */
function pattern(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length)
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 7) & 0xff
  return b
}

test('replies in pieces of a few bytes, in chunks out of order with a hole, are put together exactly', async (t) => {
  const queue = new Map<Socket, Promise<void>>()
  // Reads answered as: the second half first, a hole for [1 KiB, 2 KiB) (zeroes), then the first KiB —
  // all dribbled out in writes of 1..7 bytes.
  const srv = await rogue((cookie, s, r) => {
    if (r.type !== 0) return
    const half = r.length / 2
    const pieces = [
      chunk(cookie, 1, Buffer.concat([u64(r.offset + half), pattern(r.offset + half, half)]), false),
      chunk(cookie, 2, Buffer.concat([u64(r.offset + 1024), Buffer.from([0, 0, 4, 0])]), false),
      chunk(cookie, 1, Buffer.concat([u64(r.offset), pattern(r.offset, 1024)]), half === 2048),
    ]
    if (half > 2048) {
      pieces.push(
        chunk(cookie, 1, Buffer.concat([u64(r.offset + 2048), pattern(r.offset + 2048, half - 2048)]), true),
      )
    }
    const parts = Buffer.concat(pieces)
    // One reply at a time on the wire: replies to requests in flight together are queued.
    const previous = queue.get(s) ?? Promise.resolve()
    const next = previous.then(async () => {
      for (let at = 0, k = 0; at < parts.length && !s.destroyed; k++) {
        const n = 1 + (k % 7)
        s.write(parts.subarray(at, at + n))
        at += n
        await new Promise((resolve) => setImmediate(resolve))
      }
    })
    queue.set(s, next)
  })
  t.teardown(() => srv.close())
  const backend = await NbdBackend.connect(srv.uri)
  const { device, driver } = await serve(backend)
  const reads = await Promise.all([driver.read(0, 4096), driver.read(64, 8192)])
  const want = (offset: number, length: number): Buffer => {
    const b = pattern(offset, length)
    b.fill(0, 1024, 2048)
    return b
  }
  t.is(reads[0]!.status, S.OK)
  t.true(reads[0]!.data.equals(want(0, 4096)))
  t.is(reads[1]!.status, S.OK)
  t.true(reads[1]!.data.equals(want(64 * 512, 8192)))
  await device.close()
  await backend.close()
})

test('a read reply that covers too little or overlaps itself is a broken server: the request fails, never hangs', async (t) => {
  const cases: Array<[string, (c: Buffer, r: NbdRequest) => Buffer[]]> = [
    ['short', (c, r) => [chunk(c, 1, Buffer.concat([u64(r.offset), pattern(r.offset, 512)]), true)]],
    [
      'overlapping',
      (c, r) => [
        chunk(c, 1, Buffer.concat([u64(r.offset), pattern(r.offset, r.length / 2 + 512)]), false),
        chunk(
          c,
          1,
          Buffer.concat([u64(r.offset + r.length / 2), pattern(r.offset, r.length / 2 - 512)]),
          true,
        ),
      ],
    ],
  ]
  for (const [what, parts] of cases) {
    const srv = await rogue((cookie, s, r) => {
      if (r.type === 0) for (const p of parts(cookie, r)) s.write(p)
    })
    t.teardown(() => srv.close())
    const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 300 })
    const lost: string[] = []
    backend.on('disconnected', (e) => lost.push((e.error as VduseError).code))
    const { device, driver } = await serve(backend)
    t.is((await driver.read(0, 4096)).status, S.IOERR, what)
    t.is(lost[0], 'ERR_VDUSE_PROTOCOL', what)
    await device.close()
    await backend.close()
  }
})

test('a server that accepts but never speaks, or floods the handshake, fails the connect in bounded time', async (t) => {
  const silent = await rogue(() => {}, { silent: true })
  t.teardown(() => silent.close())
  const started = Date.now()
  await expectCode(t, NbdBackend.connect(silent.uri, { connectTimeoutMs: 300 }), 'ERR_VDUSE_UNREACHABLE')
  t.true(Date.now() - started < 3000)
  const flood = await rogue(() => {}, { flood: true })
  t.teardown(() => flood.close())
  await expectCode(t, NbdBackend.connect(flood.uri, { connectTimeoutMs: 5000 }), 'ERR_VDUSE_PROTOCOL')
})

test('a write or write-zeroes waiting for a reconnect when the driver resets never reaches the server', async (t) => {
  const file = image(1 << 20, Buffer.alloc(1 << 20, 0x33))
  const path = socketPath()
  let srv = await qemuNbd(file, { path })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 30_000 })
  const transport = new InProcessTransport()
  const device = await BlockDevice.create({ name: `nbd${n++}`, backend, transport })
  device.unref()
  transport.start()
  await srv.kill()
  // Both wait for the server to come back...
  const w = transport.request([header(T.OUT, 0), Buffer.alloc(4096, 0x77)], [1])
  const z = transport.request([header(T.WRITE_ZEROES, 0), range(16, 8, 0)], [1])
  await new Promise((r) => setTimeout(r, 200))
  // ...when the driver resets: they are fenced, and must never be sent.
  t.is(transport.reset(), 2)
  t.true((await Promise.all([w, z])).every((r) => r.fenced))
  const back = new Promise((resolve) => backend.once('reconnected', resolve))
  srv = await qemuNbd(file, { path })
  await back
  await new Promise((r) => setTimeout(r, 300))
  t.true(readFileSync(file).equals(Buffer.alloc(1 << 20, 0x33)), 'the image is untouched')
  await device.close().catch(() => {})
  await backend.close()
})

test('a restarted server that no longer allows multi-conn is not used by several connections', async (t) => {
  const file = image(1 << 20)
  const path = socketPath()
  let srv = await qemuNbd(file, { path }, { shared: 8 })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { connections: 2, reconnectTimeoutMs: 1000 })
  t.is(backend.connections, 2)
  const failures: string[] = []
  backend.on('reconnectFailed', (e) => failures.push(e.error.code))
  await srv.kill()
  srv = await qemuNbd(file, { path }, { shared: 1 })
  while (failures.length === 0) await new Promise((r) => setTimeout(r, 50))
  t.is(failures[0], 'ERR_VDUSE_MISMATCH')
  t.is(backend.connections, 0)
  await backend.close()
})

// ---- server life events, liveness, deadlines, durability across restarts (NBD v2) ----

/** Stops a server the way an operator does (SIGTERM) and waits until it is gone. */
function stopGracefully(srv: { proc: import('node:child_process').ChildProcess }): Promise<void> {
  return new Promise((resolve) => {
    if (srv.proc.exitCode !== null || srv.proc.signalCode !== null) return resolve()
    srv.proc.once('exit', () => resolve())
    srv.proc.kill('SIGTERM')
  })
}

test('nbdkit stopped gracefully (SIGTERM) and restarted under 32 writers: no error, every acknowledged write reads back', async (t) => {
  const size = 4 << 20
  const file = image(size)
  const path = socketPath()
  let srv = await nbdkit({ path }, ['file', file])
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 20_000 })
  const { device, driver } = await serve(backend)
  const blocks = size / 4096
  const latest = new Map<number, Buffer>()
  let failed = 0
  let stop = false
  const writer = async (w: number) => {
    for (let i = 0; !stop; i++) {
      const block = (w * 97 + i * 31) % blocks
      const data = randomBytes(4096)
      const r = await driver.write(block * 8, data)
      if (r.status === S.OK) latest.set(block, data)
      else failed++
    }
  }
  const writers = Array.from({ length: 32 }, (_, w) => writer(w))
  for (let round = 0; round < 2; round++) {
    await new Promise((r) => setTimeout(r, 300))
    await stopGracefully(srv)
    await new Promise((r) => setTimeout(r, 200))
    rmSync(path, { force: true })
    srv = await nbdkit({ path }, ['file', file])
  }
  await new Promise((r) => setTimeout(r, 300))
  stop = true
  await Promise.all(writers)
  t.is(failed, 0, 'no write failed')
  t.true(backend.reconnects >= 2)
  t.true(backend.shutdownRetries > 0, 'the server did answer ESHUTDOWN, and those were sent again')
  t.log(`ESHUTDOWN answers sent again: ${backend.shutdownRetries}; reconnects: ${backend.reconnects}`)
  t.is((await driver.simple(T.FLUSH)).status, S.OK)
  for (const [block, data] of latest) {
    const back = await driver.read(block * 8, 4096)
    if (!back.data.equals(data)) t.fail(`block ${block} does not hold its last acknowledged write`)
  }
  t.true(latest.size > 100, `${latest.size} blocks written`)
  await device.close()
  await backend.close()
})

test('one slow TRIM and one slow WRITE on a live server are never cut: the quiet connection is probed and answers', async (t) => {
  const srv = await nbdkit({ path: socketPath() }, ['memory', 'size=8M', 'delay-trim=3', 'delay-write=3'], {
    filters: ['delay'],
  })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { hangTimeoutMs: 700 })
  const { device, driver } = await serve(backend)
  const started = Date.now()
  const [trim, write] = await Promise.all([
    driver.simple(T.DISCARD, [range(0, 8192)]),
    driver.write(8192, Buffer.alloc(1 << 20, 7)),
  ])
  t.is(trim.status, S.OK)
  t.is(write.status, S.OK)
  t.true(Date.now() - started >= 2900, 'they did take the delay')
  t.is(backend.reconnects, 0, 'nothing was cut')
  t.is(backend.hungCut, 0)
  t.true(backend.probes >= 1, 'the quiet connection was probed')
  t.true((await driver.read(8192, 4096)).data.every((b) => b === 7))
  await device.close()
  await backend.close()
})

/** Structured replies for a rogue server: read data (zeros) or a NONE chunk, both DONE. */
function answer(cookie: Buffer, s: Socket, req: NbdRequest): void {
  if (req.type === 0) {
    const h = Buffer.alloc(20 + 8 + req.length)
    h.writeUInt32BE(0x668e33ef, 0)
    h.writeUInt16BE(1, 4)
    h.writeUInt16BE(1, 6)
    cookie.copy(h, 8)
    h.writeUInt32BE(8 + req.length, 16)
    h.writeBigUInt64BE(BigInt(req.offset), 20)
    s.write(h)
  } else {
    const h = Buffer.alloc(20)
    h.writeUInt32BE(0x668e33ef, 0)
    h.writeUInt16BE(1, 4)
    cookie.copy(h, 8)
    s.write(h)
  }
}

test('a reply the server never sends fails only that request, at the device deadline; its connection goes, nothing stays in flight', async (t) => {
  let dropped = 0
  const srv = await rogue((cookie, s, req) => {
    // The server answers everything but reads of block 2, and stays alive.
    if (req.type === 0 && req.offset === 8192) return void dropped++
    answer(cookie, s, req)
  })
  t.teardown(() => srv.close())
  const backend = await NbdBackend.connect(srv.uri, { hangTimeoutMs: 0 })
  const { device, driver } = await serve(backend, { requestTimeoutMs: 400 })
  const lost = driver.read(16, 4096)
  const others = await Promise.all(Array.from({ length: 20 }, (_, i) => driver.read(64 + i * 8, 4096)))
  t.true(
    others.every((r) => r.status === S.OK),
    'the others are answered',
  )
  t.is((await lost).status, S.IOERR, 'the dropped one fails at its deadline')
  await new Promise((r) => setTimeout(r, 600))
  t.is(backend.pending, 0, 'nothing left in flight with its payload')
  t.true(backend.reconnects >= 1, 'its connection was closed, so its copy cannot land later')
  t.is((await driver.read(64, 4096)).status, S.OK, 'serving goes on')
  t.is(dropped, 1)
  await device.close()
  await backend.close()
})

test('a server that loses its write cache when killed: acknowledged writes are sent again before anything else, and the flush tells the truth', async (t) => {
  const size = 4 << 20
  const file = image(size)
  const path = socketPath()
  const start = () => nbdkit({ path }, ['file', file, 'cache=writeback'], { filters: ['cache'] })
  let srv = await start()
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 10_000 })
  const { device, driver } = await serve(backend)
  const written = new Map<number, Buffer>()
  for (let i = 0; i < 64; i++) {
    const data = randomBytes(4096)
    t.is((await driver.write(i * 16, data)).status, S.OK)
    written.set(i, data)
  }
  t.is(backend.unflushed.changes, 64, 'acknowledged, not yet flushed: kept')
  await srv.kill() // SIGKILL: its writeback cache is gone
  t.false(readFileSync(file).subarray(0, 4096).equals(written.get(0)!), 'the server lost them indeed')
  rmSync(path, { force: true })
  srv = await start()
  t.is((await driver.simple(T.FLUSH)).status, S.OK, 'the writes were sent again: the flush is true')
  t.is(backend.unflushed.changes, 0, 'the flush made them durable')
  const image2 = readFileSync(file)
  for (const [i, data] of written) {
    if (!image2.subarray(i * 8192, i * 8192 + 4096).equals(data)) t.fail(`block ${i} is not on storage`)
  }
  await device.close()
  await backend.close()
})

test('more unflushed writes than are kept: the first flush after the server lost them fails, the next is true again', async (t) => {
  const file = image(4 << 20)
  const path = socketPath()
  const start = () => nbdkit({ path }, ['file', file, 'cache=writeback'], { filters: ['cache'] })
  let srv = await start()
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 10_000, keepUnflushedBytes: 16384 })
  const { device, driver } = await serve(backend)
  // Eight writes at once: the background flush that the second acknowledgement starts covers only the
  // first two; the rest fill the room, and some are acknowledged with none left.
  const acks = await Promise.all(Array.from({ length: 8 }, (_, i) => driver.write(i * 8, randomBytes(4096))))
  t.true(acks.every((a) => a.status === S.OK))
  await srv.kill()
  rmSync(path, { force: true })
  srv = await start()
  t.is((await driver.simple(T.FLUSH)).status, S.IOERR, 'some acknowledged writes may be gone: said once')
  t.is((await driver.simple(T.FLUSH)).status, S.OK)
  await device.close()
  await backend.close()
})

test('bookkeeping: a throwing listener does not end reconnection; a failed connect leaves no socket; a grown --queues count connects', async (t) => {
  const path = socketPath()
  let srv = await qemuNbd(image(1 << 20), { path })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri)
  const warnings: Error[] = []
  const onWarning = (w: Error) => warnings.push(w)
  process.on('warning', onWarning)
  t.teardown(() => process.off('warning', onWarning))
  backend.on('disconnected', () => {
    throw new Error('a listener bug')
  })
  backend.on('reconnectFailed', () => {
    throw new Error('another listener bug')
  })
  const { device, driver } = await serve(backend)
  await srv.kill()
  await new Promise((r) => setTimeout(r, 300))
  srv = await qemuNbd(image(1 << 20), { path })
  t.is((await driver.read(0, 4096)).status, S.OK, 'reconnected all the same')
  t.true(warnings.some((w) => w.message === 'a listener bug'))
  await device.close()
  await backend.close()
  // An export smaller than a block: refused, and the connection is not left open.
  const tiny = await nbdkit({ path: socketPath() }, ['memory', 'size=100'])
  t.teardown(() => tiny.kill())
  const sockets = () =>
    (process as unknown as { _getActiveHandles(): unknown[] })
      ._getActiveHandles()
      .filter((h) => h instanceof Socket).length
  const tiny2 = await qemuNbd(image(1 << 20), { path: socketPath() }, { shared: 20 })
  t.teardown(() => tiny2.kill())
  await new Promise((r) => setTimeout(r, 300))
  const before = sockets()
  await t.throwsAsync(NbdBackend.connect(tiny.uri), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  // Its connection ends politely (NBD_CMD_DISC), then closes: wait for that, bounded.
  for (let i = 0; i < 40 && sockets() > before; i++) await new Promise((r) => setTimeout(r, 50))
  t.true(sockets() <= before, 'no socket left open')
  // `--queues 17` with --nbd: the connection count follows the queues up to 16 — the command gets as far
  // as creating the device (which this host cannot: no VDUSE), not a usage error about connections.
  const cli = await new Promise<{ stdout: string }>((resolve) =>
    execFile(
      process.execPath,
      [
        '--import=tsx',
        join(__dirname, '../src/cli/main.ts'),
        'blk',
        '--name',
        'q17',
        '--nbd',
        tiny2.uri,
        '--queues',
        '17',
        '--json',
      ],
      (_err, stdout) => resolve({ stdout }),
    ),
  )
  const last = JSON.parse(cli.stdout.trim().split('\n').pop()!) as { code: string; message: string }
  t.regex(last.code, /^ERR_VDUSE_(UNAVAILABLE|PERMISSION)$/, last.message)
})

test('kept writes to the same block are sent again in order after the server lost its cache: the newest wins', async (t) => {
  const file = image(1 << 20)
  const path = socketPath()
  const start = () => nbdkit({ path }, ['file', file, 'cache=writeback'], { filters: ['cache'] })
  let srv = await start()
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 10_000 })
  const { device, driver } = await serve(backend)
  const versions = [randomBytes(8192), randomBytes(8192), randomBytes(8192)]
  for (const v of versions) t.is((await driver.write(0, v)).status, S.OK)
  // A trim of the second block, then a write over part of it: order matters there too.
  t.is((await driver.simple(T.DISCARD, [range(16, 16)])).status, S.OK)
  const tail = randomBytes(4096)
  t.is((await driver.write(16, tail)).status, S.OK)
  t.is(backend.unflushed.changes, 3, 'the same range kept once (its newest), the trim, the write')
  await srv.kill()
  rmSync(path, { force: true })
  srv = await start()
  t.is((await driver.simple(T.FLUSH)).status, S.OK)
  const img = readFileSync(file)
  t.true(img.subarray(0, 8192).equals(versions[2]!), 'the newest of three writes to the block')
  t.true(img.subarray(8192, 12288).equals(tail), 'the write after the trim')
  await device.close()
  await backend.close()
})
