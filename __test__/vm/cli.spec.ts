import test from 'ava'
import { spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'

import { assertInGuest, CLI, exerciseBlockDevice, sh, startCli as start, until } from './guest'

const BIN = CLI

test.before(() => assertInGuest())

test('vduse blk --memory 64M --name d0 --attach virtio --json serves a working /dev/vdX and stops cleanly', async (t) => {
  const cli = start([
    'blk',
    '--memory',
    '64M',
    '--name',
    'd0',
    '--attach',
    'virtio',
    '--json',
    '--queues',
    '2',
  ])
  const ready = await cli.next('ready')
  t.is(ready.name, 'd0')
  t.is(ready.v, 2, 'every JSON event carries the schema version')
  t.regex(ready.ts as string, /^\d{4}-\d\d-\d\dT/)
  const dev = ready.path as string
  t.regex(dev, /^\/dev\/vd[a-z]+$/)
  await exerciseBlockDevice(dev, 64 << 20, 'climem')
  const listed = JSON.parse(await sh(`node ${BIN} list --json`)) as Array<Record<string, unknown>>
  t.like(
    listed.find((r) => r.name === 'd0'),
    {
      name: 'd0',
      type: 'blk',
      size: 64 << 20,
      queues: 2,
      state: 'served',
      served: true,
      attached: true,
      driver: 'virtio_vdpa',
      path: dev,
      pid: cli.child.pid,
    },
  )
  // The human table has a header and the same facts.
  const table = await sh(`node ${BIN} list`)
  t.regex(table, /^NAME\s+TYPE\s+SIZE\s+QUEUES\s+ATTACHED\s+PID\s+STATE\n/)
  t.regex(table, new RegExp(`\\nd0\\s+blk\\s+64M\\s+2x256\\s+${dev}\\s+${cli.child.pid}\\s+served\\n`))
  // A second server for the same name: one clear line, non-zero exit.
  const clash = start(['blk', '--memory', '1M', '--name', 'd0', '--attach', 'none'])
  t.is(await clash.exit, 1)
  t.regex(clash.stderr(), /^vduse: .*ERR_VDUSE_EXISTS.*\n$/)
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
  t.like(await cli.next('stopped'), { event: 'stopped', name: 'd0', signal: 'SIGTERM' })
  t.false((await sh(`node ${BIN} list`)).includes('d0'))
})

test('file backend through the CLI: the image holds the bytes after SIGTERM; --read-only rejects writes', async (t) => {
  const image = '/tmp/cli-file.img'
  const cli = start(['blk', '--file', image, '--size', '64M', '--name', 'cli-file', '--json'])
  const dev = (await cli.next('ready')).path as string
  await exerciseBlockDevice(dev, 64 << 20, 'clifile')
  await sh(
    `head -c 8M /dev/urandom > /tmp/cli-pattern; dd if=/tmp/cli-pattern of=${dev} bs=1M seek=8 status=none`,
  )
  // No sync: a graceful stop must flush what the guest wrote.
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
  t.deepEqual(readFileSync(image).subarray(8 << 20, 16 << 20), readFileSync('/tmp/cli-pattern'))

  const ro = start(['blk', '--file', image, '--read-only', '--name', 'cli-ro', '--json'])
  const rodev = (await ro.next('ready')).path as string
  await t.throwsAsync(sh(`dd if=/dev/zero of=${rodev} bs=4k count=1 oflag=direct status=none`))
  t.is(
    (
      await sh(
        `dd if=${rodev} bs=1M skip=8 count=8 iflag=direct status=none | cmp - /tmp/cli-pattern && echo same`,
      )
    ).trim(),
    'same',
  )
  ro.child.kill('SIGINT')
  t.is(await ro.exit, 0)
})

test('vduse list shows a stale device left by a killed server, and vduse destroy removes it', async (t) => {
  const cli = start(['blk', '--memory', '8M', '--name', 'stale0', '--json'])
  await cli.next('ready')
  cli.child.kill('SIGKILL')
  await cli.exit
  const rows = JSON.parse(await sh(`node ${BIN} list --json`)) as Array<Record<string, unknown>>
  t.like(
    rows.find((r) => r.name === 'stale0'),
    { name: 'stale0', served: false, stale: true, state: 'stale', attached: true },
  )
  // `destroy --all` takes every stale device, and only those.
  const live = start(['blk', '--memory', '8M', '--name', 'live0', '--attach', 'none', '--json'])
  await live.next('ready')
  const out = await sh(`node ${BIN} destroy --all`)
  t.regex(out, /destroyed stale0/)
  t.notRegex(out, /live0/)
  const after = await sh(`node ${BIN} list`)
  t.false(after.includes('stale0'))
  t.true(after.includes('live0'))
  live.child.kill('SIGTERM')
  t.is(await live.exit, 0)
  // A name that does not exist: non-zero, one line.
  const missing = start(['destroy', 'nothing-here'])
  t.is(await missing.exit, 1)
  t.regex(missing.stderr(), /ERR_VDUSE_NOT_FOUND/)
})

test('npx vduse blk --memory 64M --name d0 --attach virtio --json prints the ready line with a working /dev/vdX', async (t) => {
  const child = spawn(
    'npx',
    ['vduse', 'blk', '--memory', '64M', '--name', 'd0', '--attach', 'virtio', '--json'],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
      detached: true,
      env: { ...process.env, npm_config_cache: '/tmp/npm-cache', npm_config_update_notifier: 'false' },
    },
  )
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const e = JSON.parse(line) as Record<string, unknown>
      if (e.event === 'ready') resolve(e)
    })
    child.on('exit', (code) => reject(new Error(`npx exited with ${code} before ready`)))
  })
  t.like(ready, { event: 'ready', name: 'd0' })
  const dev = ready.path as string
  await sh(`dd if=/dev/urandom of=/tmp/npx-pattern bs=1M count=4 status=none
    dd if=/tmp/npx-pattern of=${dev} bs=1M oflag=direct status=none
    dd if=${dev} bs=1M count=4 iflag=direct status=none | cmp - /tmp/npx-pattern`)
  const exited = new Promise((resolve) => child.on('exit', resolve))
  process.kill(-child.pid!, 'SIGTERM')
  await exited
  for (let i = 0; i < 100 && (await sh(`node ${BIN} list`)).includes('d0'); i++)
    await new Promise((r) => setTimeout(r, 100))
  t.false((await sh(`node ${BIN} list`)).includes('d0'), 'the device is gone after the stop')
})

test('a backend plugin through the CLI: vduse blk --backend ./examples/plugin-backend serves a working /dev/vdX', async (t) => {
  const cli = start([
    'blk',
    '--name',
    'plug0',
    '--backend',
    './examples/plugin-backend',
    '--size',
    '32M',
    '--json',
    '--',
    '--label',
    'vduse-plugin;',
  ])
  const ready = await cli.next('ready')
  const dev = ready.path as string
  t.regex(dev, /^\/dev\/vd[a-z]+$/)
  t.is(ready.size, 32 << 20)
  // The plugin got its arguments: unwritten blocks read as the label.
  t.is(
    await sh(`dd if=${dev} bs=4096 count=1 iflag=direct status=none | head -c 26`),
    'vduse-plugin;vduse-plugin;',
  )
  await exerciseBlockDevice(dev, 32 << 20, 'plugin')
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
  t.like(await cli.next('stopped'), { event: 'stopped', name: 'plug0' })
  // A plugin that cannot load: one clear line, exit 1, nothing left behind.
  const bad = start(['blk', '--name', 'plug1', '--backend', './examples/missing.mjs', '--size', '1M'])
  t.is(await bad.exit, 1)
  t.regex(bad.stderr(), /backend plugin "\.\/examples\/missing\.mjs": not found.*ERR_VDUSE_INVALID_CONFIG/)
  t.false((await sh(`node ${BIN} list`)).includes('plug1'))
})

test('signals: SIGUSR1 prints stats; a second stop signal says what the stop waits for; a third forces an exit', async (t) => {
  await sh('ip link set lo up')
  const image = '/tmp/cli-signals.img'
  const socket = '/tmp/cli-signals.sock'
  await sh(`rm -f ${image} ${socket}; truncate -s 64M ${image}`)
  const server = spawn('qemu-nbd', ['--format=raw', '--persistent', `--socket=${socket}`, image], {
    stdio: 'ignore',
  })
  t.teardown(() => server.kill('SIGKILL'))
  for (let i = 0; i < 200 && !(await sh(`test -S ${socket} && echo y || true`)).trim(); i++) {
    await new Promise((r) => setTimeout(r, 25))
  }
  const uri = `nbd+unix:///?socket=${socket}`
  for (const phase of ['graceful', 'forced'] as const) {
    const name = `sig-${phase}`
    const cli = start(['blk', '--nbd', uri, '--name', name, '--json'])
    const dev = (await cli.next('ready')).path as string
    cli.child.kill('SIGUSR1')
    t.like(await cli.next('stats'), { event: 'stats', name })
    // The server stops answering: a write is stuck in the backend, so the stop cannot finish yet.
    server.kill('SIGSTOP')
    const dd = sh(`dd if=/dev/urandom of=${dev} bs=4k count=1 oflag=direct status=none`).then(
      () => 'ok',
      (err: Error) => err.message,
    )
    await new Promise((r) => setTimeout(r, 500))
    cli.child.kill('SIGHUP')
    await new Promise((r) => setTimeout(r, 1000))
    cli.child.kill('SIGTERM')
    const stopping = await cli.next('stopping')
    t.regex(stopping.waitingFor as string, /detach/)
    await new Promise((r) => setTimeout(r, 200))
    t.regex(cli.stderr(), /still stopping sig-\w+: waiting for the device to detach/)
    if (phase === 'graceful') {
      // The server answers again: the write completes, the stop finishes, exit 0.
      server.kill('SIGCONT')
      t.is(await cli.exit, 0)
      t.like(await cli.next('stopped'), { name, signal: 'SIGHUP' })
      t.is(await dd, 'ok')
    } else {
      cli.child.kill('SIGINT')
      t.is(await cli.exit, 130)
      t.like(await cli.next('forced'), { name })
      t.regex(cli.stderr(), new RegExp(`vduse destroy ${name}`))
      // What was left behind goes with `vduse destroy`; the stuck write fails, the server may resume.
      t.regex(await sh(`node ${BIN} destroy ${name}`), new RegExp(`destroyed ${name}`))
      server.kill('SIGCONT')
      await dd
      t.false((await sh(`node ${BIN} list`)).includes(name))
    }
  }
})

test('--json whose reader goes away (`| head -1`): events stop, the server keeps serving and stops cleanly; SIGUSR2 on a memory disk is refused', async (t) => {
  const child = spawn(process.execPath, [BIN, 'blk', '--memory', '32M', '--name', 'epipe', '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
  const exit = new Promise<number | null>((r) => child.on('exit', (code) => r(code)))
  const first = await new Promise<string>((resolve) =>
    createInterface({ input: child.stdout }).once('line', (l) => resolve(l)),
  )
  t.is((JSON.parse(first) as { event: string }).event, 'ready')
  const dev = (JSON.parse(first) as { path: string }).path
  child.stdout.destroy() // what `head -1` does once it has its line
  child.kill('SIGUSR1') // the next event meets a closed pipe
  child.kill('SIGUSR2') // a handover of a memory disk: refused, an event that also meets the closed pipe
  await new Promise((r) => setTimeout(r, 500))
  t.is(child.exitCode, null, 'still running')
  await exerciseBlockDevice(dev, 32 << 20, 'epipe')
  const listed = JSON.parse(await sh(`${process.execPath} ${BIN} list --json`)) as Array<{
    name: string
    state: string
  }>
  t.is(listed.find((d) => d.name === 'epipe')?.state, 'served')
  child.kill('SIGTERM')
  t.is(await exit, 0)
  t.regex(stderr, /stdout is closed/)
  t.false((await sh(`${process.execPath} ${BIN} list --json`)).includes('"epipe"'), 'nothing left behind')
})

test('vduse net answers SIGUSR2 with handover-refused and keeps serving', async (t) => {
  const cli = start(['net', '--switch', '--name', 'ho-net', '--json'])
  await cli.next('ready')
  cli.child.kill('SIGUSR2')
  const refused = await cli.next('handover-refused')
  t.is(refused.code, 'ERR_VDUSE_NOT_RECOVERABLE')
  t.is(cli.child.exitCode, null)
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
})

test('SIGINT while the attach waits on the driver probe: the attach gives up, the device goes, exit 0, no ready event', async (t) => {
  await sh('rm -f /tmp/probe.held')
  const plugin = join(__dirname, 'fixtures/slow-probe-backend.mjs')
  const cli = start([
    'blk',
    '--name',
    'slowprobe',
    '--backend',
    plugin,
    '--size',
    '16M',
    '--json',
    '--',
    '--delay-ms',
    '4000',
    '--held',
    '/tmp/probe.held',
  ])
  await until('the probe read to start', () => existsSync('/tmp/probe.held'), 60_000)
  const sent = Date.now()
  cli.child.kill('SIGINT')
  t.is(await cli.exit, 0)
  t.true(Date.now() - sent < 30_000, `stopped in ${Date.now() - sent} ms`)
  t.false(
    cli.events.some((e) => e.event === 'ready'),
    'never announced',
  )
  t.truthy(cli.events.find((e) => e.event === 'stopped'))
  t.false((await sh('ls /sys/bus/vdpa/devices')).includes('slowprobe'), 'nothing left on the bus')
  t.false((await sh(`${process.execPath} ${BIN} list --json`)).includes('"slowprobe"'), 'nor a VDUSE device')
})
