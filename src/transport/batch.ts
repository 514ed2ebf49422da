import { VduseError } from '../errors'
import type { RequestSource } from './source'

/** Bytes of each request's readable head copied into the batch (a virtio request header fits). */
export const HEAD_BYTES = 64
const REQ_FIELDS = 6
const DONE_FIELDS = 3
const IO_FIELDS = 5

/**
 * A completion `status` for a unit of several buffers (a received frame over `num_buffers` buffers):
 * no status byte, and the next completion belongs to the same unit. A unit is published with one
 * used-index store — the driver never sees part of it — or, if one of its buffers died meanwhile, as
 * runts of length 0.
 */
export const STATUS_JOINED = -2

/** Native block I/O kinds (`RequestSource.submitIo`). */
export const FILE_IO_READ = 0
export const FILE_IO_WRITE = 1
export const FILE_IO_FLUSH = 2

/**
 * The typed arrays of the batch protocol, owned by JavaScript and reused for every batch — the native
 * side writes requests into them and reads completions out, so nothing is allocated per request:
 *
 * - `reqs`: per request `[ticket, queue, readableBytes, writableBytes, headLength, features]` (the
 *   session's negotiated device features, bits 0–23: requests and features always belong together);
 * - `heads`: per request the first 64 readable bytes (the request header, with no copy call);
 * - `done`: per completion `[ticket, usedLength, status]` (`status` < 0: no status byte;
 *   `STATUS_JOINED`: and the next completion is of the same unit);
 * - `ctl[0]`: completions waiting in `done`.
 */
export class BatchArrays {
  readonly reqs: Float64Array
  readonly heads: Uint8Array
  readonly view: DataView
  readonly done: Float64Array
  readonly ctl = new Uint32Array(1)

  constructor(
    readonly capacity: number,
    readonly doneCapacity: number,
  ) {
    this.reqs = new Float64Array(capacity * REQ_FIELDS)
    this.heads = new Uint8Array(capacity * HEAD_BYTES)
    this.view = new DataView(this.heads.buffer)
    this.done = new Float64Array(doneCapacity * DONE_FIELDS)
  }
}

/**
 * Completions and native I/O submissions. Completions made while a batch is being handled go out right
 * after it (one used-ring update per request, at most one interrupt per queue); completions made later
 * — after a backend's promise — go out together once per event-loop turn.
 */
export class Completions {
  /** True while the model handles a batch (the native side publishes right after). */
  inBatch = false
  #scheduled = false
  readonly #ops: Float64Array
  #opCount = 0
  #closed = false

  readonly #arrays: BatchArrays
  readonly #source: RequestSource
  constructor(arrays: BatchArrays, source: RequestSource) {
    this.#source = source
    this.#arrays = arrays
    this.#ops = new Float64Array(arrays.capacity * IO_FIELDS)
  }

  /** Completes `ticket`: `usedLength` bytes written into its writable buffers; `status` ≥ 0 goes into the last one. */
  complete(ticket: number, usedLength: number, status: number): void {
    const a = this.#arrays
    let n = a.ctl[0]!
    if (n === a.doneCapacity) {
      this.#source.flush()
      n = 0
    }
    const d = n * DONE_FIELDS
    a.done[d] = ticket
    a.done[d + 1] = usedLength
    a.done[d + 2] = status
    a.ctl[0] = n + 1
    if (!this.inBatch) this.#schedule()
  }

  /**
   * Makes room for `n` completions that must go out in one publish (a unit of `STATUS_JOINED` ones):
   * flushes now if fewer are free. `n` must not exceed the array's capacity (at least the ring size).
   */
  reserve(n: number): void {
    if (n > this.#arrays.doneCapacity) {
      throw new VduseError(
        `a unit of ${n} completions exceeds the batch arrays (${this.#arrays.doneCapacity})`,
        {
          code: 'ERR_VDUSE_INVALID_CONFIG',
        },
      )
    }
    if (this.#arrays.ctl[0]! + n > this.#arrays.doneCapacity) this.flush()
  }

  /** Hands request `ticket` to native block I/O, which completes it (status byte included). */
  submitIo(ticket: number, fd: number, kind: number, position: number, skip: number): void {
    if (this.#opCount * IO_FIELDS === this.#ops.length) this.flushIo()
    const o = this.#opCount * IO_FIELDS
    this.#ops[o] = ticket
    this.#ops[o + 1] = fd
    this.#ops[o + 2] = kind
    this.#ops[o + 3] = position
    this.#ops[o + 4] = skip
    this.#opCount++
    if (!this.inBatch) this.#schedule()
  }

  flushIo(): void {
    if (this.#opCount === 0) return
    const n = this.#opCount
    this.#opCount = 0
    this.#source.submitIo?.(this.#ops, n)
  }

  /** Sends everything now. */
  flush(): void {
    this.#scheduled = false
    if (this.#closed) return
    this.flushIo()
    if (this.#arrays.ctl[0]! > 0) this.#source.flush()
  }

  close(): void {
    this.flush()
    this.#closed = true
  }

  #schedule(): void {
    if (this.#scheduled) return
    this.#scheduled = true
    setImmediate(() => this.flush())
  }
}

/**
 * One batch of requests, read straight from the batch arrays: no object per request. Request `i` is
 * addressed by index while the batch is being handled; its `ticket` names it afterwards (completion,
 * memory access), and goes dead once it is completed or fenced — a late or duplicate use is harmless.
 */
export class RequestBatch {
  count = 0

  readonly #arrays: BatchArrays
  readonly #source: RequestSource
  constructor(
    arrays: BatchArrays,
    source: RequestSource,
    readonly completions: Completions,
  ) {
    this.#source = source
    this.#arrays = arrays
  }

  ticket(i: number): number {
    return this.#arrays.reqs[i * REQ_FIELDS]!
  }
  queue(i: number): number {
    return this.#arrays.reqs[i * REQ_FIELDS + 1]!
  }
  /** Bytes the driver gave the device to read (request headers and data out). */
  readableBytes(i: number): number {
    return this.#arrays.reqs[i * REQ_FIELDS + 2]!
  }
  /** Bytes the device may write (data in and status). */
  writableBytes(i: number): number {
    return this.#arrays.reqs[i * REQ_FIELDS + 3]!
  }
  /** The session's negotiated device features (bits 0–23) this request was made under. */
  features(i: number): number {
    return this.#arrays.reqs[i * REQ_FIELDS + 5]!
  }
  /** How many of the first readable bytes are in `heads` (at most 64). */
  headLength(i: number): number {
    return this.#arrays.reqs[i * REQ_FIELDS + 4]!
  }
  /** Where request `i`'s head starts in `heads` / `view`. */
  headOffset(i: number): number {
    return i * HEAD_BYTES
  }
  get heads(): Uint8Array {
    return this.#arrays.heads
  }
  /** A DataView over `heads`, for reading header fields without allocating. */
  get view(): DataView {
    return this.#arrays.view
  }

  /** See `RequestSource.read`. */
  read(ticket: number, offset: number, dst: Uint8Array, at = 0, length = dst.length - at): number {
    return this.#source.read(ticket, offset, dst, at, length)
  }
  /** See `RequestSource.write`. */
  write(ticket: number, offset: number, src: Uint8Array, at = 0, length = src.length - at): number {
    return this.#source.write(ticket, offset, src, at, length)
  }

  /** Completes a request; `status` (if given) is written into its last writable byte. */
  complete(ticket: number, usedLength: number, status = -1): void {
    this.completions.complete(ticket, usedLength, status)
  }

  /** Hands a block request to native I/O, which completes it. */
  submitIo(ticket: number, fd: number, kind: number, position: number, skip: number): void {
    this.completions.submitIo(ticket, fd, kind, position, skip)
  }

  get nativeIo(): boolean {
    return this.#source.submitIo !== undefined
  }
}

/** A ticket is `generation × 2^23 + queue × TICKET_QUEUE_UNIT + slot` (vduse-core's `Ticket`). */
export const TICKET_QUEUE_UNIT = 0x8000
/** How many queues a ticket can name. */
export const TICKET_QUEUES = 0x100
