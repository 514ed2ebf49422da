import { VduseError } from '../errors'
import type { BlockBackend, BlockIo } from './backend'

/**
 * Stores nothing: writes vanish, reads leave the buffers as they are (or zero them with
 * `{ zeroes: true }`). For measuring the transport itself.
 */
export class NullBackend implements BlockBackend {
  /** Nothing is stored, so any null backend may take over a null device. */
  readonly id = 'null'
  readonly #options: { zeroes?: boolean }
  constructor(
    readonly size: number,
    options: { zeroes?: boolean } = {},
  ) {
    this.#options = options
    if (!Number.isSafeInteger(size) || size <= 0)
      throw new VduseError(`size must be a positive integer, got ${size}`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
  }

  #zero = Buffer.alloc(0)

  read(io: BlockIo): void {
    if (!this.#options.zeroes) return
    if (this.#zero.length < io.length) this.#zero = Buffer.alloc(io.length)
    io.copyFrom(this.#zero)
  }

  write(): void {}

  flush(): void {}
}
