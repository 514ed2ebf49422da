// `vduse blk --nbd`: a /dev/vdX served from an NBD export (qemu-nbd on a guest tmpfs file), checked with
// real tools, and a qemu-nbd killed and restarted under fio that the guest must not notice.
import test, { type ExecutionContext } from 'ava'
import { spawn, type ChildProcess } from 'node:child_process'

import { assertInGuest, exerciseBlockDevice, sh, startCli, until } from './guest'

test.before(async () => {
  assertInGuest()
  await sh('ip link set lo up')
})

function qemuNbd(image: string, at: string[]): ChildProcess {
  return spawn(
    'qemu-nbd',
    ['--format=raw', '--persistent', '--shared=8', '--cache=writeback', ...at, image],
    {
      stdio: 'ignore',
    },
  )
}

/** qemu-nbd on a fresh 128 MiB image over a UNIX socket; resolves once it listens. */
async function unixServer(image: string, socket: string): Promise<ChildProcess> {
  await sh(`rm -f ${image} ${socket}; truncate -s 128M ${image}`)
  const server = qemuNbd(image, [`--socket=${socket}`])
  await until(
    'qemu-nbd listening',
    async () => (await sh(`test -S ${socket} && echo y || true`)).trim() === 'y',
  )
  return server
}

async function kill9(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return
  await new Promise<void>((resolve) => {
    p.once('exit', () => resolve())
    p.kill('SIGKILL')
  })
}

async function ioErrorsSince(from: number): Promise<string[]> {
  const lines = (await sh('dmesg')).split('\n').slice(from)
  return lines.filter((l) => /I\/O error|blk_update_request|critical medium error/i.test(l))
}

test('vduse blk --nbd over a UNIX socket: dd/cmp, fio verify, ext4 + fsck; the image holds the data', async (t) => {
  const image = '/tmp/nbd-unix.img'
  const socket = '/tmp/nbd-unix.sock'
  const server = await unixServer(image, socket)
  t.teardown(() => kill9(server))
  const cli = startCli(['blk', '--nbd', `nbd+unix:///?socket=${socket}`, '--name', 'nbd-unix', '--json'])
  const ready = await cli.next('ready')
  const dev = ready.path as string
  t.regex(dev, /^\/dev\/vd[a-z]+$/)
  t.is(ready.size, 128 << 20)
  // Through VDUSE the requests take the native path (no JavaScript per request).
  t.is((ready.nbd as { native: boolean }).native, true)
  t.deepEqual([...(ready.features as string[])].sort(), [
    'BLK_SIZE',
    'DISCARD',
    'FLUSH',
    'SEG_MAX',
    'TOPOLOGY',
    'WRITE_ZEROES',
  ])
  await exerciseBlockDevice(dev, 128 << 20, 'nbdunix')
  // What the guest wrote is in the image behind the server.
  await sh(`head -c 1M /dev/urandom > /tmp/nbd-pat
    dd if=/tmp/nbd-pat of=${dev} bs=1M seek=100 oflag=direct status=none
    sync`)
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
  const stopped = cli.events.find((e) => e.event === 'stopped') as { nbd: { commandsSent: number[] } }
  t.true(stopped.nbd.commandsSent[0]! > 1000, 'the engine sent the commands')
  await sh(`cmp /tmp/nbd-pat ${image} -i 0:$((100 << 20)) -n 1048576`)
})

test('qemu-nbd killed and restarted twice under fio (TCP, 2 queues, multi-conn): no error in the guest', async (t) => {
  const image = '/tmp/nbd-tcp.img'
  await sh(`rm -f ${image}; truncate -s 256M ${image}`)
  const at = ['--bind=127.0.0.1', '--port=10809']
  let server = qemuNbd(image, at)
  t.teardown(() => kill9(server))
  const listening = () =>
    until('qemu-nbd on 127.0.0.1:10809', async () => (await sh('ss -ltn')).includes('127.0.0.1:10809'))
  await listening()
  const cli = startCli(['blk', '--nbd', 'nbd://127.0.0.1/', '--name', 'nbd-tcp', '--queues', '2', '--json'])
  const ready = await cli.next('ready')
  const dev = ready.path as string
  t.like(ready.nbd, { native: true, connections: 2 })
  const dmesgFrom = (await sh('dmesg')).split('\n').length - 1
  // Writes with checksums, then a verify pass over all of it — across the restarts.
  const fio =
    sh(`fio --name=nbd-restart --filename=${dev} --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --numjobs=2 --size=64M --offset_increment=64M --verify=crc32c --verify_state_save=0 \
    --do_verify=1 --verify_fatal=1 --group_reporting --output-format=terse`)
  let fioDone = false
  void fio.finally(() => (fioDone = true)).catch(() => {})
  for (let k = 0; k < 2; k++) {
    await new Promise((r) => setTimeout(r, 1500))
    t.false(fioDone, 'the server is killed while fio runs')
    await kill9(server)
    await new Promise((r) => setTimeout(r, 1000))
    server = qemuNbd(image, at)
    await listening()
    await until(
      'the CLI to reconnect',
      () => cli.events.filter((e) => e.event === 'nbd-reconnected').length > k,
    )
  }
  await fio
  t.true(cli.events.some((e) => e.event === 'nbd-disconnected'))
  t.false(cli.events.some((e) => e.event === 'nbd-unavailable' || e.event === 'request-error'))
  t.deepEqual(await ioErrorsSince(dmesgFrom), [])
  // A full read-back verify of everything fio acknowledged, after the restarts.
  await sh(`fio --name=nbd-restart --filename=${dev} --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --numjobs=2 --size=64M --offset_increment=64M --verify=crc32c --verify_state_save=0 \
    --verify_only=1 --verify_fatal=1 --group_reporting --output-format=terse >/dev/null`)
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
})

test('nbdkit stopped gracefully (SIGTERM) and restarted twice under fio verify: no error in the guest', async (t) => {
  const image = '/tmp/nbd-graceful.img'
  const socket = '/tmp/nbd-graceful.sock'
  await sh(`rm -f ${image} ${socket}; truncate -s 128M ${image}`)
  const start = (): ChildProcess =>
    spawn('nbdkit', ['--foreground', `--unix=${socket}`, 'file', image], { stdio: 'ignore' })
  let server = start()
  t.teardown(() => kill9(server))
  const listening = () =>
    until('nbdkit listening', async () => (await sh(`test -S ${socket} && echo y || true`)).trim() === 'y')
  await listening()
  const cli = startCli(['blk', '--nbd', `nbd+unix:///?socket=${socket}`, '--name', 'nbd-graceful', '--json'])
  const dev = (await cli.next('ready')).path as string
  const dmesgFrom = (await sh('dmesg')).split('\n').length - 1
  const fio =
    sh(`fio --name=graceful --filename=${dev} --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio \
    --direct=1 --size=48M --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 \
    --output-format=terse`)
  let fioDone = false
  void fio.finally(() => (fioDone = true)).catch(() => {})
  for (let k = 0; k < 2; k++) {
    await new Promise((r) => setTimeout(r, 1500))
    t.false(fioDone, 'the server stops while fio runs')
    // What `systemctl restart` does: SIGTERM, wait for it to exit, start it again.
    await new Promise<void>((resolve) => {
      server.once('exit', () => resolve())
      server.kill('SIGTERM')
    })
    await sh(`rm -f ${socket}`)
    server = start()
    await listening()
  }
  await fio
  t.false(cli.events.some((e) => e.event === 'nbd-unavailable' || e.event === 'request-error'))
  t.deepEqual(await ioErrorsSince(dmesgFrom), [])
  cli.child.kill('SIGTERM')
  t.is(await cli.exit, 0)
  const { nbd } = cli.events.find((e) => e.event === 'stopped') as {
    nbd: { native: boolean; reconnects: number; shutdownRetries: number }
  }
  t.true(nbd.native)
  t.true(nbd.reconnects >= 2)
  t.log(`ESHUTDOWN answers sent again: ${nbd.shutdownRetries}; reconnects: ${nbd.reconnects}`)
})

/**
 * A 2-queue `--nbd` device over a fresh qemu-nbd, with fio writing and verifying 48 MiB on it: what the
 * handover and crash tests start from. `restart()` starts the successor (`--recover`).
 */
async function underFio(t: ExecutionContext, name: string) {
  const socket = `/tmp/${name}.sock`
  const server = await unixServer(`/tmp/${name}.img`, socket)
  t.teardown(() => kill9(server))
  const args = ['blk', '--nbd', `nbd+unix:///?socket=${socket}`, '--name', name, '--queues', '2', '--json']
  const run = { cli: startCli(args) }
  t.teardown(() => run.cli.child.kill('SIGKILL'))
  const dev = (await run.cli.next('ready')).path as string
  const dmesgFrom = (await sh('dmesg')).split('\n').length - 1
  const fio = sh(`fio --name=${name} --filename=${dev} --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --size=48M --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 \
    --output-format=terse`)
  // A failed test leaves no fio behind (the next tests share the guest): killed, and gone — its I/O
  // answered — before the server is (teardowns run last registered first).
  const fioPattern = `'[f]io --name=${name} '`
  t.teardown(() =>
    sh(
      `pkill -9 -f ${fioPattern} || true; for i in $(seq 100); do pgrep -f ${fioPattern} >/dev/null || break; sleep 0.1; done; true`,
    ).then(() => {}),
  )
  let fioDone = false
  void fio.finally(() => (fioDone = true)).catch(() => {})
  return {
    run,
    dev,
    fio,
    /** Lets fio run a while (writing, or verifying what it wrote); it must not have finished. */
    running: async () => {
      await new Promise((r) => setTimeout(r, 1500))
      t.false(fioDone, 'fio is still running')
    },
    restart: async () => {
      run.cli = startCli([...args, '--recover'])
      const ready = await run.cli.next('ready')
      t.like(ready, { path: dev, recovered: true })
      t.is((ready.nbd as { native: boolean }).native, true)
      return ready
    },
    /** fio passed its verification, the kernel logged no I/O error, the server stops cleanly. */
    finish: async () => {
      await fio
      t.deepEqual(await ioErrorsSince(dmesgFrom), [])
      t.false(run.cli.events.some((e) => e.event === 'request-error'))
      run.cli.child.kill('SIGTERM')
      t.is(await run.cli.exit, 0)
    },
  }
}

test('SIGUSR2 hands a native --nbd server over under fio verify: the workers hold new requests, the successor serves them, no error', async (t) => {
  const { run, running, restart, finish } = await underFio(t, 'nbd-ho')
  await running()
  run.cli.child.kill('SIGUSR2')
  t.like(await run.cli.next('released'), { name: 'nbd-ho' })
  t.is(await run.cli.exit, 0)
  await restart()
  await finish()
})

test('a native --nbd server killed (SIGKILL) under fio verify and restarted with --recover: the requests it held are served again, no error', async (t) => {
  const { run, dev, running, restart, finish } = await underFio(t, 'nbd-kill')
  const inflight = `/sys/block/${dev.replace('/dev/', '')}/inflight`
  const resubmitted: number[] = []
  for (let round = 0; round < 2; round++) {
    await running()
    // The driver has requests out (reads or writes) at the kill.
    await until('requests in flight', async () => {
      const [reads, writes] = (await sh(`cat ${inflight}`)).trim().split(/\s+/).map(Number)
      return reads! + writes! > 0
    })
    const exited = run.cli.exit
    run.cli.child.kill('SIGKILL')
    await exited
    resubmitted.push((await restart()).resubmitted as number)
  }
  // Requests the dead server had taken from the rings and not answered were served by its successor
  // (others in flight were still in the rings: the successor simply took them).
  t.true(
    resubmitted.some((n) => n > 0),
    `requests served again: ${resubmitted.join(', ')}`,
  )
  t.log(`requests served again after each kill: ${resubmitted.join(', ')}`)
  await finish()
})
