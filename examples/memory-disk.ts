// A 64 MiB RAM disk served from TypeScript, attached as /dev/vdX on this host. Run as root on a machine
// with VDUSE (modprobe vduse virtio_vdpa), or in the test guest: scripts/vm/run node --import=tsx examples/memory-disk.ts
import { BlockDevice, MemoryBackend } from '../src'

async function main(): Promise<void> {
  const device = await BlockDevice.create({
    name: 'example-mem',
    backend: new MemoryBackend(64 << 20),
    queues: 2,
    serial: 'example-mem',
    replaceStale: true,
  })
  device.on('ready', (features) => console.log(`driver ready, features 0x${features.toString(16)}`))
  const path = await device.attach()
  console.log(`serving ${path}; Ctrl-C to stop`)
  const stop = (): void => {
    void device.close().then(() => console.log('stopped'))
  }
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
  if (process.env.EXAMPLE_ONESHOT) setTimeout(stop, 100)
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
