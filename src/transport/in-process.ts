import { VduseError } from '../errors'
import { STATUS } from '../virtio/status'
import { HEAD_BYTES, STATUS_JOINED, type BatchArrays } from './batch'
import type { DeviceCounters, DeviceEvent, DeviceInit, RequestSource, Transport } from './source'

const SLOT_BITS = 0x8000
const GEN_UNIT = 0x80_0000

interface InFlight {
  ticket: number
  queue: number
  readable: Array<[number, number]>
  writable: Array<[number, number]>
  resolve: (result: InProcessResult) => void
}

/** How the fake driver saw a request end. */
export interface InProcessResult {
  /** Bytes the device said it wrote. */
  used: number
  /** Copies of the writable buffers as the device left them. */
  writable: Buffer[]
  /** The device was reset before it completed the request: it never reached the used ring. */
  fenced: boolean
  /** Where the writable buffers are in `memory` (to check what reaches them later). */
  writableAt: number[]
}

/**
 * A transport without a kernel: the device model runs exactly as over VDUSE (same batch protocol, same
 * tickets that die when a request is completed or fenced), driven by a fake driver in the same process.
 * For tests, examples and machines without VDUSE. It has no native block I/O, so file backends take their
 * JavaScript path. It simulates what the kernel side can do to a model: a driver reset with requests in
 * flight (`reset`), a driver reload with other features (`renegotiate`), memory unmapped under requests
 * (`remap`), and a device the kernel gave up on (`breakDevice`).
 */
export class InProcessTransport implements Transport {
  /** The "guest memory" requests live in. */
  readonly memory: Buffer
  #next = 0
  readonly #slots = new Map<number, InFlight>()
  readonly #gens = new Map<number, number>()
  /** Per queue, where the search for a free slot starts. */
  readonly #cursor: number[] = []
  #queueSize = 256
  #pending: InFlight[] = []
  #scheduled = false
  #onBatch: ((queue: number, count: number) => void) | undefined
  #onEvent: ((e: DeviceEvent) => void) | undefined
  #arrays: BatchArrays | undefined
  #statusValue = 0
  #features = 0n
  #offered = 0n
  #held = new Set<number>()
  #configSpace = Buffer.alloc(0)
  #closed = false
  readonly #counts = { requests: 0, completions: 0, batches: 0, fenced: 0, stale: 0 }
  /** Config interrupts the device raised (each `updateConfig` after DRIVER_OK). */
  configInterrupts = 0

  constructor(memoryBytes = 16 << 20) {
    this.memory = Buffer.alloc(memoryBytes)
  }

  open(
    init: DeviceInit,
    arrays: BatchArrays,
    onBatch: (queue: number, count: number) => void,
    onEvent: (e: DeviceEvent) => void,
  ): RequestSource {
    if (this.#onBatch) throw new VduseError('in-process transport already open', { code: 'ERR_VDUSE_EXISTS' })
    this.#onBatch = onBatch
    this.#onEvent = onEvent
    this.#arrays = arrays
    this.#offered = init.features | (1n << 32n) | (1n << 33n)
    this.#held = new Set(init.heldQueues ?? [])
    this.#configSpace = Buffer.from(init.config)
    this.#queueSize = init.queueSize
    return {
      read: (t, o, dst, at, n) => this.#copy(t, o, dst, at, n, false),
      write: (t, o, src, at, n) => this.#copy(t, o, src, at, n, true),
      flush: () => this.#flush(),
      isLive: (t) => this.#live(t) !== undefined,
      updateConfig: (offset, data) => {
        data.copy(this.#configSpace, offset)
        if (this.#statusValue & STATUS.DRIVER_OK) this.configInterrupts++
      },
      status: () => this.#statusValue,
      negotiatedFeatures: () => this.#features,
      counters: (): DeviceCounters => this.#counters(),
      statePath: () => null,
      recovered: false,
      close: async () => {
        this.#closed = true
      },
      release: async () => {
        // Handed over: requests in flight stay (a successor would serve them); this side serves no more.
        this.#closed = true
        this.released = true
      },
    }
  }

  /** The device was handed over (`release()`), not closed. */
  released = false

  #counters(): DeviceCounters {
    return {
      kicks: this.#counts.batches,
      batches: this.#counts.batches,
      requests: this.#counts.requests,
      completions: this.#counts.completions,
      interrupts: this.#counts.batches,
      badChains: 0,
      duplicateHeads: 0,
      fenced: this.#counts.fenced,
      staleCompletions: this.#counts.stale,
      brokenQueues: 0,
      inFlight: this.#slots.size,
      iotlbReloads: 0,
      drains: 0,
      maxDrainMs: 0,
      wakeups: this.#counts.batches,
      jsCalls: this.#counts.batches,
      polled: 0,
      pollCapUs: 0,
      ioOps: 0,
      ioErrors: 0,
      resubmitted: 0,
    }
  }

  // ---- the fake driver ----

  /** The config space as the driver reads it. */
  get config(): Buffer {
    return this.#configSpace
  }

  get offeredFeatures(): bigint {
    return this.#offered
  }

  /** Requests the device holds right now. */
  get inFlight(): number {
    return this.#slots.size
  }

  /** Negotiates `accept & offered` and sets DRIVER_OK, like a driver probing the device. */
  start(accept: bigint = this.#offered): void {
    this.#features = accept & this.#offered
    for (const s of [0, STATUS.ACKNOWLEDGE, 3, 0x0b, 0x0f]) this.setStatus(s)
  }

  setStatus(status: number): void {
    this.#statusValue = status
    this.#onEvent?.({ kind: 'status', status, features: this.#features })
  }

  /**
   * A driver reset with requests in flight: every request the device still holds is fenced (its promise
   * resolves with `fenced: true`; a later completion or memory access by the model is dropped), then the
   * driver starts again.
   */
  reset(): number {
    const fenced = this.#fenceAll()
    if (fenced > 0) this.#onEvent?.({ kind: 'drained', reason: 'reset', waitedMs: 0, fenced })
    this.setStatus(0)
    return fenced
  }

  #fenceAll(): number {
    const fenced = [...this.#slots.values()]
    this.#slots.clear()
    for (const r of fenced) {
      this.#counts.fenced++
      r.resolve({ used: 0, writable: [], fenced: true, writableAt: r.writable.map(([off]) => off) })
    }
    this.#deliverLater()
    return fenced.length
  }

  /** A driver reload: a reset (fencing what is in flight), then features `accept` negotiated afresh. */
  renegotiate(accept: bigint = this.#offered): number {
    const fenced = this.reset()
    this.start(accept)
    return fenced
  }

  /**
   * The driver changed its memory map under requests in flight (an IOTLB update that could not wait for
   * them): they are fenced as by `reset()`, but the device stays running — except buffers of held queues
   * (a NIC's receive buffers), which are given back unused (`used` 0, not fenced), as the kernel path does.
   * Returns how many were fenced.
   */
  remap(): number {
    let fenced = 0
    for (const [slot, r] of [...this.#slots]) {
      this.#slots.delete(slot)
      const given = this.#held.has(r.queue)
      if (given) this.#counts.completions++
      else {
        this.#counts.fenced++
        fenced++
      }
      r.resolve({ used: 0, writable: [], fenced: !given, writableAt: r.writable.map(([off]) => off) })
    }
    if (fenced > 0) this.#onEvent?.({ kind: 'drained', reason: 'iotlb', waitedMs: 0, fenced })
    this.#deliverLater()
    return fenced
  }

  /** The kernel gave up on the device (a control message went unanswered past its timeout). */
  breakDevice(): void {
    this.#onEvent?.({ kind: 'broken' })
  }

  /** Places `data` in guest memory; returns its offset. */
  place(data: Uint8Array | number): number {
    const len = typeof data === 'number' ? data : data.length
    if (this.#next + len > this.memory.length) this.#next = 0
    const off = this.#next
    if (off + len > this.memory.length)
      throw new VduseError('request larger than the fake guest memory', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    if (typeof data !== 'number') this.memory.set(data, off)
    this.#next = off + ((len + 63) & ~63)
    return off
  }

  /**
   * Submits one request: readable buffers with their contents, writable ones by length. Resolves when the
   * device completes it (or it is fenced by `reset()`).
   */
  request(readable: Uint8Array[], writableLengths: number[], queue = 0): Promise<InProcessResult> {
    if (this.#closed) return Promise.reject(new Error('transport closed'))
    const r = readable.map((d) => [this.place(d), d.length] as [number, number])
    const w = writableLengths.map((n) => {
      const at = this.place(n)
      this.memory.fill(0xee, at, at + n)
      return [at, n] as [number, number]
    })
    return new Promise((resolve) => {
      // The ticket comes with a slot, when the request is delivered (see `#assign`).
      const req: InFlight = { ticket: -1, queue, readable: r, writable: w, resolve }
      this.#pending.push(req)
      this.#counts.requests++
      if (!this.#scheduled) {
        this.#scheduled = true
        queueMicrotask(() => this.#deliver())
      }
    })
  }

  /** Hands pending requests to the model in batches, like a kick on the JavaScript thread. */
  #deliver(): void {
    this.#scheduled = false
    const a = this.#arrays
    if (!a || !this.#onBatch || this.#closed) return
    // The session's device features travel with its requests (bits 0–23), as on the kernel path.
    const features = Number(this.#features & 0xff_ffffn)
    while (this.#pending.length > 0) {
      // As on a ring, a queue holds at most queueSize requests: the rest wait for completions.
      const batch: InFlight[] = []
      const rest: InFlight[] = []
      for (const req of this.#pending) {
        if (batch.length < a.capacity && this.#assign(req)) batch.push(req)
        else rest.push(req)
      }
      this.#pending = rest
      const n = batch.length
      if (n === 0) return // every ring with waiting requests is full: a completion delivers them
      for (let i = 0; i < n; i++) {
        const req = batch[i]!
        const readableBytes = req.readable.reduce((s, [, len]) => s + len, 0)
        const writableBytes = req.writable.reduce((s, [, len]) => s + len, 0)
        const head = Math.min(HEAD_BYTES, readableBytes)
        this.#copy(req.ticket, 0, a.heads, i * HEAD_BYTES, head, false)
        a.reqs.set([req.ticket, req.queue, readableBytes, writableBytes, head, features], i * 6)
      }
      this.#counts.batches++
      this.#onBatch(batch[0]!.queue, n)
      this.#flush()
    }
  }

  /** Gives `req` a free slot of its queue, and a ticket of that slot's next generation; false if none. */
  #assign(req: InFlight): boolean {
    const base = req.queue * SLOT_BITS
    const from = this.#cursor[req.queue] ?? 0
    for (let k = 0; k < this.#queueSize; k++) {
      const s = (from + k) % this.#queueSize
      if (this.#slots.has(base + s)) continue
      this.#cursor[req.queue] = s + 1
      const gen = ((this.#gens.get(base + s) ?? 0) + 1) % 0x4000_0000
      this.#gens.set(base + s, gen)
      req.ticket = gen * GEN_UNIT + base + s
      this.#slots.set(base + s, req)
      return true
    }
    return false
  }

  /** Requests waiting for a slot go out once completions or fencing free some. */
  #deliverLater(): void {
    if (this.#pending.length === 0 || this.#scheduled) return
    this.#scheduled = true
    queueMicrotask(() => this.#deliver())
  }

  #live(ticket: number): InFlight | undefined {
    const r = this.#slots.get(ticket % GEN_UNIT)
    return r && r.ticket === ticket ? r : undefined
  }

  #copy(
    ticket: number,
    offset: number,
    js: Uint8Array,
    at: number,
    length: number,
    toGuest: boolean,
  ): number {
    const req = this.#live(ticket)
    if (!req) return -1
    const pieces = toGuest ? req.writable : req.readable
    let skip = offset
    let done = 0
    for (const [addr, len] of pieces) {
      if (done === length) break
      if (skip >= len) {
        skip -= len
        continue
      }
      const k = Math.min(len - skip, length - done)
      if (toGuest) this.memory.set(js.subarray(at + done, at + done + k), addr + skip)
      else js.set(this.memory.subarray(addr + skip, addr + skip + k), at + done)
      done += k
      skip = 0
    }
    return done
  }

  #flush(): void {
    const a = this.#arrays
    if (!a) return
    const n = a.ctl[0]!
    a.ctl[0] = 0
    // A unit of joined completions (STATUS_JOINED: a frame over several buffers) goes out whole, or —
    // when one of its buffers died meanwhile — as runts of length 0, as the kernel path publishes it.
    let unitWhole = true
    let unitStart = -1
    for (let i = 0; i < n; i++) {
      if (unitStart < 0) {
        unitStart = i
        unitWhole = true
        for (let j = i; j < n; j++) {
          if (this.#live(a.done[j * 3]!) === undefined) unitWhole = false
          if (a.done[j * 3 + 2] !== STATUS_JOINED) break
        }
      }
      const ticket = a.done[i * 3]!
      const used = unitWhole ? a.done[i * 3 + 1]! : 0
      const status = a.done[i * 3 + 2]!
      if (status !== STATUS_JOINED) unitStart = -1
      const req = this.#live(ticket)
      if (!req) {
        this.#counts.stale++
        continue
      }
      this.#slots.delete(ticket % GEN_UNIT)
      const writableBytes = req.writable.reduce((s, [, len]) => s + len, 0)
      if (status >= 0 && req.writable.length > 0) {
        const [addr, len] = req.writable[req.writable.length - 1]!
        this.memory[addr + len - 1] = status
      }
      this.#counts.completions++
      req.resolve({
        used: Math.min(used, writableBytes),
        writable: req.writable.map(([off, len]) => Buffer.from(this.memory.subarray(off, off + len))),
        fenced: false,
        writableAt: req.writable.map(([off]) => off),
      })
    }
    this.#deliverLater()
  }
}
