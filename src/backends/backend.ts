import type { RequestSource } from '../transport/source'

/**
 * One read or write of `length` bytes at byte `offset` of the device.
 *
 * Move the data with `copyFrom` (reads: into the driver's buffers) or `copyTo` (writes: out of them):
 * one native copy, no allocation. Backends that need Node `Buffer`s (to hand to `fs` or a socket) use
 * `buffers`/`forEach`: buffers the device owns, copied from (writes) or to (reads) the driver's memory —
 * so a backend can never touch the driver's memory after its request was answered or fenced.
 */
export interface BlockIo {
  /** Byte offset on the device. */
  readonly offset: number
  /** Bytes to transfer. */
  readonly length: number
  /**
   * Aborted when the request stops mattering: it timed out (answered with an I/O error) or the driver
   * reset the device. A backend should stop working on it; a write must not be applied after this.
   */
  readonly signal: AbortSignal
  /** Whether `signal` has aborted — readable without creating the signal (the device's BlockIo has it). */
  readonly cancelled?: boolean
  /**
   * Reads: copies `length` bytes of `source`, from `sourceOffset`, into the request's data at byte `at`
   * (default: all of the request's data, from `source[sourceOffset]`). Data arriving in pieces (a network
   * reply) lands piece by piece, with no buffer in between. Returns false if the request is gone (timed
   * out or fenced) — then nothing was copied — or if the range is not within the request and `source`.
   */
  copyFrom(source: Uint8Array, sourceOffset?: number, length?: number, at?: number): boolean
  /** Writes: copies `length` bytes of the request's data from byte `at` into `target` at `targetOffset`. */
  copyTo(target: Uint8Array, targetOffset?: number, length?: number, at?: number): boolean
  /** The data as device-owned Buffers (see above): fill them for a read; they hold the data of a write. */
  readonly buffers: readonly Buffer[]
  /** Calls `fn` for each piece of `buffers`: `buffer[start, start+length)` is device offset `deviceOffset`. */
  forEach(fn: (buffer: Buffer, start: number, length: number, deviceOffset: number) => void): void
  /**
   * Writes only: the write must be durable before it completes (Forced Unit Access). Set on every write
   * when the backend declares `fua` but cannot `flush`: the driver, offered no FLUSH, assumes a
   * write-through disk.
   */
  readonly fua?: boolean
}

/**
 * What a backend can do, declared rather than guessed from which methods exist (as nbdkit's `can_*`
 * callbacks). Every field is optional; the defaults are in brackets.
 */
export interface BlockBackendCapabilities {
  /** Offer FLUSH [`flush` is implemented]. */
  flush?: boolean
  /** Offer DISCARD [`discard` is implemented]. */
  discard?: boolean
  /** Offer WRITE_ZEROES [`writeZeroes` is implemented]. */
  writeZeroes?: boolean
  /** `writeZeroes(…, unmap = true)` may deallocate (tells the driver; write_zeroes_may_unmap) [`discard`]. */
  writeZeroesUnmap?: boolean
  /**
   * The backend can make one write durable by itself (`io.fua`) [false]. Without `flush`, the device then
   * asks for it on every write; with neither, acknowledged writes are only as durable as the backend.
   */
  fua?: boolean
  /** The smallest block the storage can address: 512 or 4096 [512]. A device may not use a smaller one. */
  logicalBlockSize?: 512 | 4096
  /** The block the storage writes without read-modify-write, a power of two ≥ the logical size. */
  physicalBlockSize?: number
  /** The preferred I/O size in bytes (a multiple of the logical size), e.g. a RAID stripe. */
  optimalIoSize?: number
  /**
   * Most backend calls in flight at once [unlimited]. Further requests wait in the device, in arrival
   * order, and their `requestTimeoutMs` runs while they wait.
   */
  maxInFlight?: number
}

/**
 * How a device hands its requests to a backend's own native data path (the NBD client's): the part of
 * the device's transport the backend drives. Internal: not part of the public API.
 */
export type NativeBlockHost = Required<
  Pick<RequestSource, 'nbdStart' | 'nbdAttach' | 'nbdFlush' | 'nbdCounters'>
>

/**
 * Internal: a backend with a native data path has a method under this key. A device whose transport
 * serves natively asks it once, before the device exists: undefined keeps `read`/`write`; a path means
 * the device is served on native threads with no request reaching JavaScript, and `start` is called
 * once the device exists (requests wait until it resolves). A rejection means the path could not
 * start: the device is not created.
 */
export const kNativeBlock: unique symbol = Symbol('vduse.nativeBlock')

/** A backend's native data path (see `kNativeBlock`). */
export interface NativeBlockPath {
  start(host: NativeBlockHost, options: NativeBlockOptions): Promise<void>
}

/** What a device tells a native data path about itself. */
export interface NativeBlockOptions {
  /** The device's `requestTimeoutMs` (0: none), enforced by the native path. */
  requestTimeoutMs: number
}

/**
 * Storage behind a block device. Implement `read` and `write`; every optional method you implement
 * turns on the matching virtio-blk feature (`flush` → FLUSH, `discard` → DISCARD, `writeZeroes` →
 * WRITE_ZEROES, `resize` → online resize) unless `capabilities` says otherwise. Methods may return a
 * promise; throwing or rejecting fails that one request with an I/O error, and the device keeps serving.
 *
 * The device does not own the backend: `BlockDevice.close()` flushes it but never closes it. Close it
 * yourself after the device (the CLI does).
 */
export interface BlockBackend {
  /** Device size in bytes (a multiple of the logical block size). */
  readonly size: number
  /** Offer the device read-only. */
  readonly readOnly?: boolean
  /**
   * A stable identity of the storage: the same storage gives the same string after a restart (a file's
   * device and inode, a volume id). A restarted server may take over a device whose server died
   * (`recover`) only with a backend of the same identity; leave it out for storage whose data dies with
   * the process (memory).
   */
  readonly id?: string
  /**
   * A file descriptor the device may read and write directly (preadv/pwritev on native threads, data
   * never passing through JavaScript). `read`/`write` are still used where native I/O is unavailable.
   */
  readonly fd?: number
  /** What it can do (see `BlockBackendCapabilities`); read once, when the device is created. */
  readonly capabilities?: BlockBackendCapabilities
  read(io: BlockIo): void | Promise<void>
  write(io: BlockIo): void | Promise<void>
  /** Make acknowledged writes durable. */
  flush?(): void | Promise<void>
  /**
   * The range's contents no longer matter (may be deallocated). `signal` aborts when the request stops
   * mattering (as `BlockIo.signal`): do not start work for it after that.
   */
  discard?(offset: number, length: number, signal?: AbortSignal): void | Promise<void>
  /** Zero the range; `unmap` allows deallocating it. `signal` as for `discard`. */
  writeZeroes?(offset: number, length: number, unmap: boolean, signal?: AbortSignal): void | Promise<void>
  /** Change the size (online resize). */
  resize?(size: number): void | Promise<void>
  close?(): void | Promise<void>
  /** Internal (see `kNativeBlock`). */
  [kNativeBlock]?(): NativeBlockPath | undefined
}
