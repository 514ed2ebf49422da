// A vduse backend plugin, shipped as its own package: `vduse blk --name d0 --backend vduse-example-pattern-disk
// --size 64M -- --label hello`. The default export is the factory; the device owns what it returns.
// Unwritten blocks read as the label repeated; written blocks read back what was written.
import { parseArgs } from 'node:util'

const BLOCK = 4096

/** @type {import('vduse').BackendFactory} */
export default function patternDisk({ size, readOnly, args }) {
  if (size === undefined) throw new Error('give the disk a size: --size 64M')
  const { values } = parseArgs({ args: [...args], options: { label: { type: 'string', default: 'vduse' } } })
  const unit = Buffer.from(values.label)
  const pattern = Buffer.alloc(BLOCK)
  for (let i = 0; i < BLOCK; i += unit.length) unit.copy(pattern, i)
  /** @type {Map<number, Buffer>} written blocks */
  const blocks = new Map()

  /** @type {import('vduse').BlockBackend} */
  return {
    size,
    readOnly,
    read(io) {
      // Block by block, straight into the driver's buffers (one native copy each).
      for (let at = 0; at < io.length;) {
        const offset = io.offset + at
        const within = offset % BLOCK
        const n = Math.min(BLOCK - within, io.length - at)
        io.copyFrom(blocks.get(Math.floor(offset / BLOCK)) ?? pattern, within, n, at)
        at += n
      }
    },
    write(io) {
      for (let at = 0; at < io.length;) {
        const offset = io.offset + at
        const block = Math.floor(offset / BLOCK)
        const within = offset % BLOCK
        const n = Math.min(BLOCK - within, io.length - at)
        let data = blocks.get(block)
        if (!data) blocks.set(block, (data = Buffer.from(pattern)))
        io.copyTo(data, within, n, at)
        at += n
      }
    },
    flush() {},
    discard(offset, length) {
      for (let b = Math.ceil(offset / BLOCK); (b + 1) * BLOCK <= offset + length; b++) blocks.delete(b)
    },
  }
}
