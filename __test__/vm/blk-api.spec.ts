import test from 'ava'
import { readFileSync } from 'node:fs'

import {
  BlockDevice,
  FileBackend,
  listDevices,
  MemoryBackend,
  type BlockBackend,
  type BlockIo,
} from '../../src'
import { assertInGuest, exerciseBlockDevice, sh } from './guest'

test.before(() => assertInGuest())

test('TypeScript API, memory backend: /dev/vdX passes dd/cmp, fio verify on 2 queues, ext4 + fsck', async (t) => {
  const backend = new MemoryBackend(64 << 20)
  await using device = await BlockDevice.create({ name: 'ts-mem', backend, queues: 2, replaceStale: true })
  const dev = await device.attach()
  t.regex(dev, /^\/dev\/vd[a-z]+$/)
  t.is((await sh(`blockdev --getsize64 ${dev}`)).trim(), String(64 << 20))
  t.deepEqual(device.negotiatedBlkFeatures.includes('MQ'), true)
  await exerciseBlockDevice(dev, 64 << 20, 'tsmem')
  const c = device.counters()
  t.true(c.requests > 1000)
  t.is(c.badChains, 0)
  t.true(c.batches < c.requests, `requests are batched: ${c.requests} in ${c.batches} batches`)
  await device.close()
  t.is(device.stats.ioErrors, 0)
})

test('TypeScript API, file backend: native I/O, image holds the data, blkdiscard punches holes', async (t) => {
  const image = '/tmp/ts-file.img'
  const backend = await FileBackend.open(image, { size: 64 << 20 })
  const device = await BlockDevice.create({ name: 'ts-file', backend, queues: 2, replaceStale: true })
  const dev = await device.attach()
  await exerciseBlockDevice(dev, 64 << 20, 'tsfile')
  await sh(
    `head -c 1M /dev/urandom > /tmp/chunk; dd if=/tmp/chunk of=${dev} bs=1M seek=3 oflag=direct status=none; sync`,
  )
  await device.close()
  await backend.close()
  t.deepEqual(
    readFileSync(image).subarray(3 << 20, 4 << 20),
    readFileSync('/tmp/chunk'),
    'the image holds the bytes',
  )
  // Discard: attach again, fill, blkdiscard, and watch the file's allocated blocks drop.
  const backend2 = await FileBackend.open(image)
  const device2 = await BlockDevice.create({ name: 'ts-file', backend: backend2, replaceStale: true })
  const dev2 = await device2.attach()
  await sh(`dd if=/dev/urandom of=${dev2} bs=1M count=32 oflag=direct status=none`)
  const before = Number((await sh(`stat -c %b ${image}`)).trim())
  await sh(`blkdiscard ${dev2}`)
  const after = Number((await sh(`stat -c %b ${image}`)).trim())
  t.true(after < before / 4, `blocks before ${before}, after ${after}`)
  await device2.close()
  await backend2.close()
})

test('file backend on block devices: their block size reaches the driver; discard only where the disk has it', async (t) => {
  // A loop device with 4096-byte sectors over a sparse file: discard punches holes in that file.
  await sh(
    'modprobe -d "$VDUSE_VM_MODROOT" loop 2>/dev/null || true; rm -f /tmp/loop4k.img; truncate -s 64M /tmp/loop4k.img',
  )
  const loop = (await sh('losetup --sector-size 4096 -f --show /tmp/loop4k.img')).trim()
  try {
    // Through the page cache 512-byte I/O works: the 4096-byte sectors show as the physical block size.
    const buffered = await FileBackend.open(loop)
    t.like(buffered.capabilities, { logicalBlockSize: 512, physicalBlockSize: 4096 })
    await buffered.close()
    // O_DIRECT needs whole sectors: the driver is told so.
    await using backend = await FileBackend.open(loop, { direct: true })
    t.is(backend.capabilities.logicalBlockSize, 4096)
    t.true(backend.capabilities.discard, 'a loop device discards')
    await t.throwsAsync(FileBackend.open(loop), { message: /in use/ }, 'the disk is locked while served')
    await using device = await BlockDevice.create({ name: 'ts-loop', backend, replaceStale: true })
    const dev = await device.attach()
    const sys = `/sys/block/${dev.slice(5)}/queue`
    t.is((await sh(`cat ${sys}/logical_block_size`)).trim(), '4096')
    t.true(device.offeredFeatures.includes('DISCARD'))
    // Our writes land in /dev/loopN's page cache; sync pushes them into the loop's file.
    await sh(`dd if=/dev/urandom of=${dev} bs=1M count=16 oflag=direct status=none; sync`)
    const before = Number((await sh('stat -c %b /tmp/loop4k.img')).trim())
    await sh(`blkdiscard -o 0 -l 16M ${dev}; sync`)
    const after = Number((await sh('stat -c %b /tmp/loop4k.img')).trim())
    t.true(after < before / 4, `BLKDISCARD reached the loop's file: blocks ${before} -> ${after}`)
    t.is((await sh(`cmp -n 16M ${dev} /dev/zero 2>&1 || true`)).trim(), '', 'discarded blocks read as zeroes')
    // Write-zeroes (BLKZEROOUT through the device) over data: it must read back as zeroes.
    await sh(`dd if=/dev/urandom of=${dev} bs=1M seek=16 count=1 oflag=direct status=none
      blkdiscard -z -o 16M -l 1M ${dev}`)
    t.is((await sh(`cmp -i 16M:0 -n 1M ${dev} /dev/zero 2>&1 || true`)).trim(), '', 'zeroed')
    await device.close()
  } finally {
    await sh(`losetup -d ${loop}`)
  }
  // null_blk without discard: DISCARD is not offered (it used to be offered and silently ignored).
  await sh(`rmmod null_blk 2>/dev/null || true
    modprobe -d "$VDUSE_VM_MODROOT" null_blk nr_devices=1 gb=1 bs=512 memory_backed=1`)
  try {
    await using backend = await FileBackend.open('/dev/nullb0')
    t.false(backend.capabilities.discard)
    await using device = await BlockDevice.create({ name: 'ts-nullb', backend, replaceStale: true })
    t.false(device.offeredFeatures.includes('DISCARD'))
    const dev = await device.attach()
    await t.throwsAsync(sh(`blkdiscard ${dev}`), { message: /not supported/i })
    await device.close()
  } finally {
    await sh('rmmod null_blk || true')
  }
})

test('read-only devices reject writes; resize is seen by the guest', async (t) => {
  const ro = await BlockDevice.create({
    name: 'ts-ro',
    backend: new MemoryBackend(8 << 20),
    readOnly: true,
    replaceStale: true,
  })
  const dev = await ro.attach()
  t.is((await sh(`blockdev --getro ${dev}`)).trim(), '1')
  await t.throwsAsync(sh(`dd if=/dev/zero of=${dev} bs=4k count=1 oflag=direct status=none`))
  await ro.close()

  const backend = new MemoryBackend(8 << 20)
  const device = await BlockDevice.create({ name: 'ts-resize', backend, replaceStale: true })
  const dev2 = await device.attach()
  t.is((await sh(`blockdev --getsize64 ${dev2}`)).trim(), String(8 << 20))
  await device.resize(24 << 20)
  let seen = ''
  for (let i = 0; i < 100 && seen !== String(24 << 20); i++) {
    await new Promise((r) => setTimeout(r, 50))
    seen = (await sh(`blockdev --getsize64 ${dev2}`)).trim()
  }
  t.is(seen, String(24 << 20))
  await sh(`dd if=/dev/urandom of=${dev2} bs=1M seek=20 count=1 oflag=direct status=none`)
  await device.close()
})

test('a backend that throws yields EIO in the guest, and the next request succeeds', async (t) => {
  const mem = new MemoryBackend(8 << 20)
  let failNext = false
  const backend: BlockBackend = {
    size: mem.size,
    read: (io: BlockIo) => {
      if (failNext && io.offset === 4 << 20) {
        failNext = false
        throw new Error('injected failure')
      }
      return mem.read(io)
    },
    write: (io: BlockIo) => mem.write(io),
  }
  const device = await BlockDevice.create({ name: 'ts-eio', backend, replaceStale: true })
  const dev = await device.attach()
  failNext = true
  const err = await t.throwsAsync(
    sh(`dd if=${dev} of=/dev/null bs=4k count=1 skip=1024 iflag=direct status=none`),
  )
  t.regex(err?.message ?? '', /Input\/output error/)
  await sh(`dd if=${dev} of=/dev/null bs=4k count=1 skip=1024 iflag=direct status=none`)
  t.true(device.stats.ioErrors >= 1)
  await device.close()
})

for (const pollUs of [1000, 'auto'] as const) {
  test(`adaptive polling (pollUs ${pollUs}) serves correctly and catches requests without a kick at queue depth 1`, async (t) => {
    const backend = new MemoryBackend(32 << 20)
    const device = await BlockDevice.create({
      name: `ts-poll-${pollUs}`,
      backend,
      pollUs,
      replaceStale: true,
    })
    const dev = await device.attach()
    await sh(`fio --name=poll --filename=${dev} --rw=randwrite --bs=4k --iodepth=1 --ioengine=libaio --direct=1 \
      --size=6M --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 --output-format=terse >/dev/null`)
    const c = device.counters()
    t.is(c.badChains, 0)
    t.true(c.polled > 0, `requests found by polling: ${c.polled} of ${c.requests} (wake-ups ${c.wakeups})`)
    t.true(c.wakeups < c.requests, 'polling saved wake-ups')
    // Automatic: what a wake-up costs under TCG puts the cap well above the floor.
    if (pollUs === 'auto') t.true(c.pollCapUs > 16 && c.pollCapUs <= 1000, `auto cap ${c.pollCapUs} µs`)
    else t.is(c.pollCapUs, 1000)
    await device.close()
    t.is(device.stats.ioErrors, 0)
  })
}

test('an attach that times out or is aborted leaves nothing behind; the next attach works', async (t) => {
  const name = 'ts-attach-fail'
  const onBus = async (): Promise<boolean> =>
    (await sh('ls /sys/bus/vdpa/devices/')).split('\n').includes(name)
  for (const [how, options, code] of [
    ['timed out', { timeoutMs: 1 }, 'ERR_VDUSE_TIMEOUT'],
    ['aborted', { signal: AbortSignal.abort() }, 'ABORT_ERR'],
  ] as const) {
    const device = await BlockDevice.create({ name, backend: new MemoryBackend(8 << 20), replaceStale: true })
    try {
      const err = await t.throwsAsync<Error & { code?: string }>(device.attach(options))
      t.is(err?.code, code, `${how}: ${err?.message}`)
      t.false(await onBus(), `${how}: nothing left on the vDPA bus`)
      t.false(device.attached)
    } finally {
      await device.close() // no ERR_VDUSE_BUSY
    }
    t.false(listDevices().includes(name), `${how}: the device is gone`)
  }
  const device = await BlockDevice.create({ name, backend: new MemoryBackend(8 << 20), replaceStale: true })
  t.regex(await device.attach(), /^\/dev\/vd[a-z]+$/)
  await device.close()
})
