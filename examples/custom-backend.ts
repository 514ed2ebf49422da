// A custom backend in ~30 lines: a sparse disk that keeps only the 4 KiB blocks ever written, in a Map —
// the shape of any remote or object-store backend (replace the Map with your storage client).
import { BlockDevice, type BlockBackend, type BlockIo } from '../src'

const BLOCK = 4096

class SparseBackend implements BlockBackend {
  private readonly blocks = new Map<number, Buffer>()
  constructor(readonly size: number) {}

  async read(io: BlockIo): Promise<void> {
    io.forEach((buf, start, length, at) => {
      for (let done = 0; done < length;) {
        const block = Math.floor((at + done) / BLOCK)
        const within = (at + done) % BLOCK
        const n = Math.min(BLOCK - within, length - done)
        const data = this.blocks.get(block)
        if (data) data.copy(buf, start + done, within, within + n)
        else buf.fill(0, start + done, start + done + n)
        done += n
      }
    })
  }

  async write(io: BlockIo): Promise<void> {
    io.forEach((buf, start, length, at) => {
      for (let done = 0; done < length;) {
        const block = Math.floor((at + done) / BLOCK)
        const within = (at + done) % BLOCK
        const n = Math.min(BLOCK - within, length - done)
        let data = this.blocks.get(block)
        if (!data) this.blocks.set(block, (data = Buffer.alloc(BLOCK)))
        buf.copy(data, within, start + done, start + done + n)
        done += n
      }
    })
  }

  discard(offset: number, length: number): void {
    for (let b = Math.ceil(offset / BLOCK); (b + 1) * BLOCK <= offset + length; b++) this.blocks.delete(b)
  }
}

async function main(): Promise<void> {
  const device = await BlockDevice.create({
    name: 'example-sparse',
    backend: new SparseBackend(1 << 30),
    replaceStale: true,
  })
  console.log(`a 1 GiB sparse disk at ${await device.attach()}`)
  const stop = (): void => void device.close()
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
  if (process.env.EXAMPLE_ONESHOT) stop()
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
