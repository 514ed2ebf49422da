// A TypeScript file system (MemoryFs) with a host directory mounted in its tree (`PassthroughMount`,
// `vduse fs --memory --mount`), on the real kernel (Linux 7.3): the driver mounts the directory as a
// submount (its own st_dev); the POSIX script gives the same in either tree as on tmpfs; a move across is
// a copy (EXDEV), a hard link across fails; I/O under the mount never reaches JavaScript; and the
// lifecycle — unmount/remount with no fd left behind, driver unbind/rebind with writes in flight under
// the mount, the CLI.
import test from 'ava'
import { execFile } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { FsDevice, MemoryFs, PassthroughMount, kernelSupport, type DirEntry } from '../../src'
import { assertInGuest, sh, startCli, until } from './guest'

const run = promisify(execFile)

test.before(() => {
  assertInGuest()
  const k = kernelSupport()
  if (!k.fs) throw new Error(`fs-mount.spec.ts needs Linux 6.15+ (this is ${k.release}): VDUSE_VM_KERNEL=7.3`)
})

let n = 0

/**
 * MemoryFs whose listings carry attributes for every entry, the mount point's included (as a file system
 * written without the mount in mind would): the device must still name no node there.
 */
class EagerFs extends MemoryFs {
  override *readdir(ino: number, offset: number): Generator<DirEntry> {
    for (const e of super.readdir(ino, offset)) {
      yield e.name === '.' || e.name === '..' ? e : { ...e, attr: this.getattr(e.ino) }
    }
  }
}

/** A MemoryFs with a fresh host directory (on the guest's tmpfs) mounted at /data, served and mounted. */
async function mounted(extra: Partial<Parameters<typeof FsDevice.create>[0]> = {}) {
  const name = `fsmount${n++}`
  const tag = `tag-${name}`
  const dir = `/tmp/${name}/host`
  await sh(`rm -rf /tmp/${name} && mkdir -p ${dir} && echo from-host > ${dir}/hello`)
  const memfs = new EagerFs()
  // Without lseek(): the device answers SEEK_DATA/SEEK_HOLE itself (an ENOSYS would turn them off for
  // the mounts too).
  Object.defineProperty(memfs, 'lseek', { value: undefined })
  memfs.mount('/data', new PassthroughMount({ dir }))
  const device = await FsDevice.create({ name, tag, fs: memfs, replaceStale: true, ...extra })
  await device.attach()
  const mnt = `/tmp/mnt-${name}`
  await sh(`mkdir -p ${mnt} && mount -t virtiofs ${tag} ${mnt}`)
  return { device, tag, dir, mnt, name, memfs }
}

async function unmountAndClose(m: { device: FsDevice; mnt: string }): Promise<void> {
  await sh(`umount -R ${m.mnt} 2>/dev/null || umount -l ${m.mnt} 2>/dev/null || true`)
  await m.device.close()
}

test('the host directory is a submount of the TypeScript tree: each serves its part, nothing crosses, its I/O never reaches JavaScript', async (t) => {
  const m = await mounted({ requestQueues: 2 })
  try {
    // Listed with attributes first (READDIRPLUS), then looked up: the mount is there all the same.
    t.regex(await sh(`ls -la ${m.mnt}`), / data\n/)
    t.is((await sh(`cat ${m.mnt}/data/hello`)).trim(), 'from-host')
    const [top, data] = (await sh(`stat -c %d ${m.mnt} ${m.mnt}/data`)).trim().split('\n')
    t.not(top, data, 'a superblock of its own')
    t.regex(await sh(`grep ' ${m.mnt}/data ' /proc/self/mountinfo`), /virtiofs/)
    t.is((await sh(`ls ${m.mnt}`)).trim(), 'data')

    // The POSIX script in the TypeScript tree, in the mounted directory, and on tmpfs: all the same.
    const script = join(__dirname, 'fixtures/posix-script.js')
    await sh(
      `mkdir -p /tmp/ref-${m.name} ${m.mnt}/ts ${m.mnt}/data/native && mount -t tmpfs tmpfs /tmp/ref-${m.name}`,
    )
    const steps = async (dir: string): Promise<unknown[]> =>
      JSON.parse((await run(process.execPath, [script, dir], { maxBuffer: 1 << 24 })).stdout) as unknown[]
    const ref = await steps(`/tmp/ref-${m.name}`)
    t.is(ref.length, 64, 'every step ran')
    for (const dir of [`${m.mnt}/ts`, `${m.mnt}/data/native`]) {
      const ours = await steps(dir)
      t.is(ours.length, ref.length)
      for (let i = 0; i < ref.length; i++) t.deepEqual(ours[i], ref[i], `${dir}: ${JSON.stringify(ref[i])}`)
    }
    t.true(m.memfs.nodeCount > 10, 'the script ran in MemoryFs')
    t.is(
      (await sh(`find ${m.dir}/native | wc -l`)).trim(),
      (await sh(`find /tmp/ref-${m.name} | wc -l`)).trim(),
    )

    // Across the two trees: a move is a copy and a delete (EXDEV underneath), a hard link fails.
    await sh(
      `echo ts-data > ${m.mnt}/x && mv ${m.mnt}/x ${m.mnt}/data/x && mv ${m.mnt}/data/hello ${m.mnt}/hello`,
    )
    t.is((await sh(`cat ${m.dir}/x`)).trim(), 'ts-data')
    t.is((await sh(`cat ${m.mnt}/hello; ls ${m.dir}`)).trim(), 'from-host\nnative\nx')
    t.regex(await sh(`ln ${m.mnt}/data/x ${m.mnt}/l 2>&1 || true`), /cross-device/i)
    t.regex(await sh(`rmdir ${m.mnt}/data 2>&1 || true`), /busy/i)

    // Data under the mount: served natively, JavaScript not called for it.
    const jsBefore = m.device.stats.requests
    const nativeBefore = m.device.mountStats[0]!.requests
    await sh(`fio --name=v --directory=${m.mnt}/data --size=16M --rw=randwrite --bs=4k --iodepth=16 \
      --ioengine=libaio --direct=1 --numjobs=2 --verify=crc32c --verify_state_save=0 --do_verify=1 \
      --verify_fatal=1 --group_reporting --output-format=terse >/dev/null`)
    await sh(
      `dd if=/dev/urandom of=${m.mnt}/data/big bs=1M count=16 conv=fsync 2>/dev/null && cmp ${m.mnt}/data/big ${m.dir}/big`,
    )
    const js = m.device.stats.requests - jsBefore
    const native = m.device.mountStats[0]!.requests - nativeBefore
    t.true(native > 1000, `${native} requests served natively`)
    // Per I/O, none: what reaches JavaScript is the walk above the mount (its names expire each second).
    t.true(js * 200 < native, `${js} requests reached JavaScript against ${native} served natively`)
    // SEEK_HOLE in the TypeScript tree (no lseek there), then in a sparse file of the mount: its hole is
    // still found (after an ENOSYS the driver would take the whole file for data).
    const seek = (f: string, whence: number): Promise<string> =>
      sh(`python3 -c "import os; fd = os.open('${f}', os.O_RDONLY); print(os.lseek(fd, 0, ${whence}))"`)
    await sh(`head -c 4096 /dev/urandom > ${m.mnt}/ts-file && truncate -s 1M ${m.mnt}/ts-file`)
    t.is((await seek(`${m.mnt}/ts-file`, 4)).trim(), String(1 << 20), 'SEEK_HOLE: the whole file is data')
    await sh(`head -c 4096 /dev/urandom > ${m.dir}/sparse && truncate -s 1M ${m.dir}/sparse`)
    t.is((await seek(`${m.mnt}/data/sparse`, 4)).trim(), '4096', 'the mount still finds its holes')
    // syncfs of the TypeScript tree (nothing to sync there) does not turn it off for the mount.
    await sh(`sync -f ${m.mnt}`)
    const synced = m.device.mountStats[0]!.syncs ?? 0
    await sh(`sync -f ${m.mnt}/data`)
    t.true((m.device.mountStats[0]!.syncs ?? 0) > synced, 'SYNCFS reached the mount')
    t.is(m.device.stats.malformed, 0)
    t.is(m.device.mountStats[0]!.malformed, 0)
  } finally {
    await sh(`umount /tmp/ref-${m.name} 2>/dev/null || true`)
    await unmountAndClose(m)
  }
})

test('unmount and remount: both trees keep their data, the mount closes every fd; driver unbind/rebind with writes in flight under the mount', async (t) => {
  const fds = (): number => readdirSync('/proc/self/fd').length
  const m = await mounted()
  try {
    const start = fds()
    await sh(
      `echo kept > ${m.mnt}/top && cd ${m.mnt}/data && mkdir many && cd many && seq 1 2000 | xargs touch && ls -l | wc -l >/dev/null`,
    )
    t.true(m.device.mountStats[0]!.nodes >= 2000)
    const sessions = m.device.mountStats[0]!.sessions
    await sh(`umount -R ${m.mnt}`)
    await until('the mount forgot its nodes', () => m.device.mountStats[0]!.nodes === 0)
    t.true(fds() <= start, `no fd kept: ${fds()} open, ${start} at the start`)
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt}`)
    t.is((await sh(`cat ${m.mnt}/top; ls ${m.mnt}/data/many | wc -l`)).trim(), 'kept\n2000')
    t.is(m.device.mountStats[0]!.sessions, sessions + 1, 'the remount is a new session for the mount too')

    await sh(
      `head -c 3M /dev/urandom > /tmp/keep-${m.name} && cp /tmp/keep-${m.name} ${m.mnt}/data/keep && sync`,
    )
    const writer = sh(`dd if=/dev/zero of=${m.mnt}/data/inflight bs=1M count=256 oflag=direct 2>&1 || true`)
    await until('writes under way', () => (m.device.mountStats[0]!.bytesWritten ?? 0) > 8 << 20)
    const counters = m.device.counters()
    await sh(`echo ${m.name} > /sys/bus/vdpa/drivers/virtio_vdpa/unbind`)
    await writer
    await sh(`umount -R -l ${m.mnt} 2>/dev/null || true`)
    t.is(m.device.counters().staleCompletions, counters.staleCompletions, 'no request answered twice')
    await sh(`echo ${m.name} > /sys/bus/vdpa/drivers/virtio_vdpa/bind`)
    await until('the tag again', async () =>
      (await sh('cat /sys/fs/virtiofs/*/tag 2>/dev/null || true')).includes(m.tag),
    )
    await sh(`mount -t virtiofs ${m.tag} ${m.mnt} && cmp /tmp/keep-${m.name} ${m.mnt}/data/keep`)
    t.is((await sh(`cat ${m.mnt}/top`)).trim(), 'kept')
    t.is(m.device.mountStats[0]!.malformed, 0)
  } finally {
    await unmountAndClose(m)
  }
})

test('vduse fs --memory --mount /data=DIR: ready, both trees, stats per mount, a clean stop', async (t) => {
  await sh('rm -rf /tmp/cli-mount && mkdir -p /tmp/cli-mount && echo host > /tmp/cli-mount/h')
  const cli = startCli([
    'fs',
    '--name',
    'climount',
    '--memory',
    '--mount',
    '/data=/tmp/cli-mount',
    '--json',
    '--replace',
  ])
  try {
    await cli.next('ready')
    await sh('mkdir -p /tmp/climount && mount -t virtiofs climount /tmp/climount')
    t.is((await sh('cat /tmp/climount/data/h')).trim(), 'host')
    await sh('echo mem > /tmp/climount/m && echo new > /tmp/climount/data/n')
    t.is((await sh('cat /tmp/cli-mount/n; ls /tmp/cli-mount')).trim(), 'new\nh\nn')
    cli.child.kill('SIGUSR1')
    const stats = await cli.next('stats')
    const mounts = stats.mounts as { requests: number; malformed: number }[]
    t.is(mounts.length, 1)
    t.true(mounts[0]!.requests > 0)
    t.is(mounts[0]!.malformed, 0)
    await sh('umount -R /tmp/climount')
    cli.child.kill('SIGTERM')
    t.is(await cli.exit, 0)
    t.truthy(cli.events.find((e) => e.event === 'stopped'))
  } finally {
    await sh('umount -R /tmp/climount 2>/dev/null || true')
    cli.child.kill('SIGKILL')
  }
})
