// A disk image served as a block device: data moves natively between the file and guest memory.
//   node --import=tsx examples/file-disk.ts /var/tmp/disk.img 1G
import { BlockDevice, FileBackend } from '../src'

async function main(): Promise<void> {
  const [path = '/tmp/example-disk.img', size = '256M'] = process.argv.slice(2)
  const bytes = Number.parseInt(size, 10) * (size.endsWith('G') ? 1 << 30 : size.endsWith('M') ? 1 << 20 : 1)
  const backend = await FileBackend.open(path, { size: bytes })
  const device = await BlockDevice.create({ name: 'example-file', backend, queues: 2, replaceStale: true })
  console.log(`${path} is ${await device.attach()}`)
  const stop = async (): Promise<void> => {
    await device.close() // detaches, finishes in-flight requests, fdatasyncs
    await backend.close()
  }
  process.once('SIGINT', () => void stop())
  process.once('SIGTERM', () => void stop())
  if (process.env.EXAMPLE_ONESHOT) await stop()
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
