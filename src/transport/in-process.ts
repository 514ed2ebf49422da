import type { DeviceInit } from '../../index'
import { VduseError } from '../errors'
import { STATUS } from '../virtio/status'
import type { Transport } from './native'
import type { DeviceCounters, RequestSource } from './source'

/** Region keys are `epoch * 65536 + region`; this transport has one region in epoch 1. */
const REGION_KEY = 65536

interface InFlight {
  queue: number
  readable: Array<[number, number]>
  writable: Array<[number, number]>
  resolve: (result: { used: number; writable: Buffer[] }) => void
}

/**
 * A transport without a kernel: the device model runs exactly as over VDUSE (same batches, same
 * completions), driven by a fake driver in the same process. For tests, examples and users without
 * VDUSE. It has no native block I/O, so file backends take their JavaScript path.
 */
export class InProcessTransport implements Transport {
  /** The "guest memory" requests live in. */
  readonly memory: Buffer
  private next = 0
  private slots = new Map<number, InFlight>()
  private nextSlot = 0
  private pending: number[] = []
  private armed = false
  private onRequests: (() => void) | undefined
  private onStatus: ((status: number) => void) | undefined
  private statusValue = 0
  private features = 0n
  private offered = 0n
  private configSpace = Buffer.alloc(0)
  private closed = false
  private readonly counts = { requests: 0, completions: 0, batches: 0 }
  /** Config interrupts the device raised (each `updateConfig` after DRIVER_OK). */
  configInterrupts = 0

  constructor(memoryBytes = 16 << 20) {
    this.memory = Buffer.from(new ArrayBuffer(memoryBytes))
  }

  open(init: DeviceInit, onRequests: () => void, onStatus: (status: number) => void): RequestSource {
    if (this.onRequests)
      throw new VduseError('in-process transport already open', { code: 'ERR_VDUSE_EXISTS' })
    this.onRequests = onRequests
    this.onStatus = onStatus
    this.offered = init.features | (1n << 32n) | (1n << 33n)
    this.configSpace = Buffer.from(init.config)
    const self = this
    return {
      drain: (h, r, s) => self.drain(h, r, s),
      region: () => self.memory.buffer as ArrayBuffer,
      complete: (done, n) => self.complete(done, n),
      updateConfig: (offset, data) => {
        data.copy(self.configSpace, offset)
        if (self.statusValue & STATUS.DRIVER_OK) self.configInterrupts++
      },
      status: () => self.statusValue,
      negotiatedFeatures: () => self.features,
      counters: (): DeviceCounters => ({
        kicks: self.counts.batches,
        batches: self.counts.batches,
        requests: self.counts.requests,
        completions: self.counts.completions,
        interrupts: self.counts.batches,
        badChains: 0,
        staleCompletions: 0,
        inFlight: self.slots.size,
        pending: self.pending.length,
      }),
      close: () => {
        self.closed = true
      },
    }
  }

  // ---- the fake driver ----

  /** The config space as the driver reads it. */
  get config(): Buffer {
    return this.configSpace
  }

  get offeredFeatures(): bigint {
    return this.offered
  }

  /** Negotiates `accept & offered` and sets DRIVER_OK, like a driver probing the device. */
  start(accept: bigint = this.offered): void {
    this.features = accept & this.offered
    for (const s of [0, STATUS.ACKNOWLEDGE, 3, 0x0b, 0x0f]) this.setStatus(s)
  }

  setStatus(status: number): void {
    this.statusValue = status
    this.onStatus?.(status)
  }

  /** Places `data` in guest memory; returns its offset. */
  place(data: Uint8Array | number): number {
    const len = typeof data === 'number' ? data : data.length
    const at = this.next
    if (at + len > this.memory.length) this.next = 0
    const off = this.next
    if (off + len > this.memory.length) throw new RangeError('request larger than the fake guest memory')
    if (typeof data !== 'number') this.memory.set(data, off)
    this.next = off + ((len + 63) & ~63)
    return off
  }

  /**
   * Submits one request: readable buffers with their contents, writable ones by length. Resolves when the
   * device completes it, with the used length and copies of the writable buffers.
   */
  request(
    readable: Uint8Array[],
    writableLengths: number[],
    queue = 0,
  ): Promise<{ used: number; writable: Buffer[] }> {
    if (this.closed) return Promise.reject(new Error('transport closed'))
    const r = readable.map((d) => [this.place(d), d.length] as [number, number])
    const w = writableLengths.map((n) => {
      const at = this.place(n)
      this.memory.fill(0xee, at, at + n)
      return [at, n] as [number, number]
    })
    return new Promise((resolve) => {
      const slot = this.nextSlot++
      this.slots.set(slot, { queue, readable: r, writable: w, resolve })
      this.pending.push(slot)
      this.counts.requests++
      if (!this.armed) {
        this.armed = true
        queueMicrotask(() => this.onRequests?.())
      }
    })
  }

  private drain(header: Uint32Array, reqs: Uint32Array, segs: Float64Array): number {
    let n = 0
    let s = 0
    while (this.pending.length > 0 && (n + 1) * 4 <= reqs.length) {
      const slot = this.pending[0]!
      const req = this.slots.get(slot)!
      const pieces = [...req.readable, ...req.writable]
      if ((s + pieces.length) * 3 > segs.length) break
      this.pending.shift()
      reqs[n * 4] = slot
      reqs[n * 4 + 1] = req.queue
      reqs[n * 4 + 2] = s
      reqs[n * 4 + 3] = (req.readable.length << 16) | req.writable.length
      for (const [off, len] of pieces) {
        segs[s * 3] = REGION_KEY
        segs[s * 3 + 1] = off
        segs[s * 3 + 2] = len
        s++
      }
      n++
    }
    if (n === 0) this.armed = false
    else this.counts.batches++
    header[0] = n
    header[1] = s
    return n
  }

  private complete(done: Uint32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      const slot = done[i * 2]!
      const used = done[i * 2 + 1]!
      const req = this.slots.get(slot)
      if (!req) continue
      this.slots.delete(slot)
      this.counts.completions++
      req.resolve({
        used,
        writable: req.writable.map(([off, len]) => Buffer.from(this.memory.subarray(off, off + len))),
      })
    }
  }
}
