// The main job (`npm run demo`), run inside the test guest: a virtio-blk device written in TypeScript,
// served through VDUSE by the real kernel, used with real tools, and stopped cleanly.
import { execFile } from 'node:child_process'
import { release } from 'node:os'
import { promisify } from 'node:util'

import { BlockDevice, getApiVersion, MemoryBackend } from '../src'

// Asynchronous on purpose: this thread serves the device's I/O while the tools run.
const sh = async (script: string): Promise<string> =>
  (await promisify(execFile)('sh', ['-ec', script])).stdout

async function main(): Promise<void> {
  console.log(`kernel ${release()}, VDUSE API version ${getApiVersion()}`)
  const backend = new MemoryBackend(128 << 20)
  const device = await BlockDevice.create({
    name: 'demo',
    backend,
    queues: 2,
    serial: 'vduse-demo',
    replaceStale: true,
  })
  device.on('ready', () => console.log(`driver negotiated: ${device.negotiatedBlkFeatures.join(' ')}`))
  const dev = await device.attach()
  console.log(
    `TypeScript is serving ${dev} (${(await sh(`blockdev --getsize64 ${dev}`)).trim()} bytes, serial ${(await sh(`cat /sys/block/${dev.slice(5)}/serial`)).trim()})`,
  )
  await sh(`mkfs.ext4 -q ${dev} && mkdir -p /tmp/demo && mount ${dev} /tmp/demo`)
  await sh(`echo "hello from a block device written in TypeScript" > /tmp/demo/hello.txt && sync`)
  console.log(`a file on it: ${(await sh('cat /tmp/demo/hello.txt')).trim()}`)
  console.log(
    (
      await sh(
        `fio --name=demo --filename=${dev} --rw=randread --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --runtime=3 --time_based --output-format=terse --terse-version=3 | cut -d';' -f8`,
      )
    ).trim() + ' random 4k read IOPS (QD16, TCG guest)',
  )
  await sh('umount /tmp/demo')
  await device.close()
  const c = device.counters()
  console.log(
    `served ${c.requests} requests in ${c.batches} batches with ${c.interrupts} interrupts; device closed`,
  )
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
