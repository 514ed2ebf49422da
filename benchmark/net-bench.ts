// The network half of `npm run bench` (in the guest): iperf3 TCP throughput (1 and 4 streams, both
// through the same pair of namespaces) and ping round-trip times, for our NICs through the in-process
// switch (native ports, and the JavaScript path), our NIC bridged to a tap, and a veth pair — the
// kernel's own ceiling for two namespaces.
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { promisify } from 'node:util'

const exec = promisify(execFile)
const CLI = join(__dirname, '../bin/vduse.js')

async function sh(script: string): Promise<string> {
  return (await exec('sh', ['-ec', script], { maxBuffer: 64 << 20 })).stdout
}

export interface NetResult {
  /** iperf3 TCP, bits/s received, for 1 and 4 parallel streams. */
  tcp1: number
  tcp4: number
  /** ping round trip, µs. */
  rttP50: number
  rttP99: number
  /** CPU time of the serving process per second of the 4-stream run (our targets). */
  cpuPerSecond?: number
}

interface Pair {
  /** Namespace and address of each end. */
  a: { ns: string; ip: string }
  b: { ns: string; ip: string }
  pid?: number | undefined
  stop(): Promise<void>
}

interface NetTarget {
  id: string
  label: string
  setup(): Promise<Pair>
}

/** Starts `vduse net …` (or `argv`) and waits for `count` ready events; their interface names. */
async function vduseNet(
  args: string[],
  count: number,
  argv = [CLI, 'net', ...args, '--replace', '--json'],
): Promise<{ child: ChildProcess; ready: Array<Record<string, unknown>> }> {
  const child = spawn(process.execPath, argv, {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const ready: Array<Record<string, unknown>> = []
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const e = JSON.parse(line) as Record<string, unknown>
      if (e.event === 'ready') ready.push(e)
      if (ready.length === count) resolve()
    })
    child.once('exit', (code) => reject(new Error(`vduse net exited (${code})`)))
  })
  return { child, ready }
}

async function stopChild(child: ChildProcess): Promise<void> {
  const exited = new Promise((r) => child.once('exit', r))
  child.kill('SIGTERM')
  await exited
}

async function namespaces(a: string, b: string): Promise<void> {
  await sh(
    `for n in ${a} ${b}; do ip netns del $n 2>/dev/null || true; ip netns add $n; ip -n $n link set lo up; done`,
  )
}

async function place(ifname: string, ns: string, ip: string, mtu = 1500): Promise<void> {
  await sh(`ip link set ${ifname} netns ${ns}
    ip -n ${ns} addr add ${ip}/24 dev ${ifname}
    ip -n ${ns} link set ${ifname} mtu ${mtu} up`)
}

export const NET_TARGETS: NetTarget[] = [
  {
    id: 'net-veth',
    label: 'veth pair (the kernel, no device)',
    async setup() {
      await namespaces('bn-va', 'bn-vb')
      await sh('ip link add bn-veth0 type veth peer name bn-veth1')
      await place('bn-veth0', 'bn-va', '10.90.0.1')
      await place('bn-veth1', 'bn-vb', '10.90.0.2')
      return {
        a: { ns: 'bn-va', ip: '10.90.0.1' },
        b: { ns: 'bn-vb', ip: '10.90.0.2' },
        stop: async () => void (await sh('ip netns del bn-va; ip netns del bn-vb')),
      }
    },
  },
  {
    id: 'net-switch',
    label: 'vduse net --switch: two NICs through the native switch',
    async setup() {
      const { child, ready } = await vduseNet(['--switch', '--name', 'bn-a', '--name', 'bn-b'], 2)
      await namespaces('bn-sa', 'bn-sb')
      await place(String(ready[0]!.path), 'bn-sa', '10.91.0.1')
      await place(String(ready[1]!.path), 'bn-sb', '10.91.0.2')
      return {
        a: { ns: 'bn-sa', ip: '10.91.0.1' },
        b: { ns: 'bn-sb', ip: '10.91.0.2' },
        pid: child.pid,
        stop: async () => {
          await stopChild(child)
          await sh('ip netns del bn-sa; ip netns del bn-sb')
        },
      }
    },
  },
  {
    id: 'net-switch-js',
    label: 'NetSwitch.connect(): two NICs through the switch in JavaScript',
    async setup() {
      const { child, ready } = await vduseNet([], 2, [
        '--import=tsx',
        join(__dirname, 'js-switch.ts'),
        'bn-ja',
        'bn-jb',
      ])
      await namespaces('bn-ja', 'bn-jb')
      await place(String(ready[0]!.path), 'bn-ja', '10.93.0.1')
      await place(String(ready[1]!.path), 'bn-jb', '10.93.0.2')
      return {
        a: { ns: 'bn-ja', ip: '10.93.0.1' },
        b: { ns: 'bn-jb', ip: '10.93.0.2' },
        pid: child.pid,
        stop: async () => {
          await stopChild(child)
          await sh('ip netns del bn-ja; ip netns del bn-jb')
        },
      }
    },
  },
  {
    id: 'net-tap',
    label: 'vduse net --tap: a NIC bridged natively to a tap',
    async setup() {
      await sh('modprobe -d "$VDUSE_VM_MODROOT" tun 2>/dev/null || true')
      const { child, ready } = await vduseNet(['--name', 'bn-t', '--tap', 'bn-tap0'], 1)
      await namespaces('bn-ta', 'bn-tb')
      await place(String(ready[0]!.path), 'bn-ta', '10.92.0.1')
      await place('bn-tap0', 'bn-tb', '10.92.0.2')
      return {
        a: { ns: 'bn-ta', ip: '10.92.0.1' },
        b: { ns: 'bn-tb', ip: '10.92.0.2' },
        pid: child.pid,
        stop: async () => {
          await stopChild(child)
          await sh('ip netns del bn-ta; ip netns del bn-tb')
        },
      }
    },
  },
]

function cpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(f[11]) + Number(f[12])) / 100
  } catch {
    return undefined
  }
}

async function iperf(pair: Pair, streams: number, seconds: number): Promise<number> {
  await sh(`ip netns exec ${pair.b.ns} iperf3 -s -1 -D -B ${pair.b.ip}`)
  await new Promise((r) => setTimeout(r, 300))
  const out = await sh(
    `ip netns exec ${pair.a.ns} iperf3 -c ${pair.b.ip} -t ${seconds} -P ${streams} -J --connect-timeout 5000`,
  )
  const r = JSON.parse(out) as { end?: { sum_received?: { bits_per_second?: number } }; error?: string }
  if (r.error) throw new Error(`iperf3: ${r.error}`)
  return r.end?.sum_received?.bits_per_second ?? 0
}

async function rtt(pair: Pair, count: number): Promise<{ p50: number; p99: number }> {
  const out = await sh(`ip netns exec ${pair.a.ns} ping -n -c ${count} -i 0.01 -W 2 ${pair.b.ip}`)
  const times = [...out.matchAll(/time=([\d.]+) ms/g)].map((m) => Number(m[1]) * 1000).sort((x, y) => x - y)
  if (times.length === 0) throw new Error(`ping: no replies\n${out}`)
  const at = (q: number): number => times[Math.min(times.length - 1, Math.floor(q * times.length))]!
  return { p50: at(0.5), p99: at(0.99) }
}

export async function runNetBench(
  only: string[] | undefined,
  seconds: number,
  repeat = 1,
): Promise<{
  results: Array<{ id: string; label: string; result?: NetResult; error?: string }>
  md: string
}> {
  const targets = NET_TARGETS.filter((t) => !only || only.includes(t.id))
  const runs = new Map<string, NetResult[]>()
  const errors = new Map<string, string>()
  for (let rep = 0; rep < repeat; rep++) {
    // Every other round in reverse order: no target always runs first (or right after another).
    for (const target of rep % 2 === 0 ? targets : [...targets].reverse()) {
      let pair: Pair | undefined
      try {
        pair = await target.setup()
        await rtt(pair, 20) // warm up: ARP, neighbour caches
        const tcp1 = await iperf(pair, 1, seconds)
        const before = cpuSeconds(pair.pid)
        const tcp4 = await iperf(pair, 4, seconds)
        const after = cpuSeconds(pair.pid)
        const { p50, p99 } = await rtt(pair, 500)
        const result: NetResult = { tcp1, tcp4, rttP50: p50, rttP99: p99 }
        if (before !== undefined && after !== undefined) result.cpuPerSecond = (after - before) / seconds
        runs.set(target.id, [...(runs.get(target.id) ?? []), result])
        console.log(
          `${target.id.padEnd(12)} TCP ${(tcp1 / 1e6).toFixed(0)} / ${(tcp4 / 1e6).toFixed(0)} Mbit/s, ` +
            `RTT p50 ${p50.toFixed(0)} µs p99 ${p99.toFixed(0)} µs`,
        )
      } catch (err) {
        errors.set(target.id, (err as Error).message)
        console.log(`${target.id}: failed: ${(err as Error).message}`)
      } finally {
        await pair?.stop().catch(() => {})
      }
    }
  }
  // Each figure: the median over the rounds (the lower middle one for an even count).
  const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!
  const results = targets.map((target) => {
    const got = runs.get(target.id)
    const entry: { id: string; label: string; result?: NetResult; error?: string } = {
      id: target.id,
      label: target.label,
    }
    if (got && got.length > 0) {
      entry.result = {
        tcp1: median(got.map((r) => r.tcp1)),
        tcp4: median(got.map((r) => r.tcp4)),
        rttP50: median(got.map((r) => r.rttP50)),
        rttP99: median(got.map((r) => r.rttP99)),
      }
      const cpu = got.flatMap((r) => (r.cpuPerSecond === undefined ? [] : [r.cpuPerSecond]))
      if (cpu.length > 0) entry.result.cpuPerSecond = median(cpu)
    } else entry.error = errors.get(target.id) ?? 'no run'
    return entry
  })
  const veth = results.find((r) => r.id === 'net-veth')?.result
  const ratio = (x: number, base: number | undefined): string =>
    base ? ` (${((x / base) * 100).toFixed(0)} %)` : ''
  const rttRatio = (x: number, base: number | undefined): string =>
    base ? ` (${(x / base).toFixed(1)}×)` : ''
  const md =
    `\n## Network\n\nTwo network namespaces in the guest; iperf3 TCP for ${seconds} s (client in the first, ` +
    `server in the second), then 500 pings at 10 ms intervals. In brackets: share of the veth pair's ` +
    `throughput, or multiple of its round-trip time. Offloads on (the defaults).` +
    (repeat > 1
      ? ` Every target ran ${repeat} times (in reverse order every other round); each figure is the median.`
      : '') +
    `\n\n` +
    `| target | TCP, 1 stream | TCP, 4 streams | ping p50 / p99 | server CPU (4 streams) |\n|---|---|---|---|---|\n` +
    results
      .map((r) => {
        if (!r.result) return `| ${r.label} | failed: ${r.error ?? '?'} | | | |`
        const x = r.result
        const mbit = (b: number): string => `${(b / 1e6).toFixed(0)} Mbit/s`
        return (
          `| ${r.label} | ${mbit(x.tcp1)}${ratio(x.tcp1, veth?.tcp1)} | ${mbit(x.tcp4)}${ratio(x.tcp4, veth?.tcp4)} | ` +
          `${x.rttP50.toFixed(0)}${rttRatio(x.rttP50, veth?.rttP50)} / ${x.rttP99.toFixed(0)} µs | ` +
          `${x.cpuPerSecond === undefined ? '–' : `${(x.cpuPerSecond * 100).toFixed(0)} % of a CPU`} |`
        )
      })
      .join('\n') +
    '\n'
  return { results, md }
}
