// A real VM on vhost-user: the test guest boots with `vhost-user-blk-pci`, `-netdev vhost-user` +
// `virtio-net-pci` and two `vhost-user-fs-pci` (a MemoryFs, and a host directory shared natively), connected to `vduse blk|net --vhost-user` servers running here on the host (no VDUSE
// anywhere). Inside, the stock virtio-pci drivers: dd/cmp, fio verify, ext4 + fsck on /dev/vda; ping and
// iperf3 to a tap on the host inside a network namespace this test creates.
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { promisify } from 'node:util'
import test from 'ava'

const execFileAsync = promisify(execFile)

interface Server {
  proc: ChildProcess
  events: Array<Record<string, unknown>>
  exited: Promise<number | null>
}

function serve(args: string[]): Server {
  // --json before a plugin's `--`, whose arguments are the plugin's.
  const split = args.indexOf('--')
  const own = split < 0 ? [...args, '--json'] : [...args.slice(0, split), '--json', ...args.slice(split)]
  const proc = spawn(process.execPath, ['dist/cli/main.js', ...own], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const events: Array<Record<string, unknown>> = []
  createInterface({ input: proc.stdout! }).on('line', (l) => {
    try {
      events.push(JSON.parse(l) as Record<string, unknown>)
    } catch {
      // not an event
    }
  })
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)))
  return { proc, events, exited }
}

async function until(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

async function ready(s: Server, what: string): Promise<Record<string, unknown>> {
  await until(`${what} ready`, () => s.events.some((e) => e.event === 'ready' || e.event === 'error'))
  const e = s.events.find((e) => e.event === 'ready' || e.event === 'error')!
  if (e.event === 'error') throw new Error(`${what}: ${String(e.message)}`)
  return e
}

/** Runs the guest script with the extra QEMU arguments; resolves with its stdout. */
async function guest(qemuArgs: string[], env: Record<string, string>): Promise<string> {
  try {
    const { stdout } = await execFileAsync('scripts/vm/run', ['sh', '__test__/vm-host/vhost-user-guest.sh'], {
      env: { ...process.env, ...env, VDUSE_VM_QEMU_ARGS: qemuArgs.join(' '), VDUSE_VM_TIMEOUT: '480' },
      maxBuffer: 16 << 20,
    })
    return stdout
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string }
    throw new Error(`${e.message}\nstdout: ${e.stdout ?? ''}\nstderr: ${e.stderr ?? ''}`)
  }
}

test('a VM boots with a vhost-user-blk-pci disk, a vhost-user NIC and a vhost-user-fs-pci mount served by vduse: dd/cmp, fio verify, ext4, ping, iperf3, tar, fio on virtiofs', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-vuvm-'))
  const ns = `vduse-vu-${process.pid}`
  const tap = `vut${process.pid % 10000}`
  const mac = '52:54:00:a7:00:01'
  t.teardown(async () => {
    await execFileAsync('ip', ['netns', 'del', ns]).catch(() => {})
    rmSync(dir, { recursive: true, force: true })
  })
  const blk = serve([
    'blk',
    '--name',
    'vuvm-blk',
    '--file',
    join(dir, 'disk.img'),
    '--size',
    '256M',
    '--queues',
    '2',
    '--vhost-user',
    join(dir, 'blk.sock'),
  ])
  t.teardown(() => blk.proc.kill('SIGKILL'))
  const nic = serve(['net', '--name', 'vuvm-net', '--tap', tap, '--vhost-user', join(dir, 'net.sock')])
  t.teardown(() => nic.proc.kill('SIGKILL'))
  // The file system dials QEMU instead (QEMU listens: server=on), like a back-end the VMM's side starts.
  const fs = serve([
    'fs',
    '--name',
    'vuvm-fs',
    '--tag',
    'vufs',
    '--memory',
    '--vhost-user',
    join(dir, 'fs.sock'),
    '--connect',
  ])
  t.teardown(() => fs.proc.kill('SIGKILL'))
  // A host directory shared natively (Rust serves every request), listening for QEMU.
  const share = join(dir, 'share')
  await execFileAsync('mkdir', ['-p', share])
  writeFileSync(join(share, 'from-host'), 'host-data\n')
  const shared = serve([
    'fs',
    '--name',
    'vuvm-share',
    '--tag',
    'vushare',
    '--shared-dir',
    share,
    '--vhost-user',
    join(dir, 'share.sock'),
  ])
  t.teardown(() => shared.proc.kill('SIGKILL'))
  t.is((await ready(fs, 'fs')).path, join(dir, 'fs.sock'))
  t.is((await ready(shared, 'shared fs')).path, join(dir, 'share.sock'))
  t.is((await ready(blk, 'blk')).path, join(dir, 'blk.sock'))
  t.is((await ready(nic, 'net')).path, join(dir, 'net.sock'))

  // The far end of the NIC: its tap, moved into a namespace of its own with an iperf3 server.
  await execFileAsync('ip', ['netns', 'add', ns])
  await execFileAsync('ip', ['link', 'set', tap, 'netns', ns])
  await execFileAsync('ip', ['-n', ns, 'addr', 'add', '10.77.0.1/24', 'dev', tap])
  await execFileAsync('ip', ['-n', ns, 'link', 'set', tap, 'up'])
  const iperf = spawn('ip', ['netns', 'exec', ns, 'iperf3', '-s', '-1', '-B', '10.77.0.1'], {
    stdio: 'ignore',
  })
  t.teardown(() => iperf.kill('SIGKILL'))

  const out = await guest(
    [
      `-chardev socket,id=vub,path=${join(dir, 'blk.sock')}`,
      '-device vhost-user-blk-pci,chardev=vub,num-queues=2',
      `-chardev socket,id=vun,path=${join(dir, 'net.sock')}`,
      '-netdev vhost-user,id=n0,chardev=vun',
      // vectors=0: the host's QEMU 7.2 under TCG segfaults in vhost_net_start (msix_set_vector_notifiers)
      // when a vhost-user NIC has MSI-X; with INTx it runs.
      `-device virtio-net-pci,netdev=n0,mac=${mac},vectors=0`,
      `-chardev socket,id=vuf,path=${join(dir, 'fs.sock')},server=on,wait=on`,
      '-device vhost-user-fs-pci,chardev=vuf,tag=vufs',
      `-chardev socket,id=vus,path=${join(dir, 'share.sock')}`,
      '-device vhost-user-fs-pci,chardev=vus,tag=vushare',
    ],
    {
      VDUSE_VU_MAC: mac,
      VDUSE_VU_TAG: 'vufs',
      VDUSE_VU_SHARE_TAG: 'vushare',
      VDUSE_VU_PHASE: 'blk net fs share',
    },
  )
  t.log(out.trim())
  t.regex(out, /disk-bytes 268435456 queues 2/)
  t.regex(out, /blk-ok/)
  t.regex(out, /ping-ok/)
  t.regex(out, /fs-ok/)
  t.regex(out, /share-ok/)
  // What the VM wrote is in the host directory itself.
  t.is((await execFileAsync('cat', [join(share, 'from-guest')])).stdout, 'guest-data\n')
  await execFileAsync('diff', ['-r', '/usr/include/linux', join(share, 'tree')])
  const bps = Number(/iperf-bps ([\d.]+)/.exec(out)?.[1] ?? 0)
  t.true(bps > 0, 'iperf3 moved data')

  blk.proc.kill('SIGTERM')
  nic.proc.kill('SIGTERM')
  fs.proc.kill('SIGTERM')
  shared.proc.kill('SIGTERM')
  t.is(await shared.exited, 0)
  const sharedStats = shared.events.find((e) => e.event === 'stopped') as {
    stats: { malformed: number; sessions: number }
  }
  t.is(sharedStats.stats.malformed, 0)
  t.true(sharedStats.stats.sessions >= 2, 'mounted twice')
  t.is(await blk.exited, 0)
  t.is(await nic.exited, 0)
  t.is(await fs.exited, 0)
  const stopped = blk.events.find((e) => e.event === 'stopped') as { stats: { ioErrors: number } }
  t.is(stopped.stats.ioErrors, 0)
  t.false(existsSync(join(dir, 'blk.sock')))
})

test('two NICs of a VM on one native switch served over vhost-user: ping and iperf3 between them, no frame through JavaScript', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-vusw-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const [macA, macB] = ['52:54:00:a7:01:01', '52:54:00:a7:01:02']
  const sw = serve([
    'net',
    '--switch',
    '--name',
    'vusw-a',
    '--name',
    'vusw-b',
    '--vhost-user',
    join(dir, 'a.sock'),
    '--vhost-user',
    join(dir, 'b.sock'),
  ])
  t.teardown(() => sw.proc.kill('SIGKILL'))
  await until('two NICs ready', () => sw.events.filter((e) => e.event === 'ready').length === 2)
  const netdev = (id: string, mac: string): string[] => [
    `-chardev socket,id=c${id},path=${join(dir, `${id}.sock`)}`,
    `-netdev vhost-user,id=n${id},chardev=c${id}`,
    `-device virtio-net-pci,netdev=n${id},mac=${mac},vectors=0`,
  ]
  const out = await guest([...netdev('a', macA), ...netdev('b', macB)], {
    VDUSE_VU_MAC: macA,
    VDUSE_VU_MAC2: macB,
    VDUSE_VU_PHASE: 'switch',
  })
  t.log(out.trim())
  t.regex(out, /switch-ping-ok/)
  t.true(Number(/switch-iperf-bps ([\d.]+)/.exec(out)?.[1] ?? 0) > 0, 'iperf3 moved data')
  sw.proc.kill('SIGTERM')
  t.is(await sw.exited, 0)
  const stopped = sw.events.filter((e) => e.event === 'stopped') as Array<{
    stats: { txFrames: number; rxFrames: number }
    port: { txFrames: number; rxFrames: number; txMalformed: number }
    switch: { forwarded: number }
  }>
  t.is(stopped.length, 2)
  for (const s of stopped) {
    t.true(s.port.txFrames > 100 && s.port.rxFrames > 100, JSON.stringify(s.port))
    t.is(s.port.txMalformed, 0)
    t.is(s.stats.txFrames + s.stats.rxFrames, 0, 'no frame through JavaScript')
  }
  t.true(stopped[0]!.switch.forwarded > 200)
})

test('the server killed and restarted under fio --verify in the VM: QEMU reconnects, the inflight region resumes what was in flight, no error', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-vuvm-'))
  // The guest writes its handshake here: the working directory is its one writable share of the host.
  const sync = mkdtempSync(join(process.cwd(), '.vduse-vu-'))
  t.teardown(() => {
    rmSync(dir, { recursive: true, force: true })
    rmSync(sync, { recursive: true, force: true })
  })
  const sock = join(dir, 'blk.sock')
  // A slow backend (20 ms a request): the killed server surely has requests in flight.
  const args = [
    'blk',
    '--name',
    'vuvm-rs',
    '--backend',
    join(process.cwd(), '__test__/vm-host/slow-file.cjs'),
    '--queues',
    '2',
    '--vhost-user',
    sock,
    '--log-level',
    'info',
    '--',
    join(dir, 'disk.img'),
    String(128 << 20),
  ]
  const first = serve(args)
  t.teardown(() => first.proc.kill('SIGKILL'))
  await ready(first, 'blk')
  let second: Server | undefined
  t.teardown(() => second?.proc.kill('SIGKILL'))

  const host = (async () => {
    await until('fio running in the guest', () => existsSync(join(sync, 'fio-running')), 240_000)
    first.proc.kill('SIGKILL')
    await first.exited
    await new Promise((r) => setTimeout(r, 500))
    second = serve(args)
    await ready(second, 'restarted blk')
    writeFileSync(join(sync, 'restarted'), '')
  })()
  const out = await guest(
    [
      `-chardev socket,id=vub,path=${sock},reconnect=1`,
      '-device vhost-user-blk-pci,chardev=vub,num-queues=2',
    ],
    { VDUSE_VU_PHASE: 'restart', VDUSE_VU_SYNC: sync },
  )
  await host
  t.log(out.trim())
  t.regex(out, /restart-ok/)
  const s = second!
  s.proc.kill('SIGTERM')
  t.is(await s.exited, 0)
  const stopped = s.events.find((e) => e.event === 'stopped') as {
    stats: { ioErrors: number }
    counters: { resubmitted: number }
  }
  t.is(stopped.stats.ioErrors, 0)
  for (const e of [...first.events, ...s.events]) if (e.event === 'log') t.log(String(e.message))
  t.log(`resubmitted by the restarted server: ${stopped.counters.resubmitted}`)
  t.true(stopped.counters.resubmitted > 0, 'the restarted server served what the killed one left in flight')
})
