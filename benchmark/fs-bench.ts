// The virtio-fs table of `npm run bench` (runs on the host): one boot of the test guest (Linux 7.3) with
// the same workloads on every mount (benchmark/fs-guest.ts):
//   virtiofsd     virtiofsd 1.13 (Debian trixie) on vhost-user-fs-pci, sharing a tmpfs directory here
//   vduse-vu      vduse fs --shared-dir --vhost-user on vhost-user-fs-pci, the same kind of directory
//   vduse-vduse   vduse fs --shared-dir inside the guest, through VDUSE (the guest's tmpfs)
//   memoryfs-vduse vduse fs --memory (the TypeScript MemoryFs) inside the guest, through VDUSE
//   bench9p       a tmpfs directory here over virtio-9p (QEMU's own server): the floor
// One request queue each (virtiofsd's default). It prints numbers and asserts nothing.
//   node --import=tsx benchmark/fs-bench.ts [--quick]   (npm run bench -- --only=fs: this table alone)
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { cpuSeconds, peers, waitForSocket } from './peers'

const exec = promisify(execFile)
const ROOT = join(__dirname, '..')
const quick = process.argv.includes('--quick')
// `npm run bench -- --only=…` picks targets of the block and network tables: the fs table runs only when
// one of them is `fs`.
const only = process.argv.find((a) => a.startsWith('--only='))

interface Row {
  target: string
  workload: string
  value: number
  unit: string
}

async function main(): Promise<void> {
  if (only !== undefined && !only.slice(7).split(',').includes('fs')) return
  const p = await peers()
  const dir = mkdtempSync('/dev/shm/vduse-fsbench-')
  const servers: ChildProcess[] = []
  let stopping = false
  try {
    for (const d of ['virtiofsd', 'vduse', '9p']) mkdirSync(join(dir, d))
    const vfsd = spawn(
      p.VIRTIOFSD!,
      [
        `--socket-path=${join(dir, 'virtiofsd.sock')}`,
        `--shared-dir=${join(dir, 'virtiofsd')}`,
        '--sandbox=none',
        '--cache=auto',
      ],
      { stdio: 'ignore' },
    )
    servers.push(vfsd)
    const ours = spawn(
      process.execPath,
      [
        join(ROOT, 'dist/cli/main.js'),
        'fs',
        '--name',
        'fsbench',
        '--tag',
        'vduse-vu',
        '--shared-dir',
        join(dir, 'vduse'),
        '--vhost-user',
        join(dir, 'vduse.sock'),
      ],
      { stdio: 'ignore' },
    )
    servers.push(ours)
    await waitForSocket(join(dir, 'virtiofsd.sock'), vfsd)
    await waitForSocket(join(dir, 'vduse.sock'), ours)
    const qemu = [
      `-chardev socket,id=vfsd,path=${join(dir, 'virtiofsd.sock')}`,
      '-device vhost-user-fs-pci,chardev=vfsd,tag=virtiofsd',
      `-chardev socket,id=vvu,path=${join(dir, 'vduse.sock')}`,
      '-device vhost-user-fs-pci,chardev=vvu,tag=vduse-vu',
      `-fsdev local,id=b9,path=${join(dir, '9p')},security_model=passthrough`,
      '-device virtio-9p-pci,fsdev=b9,mount_tag=bench9p',
    ]
    // CPU time sampled each second (virtiofsd exits when the VM goes: its last sample stands).
    const last = { virtiofsd: 0, 'vduse-vu': 0 }
    const sample = (): void => {
      for (const [k, proc] of [
        ['virtiofsd', vfsd],
        ['vduse-vu', ours],
      ] as const) {
        try {
          last[k] = cpuSeconds(proc.pid!)
        } catch {
          // gone: keep the last sample
        }
      }
    }
    sample()
    const cpu0 = { ...last }
    const sampler = setInterval(sample, 1000)
    const { stdout, stderr } = await exec(
      join(ROOT, 'scripts/vm/run'),
      ['node', '--import=tsx', 'benchmark/fs-guest.ts'],
      {
        cwd: ROOT,
        env: {
          ...process.env,
          VDUSE_VM_KERNEL: '7.3',
          VDUSE_VM_TIMEOUT: '1800',
          VDUSE_VM_QEMU_ARGS: qemu.join(' '),
          VDUSE_FSB_TAGS: 'virtiofsd,vduse-vu,bench9p',
          VDUSE_BENCH_RUNTIME: quick ? '3' : '5',
        },
        maxBuffer: 64 << 20,
      },
    )
    clearInterval(sampler)
    sample()
    const cpu = {
      virtiofsd: last.virtiofsd - cpu0.virtiofsd,
      'vduse-vu': last['vduse-vu'] - cpu0['vduse-vu'],
    }
    const rows: Row[] = stdout
      .split('\n')
      .filter((l) => l.startsWith('FSB '))
      .map((l) => JSON.parse(l.slice(4)) as Row)
    // A workload that failed on a target says so (the guest's stderr may come with its stdout).
    const targetNames = ['virtiofsd', 'vduse-vu', 'vduse-vduse', 'memoryfs-vduse', 'bench9p']
    for (const l of `${stdout}\n${stderr}`.split('\n')) {
      if (targetNames.some((t) => l.startsWith(`${t}: `))) console.error(l)
    }
    const targets = ['virtiofsd', 'vduse-vu', 'vduse-vduse', 'memoryfs-vduse', 'bench9p']
    const workloads = [...new Set(rows.map((r) => r.workload))]
    const cell = (t: string, w: string): Row | undefined =>
      rows.find((r) => r.target === t && r.workload === w)
    const lines = [
      `| workload | unit | ${targets.join(' | ')} | vduse-vu / virtiofsd | vduse-vduse / virtiofsd |`,
      `|---|---|${targets.map(() => '---:').join('|')}|---:|---:|`,
    ]
    for (const w of workloads) {
      const unit = rows.find((r) => r.workload === w)!.unit
      // For times (s), lower is better: ratios are virtiofsd's time over ours.
      const ratio = (t: string): string => {
        const a = cell(t, w)?.value
        const b = cell('virtiofsd', w)?.value
        if (!a || !b) return '-'
        return `${(unit === 's' ? b / a : a / b).toFixed(2)}×`
      }
      const fmt = (v: number | undefined): string =>
        v === undefined ? '-' : unit === 's' ? v.toFixed(2) : v >= 100 ? String(Math.round(v)) : v.toFixed(1)
      lines.push(
        `| ${w} | ${unit} | ${targets.map((t) => fmt(cell(t, w)?.value)).join(' | ')} | ${ratio('vduse-vu')} | ${ratio('vduse-vduse')} |`,
      )
    }
    const table = lines.join('\n')
    console.log(table)
    const cpuLine = `Host CPU seconds over the whole guest run: virtiofsd ${cpu.virtiofsd.toFixed(1)}, vduse-vu ${cpu['vduse-vu'].toFixed(1)}.`
    console.log(cpuLine)
    const stamp = `${new Date().toISOString().slice(0, 10)}-fs${quick ? '-quick' : ''}`
    mkdirSync(join(ROOT, 'benchmark/results'), { recursive: true })
    writeFileSync(
      join(ROOT, 'benchmark/results', `${stamp}.md`),
      `# virtio-fs: vduse fs --shared-dir vs virtiofsd 1.13 (${process.env.VDUSE_BENCH_REVISION ?? 'unknown build'})\n\n` +
        `One boot of the test guest (Linux 7.3, QEMU 7.2 TCG, 2 vCPUs); one request queue per device; fio with O_DIRECT, ` +
        `${quick ? 3 : 5} s per row; every shared directory on tmpfs.\n\n${table}\n\n${cpuLine}\n`,
    )
    writeFileSync(join(ROOT, 'benchmark/results', `${stamp}.json`), JSON.stringify({ rows, cpu }, null, 2))
    console.log(`results written to benchmark/results/${stamp}.{md,json}`)
  } finally {
    stopping = true
    for (const s of servers) s.kill('SIGTERM')
    await new Promise((r) => setTimeout(r, 300))
    for (const s of servers) s.kill('SIGKILL')
    rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
