import type { BlockBackend, BlockIo } from './backend'

/**
 * Stores nothing: writes vanish, reads leave the buffers as they are (or zero them with
 * `{ zeroes: true }`). For measuring the transport itself.
 */
export class NullBackend implements BlockBackend {
  constructor(
    readonly size: number,
    private readonly options: { zeroes?: boolean } = {},
  ) {
    if (!Number.isSafeInteger(size) || size <= 0)
      throw new RangeError(`size must be a positive integer, got ${size}`)
  }

  read(io: BlockIo): void {
    if (this.options.zeroes) io.forEach((buf, start, length) => buf.fill(0, start, start + length))
  }

  write(): void {}

  flush(): void {}
}
