import type { RequestSource } from './source'

/** Region keys carry the memory map's epoch in their high part (see the binding's `drain`). */
const EPOCH_DIVISOR = 65536

/** Native block I/O kinds (`RequestSource.fileIo`). */
export const FILE_IO_READ = 0
export const FILE_IO_WRITE = 1
export const FILE_IO_FLUSH = 2

/**
 * One drained batch of requests, in typed arrays owned by JavaScript and reused for every batch: no
 * object per request. Request `i` has a `slot` (its identity until completed), a queue, and buffer
 * pieces `0 .. readable(i)-1` (device-readable) followed by `writable(i)` device-writable ones.
 * Buffers are zero-copy `Buffer` views of guest memory; read and write them only inside the
 * request's pieces.
 */
export class RequestBatch {
  count = 0
  readonly header = new Uint32Array(2)
  readonly reqs: Uint32Array
  readonly segs: Float64Array
  private readonly regions = new Map<number, Buffer>()
  private readonly liveByEpoch = new Map<number, number>()
  private readonly slotEpoch: number[] = []
  private latestEpoch = 0

  constructor(
    private readonly source: RequestSource,
    private readonly completions: CompletionQueue,
    capacity: number,
    segmentCapacity: number,
  ) {
    this.reqs = new Uint32Array(capacity * 4)
    this.segs = new Float64Array(segmentCapacity * 3)
  }

  /** Fills the batch with waiting requests; 0 when there are none. */
  fill(): number {
    this.count = this.source.drain(this.header, this.reqs, this.segs)
    for (let i = 0; i < this.count; i++) {
      const slot = this.slot(i)
      const epoch =
        this.readable(i) + this.writable(i) > 0 ? Math.floor(this.regionKey(i, 0) / EPOCH_DIVISOR) : 0
      this.slotEpoch[slot] = epoch
      this.liveByEpoch.set(epoch, (this.liveByEpoch.get(epoch) ?? 0) + 1)
      if (epoch > this.latestEpoch) this.latestEpoch = epoch
    }
    return this.count
  }

  slot(i: number): number {
    return this.reqs[i * 4]!
  }
  queue(i: number): number {
    return this.reqs[i * 4 + 1]!
  }
  readable(i: number): number {
    return this.reqs[i * 4 + 3]! >>> 16
  }
  writable(i: number): number {
    return this.reqs[i * 4 + 3]! & 0xffff
  }
  /** Number of buffer pieces of request `i`. */
  pieces(i: number): number {
    return this.readable(i) + this.writable(i)
  }
  private segIndex(i: number, k: number): number {
    return (this.reqs[i * 4 + 2]! + k) * 3
  }
  private regionKey(i: number, k: number): number {
    return this.segs[this.segIndex(i, k)]!
  }
  /** The guest memory holding piece `k` of request `i` (index it from `offset(i, k)`). */
  buffer(i: number, k: number): Buffer {
    const key = this.regionKey(i, k)
    let view = this.regions.get(key)
    if (view === undefined) {
      view = Buffer.from(this.source.region(this.slot(i), key))
      this.regions.set(key, view)
    }
    return view
  }
  offset(i: number, k: number): number {
    return this.segs[this.segIndex(i, k) + 1]!
  }
  length(i: number, k: number): number {
    return this.segs[this.segIndex(i, k) + 2]!
  }
  /** Total bytes of pieces `from .. to-1`. */
  bytes(i: number, from: number, to: number): number {
    let n = 0
    for (let k = from; k < to; k++) n += this.length(i, k)
    return n
  }

  /**
   * Copies `out.length` bytes starting `skip` bytes into the readable pieces of request `i` into `out`;
   * false if the request has fewer.
   */
  readInto(i: number, skip: number, out: Uint8Array): boolean {
    let filled = 0
    const n = this.readable(i)
    for (let k = 0; k < n && filled < out.length; k++) {
      const len = this.length(i, k)
      if (skip >= len) {
        skip -= len
        continue
      }
      const take = Math.min(len - skip, out.length - filled)
      const start = this.offset(i, k) + skip
      this.buffer(i, k).copy(out, filled, start, start + take)
      filled += take
      skip = 0
    }
    return filled === out.length
  }

  /** Writes one byte at the very end of the writable pieces (virtio's usual status byte). */
  writeLastByte(i: number, value: number): boolean {
    const w = this.writable(i)
    if (w === 0) return false
    const k = this.pieces(i) - 1
    this.buffer(i, k)[this.offset(i, k) + this.length(i, k) - 1] = value
    return true
  }

  /** Completes request `i` (may be called later, after awaiting, as long as the batch was not refilled: use `completeSlot` then). */
  complete(i: number, usedLength: number): void {
    this.completeSlot(this.slot(i), usedLength)
  }

  /** Completes a request by slot; completions are sent in one call per batch or tick. */
  completeSlot(slot: number, usedLength: number): void {
    this.release(slot)
    this.completions.push(slot, usedLength)
  }

  /** Hands request `i` to native block I/O, which completes it (status byte included). */
  fileIo(i: number, fd: number, kind: number, position: number, skip: number): void {
    this.release(this.slot(i))
    this.completions.pushFileIo(this.slot(i), fd, kind, position, skip)
  }

  get nativeIo(): boolean {
    return this.source.fileIo !== undefined
  }

  /** Forgets region views of old memory maps once no request uses them (their mappings can then go). */
  private release(slot: number): void {
    const epoch = this.slotEpoch[slot] ?? 0
    const left = (this.liveByEpoch.get(epoch) ?? 1) - 1
    if (left > 0) {
      this.liveByEpoch.set(epoch, left)
      return
    }
    this.liveByEpoch.delete(epoch)
    if (epoch === this.latestEpoch) return
    for (const key of this.regions.keys()) {
      if (Math.floor(key / EPOCH_DIVISOR) === epoch) this.regions.delete(key)
    }
  }
}

/** Collects completions and native I/O submissions, and sends each kind in one native call. */
export class CompletionQueue {
  private readonly done: Uint32Array
  private doneCount = 0
  private readonly ops: Float64Array
  private opCount = 0
  private scheduled = false

  constructor(
    private readonly source: RequestSource,
    private readonly capacity: number,
  ) {
    this.done = new Uint32Array(capacity * 2)
    this.ops = new Float64Array(capacity * 5)
  }

  push(slot: number, usedLength: number): void {
    if (this.doneCount === this.capacity) this.flush()
    this.done[this.doneCount * 2] = slot
    this.done[this.doneCount * 2 + 1] = usedLength
    this.doneCount++
    this.schedule()
  }

  pushFileIo(slot: number, fd: number, kind: number, position: number, skip: number): void {
    if (this.opCount === this.capacity) this.flush()
    const o = this.opCount * 5
    this.ops[o] = slot
    this.ops[o + 1] = fd
    this.ops[o + 2] = kind
    this.ops[o + 3] = position
    this.ops[o + 4] = skip
    this.opCount++
    this.schedule()
  }

  /** Completions made asynchronously (after a backend's promise) go out together at the next tick. */
  private schedule(): void {
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(() => this.flush())
  }

  flush(): void {
    this.scheduled = false
    if (this.opCount > 0) {
      const n = this.opCount
      this.opCount = 0
      this.source.fileIo?.(this.ops, n)
    }
    if (this.doneCount > 0) {
      const n = this.doneCount
      this.doneCount = 0
      this.source.complete(this.done, n)
    }
  }
}
