// A host directory shared natively (`sharedDir`, `vduse fs --shared-dir`) on the real kernel (Linux 7.3):
// attached to virtio_vdpa and mounted with `mount -t virtiofs`, then driven by real tools — the POSIX
// script against the same operations done directly on the directory, escapes through the mount while the
// host side races renames, fio with verification, tar in and out, dbench — and through its lifecycle:
// unmount/remount, driver unbind/rebind with writes in flight, 10,000 files with no fd left behind, the CLI.
import test from 'ava'
import { execFile } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { FsDevice, kernelSupport } from '../../src'
import { assertInGuest, sh, startCli, until } from './guest'

const run = promisify(execFile)

test.before(() => {
  assertInGuest()
  const k = kernelSupport()
  if (!k.fs)
    throw new Error(`fs-shared.spec.ts needs Linux 6.15+ (this is ${k.release}): VDUSE_VM_KERNEL=7.3`)
})

let n = 0
type Extra = Partial<Parameters<typeof FsDevice.create>[0]>
/** A fresh directory (on the guest's tmpfs) shared and mounted. */
async function shared(extra: Extra = {}) {
  const name = `share${n++}`
  const tag = `tag-${name}`
  const dir = `/tmp/${name}/inner`
  await sh(`rm -rf /tmp/${name} && mkdir -p ${dir}`)
  const device = await FsDevice.create({ name, tag, sharedDir: dir, replaceStale: true, ...extra })
  await device.attach()
  const mnt = `/tmp/mnt-${name}/at`
  await sh(`mkdir -p ${mnt} && mount -t virtiofs ${tag} ${mnt}`)
  return { device, tag, dir, mnt, name }
}

async function unmountAndClose(m: { device: FsDevice; mnt: string }): Promise<void> {
  await sh(`umount ${m.mnt} 2>/dev/null || umount -l ${m.mnt} 2>/dev/null || true`)
  await m.device.close()
}

/** Type, mode, size, links and content hash of every entry under `dir` (not inode numbers or times). */
async function tree(dir: string): Promise<string> {
  return sh(
    `cd ${dir} && find . -printf '%y %m %s %n %U %G %p %l\\n' | sort && find . -type f -print0 | sort -z | xargs -0 -r sha256sum`,
  )
}

test('the POSIX script gives what the same operations give on the directory itself; both sides see one tree', async (t) => {
  const m = await shared()
  try {
    const script = join(__dirname, 'fixtures/posix-script.js')
    await sh(`mkdir -p /tmp/direct-ref && rm -rf /tmp/direct-ref/* && mount -t tmpfs tmpfs /tmp/direct-ref`)
    const ours = JSON.parse(
      (await run(process.execPath, [script, m.mnt], { maxBuffer: 1 << 24 })).stdout,
    ) as unknown[]
    const ref = JSON.parse(
      (await run(process.execPath, [script, '/tmp/direct-ref'], { maxBuffer: 1 << 24 })).stdout,
    ) as unknown[]
    t.is(ref.length, 64, 'every step ran')
    t.is(ours.length, ref.length)
    for (let i = 0; i < ref.length; i++) t.deepEqual(ours[i], ref[i], JSON.stringify(ref[i]))
    // What the driver left is what the directory holds, seen from either side.
    t.is(await tree(m.mnt), await tree(m.dir))
    // Changed on the host, seen through the mount (cache auto: within its 1 s).
    await sh(`echo host > ${m.dir}/from-host && mkdir ${m.dir}/host-dir`)
    await until('host changes visible', async () =>
      (await sh(`cat ${m.mnt}/from-host 2>/dev/null || true`)).includes('host'),
    )
    const s = m.device.stats
    t.is(s.malformed, 0)
    t.true(s.requests > 100)
    t.is(m.device.counters().jsCalls, 0, 'no request reached JavaScript')
  } finally {
    await sh('umount /tmp/direct-ref 2>/dev/null || true')
    await unmountAndClose(m)
  }
})

test('no escape through the mount: symlinks are not followed by the server, even while the host races renames', async (t) => {
  const m = await shared({ cache: 'never' })
  // Outside the share, next to it: what a server following "../" or a symlink would reach.
  const marker = `OUTSIDE-${Date.now()}`
  try {
    await sh(
      `echo ${marker} > /tmp/${m.name}/secret && mkdir -p ${m.dir}/a/b && echo inside > ${m.dir}/a/b/file`,
    )
    await sh(`ln -s ../secret ${m.dir}/esc && ln -s / ${m.dir}/root && ln -s .. ${m.dir}/up`)
    // Read through the mount, a symlink is resolved by the reader's kernel against the mount's path:
    // `mnt/esc` → `mnt/../secret`, which does not exist there. The server never resolves it itself.
    t.is((await sh(`cat ${m.mnt}/esc 2>&1 || echo failed`)).trim().split('\n').pop(), 'failed')
    t.is((await sh(`readlink ${m.mnt}/esc`)).trim(), '../secret')
    t.is((await sh(`grep -rl ${marker} ${m.mnt} 2>/dev/null || true`)).trim(), '')
    // The host side swaps a directory with a symlink to outside, over and over, while the mount is walked.
    const racer = sh(`end=$(($(date +%s)+8)); while [ $(date +%s) -lt $end ]; do
        mv ${m.dir}/a/b ${m.dir}/a/tmp 2>/dev/null; ln -s ../../.. ${m.dir}/a/b 2>/dev/null
        rm -f ${m.dir}/a/b; mv ${m.dir}/a/tmp ${m.dir}/a/b 2>/dev/null; done`)
    let walks = 0
    let found = ''
    for (let i = 0; i < 40; i++) {
      found += await sh(`grep -rl ${marker} ${m.mnt} 2>/dev/null || true`)
      found += await sh(`find ${m.mnt} -name secret 2>/dev/null || true`)
      await sh(`cat ${m.mnt}/a/b/file 2>/dev/null || true`)
      walks++
    }
    await racer
    t.is(found.trim(), '', 'nothing outside the share was reached')
    t.true(walks === 40)
    // Names the guest can send but the server refuses: none of these resolves to anything outside.
    t.is((await sh(`ls ${m.mnt}/up/ 2>&1 | grep -c secret || true`)).trim(), '0')
    t.is(m.device.stats.malformed, 0)
  } finally {
    await unmountAndClose(m)
  }
})

test('fio with verification (buffered and O_DIRECT), tar in and out compares equal, dbench runs clean, remount keeps the data', async (t) => {
  const m = await shared({ requestQueues: 2 })
  try {
    for (const direct of [0, 1]) {
      await sh(`fio --name=v${direct} --directory=${m.mnt} --size=24M --rw=randwrite --bs=4k --iodepth=16 \
        --ioengine=libaio --direct=${direct} --numjobs=2 --verify=crc32c --verify_state_save=0 --do_verify=1 \
        --verify_fatal=1 --group_reporting --output-format=terse >/dev/null`)
    }
    await sh(`fio --name=seq --directory=${m.mnt} --size=32M --rw=write --bs=1M --ioengine=psync --verify=md5 \
      --verify_state_save=0 --do_verify=1 --verify_fatal=1 --output-format=terse >/dev/null`)
    const src = join(__dirname, '../../node_modules')
    await sh(`tar -C ${src} -cf - typescript/package.json lodash tar | tar -C ${m.mnt} -xf -`)
    await sh(`cd ${src} && for d in lodash tar; do diff -r $d ${m.mnt}/$d; diff -r $d ${m.dir}/$d; done`)
    await sh(
      `rm -rf /tmp/out-${m.name} && mkdir -p /tmp/out-${m.name} && tar -C ${m.mnt} -cf - lodash | tar -C /tmp/out-${m.name} -xf - && diff -r ${src}/lodash /tmp/out-${m.name}/lodash`,
    )
    await sh(
      `mkdir -p ${m.mnt}/dbench && dbench -D ${m.mnt}/dbench -t 5 -c /usr/share/dbench/client.txt 2 >/tmp/dbench-shared.log 2>&1 || (cat /tmp/dbench-shared.log; exit 1)`,
    )
    t.regex(await sh('tail -3 /tmp/dbench-shared.log'), /Throughput/)
    const before = await sh(`cd ${m.mnt} && find lodash -type f | sort | xargs sha256sum | sha256sum`)
    const sessions = m.device.stats.sessions
    await sh(`umount ${m.mnt} && mount -t virtiofs ${m.tag} ${m.mnt}`)
    t.is(m.device.stats.sessions, sessions + 1, 'a remount is a new FUSE session')
    t.is(await sh(`cd ${m.mnt} && find lodash -type f | sort | xargs sha256sum | sha256sum`), before)
    t.is(m.device.stats.malformed, 0)
    t.true((m.device.stats.bytesWritten ?? 0) > 50 << 20)
  } finally {
    await unmountAndClose(m)
  }
})

test('10,000 files created, stat-ed and removed: after the unmount every fd is closed again', async (t) => {
  const fds = (): number => readdirSync('/proc/self/fd').length
  const m = await shared()
  try {
    const start = fds()
    await sh(`cd ${m.mnt} && mkdir many && cd many && seq 1 10000 | xargs touch && ls -l | wc -l >/dev/null`)
    t.is(Number((await sh(`ls ${m.dir}/many | wc -l`)).trim()), 10000)
    t.true(m.device.stats.nodes >= 10000, `${m.device.stats.nodes} nodes known`)
    await sh(`cd ${m.mnt}/many && find . -type f -delete && cd / && rmdir ${m.mnt}/many`)
    await sh(`umount ${m.mnt}`)
    await until('the session ended', () => m.device.stats.nodes === 0 && m.device.stats.handles === 0)
    // Not above where it started (other parts of this process may have closed some meanwhile).
    t.true(fds() <= start, `no fd kept: ${fds()} open, ${start} at the start`)
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt}`)
  } finally {
    await unmountAndClose(m)
  }
})

test('driver unbind/rebind with writes in flight: answered once or fenced, then a fresh session sees the data', async (t) => {
  const m = await shared()
  try {
    await sh(`head -c 3M /dev/urandom > /tmp/keep-shared && cp /tmp/keep-shared ${m.mnt}/keep && sync`)
    const writer = sh(`dd if=/dev/zero of=${m.mnt}/inflight bs=1M count=256 oflag=direct 2>&1 || true`)
    await until('writes under way', () => (m.device.stats.bytesWritten ?? 0) > 8 << 20)
    const counters = m.device.counters()
    await sh(`echo ${m.name} > /sys/bus/vdpa/drivers/virtio_vdpa/unbind`)
    await writer
    await sh(`umount -l ${m.mnt} 2>/dev/null || true`)
    t.is(m.device.counters().staleCompletions, counters.staleCompletions, 'no request answered twice')
    await sh(`echo ${m.name} > /sys/bus/vdpa/drivers/virtio_vdpa/bind`)
    await until('the tag again', async () =>
      (await sh('cat /sys/fs/virtiofs/*/tag 2>/dev/null || true')).includes(m.tag),
    )
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt} && cmp /tmp/keep-shared ${m.mnt}/keep`)
    t.is(m.device.stats.malformed, 0)
    await sh(`umount ${m.mnt}`)
    await m.device.detach()
    await m.device.attach()
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt} && cmp /tmp/keep-shared ${m.mnt}/keep`)
  } finally {
    await unmountAndClose(m)
  }
})

test('a write by a user without CAP_FSETID clears setuid on the host (the server does it: HANDLE_KILLPRIV_V2)', async (t) => {
  const m = await shared()
  try {
    const mode = async (): Promise<string> => (await sh(`stat -c %a ${m.dir}/s`)).trim()
    await sh(`echo x > ${m.mnt}/s && chmod 6777 ${m.mnt}/s`)
    t.is(await mode(), '6777')
    await sh(`echo root >> ${m.mnt}/s`)
    t.is(await mode(), '6777', 'root keeps them')
    await sh(`setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo nobody >> ${m.mnt}/s'`)
    t.is(await mode(), '777', 'a plain user writing loses setuid and setgid')
    await sh(
      `chmod 4777 ${m.mnt}/s && setpriv --reuid=65534 --regid=65534 --clear-groups truncate -s 1 ${m.mnt}/s`,
    )
    t.is(await mode(), '777', 'and truncating')
    t.is((await sh(`cat ${m.dir}/s`)).trim(), 'x')
  } finally {
    await unmountAndClose(m)
  }
})

test('read-only: every change fails with EROFS and the directory is untouched', async (t) => {
  const m = await shared({ readOnly: true })
  try {
    await sh(`echo data > ${m.dir}/f`)
    t.is((await sh(`cat ${m.mnt}/f`)).trim(), 'data')
    for (const cmd of [`echo x > ${m.mnt}/f`, `touch ${m.mnt}/g`, `mkdir ${m.mnt}/d`, `rm ${m.mnt}/f`]) {
      t.regex(await sh(`(${cmd}) 2>&1 || true`), /Read-only file system/, cmd)
    }
    t.is((await sh(`ls ${m.dir}`)).trim(), 'f')
  } finally {
    await unmountAndClose(m)
  }
})

test('vduse fs --shared-dir: ready, data both ways, stats, a clean stop', async (t) => {
  await sh('rm -rf /tmp/cli-share && mkdir -p /tmp/cli-share && echo host > /tmp/cli-share/h')
  const cli = startCli([
    'fs',
    '--name',
    'clishare',
    '--tag',
    'clishare',
    '--shared-dir',
    '/tmp/cli-share',
    '--cache',
    'always',
    '--readonly',
    '--json',
    '--replace',
  ])
  try {
    const ready = await cli.next('ready')
    t.is(ready.path, 'clishare')
    await sh('mkdir -p /tmp/clishare && mount -t virtiofs clishare /tmp/clishare')
    t.is((await sh('cat /tmp/clishare/h')).trim(), 'host')
    t.regex(await sh('(touch /tmp/clishare/x) 2>&1 || true'), /Read-only/)
    cli.child.kill('SIGUSR1')
    const stats = await cli.next('stats')
    t.true((stats.stats as { requests: number }).requests > 0)
    await sh('umount /tmp/clishare')
    cli.child.kill('SIGTERM')
    t.is(await cli.exit, 0)
    t.truthy(cli.events.find((e) => e.event === 'stopped'))
  } finally {
    await sh('umount /tmp/clishare 2>/dev/null || true')
    cli.child.kill('SIGKILL')
  }
})
