// The smoke test every guest kernel runs (6.12 and 7.3): a block device and two NICs on the real kernel,
// what the kernel says it offers, and virtio-fs refused with a clear error where VDUSE does not allow it.
import test from 'ava'

import {
  BlockDevice,
  FsDevice,
  MemoryBackend,
  MemoryFs,
  NetDevice,
  NetSwitch,
  kernelSupport,
} from '../../src'
import { assertInGuest, exerciseBlockDevice, sh } from './guest'

test.before(() => assertInGuest())

test('the kernel is probed: API version, VDUSE features, device types', (t) => {
  const k = kernelSupport()
  t.log(k)
  if (k.release.startsWith('6.12')) {
    t.is(k.apiVersion, 0)
    t.is(k.features, null, 'no VDUSE_GET_FEATURES before 7.3')
    t.false(k.fs)
  } else {
    t.true(k.apiVersion >= 1)
    t.true(k.fs)
  }
})

test('a block device: dd/cmp, fio verify, ext4 + fsck', async (t) => {
  const disk = await BlockDevice.create({
    name: 'smoke-blk',
    backend: new MemoryBackend(64 << 20),
    replaceStale: true,
  })
  try {
    const dev = await disk.attach()
    await exerciseBlockDevice(dev, 64 << 20, 'smoke')
    t.pass()
  } finally {
    await disk.close()
  }
})

test('two NICs through the switch ping each other', async (t) => {
  const sw = new NetSwitch()
  const nics: NetDevice[] = []
  try {
    for (const [i, ip] of ['10.88.0.1', '10.88.0.2'].entries()) {
      const nic = await NetDevice.create({ name: `smoke-n${i}`, replaceStale: true })
      nics.push(nic)
      sw.connect(nic)
      const ifname = await nic.attach()
      await sh(`ip netns del sns${i} 2>/dev/null || true; ip netns add sns${i}
        ip link set ${ifname} netns sns${i}
        ip -n sns${i} addr add ${ip}/24 dev ${ifname}
        ip -n sns${i} link set ${ifname} up`)
    }
    const out = await sh('ip netns exec sns0 ping -q -n -c 50 -i 0.01 -W 2 10.88.0.2 2>&1 || true')
    t.regex(out, / 0% packet loss/)
  } finally {
    for (const nic of nics) await nic.close().catch(() => {})
    await sh('ip netns del sns0 2>/dev/null; ip netns del sns1 2>/dev/null; true')
  }
})

test('virtio-fs where VDUSE does not allow it: ERR_VDUSE_UNAVAILABLE with a hint', async (t) => {
  if (kernelSupport().fs) return t.pass('this kernel allows virtio-fs (fs.spec.ts covers it)')
  const err = await t.throwsAsync(FsDevice.create({ name: 'smoke-fs', tag: 'x', fs: new MemoryFs() }), {
    code: 'ERR_VDUSE_UNAVAILABLE',
  })
  t.regex((err as { hint?: string }).hint ?? '', /trixie-backports|newer kernel/)
})
