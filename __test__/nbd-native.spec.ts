// The native NBD data path on the host, end to end: QEMU 10's qemu-io over libblkio (a VMM's virtio-blk
// driver) against a BlockDevice served over vhost-user, whose NbdBackend hands every request to the
// Rust engine — real qemu-nbd and nbdkit on the other side, stopped, killed and restarted under I/O.
import { closeSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'
import test from 'ava'

import { BlockDevice, NbdBackend, vhostUser } from '../src/index'
import { nbdkit, qemuNbd, socketPath, type Server } from './helpers/nbd-server'
import { clients, image as image_, qemuIo, qemuIoWith } from './helpers/qemu-io'
import { scratch } from './helpers/scratch'

const execFileAsync = promisify(execFile)

function image(dir: string, size: number): string {
  const file = join(dir, 'disk.img')
  writeFileSync(file, '')
  truncateSync(file, size)
  return file
}

async function stopGracefully(srv: Server): Promise<void> {
  await new Promise<void>((resolve) => {
    if (srv.proc.exitCode !== null || srv.proc.signalCode !== null) return resolve()
    srv.proc.once('exit', () => resolve())
    srv.proc.kill('SIGTERM')
  })
}

/** Serves `backend` over vhost-user at a fresh socket; JavaScript's read/write must never be reached. */
async function serve(
  t: { teardown(fn: () => void | Promise<void>): void },
  dir: string,
  backend: NbdBackend,
) {
  const sock = join(dir, 'd.sock')
  const device = await BlockDevice.create({
    name: 'nbd-native',
    backend,
    transport: vhostUser(sock),
    queues: 2,
  })
  t.teardown(async () => {
    await device.close().catch(() => {})
    await backend.close()
  })
  let javascript = 0
  backend.read = async () => void javascript++
  backend.write = async () => void javascript++
  return { sock, device, javascript: () => javascript }
}

test('qemu-nbd over the native path: patterns, zeroes, discard and flush from libblkio land in the image; no request reaches read/write', async (t) => {
  const dir = scratch(t, 'vduse-nbdn-')
  const file = image(dir, 64 << 20)
  const srv = await qemuNbd(file, { path: socketPath() })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { connections: 2 })
  const { sock, device, javascript } = await serve(t, dir, backend)
  t.true(backend.nativePath)
  t.is(backend.connections, 2)
  await qemuIo(
    sock,
    'write -P 0xab 0 1M',
    'read -P 0xab 0 1M',
    'write -z 64k 64k',
    'read -P 0 64k 64k',
    'aio_write -P 0x11 2M 512k',
    'aio_write -P 0x22 3M 4M',
    'aio_flush',
    'flush',
    'read -P 0x22 3M 4M',
    'write -P 0x33 8M 1M',
    'discard 8M 1M',
  )
  const img = readFileSync(file)
  t.true(img.subarray(0, 64 << 10).every((b) => b === 0xab))
  t.true(img.subarray(64 << 10, 128 << 10).every((b) => b === 0))
  t.true(img.subarray(2 << 20, (2 << 20) + (512 << 10)).every((b) => b === 0x11))
  t.true(img.subarray(3 << 20, 7 << 20).every((b) => b === 0x22))
  t.is(javascript(), 0, 'no request went through read/write')
  // Served on the device's worker threads: the JavaScript model never saw a request (an I/O error would
  // have failed qemu-io above).
  t.is(device.counters().jsCalls, 0)
  t.true(backend.commandsSent.reduce((a, b) => a + b, 0) > 10)
  await device.close()
  t.is(backend.pending, 0)
})

test('nbdkit stopped gracefully (SIGTERM) and restarted under qemu-img bench writes (depth 32): no error, every write lands', async (t) => {
  const dir = scratch(t, 'vduse-nbdn-')
  // 64 KiB more than the writes cover: how qemu-img bench wraps its offsets changed after QEMU 10.0.
  const file = image(dir, (16 << 20) + (64 << 10))
  const path = socketPath()
  // Writes take 100 ms: some are with the server when it stops (nbdkit takes a few at a time).
  const start = () => nbdkit({ path }, ['file', file, 'wdelay=100ms'], { filters: ['delay'] })
  let srv = await start()
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { reconnectTimeoutMs: 30_000 })
  const events: string[] = []
  backend.on('disconnected', () => events.push('disconnected'))
  backend.on('reconnected', () => events.push('reconnected'))
  const { sock, device, javascript } = await serve(t, dir, backend)
  // 256 writes of 64 KiB (the whole image, pattern 0x5a), 32 at a time; qemu-img fails on any error.
  const { qemuImg } = await clients()
  const bench = execFileAsync(
    qemuImg,
    [
      'bench',
      '-w',
      '-t',
      'none',
      '-d',
      '32',
      '-c',
      '256',
      '-s',
      '64k',
      `--pattern=${0x5a}`,
      '--image-opts',
      image_(sock),
    ],
    { timeout: 120_000 },
  )
  let benchDone = false
  void bench.finally(() => (benchDone = true)).catch(() => {})
  const deadline = Date.now() + 20_000
  while (backend.pending < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2))
  t.true(backend.pending >= 2, `writes in flight when the server stops (${backend.pending})`)
  // Well inside the 100 ms a write takes: the server has read some of them when it is told to stop.
  await new Promise((r) => setTimeout(r, 30))
  t.false(benchDone)
  await stopGracefully(srv)
  rmSync(path, { force: true })
  srv = await start()
  await bench
  t.true(
    readFileSync(file)
      .subarray(0, 16 << 20)
      .every((b) => b === 0x5a),
    'every write landed',
  )
  t.is(device.counters().jsCalls, 0)
  t.is(javascript(), 0)
  t.true(backend.reconnects >= 1, 'the connection was replaced')
  t.deepEqual(events.slice(0, 2), ['disconnected', 'reconnected'])
  t.true(backend.shutdownRetries > 0, 'the server answered ESHUTDOWN, and those went again')
  t.log(`ESHUTDOWN answers sent again: ${backend.shutdownRetries}`)
})

test('a server killed with acknowledged writes in its cache gets them again: the next flush is true', async (t) => {
  const dir = scratch(t, 'vduse-nbdn-')
  const file = image(dir, 16 << 20)
  const path = socketPath()
  // nbdkit's writeback cache acknowledges writes it holds in memory; a SIGKILL loses them.
  const start = () => nbdkit({ path }, ['file', file, 'cache=writeback'], { filters: ['cache'] })
  let srv = await start()
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri)
  const { sock } = await serve(t, dir, backend)
  // One session (a client's exit flushes): writes, a pause in which the server dies and comes back,
  // then the flush and the read-back.
  // Writeback (qemu-io defaults to writethrough: a flush after every write).
  const io = qemuIoWith(
    ['-t', 'writeback'],
    sock,
    'write -P 0x5a 0 2M',
    'write -P 0xa5 4M 1M',
    'sleep 3000',
    'flush',
    'read -P 0x5a 0 2M',
    'read -P 0xa5 4M 1M',
  )
  const deadline = Date.now() + 20_000
  while (backend.unflushed.bytes < 3 << 20 && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 20))
  t.is(backend.unflushed.bytes, 3 << 20, 'acknowledged, kept until a flush')
  await srv.kill()
  t.true(
    readFileSync(file)
      .subarray(0, 2 << 20)
      .every((b) => b === 0),
    'the killed cache had them',
  )
  rmSync(path, { force: true })
  srv = await start()
  // The flush succeeds only once the kept writes were sent again.
  await io
  const img = readFileSync(file)
  t.true(img.subarray(0, 2 << 20).every((b) => b === 0x5a))
  t.true(img.subarray(4 << 20, 5 << 20).every((b) => b === 0xa5))
  t.is(backend.unflushed.bytes, 0)
})

test('a server that takes one client at a time (qemu-nbd --shared=1): the JavaScript connection makes room for the native one', async (t) => {
  const dir = scratch(t, 'vduse-nbdn-')
  const file = image(dir, 16 << 20)
  const srv = await qemuNbd(file, { path: socketPath() }, { shared: 1 })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri, { connectTimeoutMs: 5000 })
  const { sock } = await serve(t, dir, backend)
  t.true(backend.nativePath)
  await qemuIo(sock, 'write -P 0x7e 0 64k', 'read -P 0x7e 0 64k')
  t.true(
    readFileSync(file)
      .subarray(0, 64 << 10)
      .every((b) => b === 0x7e),
  )
})

test('a 35 s TRIM and a 35 s WRITE on a live server succeed with the default settings: probed, never cut', async (t) => {
  // The case as it was reported: the default 30 s hang detection used to cut such a connection
  // (EIO after 62 s). Only TRIM and WRITE are delayed: the liveness probe (a small read) answers at once.
  t.timeout(150_000)
  const dir = scratch(t, 'vduse-nbdn-')
  const file = image(dir, 64 << 20)
  // What the TRIM must remove: the file plugin punches it out, so zeroes there prove it reached the server.
  const fd = openSync(file, 'r+')
  writeSync(fd, Buffer.alloc(4 << 20, 0x77), 0, 4 << 20, 32 << 20)
  closeSync(fd)
  const srv = await nbdkit({ path: socketPath() }, ['file', file, 'delay-trim=35', 'delay-write=35'], {
    filters: ['delay'],
  })
  t.teardown(() => srv.kill())
  const backend = await NbdBackend.connect(srv.uri)
  const { sock } = await serve(t, dir, backend)
  // One at a time, each timed: every TRIM and WRITE the server gets takes 35 s.
  for (const command of ['discard 32M 4M', 'write -P 0x5a 0 1M']) {
    const started = Date.now()
    // Writeback and discard=unmap: qemu-io adds no flush, and passes the discard on.
    await qemuIoWith(['-t', 'writeback', '-d', 'unmap'], sock, command)
    t.true(Date.now() - started >= 34_000, `${command} did take the delay`)
  }
  const img = readFileSync(file)
  t.true(
    img.subarray(0, 1 << 20).every((b) => b === 0x5a),
    'the write is in the image',
  )
  t.true(
    img.subarray(32 << 20, 36 << 20).every((b) => b === 0),
    'the trim reached the server',
  )
  t.is(backend.reconnects, 0, 'nothing was cut')
  t.is(backend.hungCut, 0)
  t.true(backend.probes >= 2, 'the quiet connection was probed during each')
})
