import { VduseError } from '../../errors'
import {
  kNativeBlock,
  type BlockBackend,
  type BlockBackendCapabilities,
  type BlockIo,
  type NativeBlockPath,
} from '../../backends/backend'
import {
  FILE_IO_FLUSH,
  FILE_IO_READ,
  FILE_IO_WRITE,
  TICKET_QUEUE_UNIT,
  TICKET_QUEUES,
  type RequestBatch,
} from '../../transport/batch'
import type { RequestSource } from '../../transport/source'
import { VirtioDevice, type VirtioDeviceOptions } from '../../virtio/device'
import { waitFor } from '../../wait'
import {
  BLK_CONFIG,
  BLK_FEATURES,
  BLK_STATUS,
  HEADER_BYTES,
  ID_BYTES,
  MAX_RANGES,
  MAX_RANGE_SECTORS,
  RANGE_BYTES,
  REQ,
  SECTOR,
  VIRTIO_ID_BLOCK,
  type BlkFeature,
} from './constants'

export interface BlockDeviceOptions extends VirtioDeviceOptions {
  /** Where the data lives. Its optional methods decide which features are offered. */
  backend: BlockBackend
  /** Virtqueues (default 1); more than one offers MQ. */
  queues?: number
  /** Ring size per queue, a power of two up to 32768 (default 256). */
  queueSize?: number
  /** 512 or 4096 (default: the backend's `capabilities.logicalBlockSize`, else 512). */
  logicalBlockSize?: 512 | 4096
  /** Offer the device read-only (also when the backend is). */
  readOnly?: boolean
  /** Returned by GET_ID (up to 20 bytes; `/sys/block/vdX/serial`). */
  serial?: string
  /** A backend call that takes longer fails its request with an I/O error (ms; 0 = never, the default). */
  requestTimeoutMs?: number
  /** Most data buffers per request (seg_max, default min(queueSize - 2, 254)). */
  maxSegments?: number
  /** Largest data buffer (size_max), if the backend needs a limit. */
  maxSegmentSize?: number
}

/** Counters of the TypeScript model (the native side has its own: `counters()`). */
export interface BlockStats {
  reads: number
  writes: number
  flushes: number
  discards: number
  writeZeroes: number
  getIds: number
  ioErrors: number
  unsupported: number
  malformed: number
  timeouts: number
}

function fencedError(): VduseError {
  return new VduseError('the request was fenced (driver reset, or its memory unmapped)', {
    code: 'ERR_VDUSE_FENCED',
  })
}

/** `promise`, or an ERR_VDUSE_TIMEOUT after `ms`. */
async function within<T>(promise: Promise<T> | T, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new VduseError(`${what} did not finish within ${ms} ms`, { code: 'ERR_VDUSE_TIMEOUT' })),
      ms,
    )
  })
  try {
    return await Promise.race([promise, late])
  } finally {
    clearTimeout(timer)
  }
}

function isPromise(x: unknown): x is Promise<unknown> {
  return typeof (x as { then?: unknown } | null | undefined)?.then === 'function'
}

/** What a backend call does (`#invoke`). */
const OP_READ = 0
const OP_WRITE = 1
const OP_FLUSH = 2
const OP_RANGES = 3

/** Bounce buffers beyond this size are not kept for reuse. */
const POOLED_BOUNCE = 1 << 20

/** A BlockIo for one request; pooled, so serving requests allocates nothing on the copy path. */
class Io implements BlockIo {
  ticket = 0
  offset = 0
  length = 0
  /** Where the data starts in the request's buffers: after the header for writes, at 0 for reads. */
  #skip = 0
  #write = false
  fua = false
  #bounce: Buffer | undefined
  /** `buffers` were handed out: a read's data is in the bounce buffer, to be copied to the driver. */
  #bounced = false
  #controller: AbortController | undefined
  #dead = false

  readonly #source: RequestSource

  constructor(source: RequestSource) {
    this.#source = source
  }

  start(ticket: number, offset: number, length: number, write: boolean, skip: number, fua: boolean): this {
    this.ticket = ticket
    this.fua = fua
    this.offset = offset
    this.length = length
    this.#write = write
    this.#skip = skip
    this.#bounced = false
    this.#controller = undefined
    this.#dead = false
    return this
  }

  copyFrom(source: Uint8Array, sourceOffset = 0, length = this.length, at = 0): boolean {
    if (!this.#fits(source, sourceOffset, length, at)) return false
    return this.#source.write(this.ticket, at, source, sourceOffset, length) === length
  }

  copyTo(target: Uint8Array, targetOffset = 0, length = this.length, at = 0): boolean {
    if (!this.#fits(target, targetOffset, length, at)) return false
    return this.#source.read(this.ticket, this.#skip + at, target, targetOffset, length) === length
  }

  #fits(buffer: Uint8Array, offset: number, length: number, at: number): boolean {
    return (
      offset >= 0 && length >= 0 && at >= 0 && at + length <= this.length && offset + length <= buffer.length
    )
  }

  #bounceBuffer(): Buffer {
    if (this.#write && this.#dead && !this.#bounced) throw fencedError()
    if (!this.#bounce || this.#bounce.length < this.length) this.#bounce = Buffer.allocUnsafe(this.length)
    const view = this.#bounce.length === this.length ? this.#bounce : this.#bounce.subarray(0, this.length)
    if (!this.#bounced) {
      // A write's data is copied out of the driver's buffers once. If the request died first, the copy
      // fails and the buffer holds another request's bytes: nothing may reach the backend from it.
      if (this.#write && this.#source.read(this.ticket, this.#skip, view, 0, this.length) !== this.length) {
        this.#dead = true
        throw fencedError()
      }
      this.#bounced = true
    }
    return view
  }

  /** Throws ERR_VDUSE_FENCED for a write whose request died before its data was copied. */
  get buffers(): readonly Buffer[] {
    return [this.#bounceBuffer()]
  }

  forEach(fn: (buffer: Buffer, start: number, length: number, deviceOffset: number) => void): void {
    fn(this.#bounceBuffer(), 0, this.length, this.offset)
  }

  /** A read answered from the bounce buffer: copy it to the driver's buffers. False if the request is gone. */
  finishRead(): boolean {
    if (this.#write || !this.#bounced || !this.#bounce) return true
    return this.#source.write(this.ticket, 0, this.#bounce, 0, this.length) === this.length
  }

  get signal(): AbortSignal {
    this.#controller ??= new AbortController()
    if (this.#dead && !this.#controller.signal.aborted) this.abort()
    return this.#controller.signal
  }

  /** Whether the request stopped mattering (timed out or fenced). */
  get dead(): boolean {
    return this.#dead
  }

  get cancelled(): boolean {
    return this.#dead
  }

  /** The request stopped mattering (timed out or fenced): tell the backend. */
  abort(reason: string = 'request timed out'): void {
    this.#dead = true
    if (this.#controller && !this.#controller.signal.aborted) {
      this.#controller.abort(new VduseError(reason, { code: 'ERR_VDUSE_TIMEOUT' }))
    }
  }

  /** May it be reused (its bounce buffer is not too large)? */
  get poolable(): boolean {
    return (this.#bounce?.length ?? 0) <= POOLED_BOUNCE
  }
}

/** A backend call in progress: from the call until it returns, whether its request was answered or not. */
interface Pending {
  ticket: number
  used: number
  deadline: number
  io: Io | undefined
  /** Discard / write-zeroes: their cancellation (transfers use their Io's). */
  cancel: AbortController | undefined
  /** The device bytes it touches, `[start, end)` (a discard's or write-zeroes' ranges: their hull). */
  start: number
  end: number
  /** It may write (a write, discard or write-zeroes): a ghost if its request dies before it returns. */
  writes: boolean
}

/** Native block I/O (`OP_NATIVE`) held back: `kind` says which. */
const OP_NATIVE = 4

/**
 * A request not started yet: waiting for a backend slot (`maxInFlight`), for a ghost on its bytes to
 * return, or for a handover to be decided.
 */
interface Waiting {
  ticket: number
  op: number
  /** The call of an `OP_RANGES` request. */
  call: (() => Promise<void>) | undefined
  used: number
  deadline: number
  io: Io | undefined
  cancel: AbortController | undefined
  start: number
  end: number
  /** `OP_NATIVE`: the native I/O kind (its file position is `start`). */
  kind: number
}

/**
 * A virtio-blk device backed by any `BlockBackend`. Requests IN, OUT, FLUSH, GET_ID, DISCARD and
 * WRITE_ZEROES; everything else is answered UNSUPP. A request outside the device, malformed, or whose
 * backend call throws, rejects or times out is answered IOERR — and the device keeps serving.
 */
export class BlockDevice extends VirtioDevice {
  readonly backend: BlockBackend
  readonly logicalBlockSize: number
  readonly readOnly: boolean
  readonly queues: number
  /** The features offered to the driver. */
  readonly offeredFeatures: readonly BlkFeature[]
  readonly stats: BlockStats = {
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    writeZeroes: 0,
    getIds: 0,
    ioErrors: 0,
    unsupported: 0,
    malformed: 0,
    timeouts: 0,
  }
  #bytes: number
  readonly #serial = Buffer.alloc(ID_BYTES)
  readonly #range = Buffer.alloc(RANGE_BYTES)
  readonly #pool: Io[] = []
  /**
   * Requests waiting for the backend, at `queue × queueSize + slot` (no Map on the data path). Filled
   * in full at start so V8 keeps it a dense array: indexes far past its length would make it a dictionary.
   */
  readonly #pending: Array<Pending | undefined> = []
  #queueSize = 0
  #pendingCount = 0
  readonly #timeoutMs: number
  #sweeper: NodeJS.Timeout | undefined
  readonly #nativeFd: number | undefined
  /** The backend's native data path, when the device is served by it on native threads. */
  #nativePathImpl: NativeBlockPath | undefined
  readonly #canFlush: boolean
  readonly #canDiscard: boolean
  readonly #canWriteZeroes: boolean
  readonly #maxInFlight: number
  /** Backend calls that have not returned yet (answered or not): what `maxInFlight` limits. */
  #running = 0
  /**
   * Running calls that may write (writes, discards, write-zeroes) whose requests timed out or were
   * fenced: what they write may still land, so requests on the same bytes wait until they return.
   */
  readonly #ghosts = new Set<Pending>()
  /** Requests beyond `maxInFlight`, in arrival order (bounded by the rings' sizes). */
  #waiting: Waiting[] = []
  /** Requests held back by a ghost on their bytes, or while a handover is decided (bounded likewise). */
  #held: Waiting[] = []
  /** Holds on starting anything new (a handover being decided, a shrink under way): nothing starts while > 0. */
  #pauses = 0
  /** Online resizes, one at a time, and how many are queued or running. */
  #resizing: Promise<void> = Promise.resolve()
  #resizes = 0
  /** `shutdown` ran: nothing new reaches the backend (a released device's requests are the successor's). */
  #stopped = false
  /** Every write asks for FUA (the backend declared `fua` but cannot flush). */
  readonly #fua: boolean
  readonly #capabilities: Required<Pick<BlockBackendCapabilities, 'writeZeroesUnmap'>> & {
    physicalBlockSize: number
    optimalIoSize: number
  }

  /** Creates the device and starts serving it; attach it with `attach()`. */
  static async create(options: BlockDeviceOptions): Promise<BlockDevice> {
    const device = new BlockDevice(options)
    await device.prepare()
    device.#start(options)
    await device.#startNativePath()
    await device.opened()
    return device
  }

  /**
   * A backend with a native data path of its own (the NBD client) gets it now, before any request is
   * served (requests arriving meanwhile wait): from then on requests go there, never to read/write.
   */
  async #startNativePath(): Promise<void> {
    const path = this.#nativePathImpl
    const s = this.source
    if (!path || !s.nbdStart || !s.nbdAttach || !s.nbdFlush || !s.nbdCounters) return
    const host = {
      nbdStart: s.nbdStart,
      nbdAttach: s.nbdAttach,
      nbdFlush: s.nbdFlush,
      nbdCounters: s.nbdCounters,
    }
    this.#pause()
    try {
      await path.start(host, { requestTimeoutMs: this.#timeoutMs })
    } catch (err) {
      // Closed while still paused: what arrived meanwhile is dropped with the device, never submitted.
      await this.close().catch(() => {})
      throw err
    } finally {
      this.#unpause()
    }
  }

  private constructor(options: BlockDeviceOptions) {
    super(options)
    const bad = (message: string): never => {
      throw new VduseError(message, { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    const { backend } = options
    if (typeof backend?.read !== 'function' || typeof backend.write !== 'function') {
      bad('backend must implement read() and write()')
    }
    this.backend = backend
    const caps: BlockBackendCapabilities = backend.capabilities ?? {}
    const minimum = caps.logicalBlockSize ?? 512
    if (minimum !== 512 && minimum !== 4096) bad('capabilities.logicalBlockSize must be 512 or 4096')
    this.logicalBlockSize = options.logicalBlockSize ?? minimum
    if (this.logicalBlockSize !== 512 && this.logicalBlockSize !== 4096)
      bad('logicalBlockSize must be 512 or 4096')
    if (this.logicalBlockSize < minimum) {
      bad(
        `the backend's storage addresses ${minimum}-byte blocks; logicalBlockSize ${this.logicalBlockSize} is too small`,
      )
    }
    const physical = caps.physicalBlockSize ?? this.logicalBlockSize
    if (
      !Number.isInteger(physical) ||
      physical < this.logicalBlockSize ||
      (physical & (physical - 1)) !== 0
    ) {
      bad('capabilities.physicalBlockSize must be a power of two, at least the logical block size')
    }
    const optimal = caps.optimalIoSize ?? 0
    if (!Number.isInteger(optimal) || optimal < 0 || optimal % this.logicalBlockSize !== 0) {
      bad('capabilities.optimalIoSize must be a multiple of the logical block size')
    }
    this.#maxInFlight = caps.maxInFlight ?? Infinity
    if (!(this.#maxInFlight >= 1)) bad('capabilities.maxInFlight must be at least 1')
    /** A capability: declared, or implied by the method; declaring one without its method is an error. */
    const can = (name: 'flush' | 'discard' | 'writeZeroes'): boolean => {
      const has = typeof backend[name] === 'function'
      if (caps[name] === true && !has) bad(`capabilities.${name} is true but the backend has no ${name}()`)
      return caps[name] ?? has
    }
    const canFlush = can('flush')
    const canDiscard = can('discard')
    const canWriteZeroes = can('writeZeroes')
    this.#canFlush = canFlush
    this.#canDiscard = canDiscard
    this.#canWriteZeroes = canWriteZeroes
    this.#fua = !canFlush && (caps.fua ?? false)
    this.#capabilities = {
      writeZeroesUnmap: caps.writeZeroesUnmap ?? canDiscard,
      physicalBlockSize: physical,
      optimalIoSize: optimal,
    }
    this.#bytes = backend.size
    if (!Number.isSafeInteger(this.#bytes) || this.#bytes <= 0 || this.#bytes % this.logicalBlockSize !== 0) {
      bad(`backend size ${this.#bytes} must be a positive multiple of ${this.logicalBlockSize}`)
    }
    this.queues = options.queues ?? 1
    if (!Number.isInteger(this.queues) || this.queues < 1 || this.queues > 64) bad('queues must be 1..64')
    this.readOnly = (options.readOnly ?? false) || (backend.readOnly ?? false)
    const serial = Buffer.from(options.serial ?? '', 'utf8')
    if (serial.length > ID_BYTES) bad(`serial is ${serial.length} bytes; at most ${ID_BYTES}`)
    serial.copy(this.#serial)
    this.#timeoutMs = options.requestTimeoutMs ?? 0
    if (!(this.#timeoutMs >= 0)) bad('requestTimeoutMs must be >= 0')
    this.#nativeFd = backend.fd
    const features: BlkFeature[] = ['SEG_MAX', 'BLK_SIZE', 'TOPOLOGY']
    if (options.maxSegmentSize !== undefined) features.push('SIZE_MAX')
    if (canFlush) features.push('FLUSH')
    if (this.readOnly) features.push('RO')
    if (this.queues > 1) features.push('MQ')
    if (!this.readOnly && canDiscard) features.push('DISCARD')
    if (!this.readOnly && canWriteZeroes) features.push('WRITE_ZEROES')
    this.offeredFeatures = features
  }

  #start(options: BlockDeviceOptions): void {
    const queueSize = options.queueSize ?? 256
    if (
      !Number.isInteger(queueSize) ||
      queueSize < 4 ||
      queueSize > 32768 ||
      (queueSize & (queueSize - 1)) !== 0
    ) {
      throw new VduseError('queueSize must be a power of two from 4 to 32768', {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    this.#queueSize = queueSize
    for (let k = this.queues * queueSize; k > 0; k--) this.#pending.push(undefined)
    const segMax = options.maxSegments ?? Math.min(queueSize - 2, 254)
    const config = BLK_CONFIG.encode({
      capacity: BigInt(this.#bytes / SECTOR),
      size_max: options.maxSegmentSize ?? 0,
      seg_max: segMax,
      blk_size: this.logicalBlockSize,
      physical_block_exp: Math.log2(this.#capabilities.physicalBlockSize / this.logicalBlockSize),
      min_io_size: 1,
      opt_io_size: this.#capabilities.optimalIoSize / this.logicalBlockSize,
      num_queues: this.queues,
      max_discard_sectors: MAX_RANGE_SECTORS,
      max_discard_seg: MAX_RANGES,
      discard_sector_alignment: this.logicalBlockSize / SECTOR,
      max_write_zeroes_sectors: MAX_RANGE_SECTORS,
      max_write_zeroes_seg: MAX_RANGES,
      write_zeroes_may_unmap: this.#capabilities.writeZeroesUnmap ? 1 : 0,
    })
    // A backend with a native data path of its own (NBD) is served by it on the device's worker threads:
    // no request reaches JavaScript.
    this.#nativePathImpl = this.nativeTransport ? this.backend[kNativeBlock]?.() : undefined
    this.open({
      ...(this.#nativePathImpl === undefined
        ? {}
        : {
            nbdModel: {
              serial: this.#serial,
              readOnly: this.readOnly,
              flush: this.#canFlush,
              discard: this.offeredFeatures.includes('DISCARD'),
              writeZeroes: this.offeredFeatures.includes('WRITE_ZEROES'),
            },
          }),
      deviceId: VIRTIO_ID_BLOCK,
      features: BLK_FEATURES.mask(this.offeredFeatures),
      config,
      numQueues: this.queues,
      queueSize,
      // header + data buffers + status
      maxSegments: segMax + 2,
      kind: 'blk',
      ...(this.backend.id === undefined ? {} : { backendId: this.backend.id }),
    })
    if (this.#timeoutMs > 0) {
      this.#sweeper = setInterval(() => this.#expire(), Math.max(10, this.#timeoutMs / 4))
      this.#sweeper.unref()
    }
  }

  /** Device size in bytes. */
  get size(): number {
    return this.#bytes
  }

  /** The negotiated virtio-blk features, by name (after `ready`). */
  get negotiatedBlkFeatures(): BlkFeature[] {
    return BLK_FEATURES.names(this.negotiatedFeatures)
  }

  /**
   * Online resize: grows or shrinks the backend, updates the capacity in the config space and raises a
   * config interrupt, so the driver sees the new size. Resizes run one at a time. A shrink first refuses
   * requests past the new end, holds new requests back, and waits (up to the drain timeout) until no
   * backend call writes past the new end and native I/O is idle — a late write must not extend the storage
   * again — then shrinks the storage; if they do not end in time it fails with ERR_VDUSE_TIMEOUT and
   * changes nothing. A close or handover waits for a resize under way.
   */
  resize(size: number): Promise<void> {
    const run = (): Promise<void> => this.#resize(size)
    this.#resizes++
    const next = this.#resizing.then(run, run).finally(() => this.#resizes--)
    this.#resizing = next.catch(() => {})
    return next
  }

  /** Nothing new starts until `#unpause` (pauses nest: a handover and a shrink may overlap). */
  #pause(): void {
    this.#pauses++
  }

  #unpause(): void {
    if (--this.#pauses > 0) return
    this.#releaseHeld()
    this.#pump()
  }

  async #resize(size: number): Promise<void> {
    this.assertOpen()
    if (!Number.isSafeInteger(size) || size <= 0 || size % this.logicalBlockSize !== 0) {
      throw new VduseError(`size must be a positive multiple of ${this.logicalBlockSize}`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    if (!this.backend.resize) {
      throw new VduseError('this backend cannot be resized', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    const old = this.#bytes
    if (size >= old) {
      await this.backend.resize(size)
      this.#bytes = size
    } else {
      // From here on requests past the new end are refused, and nothing new starts until the storage
      // has shrunk: what still writes past the new end must end first.
      this.#bytes = size
      this.#pause()
      try {
        this.completions.flushIo()
        const quiet = (): boolean => !this.#writesPast(size) && !this.#nativeBusy()
        if (!(await waitFor(quiet, Date.now() + this.drainTimeoutMs))) {
          throw new VduseError(
            `cannot shrink ${this.name}: writes past ${size} bytes are still running after ${this.drainTimeoutMs} ms`,
            { code: 'ERR_VDUSE_TIMEOUT', hint: 'nothing was changed; try again once the backend answers' },
          )
        }
        this.assertOpen()
        await this.backend.resize(size)
      } catch (err) {
        this.#bytes = old
        throw err
      } finally {
        this.#unpause()
      }
    }
    const { offset, data } = BLK_CONFIG.encodeField('capacity', BigInt(size / SECTOR))
    this.updateConfig(offset, data)
  }

  /** Waits for resizes queued or under way (up to `deadline`); false if one still runs. */
  #resizesDone(deadline: number): Promise<boolean> {
    return waitFor(() => this.#resizes === 0, deadline)
  }

  /** Whether a backend call that may write past `size` still runs (its request answered or not). */
  #writesPast(size: number): boolean {
    for (const p of this.#pending) if (p?.writes && p.end > size) return true
    for (const p of this.#ghosts) if (p.end > size) return true
    return false
  }

  /** Whether native I/O still has something queued or running. */
  #nativeBusy(): boolean {
    const native = this.#nativeFd !== undefined || this.#nativePathImpl !== undefined
    return native && this.source.ioQuiet?.() === false
  }

  protected inFlight(): number {
    // Calls still running count even when their requests timed out and were answered: a close waits
    // for them (up to the drain timeout), or a late write could land after the last flush.
    return Math.max(this.#pendingCount, this.#running) + this.#waiting.length + this.#held.length
  }

  /**
   * Before a handover: starts nothing new (requests keep arriving and stay in flight: the successor
   * serves them) and waits until every backend call of this server has returned and native I/O is
   * idle — or `deadline`. False: something of this server may still write, and the handover must not
   * happen (`resume` undoes the pause).
   */
  protected override async quiesce(deadline: number): Promise<boolean> {
    this.#pause()
    // Served by the workers over NBD: they hold new requests back too.
    if (this.#nativePathImpl) this.source.nbdHold?.(true)
    // A resize under way finishes first.
    if (!(await this.#resizesDone(deadline))) return false
    // Native operations decided before the pause go to the pool now, to be waited for below.
    this.completions.flushIo()
    return waitFor(() => this.#running === 0 && !this.#nativeBusy(), deadline)
  }

  protected override handoverRefusal(): string | undefined {
    // A successor takes over only with a backend of the same identity; one without dies with this process.
    return this.backend.id === undefined
      ? "its backend has no identity (its data, like a memory disk's, dies with this process)"
      : undefined
  }

  protected override resume(): void {
    if (this.#nativePathImpl) this.source.nbdHold?.(false)
    this.#unpause()
  }

  /** The final flush (bounded: `requestTimeoutMs`, or 30 s when requests have no limit). */
  protected async shutdown(): Promise<void> {
    if (this.#sweeper) clearInterval(this.#sweeper)
    // A resize under way gets the drain timeout to finish (it sees the device closing and gives up where
    // it still can); the storage is flushed after it.
    await this.#resizesDone(Date.now() + this.drainTimeoutMs)
    // Requests still waiting never start: after a close their tickets are dead, after a release they are
    // the successor's to serve. Nothing may reach the backend after its final flush.
    this.#stopped = true
    for (const w of [...this.#waiting.splice(0), ...this.#held.splice(0)]) {
      w.io?.abort('the device is closing')
      w.cancel?.abort(fencedError())
    }
    if (this.readOnly || !this.#canFlush) return
    await within(this.backend.flush!(), this.#timeoutMs || 30_000, 'the final flush')
  }

  protected override failRequest(ticket: number): void {
    this.stats.ioErrors++
    this.completions.complete(ticket, 1, BLK_STATUS.IOERR)
  }

  protected override onFenced(): void {
    // Requests the backend still holds whose tickets died: forget them (their calls, if they may write,
    // become ghosts), and tell the backend. Live ones (of a new session) stay.
    for (let k = 0; k < this.#pending.length; k++) {
      const p = this.#pending[k]
      if (p && !this.isLive(p.ticket)) this.#orphanFenced(k, p)
    }
    const alive = (list: Waiting[]): Waiting[] => {
      const live: Waiting[] = []
      for (const w of list) {
        if (this.isLive(w.ticket)) live.push(w)
        else this.#recycle(w.io)
      }
      return live
    }
    if (this.#waiting.length > 0) this.#waiting = alive(this.#waiting)
    if (this.#held.length > 0) this.#held = alive(this.#held)
    this.#pump()
    this.#updateRef()
  }

  protected handleRequest(batch: RequestBatch, i: number): void {
    const ticket = batch.ticket(i)
    const readable = batch.readableBytes(i)
    const writable = batch.writableBytes(i)
    if (writable === 0) {
      // No status byte to answer in: nothing meaningful can be said.
      this.stats.malformed++
      return batch.complete(ticket, 0)
    }
    if (batch.headLength(i) < HEADER_BYTES) {
      this.stats.malformed++
      return this.#finish(ticket, BLK_STATUS.IOERR, 0)
    }
    const view = batch.view
    const h = batch.headOffset(i)
    const type = view.getUint32(h, true)
    const sector = view.getUint32(h + 8, true) + view.getUint32(h + 12, true) * 0x1_0000_0000
    const dataIn = writable - 1
    const dataOut = readable - HEADER_BYTES
    switch (type) {
      case REQ.IN:
        this.stats.reads++
        return this.#transfer(batch, ticket, sector, dataIn, false)
      case REQ.OUT:
        this.stats.writes++
        return this.#transfer(batch, ticket, sector, dataOut, true)
      case REQ.FLUSH:
        this.stats.flushes++
        if (this.#nativeFd !== undefined && batch.nativeIo) return this.#native(ticket, FILE_IO_FLUSH, 0, 0)
        if (!this.#canFlush) return this.#finish(ticket, BLK_STATUS.OK, 0)
        return this.#run(ticket, OP_FLUSH, undefined, 0, undefined, undefined, 0, 0)
      case REQ.GET_ID: {
        this.stats.getIds++
        const n = Math.min(ID_BYTES, dataIn)
        batch.write(ticket, 0, this.#serial, 0, n)
        return this.#finish(ticket, BLK_STATUS.OK, n)
      }
      case REQ.DISCARD:
      case REQ.WRITE_ZEROES:
        return this.#ranges(batch, ticket, type, dataOut)
      default:
        this.stats.unsupported++
        return this.#finish(ticket, BLK_STATUS.UNSUPP, 0)
    }
  }

  #transfer(batch: RequestBatch, ticket: number, sector: number, length: number, write: boolean): void {
    const offset = sector * SECTOR
    if (
      (write && this.readOnly) ||
      length < 0 ||
      // A driver sends whole logical blocks (Linux does); a hostile one must not reach a backend that
      // relies on it, or an O_DIRECT file, with less.
      length % this.logicalBlockSize !== 0 ||
      offset % this.logicalBlockSize !== 0 ||
      !Number.isSafeInteger(offset) ||
      offset + length > this.#bytes
    ) {
      return this.#finish(ticket, BLK_STATUS.IOERR, 0)
    }
    if (this.#nativeFd !== undefined && batch.nativeIo) {
      // Native threads move the data and answer the request; JavaScript never touches the bytes.
      return this.#native(ticket, write ? FILE_IO_WRITE : FILE_IO_READ, offset, offset + length)
    }
    const io = (this.#pool.pop() ?? new Io(this.source)).start(
      ticket,
      offset,
      length,
      write,
      write ? HEADER_BYTES : 0,
      write && this.#fua,
    )
    this.#run(
      ticket,
      write ? OP_WRITE : OP_READ,
      undefined,
      write ? 0 : length,
      io,
      undefined,
      offset,
      offset + length,
    )
  }

  #ranges(batch: RequestBatch, ticket: number, type: number, dataOut: number): void {
    const discard = type === REQ.DISCARD
    if (discard) this.stats.discards++
    else this.stats.writeZeroes++
    if (!(discard ? this.#canDiscard : this.#canWriteZeroes)) {
      this.stats.unsupported++
      return this.#finish(ticket, BLK_STATUS.UNSUPP, 0)
    }
    const count = dataOut / RANGE_BYTES
    if (this.readOnly || !Number.isInteger(count) || count < 1 || count > MAX_RANGES) {
      return this.#finish(ticket, BLK_STATUS.IOERR, 0)
    }
    const list: Array<[number, number, boolean]> = []
    let start = Infinity
    let end = 0
    for (let k = 0; k < count; k++) {
      batch.read(ticket, HEADER_BYTES + k * RANGE_BYTES, this.#range)
      const sector = this.#range.readUInt32LE(0) + this.#range.readUInt32LE(4) * 0x1_0000_0000
      const sectors = this.#range.readUInt32LE(8)
      const flags = this.#range.readUInt32LE(12)
      const unmap = (flags & 1) === 1
      // Unknown flags, or unmap on a discard, are not ours to interpret (spec 5.2.6.2).
      if ((flags & ~1) !== 0 || (discard && unmap)) {
        this.stats.unsupported++
        return this.#finish(ticket, BLK_STATUS.UNSUPP, 0)
      }
      const offset = sector * SECTOR
      const length = sectors * SECTOR
      if (sectors > MAX_RANGE_SECTORS || !Number.isSafeInteger(offset) || offset + length > this.#bytes) {
        return this.#finish(ticket, BLK_STATUS.IOERR, 0)
      }
      list.push([offset, length, unmap])
      start = Math.min(start, offset)
      end = Math.max(end, offset + length)
    }
    const backend = this.backend
    // Ranges are rare: a controller each, so a fenced or timed-out request stops between ranges and its
    // backend knows not to start it (a late write of zeroes would destroy newer data).
    const cancel = new AbortController()
    const { signal } = cancel
    const native = this.#nativeFd !== undefined && batch.nativeIo ? this.#nativeFd : undefined
    this.#run(
      ticket,
      OP_RANGES,
      async () => {
        for (const [offset, length, unmap] of list) {
          if (signal.aborted) throw signal.reason
          // Native writes of a fenced request may still be in their system calls on these bytes: go after
          // them, never under them.
          if (native !== undefined && this.source.ioGhosts?.())
            await this.#afterNativeGhosts(native, offset, length)
          if (signal.aborted) throw signal.reason
          if (discard) await backend.discard!(offset, length, signal)
          else await backend.writeZeroes!(offset, length, unmap, signal)
        }
      },
      0,
      undefined,
      cancel,
      start,
      end,
    )
  }

  /** Waits until no native transfer of a fenced request runs on `[offset, offset+length)` of `fd`. */
  async #afterNativeGhosts(fd: number, offset: number, length: number): Promise<void> {
    const wait = this.#timeoutMs || this.drainTimeoutMs
    if (!(await waitFor(() => this.source.ioRangeQuiet!(fd, offset, length), Date.now() + wait))) {
      throw new VduseError(`native writes to these bytes are still running after ${wait} ms`, {
        code: 'ERR_VDUSE_TIMEOUT',
      })
    }
  }

  /**
   * Hands a request on device bytes `[start, end)` (a flush: none) to native I/O — unless a ghost runs
   * on its bytes or a handover is being decided. The caller checked that it lies inside the device.
   */
  #native(ticket: number, kind: number, start: number, end: number): void {
    if (this.#stopped) return // shutting down: left in flight
    if (this.#pauses > 0 || this.#ghostOverlaps(start, end)) {
      return this.#enqueue(true, ticket, OP_NATIVE, undefined, 0, undefined, undefined, start, end, kind)
    }
    this.#submitNative(ticket, kind, start)
  }

  #submitNative(ticket: number, kind: number, position: number): void {
    const skip = kind === FILE_IO_WRITE ? HEADER_BYTES : 0
    this.completions.submitIo(ticket, this.#nativeFd!, kind, position, skip)
  }

  /** Whether `[start, end)` overlaps what a ghost may still write. */
  #ghostOverlaps(start: number, end: number): boolean {
    if (this.#ghosts.size === 0 || start >= end) return false
    for (const p of this.#ghosts) {
      if (p.start < end && start < p.end) return true
    }
    return false
  }

  /**
   * Runs a backend call; answers now if it returned, or when its promise settles. Beyond `maxInFlight`
   * calls at once, it waits its turn; on bytes a ghost may still write, it waits for the ghost.
   */
  #run(
    ticket: number,
    op: number,
    call: (() => Promise<void>) | undefined,
    dataBytes: number,
    io: Io | undefined,
    cancel: AbortController | undefined,
    start: number,
    end: number,
  ): void {
    if (this.#stopped) return // shutting down: left in flight (see shutdown)
    const held = this.#pauses > 0 || this.#ghostOverlaps(start, end)
    if (held || this.#running >= this.#maxInFlight) {
      return this.#enqueue(held, ticket, op, call, dataBytes, io, cancel, start, end, 0)
    }
    this.#call(ticket, op, call, dataBytes, io, cancel, undefined, start, end)
  }

  /** Puts a request aside: `held` (behind a ghost or a pause), or waiting for a backend slot. */
  #enqueue(
    held: boolean,
    ticket: number,
    op: number,
    call: (() => Promise<void>) | undefined,
    used: number,
    io: Io | undefined,
    cancel: AbortController | undefined,
    start: number,
    end: number,
    kind: number,
  ): void {
    const deadline = this.#timeoutMs > 0 ? Date.now() + this.#timeoutMs : Infinity
    ;(held ? this.#held : this.#waiting).push({
      ticket,
      op,
      call,
      used,
      deadline,
      io,
      cancel,
      start,
      end,
      kind,
    })
    this.#updateRef()
  }

  /** The backend call of a request: no closure per request on the synchronous path. */
  #invoke(op: number, call: (() => Promise<void>) | undefined, io: Io | undefined): unknown {
    switch (op) {
      case OP_READ:
        return this.backend.read(io!)
      case OP_WRITE:
        return this.backend.write(io!)
      case OP_FLUSH:
        return this.backend.flush!()
      default:
        return call!()
    }
  }

  /**
   * Starts waiting requests while there is room. Those whose ticket died are dropped; those past their
   * deadline are failed without starting; those on a ghost's bytes are held until it returns.
   */
  #pump(): void {
    const now = Date.now()
    while (
      !this.#stopped &&
      this.#pauses === 0 &&
      this.#waiting.length > 0 &&
      this.#running < this.#maxInFlight
    ) {
      this.#startWaiting(this.#waiting.shift()!, now)
    }
    this.#updateRef()
  }

  /** A ghost returned, or a handover was called off: held requests go their normal way again. */
  #releaseHeld(): void {
    if (this.#held.length === 0 || this.#stopped || this.#pauses > 0) return
    const now = Date.now()
    const held = this.#held
    this.#held = []
    for (const w of held) this.#startWaiting(w, now)
    this.#updateRef()
  }

  /**
   * A request that waited (for a slot, a ghost or a pause) goes its way: dropped if its ticket died,
   * failed if past its deadline or now past the end (the device shrank meanwhile), held again behind a
   * ghost on its bytes, back in line without a free slot — or started.
   */
  #startWaiting(w: Waiting, now: number): void {
    if (!this.isLive(w.ticket)) this.#recycle(w.io)
    else if (w.deadline <= now) this.#timeOutWaiting(w)
    else if (this.#ghostOverlaps(w.start, w.end)) this.#held.push(w)
    else if (w.end > this.#bytes) {
      this.#recycle(w.io)
      this.#finish(w.ticket, BLK_STATUS.IOERR, 0)
    } else if (w.op === OP_NATIVE) this.#submitNative(w.ticket, w.kind, w.start)
    else if (this.#running >= this.#maxInFlight) this.#waiting.push(w)
    else this.#call(w.ticket, w.op, w.call, w.used, w.io, w.cancel, w.deadline, w.start, w.end)
  }

  #timeOutWaiting(w: Waiting): void {
    this.stats.timeouts++
    w.io?.abort()
    w.cancel?.abort(new VduseError('request timed out', { code: 'ERR_VDUSE_TIMEOUT' }))
    this.#finish(w.ticket, BLK_STATUS.IOERR, 0)
    this.#requestError(
      new VduseError(`request timed out after ${this.#timeoutMs} ms waiting for the backend`, {
        code: 'ERR_VDUSE_TIMEOUT',
      }),
    )
  }

  /** The sweeper keeps the process alive exactly while requests wait for the backend (or a slot). */
  #updateRef(): void {
    if (this.#pendingCount + this.#waiting.length + this.#held.length > 0) this.#sweeper?.ref()
    else this.#sweeper?.unref()
  }

  #call(
    ticket: number,
    op: number,
    call: (() => Promise<void>) | undefined,
    dataBytes: number,
    io: Io | undefined,
    cancel: AbortController | undefined,
    /** Set for a request that waited its turn; otherwise its timeout starts when the call returns a promise. */
    waitedDeadline: number | undefined,
    start: number,
    end: number,
  ): void {
    let result: unknown
    try {
      result = this.#invoke(op, call, io)
    } catch (err) {
      this.#backendFailed(err)
      this.#recycle(io)
      return this.#finish(ticket, BLK_STATUS.IOERR, 0)
    }
    if (!isPromise(result)) {
      const ok = io === undefined || io.finishRead()
      this.#recycle(io)
      return this.#finish(ticket, ok ? BLK_STATUS.OK : BLK_STATUS.IOERR, ok ? dataBytes : 0)
    }
    const deadline = waitedDeadline ?? (this.#timeoutMs > 0 ? Date.now() + this.#timeoutMs : Infinity)
    const writes = op === OP_WRITE || op === OP_RANGES
    const record: Pending = {
      ticket,
      used: dataBytes,
      deadline,
      io,
      cancel,
      start,
      end,
      writes,
    }
    const slot = this.#slotOf(ticket)
    const stale = this.#pending[slot]
    // The slot was reused: its previous request was fenced without our hearing of it yet.
    if (stale) this.#orphanFenced(slot, stale)
    this.#pending[slot] = record
    // A request waiting for its deadline is work in progress: the sweeper keeps the loop alive meanwhile.
    if (this.#pendingCount++ === 0) this.#updateRef()
    // The call occupies its place under maxInFlight until it returns — also after its request timed out
    // or was fenced and answered: the backend is still busy with it.
    this.#running++
    result.then(
      () => this.#returned(slot, record, BLK_STATUS.OK),
      (err: unknown) => {
        this.#backendFailed(err)
        this.#returned(slot, record, BLK_STATUS.IOERR)
      },
    )
  }

  /** The dense index of a ticket's queue and slot (see `#pending`). */
  #slotOf(ticket: number): number {
    return (
      (Math.floor(ticket / TICKET_QUEUE_UNIT) % TICKET_QUEUES) * this.#queueSize +
      (ticket % TICKET_QUEUE_UNIT)
    )
  }

  /** Forgets the request of a call (answered, or dead). */
  #forget(slot: number): void {
    this.#pending[slot] = undefined
    if (--this.#pendingCount === 0) this.#updateRef()
  }

  /**
   * The request of a call still running died (it timed out or was fenced): forget it and tell the
   * backend. A call that may write becomes a ghost — requests on its bytes wait until it returns.
   */
  #orphan(slot: number, record: Pending, ioReason: string | undefined, cancelReason: Error): void {
    this.#forget(slot)
    if (record.writes) this.#ghosts.add(record)
    record.io?.abort(ioReason)
    record.cancel?.abort(cancelReason)
  }

  #orphanFenced(slot: number, record: Pending): void {
    this.#orphan(slot, record, 'the request was fenced (driver reset, or its memory unmapped)', fencedError())
  }

  #returned(slot: number, record: Pending, status: number): void {
    this.#running--
    if (this.#pending[slot] === record) this.#settle(slot, record, status)
    // Only a returning ghost frees held requests (an ended pause frees them in #unpause).
    if (this.#ghosts.delete(record)) this.#releaseHeld()
    this.#pump()
  }

  #settle(slot: number, record: Pending, status: number): void {
    this.#forget(slot)
    let ok = status === BLK_STATUS.OK
    if (ok && record.io) ok = record.io.finishRead()
    this.#recycle(record.io)
    this.#finish(record.ticket, ok ? BLK_STATUS.OK : BLK_STATUS.IOERR, ok ? record.used : 0)
  }

  #recycle(io: Io | undefined): void {
    if (io?.poolable && !io.dead) this.#pool.push(io)
  }

  #expire(): void {
    const now = Date.now()
    // Arrival order = deadline order: the expired waiting ones are at the front; their call never started.
    while (this.#waiting.length > 0 && this.#waiting[0]!.deadline <= now) {
      const w = this.#waiting.shift()!
      if (this.isLive(w.ticket)) this.#timeOutWaiting(w)
      else this.#recycle(w.io) // fenced meanwhile: nothing to answer
    }
    if (this.#held.length > 0) {
      const held = this.#held
      this.#held = []
      for (const w of held) {
        if (w.deadline > now) this.#held.push(w)
        else if (this.isLive(w.ticket)) this.#timeOutWaiting(w)
        else this.#recycle(w.io)
      }
    }
    for (let slot = 0; slot < this.#pending.length; slot++) {
      const record = this.#pending[slot]
      if (!record || record.deadline > now) continue
      this.stats.timeouts++
      // The ticket dies with this completion: whatever the backend does later cannot reach the driver's
      // memory (copies through the ticket fail; its bounce buffer is the device's), and a write it still
      // makes keeps later requests on its bytes waiting (a ghost). The Io is not reused.
      this.#orphan(
        slot,
        record,
        undefined,
        new VduseError('request timed out', { code: 'ERR_VDUSE_TIMEOUT' }),
      )
      this.#finish(record.ticket, BLK_STATUS.IOERR, 0)
      this.#requestError(
        new VduseError(`request timed out after ${this.#timeoutMs} ms`, { code: 'ERR_VDUSE_TIMEOUT' }),
      )
    }
    this.#pump()
  }

  #backendFailed(err: unknown): void {
    // Not 'error': a failed request is the backend's business and must not crash an unprepared process.
    this.#requestError(err instanceof Error ? err : new Error(String(err)))
  }

  /** A listener that throws is a bug like any throwing listener: surfaced, but after our bookkeeping. */
  #requestError(err: Error): void {
    try {
      this.emit('requestError', err)
    } catch (listenerError) {
      queueMicrotask(() => {
        throw listenerError
      })
    }
  }

  #finish(ticket: number, status: number, dataBytes: number): void {
    if (status === BLK_STATUS.IOERR) this.stats.ioErrors++
    this.completions.complete(ticket, status === BLK_STATUS.OK ? dataBytes + 1 : 1, status)
  }
}
