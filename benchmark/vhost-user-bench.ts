// The vhost-user table of `npm run bench` (runs on the host; no VDUSE needed): `vduse blk --vhost-user`
// against qemu-storage-daemon 10's `--export vhost-user-blk` on the same backends, driven two ways —
// libblkio on the host (QEMU 10's `qemu-img bench` with driver=virtio-blk-vhost-user) and the test guest's
// stock virtio-blk driver on `vhost-user-blk-pci` (QEMU 7.2, TCG), with fio. It prints numbers and the
// server's CPU time per request; it asserts nothing.
//   node --import=tsx benchmark/vhost-user-bench.ts [--quick] [--only=vduse-null,qsd10-null]
import { execFile, spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { cpuSeconds, peers, waitForSocket } from './peers'

const exec = promisify(execFile)
const ROOT = join(__dirname, '..')
const SIZE = 256 << 20
const quick = process.argv.includes('--quick')
const only = process.argv
  .find((a) => a.startsWith('--only='))
  ?.slice(7)
  .split(',')
const REQUESTS = quick ? 20_000 : 100_000
const RUNTIME = quick ? 3 : 5

interface Target {
  id: string
  backend: string
  start(sock: string, dir: string): string[]
  peer: boolean
}

function targets(qsd: string): Target[] {
  const vduse = (id: string, backend: string, args: (dir: string) => string[]): Target => ({
    id,
    backend,
    peer: false,
    start: (sock, dir) => [
      process.execPath,
      join(ROOT, 'dist/cli/main.js'),
      'blk',
      '--name',
      id,
      ...args(dir),
      '--vhost-user',
      sock,
    ],
  })
  const qsd10 = (id: string, backend: string, blockdev: (dir: string) => string): Target => ({
    id,
    backend,
    peer: true,
    start: (sock, dir) => [
      qsd,
      '--blockdev',
      blockdev(dir),
      '--export',
      `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${sock},writable=on`,
    ],
  })
  return [
    vduse('vduse-null', 'null', () => ['--null', String(SIZE)]),
    qsd10('qsd10-null', 'null', () => `driver=null-co,node-name=n0,size=${SIZE}`),
    vduse('vduse-memory', 'RAM (vduse --memory; qsd: a file on tmpfs)', () => ['--memory', String(SIZE)]),
    qsd10(
      'qsd10-tmpfs',
      'RAM (vduse --memory; qsd: a file on tmpfs)',
      (dir) => `driver=file,filename=${join(dir, 'shm.img')},node-name=n0,cache.direct=off`,
    ),
    vduse('vduse-file', 'file', (dir) => ['--file', join(dir, 'disk.img')]),
    qsd10(
      'qsd10-file',
      'file',
      (dir) => `driver=file,filename=${join(dir, 'disk.img')},node-name=n0,aio=threads,cache.direct=off`,
    ),
  ]
}

interface Row {
  target: string
  driver: string
  workload: string
  iops: number
  cpuUsPerReq: number
}

async function main(): Promise<void> {
  const p = await peers()
  const qemuImg = p.QEMU_IMG!
  const rows: Row[] = []
  const dir = mkdtempSync(join(tmpdir(), 'vduse-vubench-'))
  const shm = mkdtempSync('/dev/shm/vduse-vubench-')
  try {
    writeFileSync(join(dir, 'disk.img'), Buffer.alloc(0))
    await exec('truncate', ['-s', String(SIZE), join(dir, 'disk.img')])
    await exec('truncate', ['-s', String(SIZE), join(shm, 'shm.img')])
    for (const t of targets(p.QSD10!)) {
      if (only && !only.includes(t.id)) continue
      const sock = join(dir, `${t.id}.sock`)
      const argv = t.start(sock, t.id === 'qsd10-tmpfs' ? shm : dir)
      const server = spawn(argv[0]!, argv.slice(1), { stdio: 'ignore' })
      try {
        await waitForSocket(sock, server)
        const image = `driver=virtio-blk-vhost-user,path=${sock},cache.direct=on`
        // libblkio on the host.
        for (const [label, depth, write] of [
          ['4k read QD1', 1, false],
          ['4k read QD16', 16, false],
          ['4k write QD16', 16, true],
        ] as const) {
          const cpu0 = cpuSeconds(server.pid!)
          const args = [
            'bench',
            '-t',
            'none',
            '-c',
            String(REQUESTS),
            '-d',
            String(depth),
            '-s',
            '4k',
            '-S',
            '4096',
          ]
          if (write) args.push('-w')
          const { stdout } = await exec(qemuImg, [...args, '--image-opts', image], { timeout: 300_000 })
          const secs = Number(/completed in ([\d.]+)/.exec(stdout)?.[1])
          const cpu = cpuSeconds(server.pid!) - cpu0
          rows.push({
            target: t.id,
            driver: 'libblkio (host)',
            workload: label,
            iops: REQUESTS / secs,
            cpuUsPerReq: (cpu * 1e6) / REQUESTS,
          })
        }
        // The guest's virtio-blk driver on vhost-user-blk-pci (one boot per target).
        const fio = (name: string, rw: string, depth: number): string =>
          `fio --name=${name} --filename=/dev/vda --rw=${rw} --bs=4k --iodepth=${depth} --ioengine=libaio ` +
          `--direct=1 --time_based --runtime=${RUNTIME} --ramp_time=1 --size=${SIZE >> 20}M --output-format=json ` +
          `| grep -E '"iops"' | head -2 | tr -dc '0-9.\\n' | awk 'NF' | sed -n '${rw === 'randwrite' ? 2 : 1}p' | sed 's/^/${name} /'`
        const cpu0 = cpuSeconds(server.pid!)
        const { stdout } = await exec(
          join(ROOT, 'scripts/vm/run'),
          [
            'sh',
            '-c',
            [
              fio('read-qd1', 'randread', 1),
              fio('read-qd16', 'randread', 16),
              fio('write-qd16', 'randwrite', 16),
            ].join(' && '),
          ],
          {
            cwd: ROOT,
            env: {
              ...process.env,
              VDUSE_VM_TIMEOUT: '600',
              VDUSE_VM_QEMU_ARGS: `-chardev socket,id=vub,path=${sock} -device vhost-user-blk-pci,chardev=vub,num-queues=1`,
            },
            maxBuffer: 16 << 20,
          },
        )
        const cpu = cpuSeconds(server.pid!) - cpu0
        const results = Object.fromEntries(
          stdout
            .trim()
            .split('\n')
            .map((l) => l.split(' '))
            .filter((f) => f.length === 2)
            .map(([k, v]) => [k, Number(v)]),
        )
        const total =
          ((results['read-qd1'] ?? 0) + (results['read-qd16'] ?? 0) + (results['write-qd16'] ?? 0)) * RUNTIME
        for (const [key, label] of [
          ['read-qd1', '4k randread QD1'],
          ['read-qd16', '4k randread QD16'],
          ['write-qd16', '4k randwrite QD16'],
        ] as const) {
          rows.push({
            target: t.id,
            driver: 'guest virtio-blk (QEMU 7.2 TCG)',
            workload: label,
            iops: results[key] ?? NaN,
            cpuUsPerReq: total > 0 ? (cpu * 1e6) / total : NaN,
          })
        }
      } finally {
        server.kill('SIGTERM')
        await new Promise((r) => setTimeout(r, 300))
        server.kill('SIGKILL')
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
    rmSync(shm, { recursive: true, force: true })
  }
  // The table: ours beside qsd10 on the same backend, driver and workload.
  const lines = [
    '| backend | driver | workload | vduse IOPS | qsd10 IOPS | vduse/qsd10 | vduse CPU µs/req | qsd10 CPU µs/req |',
    '|---|---|---|---:|---:|---:|---:|---:|',
  ]
  const pairs: Array<[string, string]> = [
    ['vduse-null', 'qsd10-null'],
    ['vduse-memory', 'qsd10-tmpfs'],
    ['vduse-file', 'qsd10-file'],
  ]
  for (const [ours, theirs] of pairs) {
    for (const r of rows.filter((x) => x.target === ours)) {
      const q = rows.find((x) => x.target === theirs && x.driver === r.driver && x.workload === r.workload)
      const backend = targets('').find((t) => t.id === ours)!.backend
      lines.push(
        `| ${backend} | ${r.driver} | ${r.workload} | ${Math.round(r.iops)} | ${q ? Math.round(q.iops) : '-'} | ` +
          `${q ? (r.iops / q.iops).toFixed(2) + '×' : '-'} | ${r.cpuUsPerReq.toFixed(1)} | ${q ? q.cpuUsPerReq.toFixed(1) : '-'} |`,
      )
    }
  }
  const table = lines.join('\n')
  console.log(table)
  const stamp = `${new Date().toISOString().slice(0, 10)}-vhost-user${quick ? '-quick' : ''}`
  mkdirSync(join(ROOT, 'benchmark/results'), { recursive: true })
  writeFileSync(
    join(ROOT, 'benchmark/results', `${stamp}.md`),
    `# vhost-user: vduse blk --vhost-user vs qemu-storage-daemon 10 (${process.env.VDUSE_BENCH_REVISION ?? 'unknown build'})\n\n` +
      `Host: 2 cores; ${REQUESTS} requests per libblkio row; fio ${RUNTIME} s per guest row; one queue.\n\n${table}\n`,
  )
  writeFileSync(join(ROOT, 'benchmark/results', `${stamp}.json`), JSON.stringify(rows, null, 2))
  console.log(`results written to benchmark/results/${stamp}.{md,json}`)
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
