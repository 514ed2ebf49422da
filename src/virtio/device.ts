import { EventEmitter } from 'node:events'

import { removeStaleDevice } from '../control'
import { VduseError, asError, throwIfAborted } from '../errors'
import { installLogSink } from '../log'
import { attach, currentAttachment, detach, isAttached, type AttachDriver } from '../transport/attach'
import { BatchArrays, Completions, RequestBatch } from '../transport/batch'
import { vduseTransport } from '../transport/native'
import type { DeviceCounters, DeviceEvent, DeviceInit, RequestSource, Transport } from '../transport/source'
import { waitFor } from '../wait'
import { STATUS } from './status'

/** Options every device takes. */
export interface VirtioDeviceOptions {
  /** Device name: `/dev/vduse/NAME`, and the name on the vDPA bus. */
  name: string
  /** Replace a leftover device of the same name from a process that died. */
  replaceStale?: boolean
  /** Closes the device when aborted. */
  signal?: AbortSignal
  /** Where the device lives: the kernel (default), a `vhostUser(socketPath)` socket, or an `InProcessTransport`. */
  transport?: Transport
  /**
   * Longest a driver reset or memory-map change waits for requests still in the model, all queues
   * together (ms, default 5000, at most 10000); requests still running then are fenced — their results
   * are dropped and their memory is out of reach.
   */
  drainTimeoutMs?: number
  /** Threads for native file I/O (default 4). */
  ioThreads?: number
  /** Requests per batch handed to the model (default 64). */
  batchSize?: number
  /**
   * Poll the rings for up to this long (µs, at most 1000) after a batch before sleeping, adaptively (the
   * poll time grows while kicks come within the cap after a sleep, and shrinks after longer sleeps):
   * only at low depth (a wake-up finds under 1.5 requests on average), only while no request waits on a
   * JavaScript backend (its completion arrives on this same event loop; requests handed to native file
   * I/O do not count), and never while another queue has requests. It trades CPU on the JavaScript
   * thread for latency: at queue depth 1 it removes a wake-up per request. The cap must exceed the
   * driver's gap between requests, or polling never starts; that gap scales with the machine, so
   * `'auto'` sizes the cap as 16 times what serving a one-request wake-up measurably costs here (16–1000
   * µs; the `pollCapUs` counter shows it). Default 0: never — the JavaScript thread is the
   * application's. The CLI, a dedicated server, uses `'auto'`.
   */
  pollUs?: number | 'auto'
  /**
   * Directory of the state file that lets a restarted server take the device over (default
   * `/run/vduse`); `null`: keep none.
   */
  stateDir?: string | null
  /**
   * Take over a device of this name whose server died, instead of creating one: same options, same
   * backend (`BlockBackend.id`), same state directory. The requests the dead server left in flight are
   * served again first, in their original order; the driver sees a pause, not an error. A device that
   * does not exist is created as usual.
   *
   * @throws ERR_VDUSE_MISMATCH (the device differs: size, features, queues, backend — nothing is changed),
   *   ERR_VDUSE_NOT_RECOVERABLE (no state file, or its data died with its server), ERR_VDUSE_BUSY (a live
   *   process serves it).
   */
  recover?: boolean
}

export interface AttachOptions {
  /** `virtio` (default): a host device (/dev/vdX); `vhost`: /dev/vhost-vdpa-N for a VM. */
  driver?: AttachDriver
  timeoutMs?: number
  signal?: AbortSignal
}

/** What a drain did (a driver reset or memory-map change with requests in the model). */
export interface DrainInfo {
  reason: 'reset' | 'iotlb'
  waitedMs: number
  /** Requests fenced: their results are dropped. */
  fenced: number
  /**
   * Native reads still wrote into the fenced memory at the deadline: it was revoked (replaced by memory
   * the device owns) before the kernel was answered.
   */
  revoked: boolean
}

export interface VirtioDeviceEvents {
  /** The driver wrote a new device status. */
  status: [status: number]
  /** The driver finished negotiating and started the device (DRIVER_OK). */
  ready: [features: bigint]
  /** The driver reset the device: every request it had in flight is completed or fenced. */
  reset: []
  /** A reset or memory-map change had to wait for requests, or fence some. */
  drained: [info: DrainInfo]
  /** The kernel marked the device broken (a message went unanswered); destroy and recreate it. */
  broken: [error: VduseError]
  /** Something went wrong serving requests; the device keeps serving. */
  error: [error: Error]
  /** One request failed in the model or backend (threw, rejected or timed out); it was answered with an error. */
  requestError: [error: Error]
  close: []
}

/**
 * A virtio device served from JavaScript. Subclasses (device models) describe the device and handle
 * requests; this class owns the lifecycle: creation, events, attach/detach, config updates, graceful
 * close — and isolates errors: a request whose handler throws is answered with an error and reported
 * (`requestError`), and the device keeps serving.
 */
export abstract class VirtioDevice<
  Events extends VirtioDeviceEvents & Record<keyof Events, unknown[]> = VirtioDeviceEvents,
>
  extends EventEmitter<Events>
  implements AsyncDisposable
{
  readonly name: string
  protected source!: RequestSource
  protected batch!: RequestBatch
  protected completions!: Completions
  #keepAlive: NodeJS.Timeout | undefined
  /** The driver the device is bound to; `unbound` when it is on the vDPA bus without one. */
  #attachedAs: AttachDriver | 'unbound' | undefined
  #path: string | undefined
  #closing: Promise<void> | undefined
  #status = 0
  #features = 0n
  #lastCounters: DeviceCounters | undefined
  /** Closes the device when `options.signal` aborts; removed once the device is closed. */
  #onAbort: (() => void) | undefined
  /** Torn down: closed or handed over, the source let go. */
  #gone = false
  readonly #options: VirtioDeviceOptions

  /** This emitter, typed with the events every device has (subclasses add their own). */
  get #events(): EventEmitter<VirtioDeviceEvents> {
    return this as unknown as EventEmitter<VirtioDeviceEvents>
  }

  protected constructor(options: VirtioDeviceOptions) {
    super()
    this.#options = options
    this.name = options.name
  }

  /** With `replaceStale`, removes a leftover device of this name (also when it is still attached). */
  protected async prepare(): Promise<void> {
    throwIfAborted(this.#options.signal, 'Creating the device')
    if (this.#options.replaceStale && this.#options.recover) {
      throw new VduseError('replaceStale and recover exclude each other', {
        code: 'ERR_VDUSE_INVALID_CONFIG',
        hint: "recover takes a dead server's device over; replaceStale destroys it",
      })
    }
    if (
      this.#options.transport?.socketPath !== undefined &&
      (this.#options.recover || this.#options.replaceStale || typeof this.#options.stateDir === 'string')
    ) {
      throw new VduseError('recover, replaceStale and stateDir are for VDUSE devices, not vhostUser()', {
        code: 'ERR_VDUSE_INVALID_CONFIG',
        hint: 'a vhost-user client keeps the in-flight log itself (INFLIGHT_SHMFD); a restarted server resumes it',
      })
    }
    if (this.#options.replaceStale && this.#options.transport === undefined) {
      try {
        await removeStaleDevice(this.name, { stateDir: this.#options.stateDir })
      } catch (err) {
        if ((err as { code?: string }).code !== 'ERR_VDUSE_BUSY') throw err
        throw new VduseError(`a live process already serves a VDUSE device named "${this.name}"`, {
          code: 'ERR_VDUSE_EXISTS',
          hint: 'pick another name, or stop the process that serves it',
          cause: err,
        })
      }
    }
  }

  /** Whether the device is served by the native binding (VDUSE or vhost-user), which can run native models. */
  protected get nativeTransport(): boolean {
    return (this.#options.transport ?? vduseTransport).native === true
  }

  /** Creates the device (called by the subclass's async factory once it knows its features and config). */
  protected open(
    init: Omit<DeviceInit, 'name' | 'replaceStale' | 'drainTimeoutMs' | 'ioThreads' | 'stateDir'>,
  ): void {
    const transport = this.#options.transport ?? vduseTransport
    if (transport.native) installLogSink()
    this.#path = transport.socketPath
    const stateDir = this.#options.stateDir
    const full: DeviceInit = {
      ...init,
      name: this.#options.name,
      replaceStale: this.#options.replaceStale ?? false,
      drainTimeoutMs: this.#options.drainTimeoutMs ?? 5000,
      ioThreads: this.#options.ioThreads ?? 4,
      ...(stateDir === undefined ? {} : { stateDir: stateDir ?? '' }),
      recover: this.#options.recover ?? false,
      ...(this.#options.pollUs === 'auto'
        ? { pollAuto: true }
        : this.#options.pollUs === undefined
          ? {}
          : { pollUs: this.#options.pollUs }),
    }
    const poll = this.#options.pollUs
    if (poll !== undefined && poll !== 'auto' && (!Number.isInteger(poll) || poll < 0 || poll > 1000)) {
      throw new VduseError("pollUs must be 'auto' or an integer from 0 to 1000", {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    const capacity = this.#options.batchSize ?? 64
    // Room for a whole ring of completions: a unit of joined ones (a frame over buffers) is never split.
    const arrays = new BatchArrays(capacity, Math.max(256, capacity * 4, init.queueSize))
    this.source = transport.open(
      full,
      arrays,
      (queue, count) => this.#onBatch(queue, count),
      (event) => this.#onEvent(event),
    )
    if (this.source.recovered) {
      // The driver may have started the device long ago: pick up where the dead server was.
      this.#status = this.source.status()
      this.#features = this.source.negotiatedFeatures()
    }
    this.completions = new Completions(arrays, this.source)
    this.batch = new RequestBatch(arrays, this.source, this.completions)
    // Served devices keep the process alive (unref() opts out), like a listening server.
    this.#keepAlive = setInterval(() => {}, 1 << 30)
    const signal = this.#options.signal
    if (signal) {
      const onAbort = (): void => {
        this.close().catch((err: unknown) => this.report(err))
      }
      if (signal.aborted) onAbort()
      else {
        this.#onAbort = onAbort
        signal.addEventListener('abort', onAbort, { once: true })
      }
    }
  }

  /** How long a reset, a close or a handover waits for requests in the model (ms). */
  protected get drainTimeoutMs(): number {
    return this.#options.drainTimeoutMs ?? 5000
  }

  /** Called by the subclass's factory once the device is open: a taken-over device learns where it is attached. */
  protected async opened(): Promise<void> {
    const signal = this.#options.signal
    if (signal?.aborted) {
      // Aborted while it was being created: the abort handler closes it; the caller gets no device.
      await this.close().catch(() => {})
      throwIfAborted(signal, 'Creating the device')
    }
    if (!this.source.recovered || this.#options.transport !== undefined) return
    if (!(await isAttached(this.name))) return
    const now = await currentAttachment(this.name)
    this.#attachedAs = now?.driver ?? 'unbound'
    this.#path = now?.path
  }

  /** Handles request `i` of `batch`: complete it through `batch` now, or later by its ticket. */
  protected abstract handleRequest(batch: RequestBatch, i: number): void

  /**
   * Answers a request whose handler threw (default: an empty completion). Device models override it
   * with their error status.
   */
  protected failRequest(ticket: number): void {
    this.completions.complete(ticket, 0, -1)
  }

  /** Requests the model has taken but not completed yet. */
  protected abstract inFlight(): number

  /**
   * Requests the model holds may have been fenced (a driver reset, or memory unmapped under them): their
   * tickets are dead — `isLive(ticket)` tells — and their completions will be dropped. Models drop what
   * they keep for dead tickets and tell their backends.
   */
  protected onFenced(): void {}

  /**
   * The driver reset the device (after `onFenced`): a session the model keeps with the driver (FUSE's
   * node and handle tables) ends here.
   */
  protected onReset(): void {}

  /** Whether a request is still in flight (false once completed or fenced). */
  protected isLive(ticket: number): boolean {
    return this.source.isLive(ticket)
  }

  /** Lets the model finish: flush the backend, release resources. Called once by `close()`. */
  protected abstract shutdown(): Promise<void>

  /**
   * Before a handover: the model starts nothing new and waits until nothing of this server can still
   * write (backend calls returned, native I/O idle), or `deadline` (ms since the epoch). False calls the
   * handover off: then `resume` runs and the device keeps serving. Default: nothing to wait for.
   */
  protected async quiesce(_deadline: number): Promise<boolean> {
    return true
  }

  /**
   * Why no successor could take this device over (its data dies with this process), or undefined. A
   * handover is then refused before anything is paused. Default: nothing stands in the way.
   */
  protected handoverRefusal(): string | undefined {
    return undefined
  }

  /** A handover was called off (see `quiesce`): serve as before. */
  protected resume(): void {}

  #onBatch(_queue: number, count: number): void {
    const batch = this.batch
    batch.count = count
    this.completions.inBatch = true
    try {
      for (let i = 0; i < count; i++) {
        try {
          this.handleRequest(batch, i)
        } catch (err) {
          this.#requestFailed(batch.ticket(i), err)
        }
      }
    } finally {
      this.completions.inBatch = false
      this.completions.flushIo()
    }
  }

  /** A handler threw: the request is answered with an error (a second completion of it would be dropped). */
  #requestFailed(ticket: number, err: unknown): void {
    try {
      this.failRequest(ticket)
    } catch {
      this.completions.complete(ticket, 0, -1)
    }
    try {
      this.#events.emit('requestError', asError(err))
    } catch (listenerError) {
      // A listener that throws is a bug like any throwing listener: surface it, after this batch is done.
      queueMicrotask(() => {
        throw listenerError
      })
    }
  }

  #onEvent(e: DeviceEvent): void {
    try {
      if (e.kind === 'status') this.#onStatus(e.status ?? 0, e.features ?? 0n)
      else if (e.kind === 'drained') {
        // Requests fenced by an IOTLB change die without a status change: the model must hear of it too.
        if ((e.fenced ?? 0) > 0) this.onFenced()
        this.#events.emit('drained', {
          reason: e.reason ?? 'reset',
          waitedMs: e.waitedMs ?? 0,
          fenced: e.fenced ?? 0,
          revoked: e.revoked ?? false,
        })
      } else if (e.kind === 'broken') {
        const err = new VduseError(`the kernel marked VDUSE device ${this.name} broken`, {
          code: 'ERR_VDUSE_BROKEN',
          hint: 'a control message went unanswered past its timeout; detach, destroy and recreate the device',
        })
        if (this.#events.listenerCount('broken') > 0) this.#events.emit('broken', err)
        else this.report(err)
      }
    } catch (err) {
      this.report(err)
    }
  }

  #onStatus(status: number, features: bigint): void {
    const before = this.#status
    this.#status = status
    this.#events.emit('status', status)
    if (status & STATUS.DRIVER_OK && !(before & STATUS.DRIVER_OK)) {
      this.#features = features
      this.#events.emit('ready', features)
    }
    if ((status === 0 && before !== 0) || (before & STATUS.DRIVER_OK && !(status & STATUS.DRIVER_OK))) {
      // The reset fenced what was still in the model before this event was sent; requests of a new
      // session may already be in the model too (kicks and events travel separately): `onFenced` tells
      // them apart by ticket.
      this.onFenced()
      this.onReset()
      this.#events.emit('reset')
    }
  }

  /** An error nobody asked for: an 'error' event if someone listens, a warning otherwise — never a crash. */
  protected report(err: unknown): void {
    const e = asError(err)
    if (this.#events.listenerCount('error') > 0) this.#events.emit('error', e)
    else process.emitWarning(e)
  }

  /** The last status the driver set. */
  get status(): number {
    return this.#status
  }

  /** Features the driver accepted; meaningful once `ready` was emitted. */
  get negotiatedFeatures(): bigint {
    return this.#features
  }

  /** Request, interrupt, fence and drain counters, from the native side. */
  counters(): DeviceCounters {
    return this.#lastCounters ?? this.source.counters()
  }

  /** The state file that lets a restarted server take the device over, if any. */
  get statePath(): string | null {
    return this.source.statePath()
  }

  /** Whether the device is attached to the vDPA bus (by `attach()`, or found so when it was recovered). */
  get attached(): boolean {
    return this.#attachedAs !== undefined
  }

  /** The node the attached driver made (`/dev/vdX`, `/dev/vhost-vdpa-N`, an interface name), or a vhost-user device's socket. */
  get path(): string | undefined {
    return this.#path
  }

  /**
   * Whether this device was taken over from a server that died (`recover`). A recovered device the
   * driver had already started emits no `ready`: `status` and `negotiatedFeatures` hold what it set.
   */
  get recovered(): boolean {
    return this.source.recovered
  }

  /**
   * Adds the device to the vDPA bus and resolves with the node the kernel made: `/dev/vdX` for a block
   * device with the `virtio` driver, `/dev/vhost-vdpa-N` with `vhost`. The device is served meanwhile.
   */
  async attach(options: AttachOptions = {}): Promise<string> {
    this.assertOpen()
    if (this.#options.transport?.socketPath !== undefined) {
      throw new VduseError(`device ${this.name} is served over vhost-user: a VMM connects to its socket`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
        hint: `point the VMM at ${this.#options.transport.socketPath} (QEMU: -chardev socket,path=…)`,
      })
    }
    if (this.#attachedAs !== undefined) {
      throw new VduseError(`device ${this.name} is already attached`, {
        code: 'ERR_VDUSE_BUSY',
        hint: 'a recovered device stays where its old server left it; detach() first to move it',
      })
    }
    throwIfAborted(options.signal, 'Attaching')
    const driver = options.driver ?? 'virtio'
    const path = await attach(this.name, driver, options)
    this.#attachedAs = driver
    this.#path = path
    return path
  }

  /** Removes the device from the vDPA bus. */
  async detach(options: { signal?: AbortSignal } = {}): Promise<void> {
    throwIfAborted(options.signal, 'Detaching')
    // A vhost-user device is on no bus (a VDUSE device of the same name is someone else's).
    if (this.#options.transport?.socketPath !== undefined) return
    if (this.#attachedAs === undefined && !(await isAttached(this.name))) return
    await detach(this.name, options)
    this.#attachedAs = undefined
    this.#path = undefined
  }

  /**
   * Rewrites config-space bytes; the driver gets a config interrupt once it is running. Allowed until the
   * device is gone (a resize that finishes while a close or handover waits for it still reports).
   */
  protected updateConfig(offset: number, data: Buffer): void {
    if (this.#gone) throw new VduseError(`device ${this.name} is closed`, { code: 'ERR_VDUSE_CLOSED' })
    this.source.updateConfig(offset, data)
  }

  /** Does not keep the process alive by itself (like `server.unref()`). */
  unref(): this {
    this.#keepAlive?.unref()
    return this
  }

  ref(): this {
    this.#keepAlive?.ref()
    return this
  }

  get closed(): boolean {
    return this.#closing !== undefined
  }

  /**
   * Graceful stop: detaches the device from the vDPA bus, lets requests in the model finish (up to the
   * drain timeout), flushes the backend (bounded: `requestTimeoutMs`, or 30 s), and destroys the device.
   * Safe to call more than once. If the detach fails, nothing else was done: the promise rejects and a
   * later `close()` tries again. A failed final flush is thrown once the device is gone (acknowledged
   * writes may not be durable: never reported as a success).
   */
  close(): Promise<void> {
    return this.#end(() => this.#doClose())
  }

  /**
   * Hands the device over to a successor — an upgrade without the driver seeing an error: stops serving
   * without detaching or destroying the device. First nothing new starts and every backend call and
   * native transfer of this server must end (within the drain timeout): a write of this server must
   * never land after the successor's. If they do not, the handover is called off — ERR_VDUSE_BUSY, and
   * the device keeps serving (try again, or `close()`). Requests in flight are left in the state file;
   * the successor (`recover: true`, `vduse blk --recover`) serves them again. Until it has taken over,
   * the driver waits (and a reset it sends meanwhile must be answered within the kernel's 30 s).
   *
   * @throws ERR_VDUSE_NOT_RECOVERABLE when the device keeps no state file (`stateDir: null`);
   *   ERR_VDUSE_BUSY when something of this server was still running (nothing changed).
   */
  release(): Promise<void> {
    return this.#end(() => this.#doRelease())
  }

  /** Ends the device once (a close or a handover); an attempt that failed retryably may be made again. */
  #end(run: () => Promise<void>): Promise<void> {
    this.#closing ??= run().catch((err: unknown) => {
      if ((err as { retryable?: boolean }).retryable) this.#closing = undefined
      throw err
    })
    return this.#closing
  }

  async #doRelease(): Promise<void> {
    // What makes a handover impossible is found out before anything is paused or stopped.
    if (this.#options.transport?.socketPath !== undefined) {
      throw retryable(
        new VduseError(`device ${this.name} is served over vhost-user: there is no device to hand over`, {
          code: 'ERR_VDUSE_NOT_RECOVERABLE',
          hint: 'stop it and start the new server on the same socket: the VMM reconnects (QEMU: reconnect=N) and block devices resume their in-flight requests',
        }),
      )
    }
    if (!this.source.release || this.source.releasable?.() === false) {
      throw retryable(
        new VduseError(`device ${this.name} cannot be handed over: it keeps no state file`, {
          code: 'ERR_VDUSE_NOT_RECOVERABLE',
          hint: 'create it with a stateDir (the default) to hand it over; close() stops it',
        }),
      )
    }
    const why = this.handoverRefusal()
    if (why !== undefined) {
      throw retryable(
        new VduseError(`device ${this.name} cannot be handed over: ${why}`, {
          code: 'ERR_VDUSE_NOT_RECOVERABLE',
          hint: 'nobody could take it over; it keeps serving (close() stops it)',
        }),
      )
    }
    const ms = this.drainTimeoutMs
    let quiet: boolean
    try {
      quiet = await this.quiesce(Date.now() + ms)
    } catch (err) {
      this.resume()
      throw retryable(err)
    }
    if (!quiet) {
      this.resume()
      throw retryable(
        new VduseError(
          `device ${this.name} was not handed over: backend calls or native I/O still running after ${ms} ms ` +
            'could write after the successor',
          {
            code: 'ERR_VDUSE_BUSY',
            hint: 'the device keeps serving; try again once the backend answers, or close() it',
          },
        ),
      )
    }
    let flushFailed: Error | undefined
    try {
      flushFailed = await this.#settle(false)
      await this.source.release()
    } catch (err) {
      // The device was not let go: nothing was handed over, and close() can still stop it.
      throw retryable(err)
    }
    this.#lastCounters = this.source.counters()
    this.#teardown()
    if (flushFailed) throw flushFailed
  }

  /**
   * Lets requests in the model finish (up to the drain timeout, when `drain`), then flushes the backend.
   * A failed flush does not keep the device alive: it is returned, to be thrown once the device is gone.
   */
  async #settle(drain: boolean): Promise<Error | undefined> {
    const deadline = Date.now() + this.drainTimeoutMs
    if (drain) await waitFor(() => this.inFlight() === 0, deadline)
    this.completions.flush()
    let failed: Error | undefined
    try {
      await this.shutdown()
    } catch (err) {
      failed = asError(err)
    }
    this.completions.close()
    this.#lastCounters = this.source.counters()
    return failed
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }

  async #doClose(): Promise<void> {
    if (
      this.#attachedAs !== undefined ||
      (this.#options.transport === undefined && (await isAttached(this.name)))
    ) {
      try {
        await this.detach()
      } catch (err) {
        // Nothing was torn down: the device still serves, and close() may be called again.
        throw retryable(err)
      }
    }
    try {
      const flushFailed = await this.#settle(true)
      await this.source.close()
      this.#lastCounters = this.source.counters()
      if (flushFailed) throw flushFailed
    } finally {
      this.#teardown()
    }
  }

  /** The device is gone (closed or handed over): no timer keeps the process alive, no signal closes it. */
  #teardown(): void {
    this.#gone = true
    if (this.#keepAlive) clearInterval(this.#keepAlive)
    if (this.#onAbort) this.#options.signal?.removeEventListener('abort', this.#onAbort)
    this.#onAbort = undefined
    this.#events.emit('close')
  }

  protected assertOpen(): void {
    if (this.#closing) throw new VduseError(`device ${this.name} is closed`, { code: 'ERR_VDUSE_CLOSED' })
  }
}

/** Marks a close or handover failure after which nothing was torn down: the call may be made again. */
function retryable(err: unknown): Error {
  const e = asError(err)
  Object.defineProperty(e, 'retryable', { value: true, enumerable: false })
  return e
}
