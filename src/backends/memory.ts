import { VduseError } from '../errors'
import type { BlockBackend, BlockIo } from './backend'

/** A RAM disk. Discarded and zeroed ranges read back as zeroes. */
export class MemoryBackend implements BlockBackend {
  #data: Buffer

  constructor(size: number) {
    if (!Number.isSafeInteger(size) || size <= 0)
      throw new VduseError(`size must be a positive integer, got ${size}`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    this.#data = Buffer.alloc(size)
  }

  get size(): number {
    return this.#data.length
  }

  /** The disk's bytes (for tests and snapshots). */
  get contents(): Buffer {
    return this.#data
  }

  read(io: BlockIo): void {
    io.copyFrom(this.#data, io.offset)
  }

  write(io: BlockIo): void {
    io.copyTo(this.#data, io.offset)
  }

  flush(): void {}

  discard(offset: number, length: number): void {
    this.#data.fill(0, offset, offset + length)
  }

  writeZeroes(offset: number, length: number): void {
    this.#data.fill(0, offset, offset + length)
  }

  resize(size: number): void {
    const next = Buffer.alloc(size)
    this.#data.copy(next, 0, 0, Math.min(size, this.#data.length))
    this.#data = next
  }
}
