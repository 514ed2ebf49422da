// The vhost-user transport on the host — no VM, no VDUSE: QEMU 10's qemu-io and qemu-img over libblkio's
// virtio-blk-vhost-user driver (the virtio-blk driver code a VMM uses) against our devices.
import { spawn, execFile, type ChildProcess } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { promisify } from 'node:util'
import test from 'ava'

import { BlockDevice, MemoryBackend, vhostUser, type BlockBackend, type BlockIo } from '../src/index'
import { parseCommand } from '../src/cli/args'
import { clients, image, qemuIo } from './helpers/qemu-io'
import { scratch } from './helpers/scratch'

const execFileAsync = promisify(execFile)

async function until(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

test('a BlockDevice over vhostUser(): patterns, zeroes, flush and discard from libblkio; a second session sees the data', async (t) => {
  const dir = scratch(t, 'vduse-vu-')
  const sock = join(dir, 'd.sock')
  const backend = new MemoryBackend(64 << 20)
  const disk = await BlockDevice.create({ name: 'vu-basic', backend, transport: vhostUser(sock) })
  t.teardown(() => disk.close())
  t.is(disk.path, sock)
  t.true(existsSync(sock))
  const attach = await t.throwsAsync(disk.attach())
  t.is((attach as { code?: string }).code, 'ERR_VDUSE_INVALID_CONFIG')

  await qemuIo(
    sock,
    'write -P 0xab 0 1M',
    'read -P 0xab 0 1M',
    'write -z 64k 64k',
    'read -P 0 64k 64k',
    'aio_write -P 0x11 2M 512k',
    'aio_write -P 0x22 3M 512k',
    'aio_flush',
    'flush',
    'discard 8M 1M',
    'read -P 0 8M 1M',
  )
  // The bytes are where the driver put them, in the backend itself.
  t.true(backend.contents.subarray(0, 64 << 10).every((b) => b === 0xab))
  t.true(backend.contents.subarray(64 << 10, 128 << 10).every((b) => b === 0))
  t.true(backend.contents.subarray(2 << 20, (2 << 20) + (512 << 10)).every((b) => b === 0x11))
  // A second client, after the first left: same device, same data.
  await qemuIo(sock, 'read -P 0xab 128k 896k', 'read -P 0x22 3M 512k')
  t.is(disk.stats.ioErrors, 0)
  t.is(disk.counters().badChains, 0)
  await disk.close()
  t.false(existsSync(sock), 'close() removes the socket')
})

test('a client killed mid-I/O is a reset: requests stuck in the backend are fenced, their late writes dropped, and the next client is served', async (t) => {
  const dir = scratch(t, 'vduse-vu-')
  const sock = join(dir, 'd.sock')
  const inner = new MemoryBackend(64 << 20)
  const stuck: Array<() => void> = []
  let lateWrites = 0
  // Writes past 32 MiB hang until released (a backend that stalls); everything else is immediate.
  const backend: BlockBackend = {
    size: inner.size,
    read: (io) => inner.read(io),
    write: (io: BlockIo) => {
      if (io.offset < 32 << 20) return inner.write(io)
      return new Promise<void>((resolve) =>
        stuck.push(() => {
          // After the fence the copy is refused: nothing reaches storage from a dead request.
          if (io.copyTo(inner.contents, io.offset)) lateWrites++
          resolve()
        }),
      )
    },
    flush: () => {},
  }
  const disk = await BlockDevice.create({
    name: 'vu-kill',
    backend,
    transport: vhostUser(sock),
    drainTimeoutMs: 300,
  })
  t.teardown(() => disk.close())
  const drains: Array<{ reason: string; fenced: number }> = []
  disk.on('drained', (d) => drains.push(d))

  const { qemuImg } = await clients()
  const bench = spawn(
    qemuImg,
    [
      'bench',
      '-t',
      'none',
      '-w',
      '-c',
      '1000000',
      '-d',
      '8',
      '-s',
      '64k',
      '-o',
      String(32 << 20),
      '--image-opts',
      image(sock),
    ],
    { stdio: 'ignore' },
  )
  t.teardown(() => bench.kill('SIGKILL'))
  await until('writes stuck in the backend', () => stuck.length >= 2)
  await new Promise((r) => setTimeout(r, 200))
  const stuckAtKill = stuck.length
  bench.kill('SIGKILL')
  await until('the reset drain', () => drains.length > 0)
  t.is(drains[0]!.reason, 'reset')
  t.true(drains[0]!.fenced >= stuckAtKill, `fenced ${drains[0]!.fenced} of ${stuckAtKill}`)
  await until('nothing in flight', () => disk.counters().inFlight === 0)
  for (const release of stuck.splice(0)) release()
  await new Promise((r) => setTimeout(r, 50))
  t.is(lateWrites, 0, 'a fenced write never lands')
  t.true(inner.contents.subarray(32 << 20, 33 << 20).every((b) => b === 0))
  // The next client finds a clean device.
  await qemuIo(sock, 'write -P 0x5a 0 1M', 'read -P 0x5a 0 1M', 'flush')
  t.is(disk.counters().badChains, 0)
})

test('vduse blk --file --vhost-user: native I/O straight into the client memory; SIGTERM stops and removes the socket', async (t) => {
  const dir = scratch(t, 'vduse-vu-')
  const sock = join(dir, 'd.sock')
  const img = join(dir, 'disk.img')
  const cli: ChildProcess = spawn(
    process.execPath,
    [
      'dist/cli/main.js',
      'blk',
      '--name',
      'vu-file',
      '--file',
      img,
      '--size',
      '32M',
      '--queues',
      '2',
      '--vhost-user',
      sock,
      '--json',
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  )
  t.teardown(() => cli.kill('SIGKILL'))
  const events: Array<Record<string, unknown>> = []
  createInterface({ input: cli.stdout! }).on('line', (l) =>
    events.push(JSON.parse(l) as Record<string, unknown>),
  )
  await until('ready', () => events.some((e) => e.event === 'ready'))
  const ready = events.find((e) => e.event === 'ready')!
  t.is(ready.path, sock)

  await qemuIo(
    sock,
    'write -P 0x3c 1M 2M',
    'write -z 1536k 256k',
    'flush',
    'read -P 0x3c 1M 512k',
    'read -P 0 1536k 256k',
  )
  const bytes = readFileSync(img)
  t.true(bytes.subarray(1 << 20, (1 << 20) + (512 << 10)).every((b) => b === 0x3c))
  t.true(bytes.subarray(1536 << 10, 1792 << 10).every((b) => b === 0))
  t.true(bytes.subarray(1792 << 10, 3 << 20).every((b) => b === 0x3c))
  // Both queues under load (libblkio spreads its requests over the queues the device offers).
  const { qemuImg } = await clients()
  await execFileAsync(
    qemuImg,
    ['bench', '-t', 'none', '-c', '4000', '-d', '16', '-s', '4k', '--image-opts', image(sock)],
    {
      timeout: 60_000,
    },
  )

  const exited = new Promise<number | null>((r) => cli.on('exit', r))
  cli.kill('SIGTERM')
  t.is(await exited, 0)
  const stopped = events.find((e) => e.event === 'stopped') as { stats: { ioErrors: number } } | undefined
  t.truthy(stopped)
  t.is(stopped!.stats.ioErrors, 0)
  t.false(existsSync(sock))
})

test('--vhost-user excludes --attach, --recover and --replace; net wants one socket per NIC', (t) => {
  const usage = (args: string[]): string => {
    const err = t.throws(() => parseCommand(args))
    return err!.message
  }
  t.regex(
    usage(['blk', '--name', 'a', '--null', '1M', '--vhost-user', '/tmp/s', '--attach', 'vhost']),
    /exclude/,
  )
  t.regex(usage(['blk', '--name', 'a', '--null', '1M', '--vhost-user', '/tmp/s', '--recover']), /VDUSE/)
  t.regex(usage(['blk', '--name', 'a', '--null', '1M', '--vhost-user', 'x'.repeat(120)]), /1 to 107 bytes/)
  t.regex(
    usage(['net', '--name', 'a', '--name', 'b', '--switch', '--vhost-user', '/tmp/s']),
    /one socket per --name/,
  )
  const ok = parseCommand(['blk', '--name', 'a', '--null', '1M', '--vhost-user', '/tmp/s'])
  t.like(ok, { command: 'blk', attach: 'none', vhostUser: '/tmp/s' })
  t.like(parseCommand(['fs', '--name', 'f', '--memory', '--vhost-user', '/tmp/f']), {
    command: 'fs',
    attach: 'none',
    vhostUser: '/tmp/f',
  })
  t.regex(usage(['fs', '--name', 'f', '--memory', '--vhost-user', '/tmp/f', '--attach', 'virtio']), /exclude/)
  t.regex(usage(['blk', '--name', 'a', '--null', '1M', '--connect']), /--connect goes with --vhost-user/)
  t.like(parseCommand(['net', '--name', 'n', '--tap', 't0', '--vhost-user', '/tmp/n', '--connect']), {
    vhostUser: ['/tmp/n'],
    vhostUserConnect: true,
  })
})
