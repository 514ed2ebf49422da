// Crash recovery on the real kernel: a server killed with SIGKILL (at random moments, with requests in
// flight, with one stuck in its backend, between a write's completion and the next flush, while the driver
// resets the device) is restarted with `vduse blk --recover`; the driver — the kernel's virtio_blk under
// fio, or QEMU 10's qemu-io over libblkio — sees a pause, never an error, and every acknowledged write is
// in the image. A server handed over with SIGUSR2 is taken over the same way. Mismatched restarts are
// refused with a typed error and leave the device as it was.
import test from 'ava'
import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync, existsSync, openSync, readFileSync, readSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'

import { assertInGuest, CLI, execFileAsync, peers, sh, startCli, until, type Running } from './guest'

test.before(() => assertInGuest())

/** The device's row in `vduse list --json`. */
async function listed(name: string): Promise<Record<string, unknown> | undefined> {
  const rows = JSON.parse(await sh(`node ${CLI} list --json`)) as Array<Record<string, unknown>>
  return rows.find((r) => r.name === name)
}

function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r')
  try {
    const buf = Buffer.alloc(length)
    readSync(fd, buf, 0, length, offset)
    return buf
  } finally {
    closeSync(fd)
  }
}

/** `promise`, or a clear failure after `ms` (rather than the suite's timeout). */
async function within<T>(ms: number, promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([promise, late])
  } finally {
    clearTimeout(timer)
  }
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve(child.exitCode)
    else child.once('exit', (code) => resolve(code))
  })
}

async function kill9(server: Running): Promise<void> {
  server.child.kill('SIGKILL')
  await server.exit
}

/** Lines of the kernel log after line `from` that report I/O errors. */
async function ioErrorsSince(from: number): Promise<string[]> {
  const lines = (await sh('dmesg')).split('\n').slice(from)
  return lines.filter((l) => /I\/O error|blk_update_request|critical medium error/i.test(l))
}

/** The stalling fixture server (see fixtures/stalling-server.ts), its JSON events as they come. */
function startStalling(
  name: string,
  image: string,
  holdAt: number,
  driver: 'virtio' | 'vhost' = 'virtio',
): { child: ChildProcess; events: Array<Record<string, unknown>>; exit: Promise<number | null> } {
  const fixture = join(__dirname, 'fixtures/stalling-server.ts')
  const child = spawn(process.execPath, ['--import=tsx', fixture, name, image, String(holdAt), driver], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const events: Array<Record<string, unknown>> = []
  createInterface({ input: child.stdout! }).on('line', (l) =>
    events.push(JSON.parse(l) as Record<string, unknown>),
  )
  return { child, events, exit: exited(child) }
}

test('fio with verification survives five SIGKILLs and a SIGUSR2 handover of a --file server, restarted with --recover', async (t) => {
  // The "file" is a memory-backed null_blk that takes 2 ms per request: slow storage, so that the kills
  // land with requests in the server (a tmpfs file answers so fast that the server is nearly always idle).
  await sh(`rmmod null_blk 2>/dev/null || true
    modprobe -d "$VDUSE_VM_MODROOT" null_blk nr_devices=1 gb=1 memory_backed=1 irqmode=2 completion_nsec=2000000`)
  const image = '/dev/nullb0'
  const base = ['blk', '--name', 'rec-fio', '--file', image, '--direct', '--json', '--queues', '2']
  let server = startCli(base)
  t.teardown(async () => {
    server.child.kill('SIGTERM')
    await server.exit
    await sh('rmmod null_blk || true')
  })
  const dev = (await server.next('ready')).path as string
  t.regex(dev, /^\/dev\/vd[a-z]+$/)
  const dmesgFrom = (await sh('dmesg')).split('\n').length - 1

  // Passes over the same 16 MiB until told to stop, each with its own seed (so its own data): a stale
  // write of an earlier pass replayed over a later one fails the last pass's verification. Each pass
  // verifies as it writes and again at its end; at full queue depth the kills land mid-I/O.
  const job = (seed: number | string, dev: string): string =>
    `--name=rec --filename=${dev} --rw=randwrite --bs=4k --size=16M --iodepth=16 --ioengine=libaio \
     --numjobs=1 --randseed=${seed} --verify=crc32c --verify_fatal=1 --verify_state_save=0`
  await sh('rm -f /tmp/rec-stop /tmp/rec-seed')
  const passes = `seed=1; while [ ! -e /tmp/rec-stop ]; do
      fio ${job('$seed', dev)} --direct=1 --verify_backlog=512 --output-format=terse >/dev/null || exit 1
      echo $seed > /tmp/rec-seed; seed=$((seed + 1))
    done`
  const fio = spawn('sh', ['-c', passes], { stdio: ['ignore', 'ignore', 'pipe'] })
  let fioErr = ''
  fio.stderr.on('data', (d: Buffer) => (fioErr += d.toString()))
  const fioDone = exited(fio)

  let resubmitted = 0
  const restart = async (): Promise<void> => {
    server = startCli([...base, '--recover'])
    const ready = await server.next('ready')
    t.like(ready, { path: dev, recovered: true })
    resubmitted += ready.resubmitted as number
  }
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 700 + Math.random() * 1300))
    await kill9(server)
    t.like(await listed('rec-fio'), { served: false, recoverable: true, attached: true })
    await restart()
  }
  // An upgrade: the server hands over and exits 0; its successor takes over.
  await new Promise((r) => setTimeout(r, 500))
  server.child.kill('SIGUSR2')
  t.like(await server.next('released'), { name: 'rec-fio' })
  t.is(await server.exit, 0)
  await restart()
  // The last pass must follow a killed one (a replayed stale write would fail its verification): let at
  // least two passes finish, however slow the guest is today.
  const passesDone = (): number =>
    existsSync('/tmp/rec-seed') ? Number(readFileSync('/tmp/rec-seed', 'utf8')) : 0
  await until('two fio passes', () => passesDone() >= 2 || fio.exitCode !== null, 180_000)
  await sh('touch /tmp/rec-stop')
  t.is(await within(180_000, fioDone, 'fio'), 0, fioErr)
  const last = Number(readFileSync('/tmp/rec-seed', 'utf8'))
  t.true(last >= 2, `fio passes: ${last}`)
  t.log(`requests found in flight and served again: ${resubmitted}; fio passes: ${last}`)
  t.true(resubmitted > 0, 'some kill landed with requests in flight')

  // Everything the last pass wrote, read back through the device, then from the storage itself after a
  // graceful stop.
  await sh(`fio ${job(last, dev)} --direct=1 --verify_only --output-format=terse >/dev/null`)
  t.deepEqual(await ioErrorsSince(dmesgFrom), [])
  server.child.kill('SIGTERM')
  t.is(await server.exit, 0)
  await sh(`fio ${job(last, image)} --direct=1 --verify_only --output-format=terse >/dev/null`)
  t.is(await listed('rec-fio'), undefined)
})

test('a write stuck in the backend at the crash is served again after --recover; a completed write survives to the next flush', async (t) => {
  const image = '/tmp/recover-stuck.img'
  await sh(`rm -f ${image}; truncate -s 64M ${image}`)
  const holdAt = 8 << 20
  const stalling = startStalling('rec-stuck', image, holdAt)
  await until('the stalling server', () => stalling.events.some((e) => e.event === 'ready'), 60_000)
  const dev = stalling.events.find((e) => e.event === 'ready')!.path as string

  // A completed write (acknowledged, no flush yet), then a write the backend holds.
  await sh(`head -c 1M /dev/urandom > /tmp/rec-done; head -c 64k /dev/urandom > /tmp/rec-held
    dd if=/tmp/rec-done of=${dev} bs=1M seek=1 oflag=direct status=none`)
  const held = spawn(
    'dd',
    ['if=/tmp/rec-held', `of=${dev}`, 'bs=64k', `seek=${holdAt / 65536}`, 'oflag=direct'],
    {
      stdio: 'ignore',
    },
  )
  const heldExit = exited(held)
  await until('the backend to hold the write', () => stalling.events.some((e) => e.event === 'held'))
  stalling.child.kill('SIGKILL')
  await stalling.exit
  t.like(await listed('rec-stuck'), { served: false, recoverable: true })

  const server = startCli(['blk', '--name', 'rec-stuck', '--file', image, '--json', '--recover'])
  t.teardown(async () => {
    server.child.kill('SIGTERM')
    await server.exit
  })
  const ready = await server.next('ready')
  t.like(ready, { path: dev, recovered: true })
  t.true((ready.resubmitted as number) >= 1, `resubmitted ${String(ready.resubmitted)}`)
  t.is(await within(30_000, heldExit, 'the held write'), 0, 'the held write completed without an error')
  // A flush after recovery reaches the backend (fdatasync), and both writes are in the image.
  await sh(`dd if=/dev/null of=${dev} conv=fsync status=none`)
  const img = readFileSync(image)
  t.true(img.subarray(1 << 20, 2 << 20).equals(readFileSync('/tmp/rec-done')), 'the acknowledged write')
  t.true(img.subarray(holdAt, holdAt + 65536).equals(readFileSync('/tmp/rec-held')), 'the held write')
  server.child.kill('SIGTERM')
  const stopped = await server.next('stopped')
  t.true(((stopped.stats as { flushes: number }).flushes ?? 0) >= 1, 'the flush reached the backend')
  t.is(await server.exit, 0)
})

test('a reset the driver sends while no server runs is answered by the successor; the disk comes back', async (t) => {
  const image = '/tmp/recover-reset.img'
  await sh(`rm -f ${image}`)
  const first = startCli(['blk', '--name', 'rec-reset', '--file', image, '--size', '32M', '--json'])
  const dev = (await first.next('ready')).path as string
  await sh(
    `head -c 2M /dev/urandom > /tmp/rec-reset; dd if=/tmp/rec-reset of=${dev} bs=1M oflag=direct status=none`,
  )
  await kill9(first)
  // Unbinding the driver resets the device: the kernel sends SET_STATUS(0) and waits (up to 30 s) for
  // an answer nobody can give yet.
  const unbind = spawn('sh', ['-c', 'echo rec-reset > /sys/bus/vdpa/drivers/virtio_vdpa/unbind'], {
    stdio: 'ignore',
  })
  const unbound = exited(unbind)
  await new Promise((r) => setTimeout(r, 1000))
  t.is(unbind.exitCode, null, 'the unbind waits for the reset to be answered')
  const server = startCli(['blk', '--name', 'rec-reset', '--file', image, '--json', '--recover'])
  t.teardown(async () => {
    server.child.kill('SIGTERM')
    await server.exit
  })
  t.like(await server.next('ready'), { recovered: true })
  t.is(await within(25_000, unbound, 'the unbind'), 0)
  await sh('echo rec-reset > /sys/bus/vdpa/drivers/virtio_vdpa/bind')
  let node = ''
  await until('the disk to come back', async () => {
    node = (await sh('ls /sys/bus/vdpa/devices/rec-reset/virtio*/block 2>/dev/null || true')).trim()
    return node !== ''
  })
  await sh(`dd if=/dev/${node} bs=1M count=2 iflag=direct status=none | cmp - /tmp/rec-reset`)
  server.child.kill('SIGTERM')
  t.is(await server.exit, 0)
})

test('mismatched restarts are refused with a typed error and leave the device untouched', async (t) => {
  const image = '/tmp/recover-mismatch.img'
  await sh(`rm -f ${image} ${image}.copy`)
  const first = startCli(['blk', '--name', 'rec-mm', '--file', image, '--size', '32M', '--json'])
  const dev = (await first.next('ready')).path as string
  await sh(
    `head -c 2M /dev/urandom > /tmp/rec-mm; dd if=/tmp/rec-mm of=${dev} bs=1M oflag=direct status=none`,
  )
  await kill9(first)
  await sh(`cp ${image} ${image}.copy`)
  const before = await listed('rec-mm')
  t.like(before, { served: false, recoverable: true, attached: true, servings: 1 })

  const refused = async (args: string[], code: string, what: RegExp): Promise<void> => {
    const cli = startCli(['blk', '--name', 'rec-mm', '--json', '--recover', ...args])
    const err = await cli.next('error')
    t.is(await cli.exit, 1)
    t.is(err.code, code, JSON.stringify(err))
    t.regex(String(err.message), what)
    t.truthy(err.hint)
    t.deepEqual(await listed('rec-mm'), before, 'the device and its state are as they were')
    t.is(statSync(image).size, 32 << 20)
  }
  await refused(['--file', image, '--read-only'], 'ERR_VDUSE_MISMATCH', /features/)
  await refused(['--file', image, '--queues', '2'], 'ERR_VDUSE_MISMATCH', /features|queue count|config space/)
  await refused(['--file', image, '--block-size', '4096'], 'ERR_VDUSE_MISMATCH', /config space/)
  await refused(['--file', `${image}.copy`], 'ERR_VDUSE_MISMATCH', /backend/)
  await refused(['--memory', '32M'], 'ERR_VDUSE_NOT_RECOVERABLE', /did not outlive|no identity/)
  // The image grew behind the device's back: its size no longer matches.
  await sh(`truncate -s 48M ${image}`)
  const grown = startCli(['blk', '--name', 'rec-mm', '--json', '--recover', '--file', image])
  t.like(await grown.next('error'), { code: 'ERR_VDUSE_MISMATCH' })
  t.is(await grown.exit, 1)
  t.deepEqual(await listed('rec-mm'), before)
  await sh(`truncate -s 32M ${image}`)

  // The right restart still works, and the data is there.
  const server = startCli(['blk', '--name', 'rec-mm', '--file', image, '--json', '--recover'])
  t.like(await server.next('ready'), { path: dev, recovered: true })
  await sh(`dd if=${dev} bs=1M count=2 iflag=direct status=none | cmp - /tmp/rec-mm`)
  server.child.kill('SIGTERM')
  t.is(await server.exit, 0)
  t.is(await listed('rec-mm'), undefined)
})

test('a state file of an earlier device of the same name is refused, not replayed into the new rings', async (t) => {
  const image = '/tmp/recover-old.img'
  await sh(`rm -f ${image}`)
  const serve = (): Running =>
    startCli(['blk', '--name', 'rec-old', '--file', image, '--size', '32M', '--json'])
  // The earlier device: a couple of thousand requests, then a crash; its state file is kept aside.
  const old = serve()
  const oldDev = (await old.next('ready')).path as string
  await sh(`dd if=/dev/urandom of=${oldDev} bs=4k count=2048 oflag=direct status=none`)
  await kill9(old)
  await sh(`cp /run/vduse/rec-old /tmp/rec-old.state; node ${CLI} destroy rec-old`)
  // The device of today, same name, same image, same options: a few requests, then a crash.
  const now = serve()
  const dev = (await now.next('ready')).path as string
  await sh(`dd if=/dev/urandom of=${dev} bs=4k count=4 oflag=direct status=none`)
  await kill9(now)
  await sh('cp /tmp/rec-old.state /run/vduse/rec-old')
  const cli = startCli(['blk', '--name', 'rec-old', '--file', image, '--json', '--recover'])
  const err = await cli.next('error')
  t.is(await cli.exit, 1)
  t.is(err.code, 'ERR_VDUSE_NOT_RECOVERABLE', JSON.stringify(err))
  t.regex(String(err.message), /ahead of the log|does not fit the rings/)
  await sh(`node ${CLI} destroy rec-old`)
  t.is(await listed('rec-old'), undefined)
})

test('qemu-io over libblkio (vhost-vdpa) keeps going across a SIGKILL with a write in flight and --recover', async (t) => {
  const { qemuIo } = await peers()
  const image = '/tmp/recover-qio.img'
  await sh(`rm -f ${image}; truncate -s 64M ${image}`)
  const holdAt = 16 << 20
  const stalling = startStalling('rec-qio', image, holdAt, 'vhost')
  await until('the stalling server', () => stalling.events.some((e) => e.event === 'ready'), 60_000)
  const node = stalling.events.find((e) => e.event === 'ready')!.path as string
  t.regex(node, /^\/dev\/vhost-vdpa-\d+$/)
  const opts = `driver=virtio-blk-vhost-vdpa,path=${node},cache.direct=on`
  // 64 writes of 512 KiB, each with its own pattern — the 33rd is held by the backend when the server
  // dies — then a flush and a read-back of every one, all in one session.
  const cmds: string[] = []
  for (let i = 0; i < 64; i++) cmds.push(`write -P ${i + 1} ${i * 512}k 512k`)
  cmds.push('flush')
  for (let i = 0; i < 64; i++) cmds.push(`read -P ${i + 1} ${i * 512}k 512k`)
  const qio = execFileAsync(qemuIo, ['--image-opts', opts, ...cmds.flatMap((c) => ['-c', c])], {
    maxBuffer: 16 << 20,
  })
  await until('the backend to hold a write', () => stalling.events.some((e) => e.event === 'held'))
  stalling.child.kill('SIGKILL')
  await stalling.exit
  const server = startCli(['blk', '--name', 'rec-qio', '--file', image, '--json', '--recover'])
  t.teardown(async () => {
    server.child.kill('SIGTERM')
    await server.exit
  })
  const ready = await server.next('ready')
  t.like(ready, { path: node, recovered: true })
  t.true((ready.resubmitted as number) >= 1)
  const { stdout } = await within(60_000, qio, 'qemu-io')
  t.notRegex(stdout, /fail|error|Pattern verification/i)
  t.is(stdout.match(/^read /gm)?.length, 64, stdout.slice(-2000))
  t.true(
    readAt(image, holdAt, 512 << 10).equals(Buffer.alloc(512 << 10, 33)),
    'the held write is in the image',
  )
  // A new session sees the data too (its start resets the device; the successor handles that).
  const again = await execFileAsync(qemuIo, [
    '--image-opts',
    opts,
    '-c',
    'read -P 1 0 512k',
    '-c',
    `read -P 64 ${63 * 512}k 512k`,
  ])
  t.notRegex(again.stdout, /fail|error|Pattern verification/i)
  server.child.kill('SIGTERM')
  t.is(await server.exit, 0)
})
