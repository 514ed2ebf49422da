import { VduseError } from '../../errors'
import type { BlockBackend, BlockIo } from '../../backends/backend'
import { FILE_IO_FLUSH, FILE_IO_READ, FILE_IO_WRITE, type RequestBatch } from '../../transport/batch'
import { VirtioDevice, type VirtioDeviceOptions } from '../../virtio/device'
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
  /** 512 (default) or 4096. */
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

function isPromise(x: unknown): x is Promise<unknown> {
  return typeof (x as { then?: unknown } | null | undefined)?.then === 'function'
}

/** A BlockIo over pieces of one request; pooled, so serving requests allocates nothing. */
class Io implements BlockIo {
  offset = 0
  length = 0
  count = 0
  readonly bufs: Buffer[] = []
  readonly starts: number[] = []
  readonly lens: number[] = []
  private views: Uint8Array[] | undefined
  private controller: AbortController | undefined
  private timedOut = false

  /** Pieces `from .. to-1` of request `i`, minus `skip` bytes at the start and `trim` at the end. */
  load(
    batch: RequestBatch,
    i: number,
    from: number,
    to: number,
    skip: number,
    trim: number,
    offset: number,
  ): void {
    this.count = 0
    this.length = 0
    this.offset = offset
    this.views = undefined
    this.controller = undefined
    this.timedOut = false
    let left = batch.bytes(i, from, to) - skip - trim
    for (let k = from; k < to && left > 0; k++) {
      let start = batch.offset(i, k)
      let len = batch.length(i, k)
      if (skip >= len) {
        skip -= len
        continue
      }
      start += skip
      len -= skip
      skip = 0
      len = Math.min(len, left)
      this.bufs[this.count] = batch.buffer(i, k)
      this.starts[this.count] = start
      this.lens[this.count] = len
      this.count++
      this.length += len
      left -= len
    }
  }

  get buffers(): readonly Uint8Array[] {
    this.views ??= Array.from({ length: this.count }, (_, k) =>
      this.bufs[k]!.subarray(this.starts[k]!, this.starts[k]! + this.lens[k]!),
    )
    return this.views
  }

  /** Aborted when the request times out: a backend should stop touching the buffers then. */
  get signal(): AbortSignal {
    this.controller ??= new AbortController()
    if (this.timedOut) this.abort()
    return this.controller.signal
  }

  abort(): void {
    this.timedOut = true
    if (this.controller && !this.controller.signal.aborted) {
      this.controller.abort(new VduseError('request timed out', { code: 'ERR_VDUSE_TIMEOUT' }))
    }
  }

  forEach(fn: (buffer: Buffer, start: number, length: number, deviceOffset: number) => void): void {
    let at = this.offset
    for (let k = 0; k < this.count; k++) {
      fn(this.bufs[k]!, this.starts[k]!, this.lens[k]!, at)
      at += this.lens[k]!
    }
  }
}

interface Pending {
  batch: RequestBatch
  statusBuffer: Buffer
  statusOffset: number
  used: number
  deadline: number
  io: Io | undefined
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
  private bytes: number
  private readonly serial = Buffer.alloc(ID_BYTES)
  private readonly header = Buffer.alloc(HEADER_BYTES)
  private readonly range = Buffer.alloc(RANGE_BYTES)
  private readonly pool: Io[] = []
  private readonly pending = new Map<number, Pending>()
  private readonly timeoutMs: number
  private sweeper: NodeJS.Timeout | undefined
  private readonly nativeFd: number | undefined

  /** Creates the device and starts serving it; attach it with `attach()`. */
  static async create(options: BlockDeviceOptions): Promise<BlockDevice> {
    const device = new BlockDevice(options)
    await device.prepare()
    device.start(options)
    return device
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
    this.logicalBlockSize = options.logicalBlockSize ?? 512
    if (this.logicalBlockSize !== 512 && this.logicalBlockSize !== 4096)
      bad('logicalBlockSize must be 512 or 4096')
    this.bytes = backend.size
    if (!Number.isSafeInteger(this.bytes) || this.bytes <= 0 || this.bytes % this.logicalBlockSize !== 0) {
      bad(`backend size ${this.bytes} must be a positive multiple of ${this.logicalBlockSize}`)
    }
    this.queues = options.queues ?? 1
    if (!Number.isInteger(this.queues) || this.queues < 1 || this.queues > 64) bad('queues must be 1..64')
    this.readOnly = (options.readOnly ?? false) || (backend.readOnly ?? false)
    const serial = Buffer.from(options.serial ?? '', 'utf8')
    if (serial.length > ID_BYTES) bad(`serial is ${serial.length} bytes; at most ${ID_BYTES}`)
    serial.copy(this.serial)
    this.timeoutMs = options.requestTimeoutMs ?? 0
    if (!(this.timeoutMs >= 0)) bad('requestTimeoutMs must be >= 0')
    this.nativeFd = backend.fd
    const features: BlkFeature[] = ['SEG_MAX', 'BLK_SIZE', 'TOPOLOGY']
    if (options.maxSegmentSize !== undefined) features.push('SIZE_MAX')
    if (backend.flush) features.push('FLUSH')
    if (this.readOnly) features.push('RO')
    if (this.queues > 1) features.push('MQ')
    if (!this.readOnly && backend.discard) features.push('DISCARD')
    if (!this.readOnly && backend.writeZeroes) features.push('WRITE_ZEROES')
    this.offeredFeatures = features
  }

  private start(options: BlockDeviceOptions): void {
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
    const segMax = options.maxSegments ?? Math.min(queueSize - 2, 254)
    const config = BLK_CONFIG.encode({
      capacity: BigInt(this.bytes / SECTOR),
      size_max: options.maxSegmentSize ?? 0,
      seg_max: segMax,
      blk_size: this.logicalBlockSize,
      min_io_size: 1,
      num_queues: this.queues,
      max_discard_sectors: MAX_RANGE_SECTORS,
      max_discard_seg: MAX_RANGES,
      discard_sector_alignment: this.logicalBlockSize / SECTOR,
      max_write_zeroes_sectors: MAX_RANGE_SECTORS,
      max_write_zeroes_seg: MAX_RANGES,
      write_zeroes_may_unmap: this.backend.discard ? 1 : 0,
    })
    this.open({
      deviceId: VIRTIO_ID_BLOCK,
      features: BLK_FEATURES.mask(this.offeredFeatures),
      config,
      numQueues: this.queues,
      queueSize,
      // header + data buffers + status
      maxSegments: segMax + 2,
    })
    if (this.timeoutMs > 0) {
      this.sweeper = setInterval(() => this.expire(), Math.max(10, this.timeoutMs / 4))
      this.sweeper.unref()
    }
  }

  /** Device size in bytes. */
  get size(): number {
    return this.bytes
  }

  /** The negotiated virtio-blk features, by name (after `ready`). */
  get negotiatedBlkFeatures(): BlkFeature[] {
    return BLK_FEATURES.names(this.negotiatedFeatures)
  }

  /**
   * Online resize: grows or shrinks the backend, updates the capacity in the config space and raises a
   * config interrupt, so the driver sees the new size.
   */
  async resize(size: number): Promise<void> {
    this.assertOpen()
    if (!Number.isSafeInteger(size) || size <= 0 || size % this.logicalBlockSize !== 0) {
      throw new VduseError(`size must be a positive multiple of ${this.logicalBlockSize}`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    if (!this.backend.resize) {
      throw new VduseError('this backend cannot be resized', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    await this.backend.resize(size)
    this.bytes = size
    const { offset, data } = BLK_CONFIG.encodeField('capacity', BigInt(size / SECTOR))
    this.updateConfig(offset, data)
  }

  protected handleBatch(batch: RequestBatch): void {
    for (let i = 0; i < batch.count; i++) this.handleRequest(batch, i)
  }

  protected inFlight(): number {
    return this.pending.size
  }

  protected async shutdown(): Promise<void> {
    if (this.sweeper) clearInterval(this.sweeper)
    if (!this.readOnly && this.backend.flush) await this.backend.flush()
  }

  private handleRequest(batch: RequestBatch, i: number): void {
    const r = batch.readable(i)
    const w = batch.writable(i)
    if (w === 0 || !batch.readInto(i, 0, this.header)) {
      // No status byte to answer in, or no header: nothing meaningful can be said.
      this.stats.malformed++
      if (w > 0) this.finish(batch, i, BLK_STATUS.IOERR, 0)
      else batch.complete(i, 0)
      return
    }
    const type = this.header.readUInt32LE(0)
    const sector = this.header.readUInt32LE(8) + this.header.readUInt32LE(12) * 0x1_0000_0000
    const dataIn = batch.bytes(i, r, r + w) - 1
    const dataOut = batch.bytes(i, 0, r) - HEADER_BYTES
    switch (type) {
      case REQ.IN:
        this.stats.reads++
        return this.transfer(batch, i, sector, dataIn, false)
      case REQ.OUT:
        this.stats.writes++
        return this.transfer(batch, i, sector, dataOut, true)
      case REQ.FLUSH:
        this.stats.flushes++
        if (this.nativeFd !== undefined && batch.nativeIo)
          return batch.fileIo(i, this.nativeFd, FILE_IO_FLUSH, 0, 0)
        if (!this.backend.flush) return this.finish(batch, i, BLK_STATUS.OK, 0)
        return this.run(batch, i, () => this.backend.flush!(), 0, undefined)
      case REQ.GET_ID:
        this.stats.getIds++
        return this.getId(batch, i, dataIn)
      case REQ.DISCARD:
      case REQ.WRITE_ZEROES:
        return this.ranges(batch, i, type, dataOut)
      default:
        this.stats.unsupported++
        return this.finish(batch, i, BLK_STATUS.UNSUPP, 0)
    }
  }

  private transfer(batch: RequestBatch, i: number, sector: number, length: number, write: boolean): void {
    const offset = sector * SECTOR
    if (
      (write && this.readOnly) ||
      length < 0 ||
      length % SECTOR !== 0 ||
      !Number.isSafeInteger(offset) ||
      offset + length > this.bytes
    ) {
      return this.finish(batch, i, BLK_STATUS.IOERR, 0)
    }
    if (this.nativeFd !== undefined && batch.nativeIo) {
      // Native threads move the data and answer the request; JavaScript never touches the bytes.
      return batch.fileIo(
        i,
        this.nativeFd,
        write ? FILE_IO_WRITE : FILE_IO_READ,
        offset,
        write ? HEADER_BYTES : 0,
      )
    }
    const r = batch.readable(i)
    const io = this.pool.pop() ?? new Io()
    if (write) io.load(batch, i, 0, r, HEADER_BYTES, 0, offset)
    else io.load(batch, i, r, batch.pieces(i), 0, 1, offset)
    this.run(batch, i, () => (write ? this.backend.write(io) : this.backend.read(io)), write ? 0 : length, io)
  }

  private getId(batch: RequestBatch, i: number, room: number): void {
    const r = batch.readable(i)
    const n = Math.min(ID_BYTES, room)
    let copied = 0
    for (let k = r; k < batch.pieces(i) && copied < n; k++) {
      const take = Math.min(batch.length(i, k), n - copied)
      this.serial.copy(batch.buffer(i, k), batch.offset(i, k), copied, copied + take)
      copied += take
    }
    this.finish(batch, i, BLK_STATUS.OK, n)
  }

  private ranges(batch: RequestBatch, i: number, type: number, dataOut: number): void {
    const discard = type === REQ.DISCARD
    if (discard) this.stats.discards++
    else this.stats.writeZeroes++
    const op = discard ? this.backend.discard : this.backend.writeZeroes
    if (!op) {
      this.stats.unsupported++
      return this.finish(batch, i, BLK_STATUS.UNSUPP, 0)
    }
    const count = dataOut / RANGE_BYTES
    if (this.readOnly || !Number.isInteger(count) || count < 1 || count > MAX_RANGES) {
      return this.finish(batch, i, BLK_STATUS.IOERR, 0)
    }
    const list: Array<[number, number, boolean]> = []
    for (let k = 0; k < count; k++) {
      batch.readInto(i, HEADER_BYTES + k * RANGE_BYTES, this.range)
      const sector = this.range.readUInt32LE(0) + this.range.readUInt32LE(4) * 0x1_0000_0000
      const sectors = this.range.readUInt32LE(8)
      const flags = this.range.readUInt32LE(12)
      const unmap = (flags & 1) === 1
      // Unknown flags, or unmap on a discard, are not ours to interpret (spec 5.2.6.2).
      if ((flags & ~1) !== 0 || (discard && unmap)) {
        this.stats.unsupported++
        return this.finish(batch, i, BLK_STATUS.UNSUPP, 0)
      }
      const offset = sector * SECTOR
      const length = sectors * SECTOR
      if (sectors > MAX_RANGE_SECTORS || !Number.isSafeInteger(offset) || offset + length > this.bytes) {
        return this.finish(batch, i, BLK_STATUS.IOERR, 0)
      }
      list.push([offset, length, unmap])
    }
    const backend = this.backend
    this.run(
      batch,
      i,
      async () => {
        for (const [offset, length, unmap] of list) {
          if (discard) await backend.discard!(offset, length)
          else await backend.writeZeroes!(offset, length, unmap)
        }
      },
      0,
      undefined,
    )
  }

  /** Runs a backend call; answers now if it returned, or when its promise settles. */
  private run(
    batch: RequestBatch,
    i: number,
    call: () => unknown,
    dataBytes: number,
    io: Io | undefined,
  ): void {
    let result: unknown
    try {
      result = call()
    } catch (err) {
      this.backendFailed(err)
      if (io) this.pool.push(io)
      return this.finish(batch, i, BLK_STATUS.IOERR, 0)
    }
    if (!isPromise(result)) {
      if (io) this.pool.push(io)
      return this.finish(batch, i, BLK_STATUS.OK, dataBytes)
    }
    const slot = batch.slot(i)
    const k = batch.pieces(i) - 1
    const record: Pending = {
      batch,
      statusBuffer: batch.buffer(i, k),
      statusOffset: batch.offset(i, k) + batch.length(i, k) - 1,
      used: dataBytes + 1,
      deadline: this.timeoutMs > 0 ? Date.now() + this.timeoutMs : Infinity,
      io,
    }
    this.pending.set(slot, record)
    result.then(
      () => this.settle(slot, record, BLK_STATUS.OK),
      (err: unknown) => {
        this.backendFailed(err)
        this.settle(slot, record, BLK_STATUS.IOERR)
      },
    )
  }

  private settle(slot: number, record: Pending, status: number): void {
    if (this.pending.get(slot) !== record) return // timed out and answered already
    this.pending.delete(slot)
    record.statusBuffer[record.statusOffset] = status
    if (status !== BLK_STATUS.OK) this.stats.ioErrors++
    record.batch.completeSlot(slot, status === BLK_STATUS.OK ? record.used : 1)
    if (record.io) this.pool.push(record.io)
  }

  private expire(): void {
    const now = Date.now()
    for (const [slot, record] of this.pending) {
      if (record.deadline > now) continue
      this.stats.timeouts++
      // The Io is not recycled: the backend may still hold it.
      record.io?.abort()
      record.io = undefined
      this.settle(slot, record, BLK_STATUS.IOERR)
      this.emit(
        'requestError',
        new VduseError(`request timed out after ${this.timeoutMs} ms`, { code: 'ERR_VDUSE_TIMEOUT' }),
      )
    }
  }

  private backendFailed(err: unknown): void {
    // Not 'error': a failed request is the backend's business and must not crash an unprepared process.
    this.emit('requestError', err instanceof Error ? err : new Error(String(err)))
  }

  private finish(batch: RequestBatch, i: number, status: number, dataBytes: number): void {
    if (status !== BLK_STATUS.OK) this.stats.ioErrors += status === BLK_STATUS.IOERR ? 1 : 0
    batch.writeLastByte(i, status)
    batch.complete(i, status === BLK_STATUS.OK ? dataBytes + 1 : 1)
  }
}
