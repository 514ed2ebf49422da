// Runs inside the test guest (benchmark/run): the same fio matrix on every target — vduse (TypeScript
// model with null, memory and file backends; the native Rust model), QEMU's own VDUSE export
// (qemu-storage-daemon 10.0, the reference peer, and 7.2), ublk (rublk null and loop: what a Linux user
// picks instead for a host-side userspace disk), the kernel (null_blk, loop) and NBD (qemu-nbd served by
// the kernel's client and by vduse --nbd) — and writes the results, with the CPU time each userspace server spends per request. It is a benchmark, not
// a test: it asserts nothing about speed.
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { cpus, release, totalmem } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { promisify } from 'node:util'

import { runNetBench } from './net-bench'
const exec = promisify(execFile)
const ROOT = join(__dirname, '..')
const SIZE_MIB = 256
const RUNTIME = Number(process.env.VDUSE_BENCH_RUNTIME ?? 5)
const RAMP = 1
const QUEUES = 2
const QUEUE_SIZE = 256
const IMAGE = '/tmp/bench.img'
// The fixed-cap polling row's cap (the CLI's default is 'auto'). Polling catches a request only if the
// driver's next one comes within the cap; under TCG that gap (interrupt work item, fio's wake-up and
// submission) is 300–600 µs, several times what it is on hardware, so the row uses the maximum allowed.
const POLL_US = 1000
const quick = process.argv.includes('--quick')
// --repeat=N: run the whole matrix N times, the targets in reverse order every other time (so no target is
// always first or last on a host whose speed drifts), and report each cell's median with every run's IOPS.
const REPEAT = Number(process.argv.find((a) => a.startsWith('--repeat='))?.slice(9) ?? 1)
if (!Number.isInteger(REPEAT) || REPEAT < 1 || REPEAT > 20) {
  console.error('bench: --repeat takes a whole number from 1 to 20')
  process.exit(2)
}
const only = process.argv
  .find((a) => a.startsWith('--only='))
  ?.slice(7)
  .split(',')

async function sh(script: string): Promise<string> {
  return (await exec('sh', ['-ec', script], { maxBuffer: 64 << 20 })).stdout
}

interface Workload {
  id: string
  label: string
  rw: string
  bs: string
  iodepth: number
  numjobs: number
}

/** Peer tools (unpacked or built on the host by benchmark/run, cached; read-only here). */
async function peerPaths(): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  for (const script of ['scripts/peers/fetch', 'scripts/peers/rublk']) {
    try {
      for (const line of (await exec(join(ROOT, script), [], { cwd: ROOT })).stdout.split('\n')) {
        const eq = line.indexOf('=')
        if (eq > 0) out[line.slice(0, eq)] = line.slice(eq + 1)
      }
    } catch (err) {
      console.log(`${script}: ${(err as Error).message.split('\n')[0]}`)
    }
  }
  return out
}
let PEERS: Record<string, string> = {}

const WORKLOADS: Workload[] = [
  { id: 'rr4k-qd1', label: '4k randread QD1', rw: 'randread', bs: '4k', iodepth: 1, numjobs: 1 },
  { id: 'rr4k-qd16', label: '4k randread QD16', rw: 'randread', bs: '4k', iodepth: 16, numjobs: 1 },
  { id: 'rw4k-qd16', label: '4k randwrite QD16', rw: 'randwrite', bs: '4k', iodepth: 16, numjobs: 1 },
  { id: 'sr128k-qd8', label: '128k read QD8', rw: 'read', bs: '128k', iodepth: 8, numjobs: 1 },
  { id: 'rr4k-qd16x2', label: '4k randread QD16 ×2 jobs', rw: 'randread', bs: '4k', iodepth: 16, numjobs: 2 },
]

interface Result {
  iops: number
  meanUs: number
  p99Us: number
  errors: number
  /** CPU time of the serving process per request (µs), for userspace servers. */
  cpuUs?: number
}

/** utime + stime of a process (all threads), in seconds. */
function cpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) / 100 // clock ticks (USER_HZ = 100)
  } catch {
    return undefined
  }
}

/**
 * Writes the whole device once before its first workload, as storage benchmarks precondition a drive: a sparse
 * backend (the `--memory` RAM disk, rublk over a file) would otherwise pay its first-touch allocation inside the
 * measured write runs, while the tmpfs image the file peers serve is already written in full.
 */
async function precondition(path: string): Promise<void> {
  await exec('dd', [
    `if=/dev/zero`,
    `of=${path}`,
    'bs=1M',
    `count=${SIZE_MIB}`,
    'oflag=direct',
    'status=none',
  ])
}

async function fio(path: string, w: Workload, runtime = RUNTIME, pid?: number): Promise<Result> {
  const cpuBefore = cpuSeconds(pid)
  const started = Date.now()
  const out = await exec(
    'fio',
    [
      // One job runs on one CPU (and so one queue); two jobs spread over both.
      ...(w.numjobs === 1 ? ['--cpus_allowed=0'] : []),
      `--name=${w.id}`,
      `--filename=${path}`,
      `--rw=${w.rw}`,
      `--bs=${w.bs}`,
      `--iodepth=${w.iodepth}`,
      `--numjobs=${w.numjobs}`,
      '--ioengine=libaio',
      '--direct=1',
      '--time_based',
      `--runtime=${runtime}`,
      `--ramp_time=${RAMP}`,
      '--group_reporting',
      '--norandommap',
      '--output-format=json',
    ],
    { maxBuffer: 16 << 20 },
  )
  const cpuAfter = cpuSeconds(pid)
  const job = (JSON.parse(out.stdout) as { jobs: FioJob[] }).jobs[0]!
  const side = w.rw.includes('write') ? job.write : job.read
  const result: Result = {
    iops: side.iops,
    meanUs: side.clat_ns.mean / 1000,
    p99Us: (side.clat_ns.percentile?.['99.000000'] ?? 0) / 1000,
    errors: job.error,
  }
  if (cpuBefore !== undefined && cpuAfter !== undefined) {
    // The CPU time covers the whole fio run (ramp included): divide by the requests of that whole time.
    const requests = side.iops * ((Date.now() - started) / 1000)
    if (requests > 0) result.cpuUs = ((cpuAfter - cpuBefore) * 1e6) / requests
  }
  return result
}

interface FioJob {
  error: number
  read: FioSide
  write: FioSide
}
interface FioSide {
  iops: number
  clat_ns: { mean: number; percentile?: Record<string, number> }
}

interface Running {
  path: string
  /** The serving process, for CPU time per request. */
  pid?: number
  stop(): Promise<Record<string, unknown> | undefined>
}

interface Target {
  id: string
  label: string
  /** The qemu-storage-daemon target it is compared with. */
  peer?: string
  start(): Promise<Running>
}

function waitLine(child: ChildProcess, match: (line: string) => boolean, what: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let err = ''
    child.stderr?.on('data', (d: Buffer) => (err += d.toString()))
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (match(line)) resolve(line)
    })
    child.on('exit', (code) => reject(new Error(`${what} exited (${code}): ${err}`)))
  })
}

async function vdaFor(name: string): Promise<string> {
  for (let i = 0; i < 400; i++) {
    const out = await sh(`ls /sys/bus/vdpa/devices/${name}/virtio*/block 2>/dev/null || true`)
    const dev = out.trim().split('\n')[0]
    if (dev) return `/dev/${dev}`
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`no block device for ${name}`)
}

function vduseCli(backend: string[], name = `bench-${backend[0]!.slice(2)}`): () => Promise<Running> {
  return async () => {
    const child = spawn(
      process.execPath,
      [
        join(ROOT, 'bin/vduse.js'),
        'blk',
        '--name',
        name,
        ...backend,
        '--queues',
        String(QUEUES),
        '--queue-size',
        String(QUEUE_SIZE),
        '--json',
        '--replace',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    )
    const ready = JSON.parse(await waitLine(child, (l) => l.includes('"ready"'), 'vduse')) as { path: string }
    const stopped = waitLine(child, (l) => l.includes('"stopped"'), 'vduse')
    return {
      path: ready.path,
      ...(child.pid === undefined ? {} : { pid: child.pid }),
      stop: async () => {
        child.kill('SIGTERM')
        return JSON.parse(await stopped) as Record<string, unknown>
      },
    }
  }
}

async function nativeRam(): Promise<Running> {
  const child = spawn(
    join(ROOT, 'target/release/examples/ram_blk'),
    ['bench-native', String(SIZE_MIB), String(QUEUES), String(QUEUE_SIZE)],
    {
      stdio: ['pipe', 'pipe', 'pipe'],
    },
  )
  await waitLine(child, (l) => l === 'ready', 'ram_blk')
  const stopped = waitLine(child, (l) => l.startsWith('stopped'), 'ram_blk')
  await sh('vdpa dev add name bench-native mgmtdev vduse')
  return {
    path: await vdaFor('bench-native'),
    ...(child.pid === undefined ? {} : { pid: child.pid }),
    stop: async () => {
      await sh('vdpa dev del bench-native')
      child.stdin!.end()
      return { counters: (await stopped).slice(8) }
    },
  }
}

function qsd(blockdev: string, binary: () => string, tag: string): () => Promise<Running> {
  return async () => {
    const name = `${tag}-${blockdev.startsWith('driver=null') ? 'null' : 'file'}`
    const child = spawn(
      binary(),
      [
        '--blockdev',
        `${blockdev},node-name=disk0`,
        '--export',
        `type=vduse-blk,id=e0,node-name=disk0,name=${name},num-queues=${QUEUES},queue-size=${QUEUE_SIZE},writable=on`,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    )
    let exited = false
    child.on('exit', () => (exited = true))
    for (let i = 0; i < 200 && !(await sh(`ls /sys/class/vduse/ | grep -x ${name} || true`)).trim(); i++) {
      if (exited) throw new Error('qemu-storage-daemon exited')
      await new Promise((r) => setTimeout(r, 50))
    }
    await sh(`vdpa dev add name ${name} mgmtdev vduse`)
    return {
      path: await vdaFor(name),
      ...(child.pid === undefined ? {} : { pid: child.pid }),
      stop: async () => {
        await sh(`vdpa dev del ${name}`)
        child.kill('SIGTERM')
        await new Promise((r) => child.once('exit', r))
        return undefined
      },
    }
  }
}

/** A ublk device served by rublk (`rublk add null|loop`), its daemon's pid for CPU time. */
function rublk(args: string[]): () => Promise<Running> {
  return async () => {
    await modprobe('ublk_drv').catch(() => {})
    const bin = PEERS.RUBLK
    if (!bin) throw new Error('rublk is not built (scripts/peers/rublk)')
    // The daemon keeps rublk's stdout and stderr: send them to a file, or the pipe never closes.
    const log = `/tmp/rublk-${process.pid}.log`
    const cmd = [bin, 'add', ...args, '-q', String(QUEUES), '-d', String(QUEUE_SIZE)].join(' ')
    const out = await sh(`${cmd} </dev/null >${log} 2>&1; cat ${log}`)
    // `rublk add` returns once the device is live and dumps "dev id N: ..." and "daemon pid P".
    const id = Number(/dev id (\d+):/.exec(out)?.[1] ?? NaN)
    if (!Number.isFinite(id)) throw new Error(`rublk add failed: ${out}`)
    const pid = Number(/daemon pid (\d+)/.exec(out)?.[1] ?? NaN)
    return {
      path: `/dev/ublkb${id}`,
      ...(Number.isFinite(pid) ? { pid } : {}),
      stop: async () => {
        await exec(bin, ['del', '-n', String(id)])
        return undefined
      },
    }
  }
}

/** qemu-nbd on the tmpfs image over a UNIX socket, allowing multi-conn; resolves once it listens. */
async function qemuNbd(socket: string): Promise<() => Promise<void>> {
  await sh(`rm -f ${socket}`)
  const server = spawn('qemu-nbd', ['-k', socket, '-f', 'raw', '-t', '--shared=4', IMAGE], {
    stdio: 'ignore',
  })
  for (let i = 0; i < 100; i++) {
    if ((await sh(`test -S ${socket} && echo y || true`)).trim()) break
    await new Promise((r) => setTimeout(r, 50))
  }
  return async () => {
    server.kill('SIGTERM')
    await new Promise((r) => server.once('exit', r))
  }
}

/** vduse --nbd against its own qemu-nbd (over a UNIX socket), with `connections` connections. */
function vduseNbd(id: string, connections: number): () => Promise<Running> {
  return async () => {
    const socket = `/tmp/${id}.sock`
    const stopServer = await qemuNbd(socket)
    const running = await vduseCli(
      ['--nbd', `nbd+unix:///?socket=${socket}`, '--connections', String(connections)],
      `bench-${id}`,
    )().catch(async (err: unknown) => {
      await stopServer()
      throw err
    })
    return {
      ...running,
      stop: async () => {
        const stopped = await running.stop()
        await stopServer()
        return stopped
      },
    }
  }
}

/** The kernel's NBD client (nbd-client) against qemu-nbd over a UNIX socket, `connections` connections. */
function kernelNbd(id: string, connections: number): () => Promise<Running> {
  return async () => {
    await modprobe('nbd').catch(() => {})
    const socket = `/tmp/${id}.sock`
    const stopServer = await qemuNbd(socket)
    await sh(`nbd-client -unix ${socket} /dev/nbd0 -b 4096 -N "" -C ${connections} >/dev/null`)
    return {
      path: '/dev/nbd0',
      stop: async () => {
        await sh('nbd-client -d /dev/nbd0 >/dev/null')
        await stopServer()
        return undefined
      },
    }
  }
}

async function modprobe(args: string): Promise<void> {
  await sh(`modprobe -d "$VDUSE_VM_MODROOT" ${args}`)
}

const TARGETS: Target[] = [
  {
    id: 'vduse-null',
    label: 'vduse CLI --null (TypeScript; polling: auto, the CLI default)',
    peer: 'qsd10-null',
    start: vduseCli(['--null', `${SIZE_MIB}M`]),
  },
  {
    id: 'vduse-null-nopoll',
    label: 'vduse CLI --null --poll-us 0 (TypeScript, never polls)',
    peer: 'qsd10-null',
    start: vduseCli(['--null', `${SIZE_MIB}M`, '--poll-us', '0'], 'bench-null-nopoll'),
  },
  {
    id: 'vduse-null-poll',
    label: `vduse CLI --null --poll-us ${POLL_US} (TypeScript, polling capped at ${POLL_US} µs)`,
    peer: 'qsd10-null',
    start: vduseCli(['--null', `${SIZE_MIB}M`, '--poll-us', String(POLL_US)], 'bench-null-poll'),
  },
  {
    id: 'vduse-memory',
    label: 'vduse CLI --memory (TypeScript; polling: auto, the CLI default)',
    peer: 'qsd10-file',
    start: vduseCli(['--memory', `${SIZE_MIB}M`]),
  },
  {
    id: 'vduse-memory-nopoll',
    label: 'vduse CLI --memory --poll-us 0 (TypeScript, never polls)',
    peer: 'qsd10-file',
    start: vduseCli(['--memory', `${SIZE_MIB}M`, '--poll-us', '0'], 'bench-memory-nopoll'),
  },
  {
    id: 'vduse-file',
    label: 'vduse CLI --file tmpfs (native I/O; no polling, the CLI default with --file)',
    peer: 'qsd10-file',
    start: vduseCli(['--file', IMAGE]),
  },
  {
    id: 'vduse-file-poll',
    label: 'vduse CLI --file tmpfs --poll-us auto (native I/O, polling)',
    peer: 'qsd10-file',
    start: vduseCli(['--file', IMAGE, '--poll-us', 'auto'], 'bench-file-poll'),
  },
  {
    id: 'vduse-native',
    label: 'vduse-core native RAM model (Rust only)',
    peer: 'qsd10-null',
    start: nativeRam,
  },
  {
    id: 'qsd10-null',
    label: 'qemu-storage-daemon 10.0 vduse-blk, null-co',
    start: qsd(
      `driver=null-co,size=${SIZE_MIB << 20}`,
      () => PEERS.QSD10 ?? 'qemu-storage-daemon-10-missing',
      'qsd10',
    ),
  },
  {
    id: 'qsd10-file',
    label: 'qemu-storage-daemon 10.0 vduse-blk, tmpfs file',
    start: qsd(
      `driver=file,filename=${IMAGE}`,
      () => PEERS.QSD10 ?? 'qemu-storage-daemon-10-missing',
      'qsd10',
    ),
  },
  {
    id: 'qsd7-null',
    label: 'qemu-storage-daemon 7.2 vduse-blk, null-co',
    peer: 'qsd10-null',
    start: qsd(`driver=null-co,size=${SIZE_MIB << 20}`, () => 'qemu-storage-daemon', 'qsd7'),
  },
  {
    id: 'qsd7-file',
    label: 'qemu-storage-daemon 7.2 vduse-blk, tmpfs file',
    peer: 'qsd10-file',
    start: qsd(`driver=file,filename=${IMAGE}`, () => 'qemu-storage-daemon', 'qsd7'),
  },
  {
    id: 'ublk-null',
    label: 'ublk: rublk null',
    peer: 'qsd10-null',
    start: rublk(['null']),
  },
  {
    id: 'ublk-loop',
    label: 'ublk: rublk loop, tmpfs file',
    peer: 'qsd10-file',
    start: rublk(['loop', '-f', IMAGE, '--buffered-io']),
  },
  {
    id: 'null_blk',
    label: 'kernel null_blk',
    peer: 'qsd10-null',
    start: async () => {
      await modprobe(
        `null_blk nr_devices=1 gb=1 queue_mode=2 submit_queues=${QUEUES} hw_queue_depth=${QUEUE_SIZE}`,
      )
      return { path: '/dev/nullb0', stop: async () => (await sh('rmmod null_blk'), undefined) }
    },
  },
  {
    id: 'loop',
    label: 'kernel loop, tmpfs file',
    peer: 'qsd10-file',
    start: async () => {
      await modprobe('loop').catch(() => {})
      const dev = (await sh(`losetup -f --show ${IMAGE}`)).trim()
      return { path: dev, stop: async () => (await sh(`losetup -d ${dev}`), undefined) }
    },
  },
  {
    id: 'nbd',
    label: 'qemu-nbd + kernel NBD client, tmpfs file',
    peer: 'qsd10-file',
    start: kernelNbd('nbd', 1),
  },
  {
    id: 'nbd-mc',
    label: 'qemu-nbd + kernel NBD client, 2 connections',
    peer: 'nbd',
    start: kernelNbd('nbd-mc', 2),
  },
  {
    id: 'vduse-nbd',
    label: 'vduse CLI --nbd to qemu-nbd, UNIX socket (native data path)',
    peer: 'nbd',
    start: vduseNbd('vduse-nbd', 1),
  },
  {
    id: 'vduse-nbd-mc',
    label: 'vduse CLI --nbd, 2 queues, 2 connections (multi-conn, native)',
    peer: 'nbd-mc',
    start: vduseNbd('vduse-nbd-mc', 2),
  },
]

interface TargetResult {
  id: string
  label: string
  peer?: string
  /** Per workload the median run (by IOPS) of the repeats. */
  results: Record<string, Result>
  /** Per workload every repeat's IOPS, in run order (with --repeat). */
  runs?: Record<string, number[]>
  soak?: { iops: number[]; drift: number }
  stopped?: Record<string, unknown>
  error?: string
}

function fmt(n: number): string {
  return n >= 100 ? Math.round(n).toLocaleString('en-US') : n.toFixed(1)
}

/** The median of `xs` (the mean of the middle two for an even count); undefined when empty. */
function median(xs: number[]): number | undefined {
  if (xs.length === 0) return undefined
  const sorted = [...xs].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

function table(all: TargetResult[]): string {
  const byId = new Map(all.map((t) => [t.id, t]))
  const head = `| target | ${WORKLOADS.map((w) => w.label).join(' | ')} |\n|---|${WORKLOADS.map(() => '---').join('|')}|\n`
  const rows = all.map((t) => {
    const cells = WORKLOADS.map((w) => {
      const r = t.results[w.id]
      if (!r) return t.error ? 'failed' : '–'
      const peerEntry = t.peer ? byId.get(t.peer) : undefined
      const peer = peerEntry?.results[w.id]
      // Repeats pair up (target and peer ran in the same round, on the host as it was then): the ratio is
      // the median of the per-round ratios, not a ratio of medians from different rounds.
      const mine = t.runs?.[w.id]
      const theirs = peerEntry?.runs?.[w.id]
      const ratioValue =
        mine && theirs && mine.length === theirs.length
          ? median(mine.map((v, i) => v / theirs[i]!).filter((x) => Number.isFinite(x)))
          : peer && peer.iops > 0
            ? r.iops / peer.iops
            : undefined
      const ratio = ratioValue === undefined ? '' : ` (${ratioValue.toFixed(2)}×)`
      const cpu = r.cpuUs !== undefined ? `<br>${r.cpuUs.toFixed(1)} µs CPU/req` : ''
      const runs = t.runs?.[w.id]
      const spread = runs && runs.length > 1 ? `<br>runs: ${runs.map(fmt).join(', ')}` : ''
      return `${fmt(r.iops)}${ratio}<br>${fmt(r.meanUs)} / ${fmt(r.p99Us)} µs${cpu}${spread}`
    })
    const failed = t.error ? ` — **failed** (${t.error.slice(0, 80)}); cells hold the runs before it` : ''
    return `| ${t.label}${t.peer ? ` — vs ${t.peer}` : ''}${failed} | ${cells.join(' | ')} |`
  })
  return head + rows.join('\n') + '\n'
}

async function main(): Promise<void> {
  PEERS = await peerPaths()
  const meminfo = readFileSync('/proc/meminfo', 'utf8').match(/MemTotal:\s+(\d+)/)?.[1]
  const env = {
    date: new Date().toISOString(),
    kernel: release(),
    guestCpus: cpus().length,
    guestMemoryMiB: Math.round(Number(meminfo ?? totalmem() / 1024) / 1024),
    cpuModel: cpus()[0]?.model ?? 'unknown',
    accelerator: 'QEMU TCG (software emulation)',
    fio: (await sh('fio --version')).trim(),
    qemu: (await sh('qemu-storage-daemon --version | head -1')).trim(),
    qemu10: PEERS.QEMU_VERSION ?? 'missing',
    node: process.version,
    runtimeSeconds: RUNTIME,
    rampSeconds: RAMP,
    queues: QUEUES,
    queueSize: QUEUE_SIZE,
    deviceMiB: SIZE_MIB,
    repeat: REPEAT,
    revision: process.env.VDUSE_BENCH_REVISION ?? 'unknown',
  }
  console.log(`# vduse benchmark\n${JSON.stringify(env, null, 1)}`)
  await sh(`dd if=/dev/zero of=${IMAGE} bs=1M count=${SIZE_MIB} status=none`)
  const selected = TARGETS.filter((t) => !only || only.includes(t.id))
  const all: TargetResult[] = selected.map((t) => ({
    id: t.id,
    label: t.label,
    results: {},
    ...(t.peer ? { peer: t.peer } : {}),
  }))
  const samples = new Map<string, Result[]>()
  for (let rep = 0; rep < REPEAT; rep++) {
    const order = rep % 2 === 0 ? selected : [...selected].reverse()
    for (const target of order) {
      const entry = all.find((e) => e.id === target.id)!
      if (entry.error) continue
      if (REPEAT > 1) console.log(`${target.id}: run ${rep + 1} of ${REPEAT}`)
      let running: Running | undefined
      try {
        running = await target.start()
        await precondition(running.path)
        for (const w of WORKLOADS) {
          const result = await fio(running.path, w, RUNTIME, running.pid)
          const key = `${target.id}|${w.id}`
          samples.set(key, [...(samples.get(key) ?? []), result])
          console.log(`${target.id.padEnd(14)} ${w.label.padEnd(26)} ${fmt(result.iops).padStart(8)} IOPS`)
        }
        if (
          !quick &&
          rep === REPEAT - 1 &&
          target.id.startsWith('vduse-') &&
          target.id !== 'vduse-file' &&
          !target.id.includes('nbd')
        ) {
          // Soak: six back-to-back 10 s runs of 4k randread QD16; the IOPS series shows any drift.
          const iops: number[] = []
          for (let i = 0; i < 6; i++) iops.push((await fio(running.path, WORKLOADS[1]!, 10)).iops)
          entry.soak = { iops, drift: (iops[iops.length - 1]! - iops[0]!) / iops[0]! }
          console.log(`${target.id.padEnd(14)} soak 60 s: ${iops.map(fmt).join(', ')} IOPS`)
        }
      } catch (err) {
        entry.error = (err as Error).message
        console.log(`${target.id}: failed: ${entry.error}`)
      } finally {
        const stopped = await running?.stop().catch((err: Error) => ({ stopError: err.message }))
        if (stopped) entry.stopped = stopped
      }
    }
  }
  for (const entry of all) {
    for (const w of WORKLOADS) {
      const runs = samples.get(`${entry.id}|${w.id}`)
      if (!runs) continue
      // The median run by IOPS (the lower middle one for an even count), with its own latency and CPU.
      const sorted = [...runs].sort((a, b) => a.iops - b.iops)
      entry.results[w.id] = sorted[Math.floor((sorted.length - 1) / 2)]!
      if (runs.length > 1) (entry.runs ??= {})[w.id] = runs.map((r) => r.iops)
    }
  }
  const net = await runNetBench(only, RUNTIME, REPEAT)
  const md =
    `# vduse benchmark, ${env.date.slice(0, 10)}\n\n` +
    `Guest: ${env.guestCpus} vCPUs, ${env.guestMemoryMiB} MiB, kernel ${env.kernel}, ${env.accelerator} on ${env.cpuModel}.\n` +
    `Build: ${env.revision}. fio ${env.fio}, libaio, direct=1, ${RUNTIME} s per run after ${RAMP} s warm-up; devices of ${SIZE_MIB} MiB, each written once in full before its first run, with ` +
    `${QUEUES} queues of ${QUEUE_SIZE} (one-job workloads run on one CPU, so one queue); reference peer: ` +
    `qemu-storage-daemon ${env.qemu10}, also ${env.qemu}. Absolute numbers under TCG mean little: compare ratios within one run.\n\n` +
    (REPEAT > 1
      ? `Every target ran ${REPEAT} times, in reverse order every other time. Each cell shows the median run by ` +
        `IOPS (the lower of the middle two for an even count) with its latency and CPU; the ratio is the median ` +
        `of the per-round ratios to the peer. Device counters are those of the last round.\n\n`
      : '') +
    `Each cell: IOPS (ratio to the matching qemu-storage-daemon 10.0 target)<br>mean / p99 completion latency` +
    `<br>CPU time of the serving process per request (userspace servers)` +
    (REPEAT > 1 ? `<br>every run's IOPS, in run order` : '') +
    `.\n\n` +
    table(all) +
    (all.some((t) => t.soak)
      ? `\nSoak (4k randread QD16, six 10 s runs back to back):\n\n| target | IOPS per 10 s | drift first→last |\n|---|---|---|\n` +
        all
          .filter((t) => t.soak)
          .map(
            (t) =>
              `| ${t.label} | ${t.soak!.iops.map(fmt).join(', ')} | ${(t.soak!.drift * 100).toFixed(1)} % |`,
          )
          .join('\n') +
        '\n'
      : '') +
    `\nDevice counters at the end (vduse targets):\n\n` +
    all
      .filter((t) => t.stopped)
      .map((t) => `- ${t.id}: \`${JSON.stringify(t.stopped)}\``)
      .join('\n') +
    '\n' +
    (net.results.length > 0 ? net.md : '')
  console.log('\n' + md)
  const dir = join(ROOT, 'benchmark/results')
  mkdirSync(dir, { recursive: true })
  // A partial run (--only) goes beside the full results, never over them.
  const stamp =
    env.date.slice(0, 10) + (only ? `-only-${only.join('+')}` : '') + (REPEAT > 1 ? `-x${REPEAT}` : '')
  writeFileSync(join(dir, `${stamp}.md`), md)
  writeFileSync(
    join(dir, `${stamp}.json`),
    JSON.stringify({ env, targets: all, workloads: WORKLOADS, network: net.results }, null, 1) + '\n',
  )
  console.log(`results written to benchmark/results/${stamp}.{md,json}`)
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
