// virtio-fs on the real kernel (Linux 6.15+; the harness boots 7.3 for this file): a MemoryFs served from
// this process, attached to virtio_vdpa and mounted with `mount -t virtiofs`, then driven by real tools —
// a POSIX script compared with tmpfs, fio with verification, tar in and out, dbench — and through its
// lifecycle: unmount/remount, driver unbind/rebind with requests in flight, detach/re-attach, the CLI.
import test from 'ava'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { FsDevice, MemoryFs, kernelSupport, type FileIo, type FsContext } from '../../src'
import { assertInGuest, sh, startCli, until } from './guest'

const run = promisify(execFile)

test.before(() => {
  assertInGuest()
  const k = kernelSupport()
  if (!k.fs) throw new Error(`fs.spec.ts needs Linux 6.15+ (this is ${k.release}): VDUSE_VM_KERNEL=7.3`)
})

let n = 0
async function mounted(fs = new MemoryFs(), extra: { requestQueues?: number } = {}) {
  const name = `vfs${n++}`
  const tag = `tag-${name}`
  const device = await FsDevice.create({ name, tag, fs, replaceStale: true, ...extra })
  const path = await device.attach()
  const mnt = `/tmp/mnt-${name}`
  await sh(`mkdir -p ${mnt} && mount -t virtiofs ${tag} ${mnt}`)
  return { device, fs, tag, path, mnt, name }
}

async function unmountAndClose(m: { device: FsDevice; mnt: string }): Promise<void> {
  await sh(`umount ${m.mnt} 2>/dev/null || umount -l ${m.mnt} 2>/dev/null || true`)
  await m.device.close()
}

test('kernel support is probed: API version 1 offered, GET_FEATURES = QUEUE_READY | SUSPEND', (t) => {
  const k = kernelSupport()
  t.is(k.apiVersion, 1)
  t.is(k.features, 3)
  t.true(k.queueReady && k.suspend && k.fs)
})

test('attach binds the virtiofs driver; the path is the tag; the same POSIX script gives what tmpfs gives', async (t) => {
  const m = await mounted()
  t.is(m.path, m.tag)
  try {
    await sh(`mkdir -p /tmp/ref && mount -t tmpfs tmpfs /tmp/ref`)
    const script = join(__dirname, 'fixtures/posix-script.js')
    const ours = JSON.parse(
      (await run(process.execPath, [script, m.mnt], { maxBuffer: 1 << 24 })).stdout,
    ) as unknown[]
    const ref = JSON.parse(
      (await run(process.execPath, [script, '/tmp/ref'], { maxBuffer: 1 << 24 })).stdout,
    ) as unknown[]
    t.is(ours.length, ref.length)
    for (let i = 0; i < ref.length; i++) t.deepEqual(ours[i], ref[i])
    t.is(ref.length, 64, 'every step ran')
    t.is(m.device.stats.malformed, 0)
  } finally {
    await sh('umount /tmp/ref')
    await unmountAndClose(m)
  }
})

test('fio with verification on files in the mount (buffered and O_DIRECT), and statfs', async (t) => {
  const m = await mounted()
  try {
    for (const direct of [0, 1]) {
      await sh(`fio --name=v${direct} --directory=${m.mnt} --size=24M --rw=randwrite --bs=4k --iodepth=16 \
        --ioengine=libaio --direct=${direct} --numjobs=2 --verify=crc32c --verify_state_save=0 --do_verify=1 \
        --verify_fatal=1 --group_reporting --output-format=terse >/dev/null`)
    }
    await sh(`fio --name=seq --directory=${m.mnt} --size=32M --rw=write --bs=1M --ioengine=psync --verify=md5 \
      --verify_state_save=0 --do_verify=1 --verify_fatal=1 --output-format=terse >/dev/null`)
    const df = await sh(`df -B1 --output=size ${m.mnt} | tail -1`)
    t.is(Number(df.trim()), 1 << 30, 'statfs reports MemoryFs capacity')
    t.pass()
  } finally {
    await unmountAndClose(m)
  }
})

test('tar of a real tree in and out compares equal; dbench runs clean; unmount and remount keep the data', async (t) => {
  const m = await mounted()
  try {
    const src = join(__dirname, '../../node_modules')
    await sh(
      `tar -C ${src} -cf - typescript/lib/lib.d.ts typescript/package.json lodash tar | tar -C ${m.mnt} -xf -`,
    )
    await sh(
      `cd ${src} && for d in lodash tar; do diff -r $d ${m.mnt}/$d; done && cmp typescript/lib/lib.d.ts ${m.mnt}/typescript/lib/lib.d.ts`,
    )
    await sh(
      `mkdir -p /tmp/out && tar -C ${m.mnt} -cf - lodash | tar -C /tmp/out -xf - && diff -r ${src}/lodash /tmp/out/lodash`,
    )
    const files = Number((await sh(`find ${m.mnt}/lodash -type f | wc -l`)).trim())
    t.true(files > 500, `${files} files`)
    await sh(
      `mkdir -p ${m.mnt}/dbench && dbench -D ${m.mnt}/dbench -t 5 -c /usr/share/dbench/client.txt 2 >/tmp/dbench.log 2>&1 || (cat /tmp/dbench.log; exit 1)`,
    )
    const dbench = await sh('tail -3 /tmp/dbench.log')
    t.regex(dbench, /Throughput/)
    const before = await sh(`cd ${m.mnt} && find lodash -type f | sort | xargs sha256sum | sha256sum`)
    await sh(`umount ${m.mnt}`)
    const sessions = m.device.stats.sessions
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt}`)
    t.is(m.device.stats.sessions, sessions + 1, 'a remount is a new FUSE session')
    const after = await sh(`cd ${m.mnt} && find lodash -type f | sort | xargs sha256sum | sha256sum`)
    t.is(after, before)
    t.is(m.device.stats.malformed, 0)
  } finally {
    await unmountAndClose(m)
  }
})

test('driver unbind/rebind with writes in flight: answered once or fenced, then a fresh session sees the data', async (t) => {
  const fs = new MemoryFs()
  const inner = fs.write.bind(fs)
  let delayMs = 0
  let inCalls = 0
  // Writes that wait: the unbind finds requests in the model.
  fs.write = ((ino: number, io: FileIo, handle: Parameters<MemoryFs['write']>[2], ctx?: FsContext) => {
    if (delayMs === 0) return inner(ino, io, handle)
    inCalls++
    return new Promise<number>((resolve) =>
      setTimeout(() => resolve(inner(ino, io, handle)), delayMs),
    ).finally(() => inCalls--) as unknown as number
    void ctx
  }) as MemoryFs['write']
  const m = await mounted(fs)
  try {
    await sh(`head -c 3M /dev/urandom > /tmp/keep && cp /tmp/keep ${m.mnt}/keep && sync`)
    delayMs = 300
    const writer = sh(`dd if=/dev/zero of=${m.mnt}/inflight bs=64k count=64 oflag=direct 2>&1 || true`)
    await until('writes in the model', () => inCalls > 0)
    const counters = m.device.counters()
    await sh(`echo ${m.name} > /sys/bus/vdpa/drivers/virtio_vdpa/unbind`)
    delayMs = 0
    await writer
    await sh(`umount -l ${m.mnt} 2>/dev/null || true`)
    const after = m.device.counters()
    t.is(after.staleCompletions, counters.staleCompletions, 'no request answered twice')
    await sh(`echo ${m.name} > /sys/bus/vdpa/drivers/virtio_vdpa/bind`)
    await until('the tag again', async () =>
      (await sh('cat /sys/fs/virtiofs/*/tag 2>/dev/null || true')).includes(m.tag),
    )
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt} && cmp /tmp/keep ${m.mnt}/keep`)
    t.is(m.device.stats.malformed, 0)
    // Detach and re-attach the live device: still the same data.
    await sh(`umount ${m.mnt}`)
    await m.device.detach()
    await m.device.attach()
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt} && cmp /tmp/keep ${m.mnt}/keep`)
  } finally {
    await unmountAndClose(m)
  }
})

test('attached to vhost-vdpa instead (for a VM): the node appears; detached, it is gone', async (t) => {
  const device = await FsDevice.create({
    name: 'vfs-vhost',
    tag: 'vm-share',
    fs: new MemoryFs(),
    replaceStale: true,
  })
  try {
    const path = await device.attach({ driver: 'vhost' })
    t.regex(path, /^\/dev\/vhost-vdpa-\d+$/)
    await sh(`test -c ${path}`)
    await device.detach()
    t.false(device.attached)
  } finally {
    await device.close()
  }
})

test('two request queues serve parallel writers', async (t) => {
  const m = await mounted(new MemoryFs(), { requestQueues: 2 })
  try {
    await sh(`fio --name=mq --directory=${m.mnt} --size=8M --rw=randrw --bs=16k --ioengine=psync --numjobs=4 \
      --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 --group_reporting --output-format=terse >/dev/null`)
    t.pass()
  } finally {
    await unmountAndClose(m)
  }
})

test('vduse fs: ready with the tag as path, a handover refused, stats, a clean stop', async (t) => {
  const cli = startCli([
    'fs',
    '--name',
    'clifs',
    '--tag',
    'clitag',
    '--memory',
    '--size',
    '64M',
    '--json',
    '--replace',
  ])
  try {
    const ready = await cli.next('ready')
    t.is(ready.path, 'clitag')
    await sh('mkdir -p /tmp/clifs && mount -t virtiofs clitag /tmp/clifs && echo data > /tmp/clifs/f')
    const session = await cli.next('session')
    t.is(session.major, 7)
    cli.child.kill('SIGUSR2')
    const refused = await cli.next('handover-refused')
    t.is(refused.code, 'ERR_VDUSE_NOT_RECOVERABLE')
    t.is((await sh('cat /tmp/clifs/f')).trim(), 'data', 'still serving')
    cli.child.kill('SIGUSR1')
    const stats = await cli.next('stats')
    t.true((stats.stats as { requests: number }).requests > 0)
    await sh('umount /tmp/clifs')
    cli.child.kill('SIGTERM')
    t.is(await cli.exit, 0)
    t.truthy(cli.events.find((e) => e.event === 'stopped'))
    t.false((await sh('ls /sys/bus/vdpa/devices')).includes('clifs'))
  } finally {
    // Unmounted while the server still serves: a mount whose server died would hang whoever syncs it.
    await sh('umount /tmp/clifs 2>/dev/null || true')
    cli.child.kill('SIGKILL')
  }
})
