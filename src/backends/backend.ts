/**
 * One read or write: `length` bytes at byte `offset` of the device, in guest buffers (zero-copy views of
 * the driver's memory — valid until the request completes).
 */
export interface BlockIo {
  /** Byte offset on the device. */
  readonly offset: number
  /** Bytes to transfer (the sum of the buffers' lengths). */
  readonly length: number
  /** The guest buffers, in order (created on first use; `forEach` allocates nothing). */
  readonly buffers: readonly Uint8Array[]
  /** Calls `fn` for each piece: `buffer[start .. start+length)` maps to device offset `deviceOffset`. */
  forEach(fn: (buffer: Buffer, start: number, length: number, deviceOffset: number) => void): void
}

/**
 * Storage behind a block device. Implement `read` and `write`; every optional method you implement
 * turns on the matching virtio-blk feature (`flush` → FLUSH, `discard` → DISCARD, `writeZeroes` →
 * WRITE_ZEROES, `resize` → online resize). Methods may return a promise; throwing or rejecting fails
 * that one request with an I/O error, and the device keeps serving.
 */
export interface BlockBackend {
  /** Device size in bytes (a multiple of the logical block size). */
  readonly size: number
  /** Offer the device read-only. */
  readonly readOnly?: boolean
  /**
   * A file descriptor the device may read and write directly (preadv/pwritev on native threads, data
   * never passing through JavaScript). `read`/`write` are still used where native I/O is unavailable.
   */
  readonly fd?: number
  read(io: BlockIo): void | Promise<void>
  write(io: BlockIo): void | Promise<void>
  /** Make acknowledged writes durable. */
  flush?(): void | Promise<void>
  /** The range's contents no longer matter (may be deallocated). */
  discard?(offset: number, length: number): void | Promise<void>
  /** Zero the range; `unmap` allows deallocating it. */
  writeZeroes?(offset: number, length: number, unmap: boolean): void | Promise<void>
  /** Change the size (online resize). */
  resize?(size: number): void | Promise<void>
  close?(): void | Promise<void>
}
