// Runs inside the test guest for benchmark/fs-bench.ts: mounts every virtio-fs target (and 9p) and runs
// the same workloads on each — fio 4k random read and write at QD16 and 128k sequential on a 256 MiB file
// (O_DIRECT: the server, not the guest's page cache, is measured), 10,000 files created, stat-ed and
// removed, and a tar extract. Prints one `FSB {json}` line per number. Asserts nothing.
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { createInterface } from 'node:readline'
import { join } from 'node:path'
import { promisify } from 'node:util'

const exec = promisify(execFile)
const ROOT = join(__dirname, '..')
const RUNTIME = Number(process.env.VDUSE_BENCH_RUNTIME ?? 5)
const FILES = 10_000
/** VDUSE_FSB_WORKLOADS=data,meta,tar: which groups to run (default all). */
const GROUPS = (process.env.VDUSE_FSB_WORKLOADS ?? 'data,meta,tar').split(',')

async function sh(script: string): Promise<string> {
  const { stdout } = await exec('sh', ['-ec', script], { maxBuffer: 64 << 20 })
  return stdout
}

interface Mount {
  target: string
  tag: string
  mnt: string
  server?: ChildProcess
}

/** Starts `vduse fs` in this guest (VDUSE) and waits for it to be ready. */
async function vduseFs(args: string[]): Promise<ChildProcess> {
  const child = spawn(
    process.execPath,
    [join(ROOT, 'dist/cli/main.js'), 'fs', ...args, '--json', '--replace'],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  )
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (l) => {
      if (l.includes('"event":"ready"')) resolve()
      if (l.includes('"event":"error"')) reject(new Error(l))
    })
    child.on('exit', (code) => reject(new Error(`vduse fs exited (${code})`)))
  })
  return child
}

function emit(target: string, workload: string, value: number, unit: string): void {
  console.log(`FSB ${JSON.stringify({ target, workload, value, unit })}`)
}

async function fio(m: Mount, name: string, rw: string, bs: string, depth: number): Promise<number> {
  const out = await sh(
    `fio --name=${name} --filename=${m.mnt}/bench.dat --rw=${rw} --bs=${bs} --iodepth=${depth} --ioengine=libaio \
     --direct=1 --time_based --runtime=${RUNTIME} --ramp_time=1 --size=256M --output-format=json 2>/dev/null`,
  )
  const job = (JSON.parse(out) as { jobs: Array<{ read: { iops: number }; write: { iops: number } }> })
    .jobs[0]!
  return rw.includes('write') ? job.write.iops : job.read.iops
}

async function workloads(m: Mount): Promise<void> {
  if (GROUPS.includes('data')) await data(m)
  if (GROUPS.includes('meta')) await meta(m)
  if (GROUPS.includes('tar')) await tar(m)
}

async function data(m: Mount): Promise<void> {
  await sh(`fio --name=prep --filename=${m.mnt}/bench.dat --size=256M --rw=write --bs=1M --ioengine=psync \
    --end_fsync=1 --output-format=terse >/dev/null`)
  emit(m.target, '4k randread QD16', await fio(m, 'rr', 'randread', '4k', 16), 'IOPS')
  emit(m.target, '4k randwrite QD16', await fio(m, 'rw', 'randwrite', '4k', 16), 'IOPS')
  const mib = (iops: number): number => (iops * 128) / 1024
  emit(m.target, '128k read QD4', mib(await fio(m, 'sr', 'read', '128k', 4)), 'MiB/s')
  emit(m.target, '128k write QD4', mib(await fio(m, 'sw', 'write', '128k', 4)), 'MiB/s')
  await sh(`rm -f ${m.mnt}/bench.dat`)
}

async function meta(m: Mount): Promise<void> {
  // Metadata: 10,000 files created, stat-ed and removed, from one process (no fork per file).
  const meta = await exec(process.execPath, [
    '-e',
    `const fs = require('fs'); const d = process.argv[1]; fs.mkdirSync(d);
     const t = process.hrtime.bigint();
     for (let i = 0; i < ${FILES}; i++) fs.writeFileSync(d + '/f' + i, '');
     for (let i = 0; i < ${FILES}; i++) fs.statSync(d + '/f' + i);
     for (let i = 0; i < ${FILES}; i++) fs.unlinkSync(d + '/f' + i);
     console.log(Number(process.hrtime.bigint() - t) / 1e9); fs.rmdirSync(d)`,
    `${m.mnt}/meta`,
  ])
  emit(m.target, `create+stat+unlink ${FILES} files`, (3 * FILES) / Number(meta.stdout.trim()), 'ops/s')
}

async function tar(m: Mount): Promise<void> {
  const t0 = process.hrtime.bigint()
  await sh(`mkdir ${m.mnt}/tree && tar -C ${m.mnt}/tree -xf /tmp/fsb-tree.tar && sync`)
  emit(m.target, 'tar extract (/usr/include/linux)', Number(process.hrtime.bigint() - t0) / 1e9, 's')
  await sh(`rm -rf ${m.mnt}/tree`)
}

async function main(): Promise<void> {
  const mounts: Mount[] = []
  const tags = (process.env.VDUSE_FSB_TAGS ?? '').split(',').filter(Boolean)
  await sh(`modprobe -d "$VDUSE_VM_MODROOT" virtiofs 2>/dev/null || true`)
  await sh('tar -C /usr/include/linux -cf /tmp/fsb-tree.tar .')
  for (const tag of tags) mounts.push({ target: tag, tag, mnt: `/tmp/fsb/${tag}` })
  // In this guest, through VDUSE: the same directory sharing (on the guest's tmpfs), and MemoryFs.
  if (process.env.VDUSE_FSB_VDUSE !== '0') {
    await sh('mkdir -p /tmp/fsb-share && rm -rf /tmp/fsb-share/*')
    mounts.push({
      target: 'vduse-vduse',
      tag: 'vduse-vduse',
      mnt: '/tmp/fsb/vduse-vduse',
      server: await vduseFs(['--name', 'fsbshare', '--tag', 'vduse-vduse', '--shared-dir', '/tmp/fsb-share']),
    })
    mounts.push({
      target: 'memoryfs-vduse',
      tag: 'memoryfs-vduse',
      mnt: '/tmp/fsb/memoryfs-vduse',
      server: await vduseFs(['--name', 'fsbmem', '--tag', 'memoryfs-vduse', '--memory', '--size', '1G']),
    })
  }
  for (const m of mounts) {
    const type =
      m.tag === 'bench9p' ? '9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none' : 'virtiofs'
    await sh(`mkdir -p ${m.mnt} && mount -t ${type} ${m.tag} ${m.mnt}`)
  }
  for (const m of mounts) {
    try {
      await workloads(m)
    } catch (err) {
      console.error(`${m.target}: ${(err as Error).message.split('\n')[0]}`)
    }
  }
  for (const m of mounts) {
    await sh(`umount ${m.mnt} || umount -l ${m.mnt} || true`)
    m.server?.kill('SIGTERM')
  }
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
