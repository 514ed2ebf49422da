// The request lifecycle on the real kernel, driven by real drivers: QEMU 10's qemu-io over libblkio's
// virtio-blk-vhost-vdpa (a VM's view of the device, without a VM), and the kernel's own virtio_blk.
// Sessions that end, sessions killed with requests stuck in the backend, driver unbind/rebind, detach and
// re-attach of a live server, a model that throws, requests larger than a batch, request timeouts.
import test from 'ava'
import { spawn } from 'node:child_process'

import {
  BlockDevice,
  MemoryBackend,
  VirtioDevice,
  type BlockBackend,
  type BlockIo,
  type DrainInfo,
  type RequestBatch,
} from '../../src'
import { assertInGuest, execFileAsync, peers, sh, until } from './guest'

test.before(() => assertInGuest())

/** A memory disk whose reads of one byte offset wait until released (a backend stuck on remote storage). */
class Gated implements BlockBackend {
  readonly mem: MemoryBackend
  holdAt: number | undefined
  readonly held: BlockIo[] = []
  private releases: Array<() => void> = []
  constructor(size: number) {
    this.mem = new MemoryBackend(size)
  }
  get size(): number {
    return this.mem.size
  }
  read(io: BlockIo): void | Promise<void> {
    if (this.holdAt !== undefined && io.offset <= this.holdAt && this.holdAt < io.offset + io.length) {
      this.held.push(io)
      return new Promise<void>((resolve) => this.releases.push(resolve))
    }
    return this.mem.read(io)
  }
  write(io: BlockIo): void {
    this.mem.write(io)
  }
  flush(): void {}
  discard(offset: number, length: number): void {
    this.mem.discard(offset, length)
  }
  writeZeroes(offset: number, length: number): void {
    this.mem.writeZeroes(offset, length)
  }
  /** The late backend: tries to land its data in every held request; returns what copyFrom said. */
  releaseLate(): boolean[] {
    const copied = this.held.splice(0).map((io) => io.copyFrom(Buffer.alloc(io.length, 0x5a)))
    for (const r of this.releases.splice(0)) r()
    return copied
  }
}

test('qemu-io over libblkio: patterns, zeroes, discard, flush; a killed session with a stuck request; the next session is prompt', async (t) => {
  const { qemuIo, version } = await peers()
  t.regex(version, /^10\./)
  const backend = new Gated(32 << 20)
  const device = await BlockDevice.create({
    name: 'ts-qio',
    backend,
    replaceStale: true,
    drainTimeoutMs: 1000,
  })
  t.teardown(() => device.close())
  const drains: DrainInfo[] = []
  device.on('drained', (d) => drains.push(d))
  const node = await device.attach({ driver: 'vhost' })
  t.regex(node, /^\/dev\/vhost-vdpa-\d+$/)
  const opts = `driver=virtio-blk-vhost-vdpa,path=${node},cache.direct=on`
  const qio = async (...cmds: string[]): Promise<string> => {
    const { stdout } = await execFileAsync(qemuIo, ['--image-opts', opts, ...cmds.flatMap((c) => ['-c', c])])
    t.notRegex(stdout, /fail|error/i, stdout)
    return stdout
  }

  // Session 1: data, zeroes, discard, flush — checked by qemu-io's pattern reads and in the backend.
  await qio(
    'write -P 0xab 0 1M',
    'read -P 0xab 0 1M',
    'write -P 0xcd 1M 128k',
    'write -z 1M 64k',
    'read -P 0 1M 64k',
    'read -P 0xcd 1088k 64k',
    'discard 4M 1M',
    'flush',
  )
  t.true(backend.mem.contents.subarray(0, 1 << 20).every((b) => b === 0xab))
  t.true(backend.mem.contents.subarray(1 << 20, (1 << 20) + (64 << 10)).every((b) => b === 0))
  // Session 2, after the first ended (and reset the device): still served, data intact.
  await qio('read -P 0xab 512k 512k')

  // Session 3 is killed (a VM crashing) with a read stuck in the backend.
  backend.holdAt = 8 << 20
  const stuck = spawn(qemuIo, ['--image-opts', opts, '-c', 'aio_read 8M 4k', '-c', 'sleep 600000'], {
    stdio: 'ignore',
  })
  await until('the backend to hold the read', () => backend.held.length === 1)
  const killed = Date.now()
  stuck.kill('SIGKILL')
  await new Promise((r) => stuck.once('exit', r))
  backend.holdAt = undefined
  // Session 4 is served promptly: the reset answered within the drain bound and fenced the stuck read.
  await qio('read -P 0xab 0 4k')
  const took = Date.now() - killed
  t.true(took < 10_000, `the next session was served ${took} ms after the kill`)
  await until('the drain to be reported', () => drains.some((d) => d.reason === 'reset' && d.fenced >= 1))
  t.true(device.counters().fenced >= 1)
  // The stuck read completes late: its data cannot land anywhere, and nothing breaks.
  t.deepEqual(backend.releaseLate(), [false])
  await qio('read -P 0xab 0 1M')
  await device.close()
})

test('driver unbind/rebind and detach/re-attach of a live server keep the data and serve every request once', async (t) => {
  const device = await BlockDevice.create({
    name: 'ts-rebind',
    backend: new MemoryBackend(16 << 20),
    replaceStale: true,
  })
  t.teardown(() => device.close())
  let dev = await device.attach()
  await sh(
    `head -c 4M /dev/urandom > /tmp/rebind-pattern; dd if=/tmp/rebind-pattern of=${dev} bs=1M oflag=direct status=none`,
  )
  const check = async (node: string): Promise<void> => {
    await sh(
      `dd if=${node} of=/tmp/rebind-back bs=1M count=4 iflag=direct status=none; cmp /tmp/rebind-pattern /tmp/rebind-back`,
    )
  }
  for (let i = 0; i < 3; i++) {
    await sh(`echo ts-rebind > /sys/bus/vdpa/drivers/virtio_vdpa/unbind`)
    await sh(`echo ts-rebind > /sys/bus/vdpa/drivers/virtio_vdpa/bind`)
    await until(
      'the disk to come back',
      async () =>
        (await sh(`ls /sys/bus/vdpa/devices/ts-rebind/virtio*/block 2>/dev/null || true`)).trim() !== '',
    )
    dev = `/dev/${(await sh(`ls /sys/bus/vdpa/devices/ts-rebind/virtio*/block`)).trim()}`
    await check(dev)
  }
  for (let i = 0; i < 3; i++) {
    await device.detach()
    dev = await device.attach()
    await check(dev)
  }
  await sh(`fio --name=rebind --filename=${dev} --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio --direct=1 --size=4M \
    --offset=8M --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 --output-format=terse >/dev/null`)
  await device.close()
  const c = device.counters()
  t.is(c.fenced, 0, 'orderly resets leave nothing to fence')
  t.is(c.requests, c.completions, 'every request completed once')
  t.is(c.badChains, 0)
})

/** A minimal virtio-blk written against the public API; it throws on reads of sector 4096 (a model bug). */
class BuggyBlk extends VirtioDevice {
  private readonly data = Buffer.alloc(8 << 20)
  static async make(name: string): Promise<BuggyBlk> {
    const d = new BuggyBlk({ name, replaceStale: true, batchSize: 2 })
    await d.prepare()
    const config = Buffer.alloc(60)
    config.writeBigUInt64LE(BigInt((8 << 20) / 512), 0)
    d.open({ deviceId: 2, features: 0n, config, numQueues: 1, queueSize: 256, maxSegments: 130, kind: 'blk' })
    return d
  }
  protected handleRequest(batch: RequestBatch, i: number): void {
    const t = batch.ticket(i)
    const h = batch.headOffset(i)
    const type = batch.view.getUint32(h, true)
    const offset = batch.view.getUint32(h + 8, true) * 512
    if (type === 0) {
      if (offset === 4096 * 512) throw new Error('model bug')
      const n = batch.writableBytes(i) - 1
      batch.write(t, 0, this.data, offset, n)
      return batch.complete(t, n + 1, 0)
    }
    if (type === 1) {
      batch.read(t, 16, this.data, offset, batch.readableBytes(i) - 16)
      return batch.complete(t, 1, 0)
    }
    batch.complete(t, 1, type === 4 ? 0 : 2)
  }
  protected override failRequest(ticket: number): void {
    this.completions.complete(ticket, 1, 1) // VIRTIO_BLK_S_IOERR
  }
  protected inFlight(): number {
    return 0
  }
  protected async shutdown(): Promise<void> {}
}

test('a model that throws fails that request with EIO in the guest; the device keeps serving, batches of 2 serve big requests', async (t) => {
  const device = await BuggyBlk.make('ts-buggy')
  t.teardown(() => device.close())
  const errors: string[] = []
  device.on('requestError', (e) => errors.push(e.message))
  const dev = await device.attach()
  const err = await t.throwsAsync(
    sh(`dd if=${dev} of=/dev/null bs=512 count=1 skip=4096 iflag=direct status=none`),
  )
  t.regex(err?.message ?? '', /Input\/output error/)
  t.deepEqual(errors, ['model bug'])
  // Requests of 256 KiB (more buffers than a batch has requests), 16 at a time through batches of 2.
  await sh(`fio --name=big --filename=${dev} --rw=randwrite --bs=256k --iodepth=16 --ioengine=libaio --direct=1 \
    --size=4M --offset=4M --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 --output-format=terse >/dev/null`)
  await device.close()
})

test('a request timeout answers EIO in bounded time; the late backend result is dropped', async (t) => {
  const backend = new Gated(8 << 20)
  backend.holdAt = 1 << 20
  const device = await BlockDevice.create({
    name: 'ts-timeout',
    backend,
    replaceStale: true,
    requestTimeoutMs: 300,
  })
  t.teardown(() => device.close())
  const dev = await device.attach()
  const started = Date.now()
  const err = await t.throwsAsync(
    sh(`dd if=${dev} of=/dev/null bs=4k count=1 skip=256 iflag=direct status=none`),
  )
  t.regex(err?.message ?? '', /Input\/output error/)
  t.true(Date.now() - started < 10_000)
  t.true(device.stats.timeouts >= 1)
  t.true(
    backend.releaseLate().every((copied) => !copied),
    'the late result could not reach the driver',
  )
  backend.holdAt = undefined
  await sh(`dd if=${dev} of=/dev/null bs=4k count=1 skip=256 iflag=direct status=none`)
  await device.close()
})
