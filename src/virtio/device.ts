import { EventEmitter } from 'node:events'

import { removeStaleDevice } from '../control'
import { VduseError } from '../errors'
import { attach, detach, type AttachDriver } from '../transport/attach'
import { CompletionQueue, RequestBatch } from '../transport/batch'
import { vduseTransport, type DeviceInit, type Transport } from '../transport/native'
import type { DeviceCounters, RequestSource } from '../transport/source'
import { STATUS } from './status'

/** Options every device takes. */
export interface VirtioDeviceOptions {
  /** Device name: `/dev/vduse/NAME`, and the name on the vDPA bus. */
  name: string
  /** Replace a leftover device of the same name from a process that died. */
  replaceStale?: boolean
  /** Closes the device when aborted. */
  signal?: AbortSignal
  /** Where the device lives: the kernel (default) or an `InProcessTransport`. */
  transport?: Transport
  /** Longest the kernel-facing side waits for in-flight requests on a reset (ms, default 10000). */
  drainTimeoutMs?: number
  /** Threads for native file I/O (default 4). */
  ioThreads?: number
  /** Requests drained per batch (default 256). */
  batchSize?: number
}

export interface AttachOptions {
  /** `virtio` (default): a host device (/dev/vdX); `vhost`: /dev/vhost-vdpa-N for a VM. */
  driver?: AttachDriver
  timeoutMs?: number
  signal?: AbortSignal
}

export interface VirtioDeviceEvents {
  /** The driver wrote a new device status. */
  status: [status: number]
  /** The driver finished negotiating and started the device (DRIVER_OK). */
  ready: [features: bigint]
  /** The driver reset the device. */
  reset: []
  /** Something went wrong serving requests; the device keeps serving. */
  error: [error: Error]
  /** One request failed in the backend (threw, rejected or timed out); it was answered with an error. */
  requestError: [error: Error]
  close: []
}

/** Batches drained per wake-up before yielding to the event loop. */
const BATCHES_PER_TURN = 16

/**
 * A virtio device served from JavaScript. Subclasses (device models) describe the device and handle
 * request batches; this class owns the lifecycle: creation, status events, attach/detach, config
 * updates, graceful close.
 */
export abstract class VirtioDevice extends EventEmitter<VirtioDeviceEvents> implements AsyncDisposable {
  readonly name: string
  protected source!: RequestSource
  protected batch!: RequestBatch
  protected completions!: CompletionQueue
  private keepAlive: NodeJS.Timeout | undefined
  private attachedAs: AttachDriver | undefined
  private closing: Promise<void> | undefined
  private statusValue = 0
  private features = 0n
  private draining = false
  private sourceClosed = false

  protected constructor(private readonly options: VirtioDeviceOptions) {
    super()
    this.name = options.name
  }

  /** With `replaceStale`, removes a leftover device of this name (also when it is still attached). */
  protected async prepare(): Promise<void> {
    if (this.options.replaceStale && this.options.transport === undefined) {
      try {
        await removeStaleDevice(this.name)
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

  /** Creates the device (called by the subclass's async factory once it knows its features and config). */
  protected open(init: Omit<DeviceInit, 'name' | 'replaceStale' | 'drainTimeoutMs' | 'ioThreads'>): void {
    const transport = this.options.transport ?? vduseTransport
    const full: DeviceInit = {
      ...init,
      name: this.options.name,
      replaceStale: this.options.replaceStale ?? false,
      drainTimeoutMs: this.options.drainTimeoutMs ?? 10_000,
      ioThreads: this.options.ioThreads ?? 4,
    }
    this.source = transport.open(
      full,
      () => this.onRequests(),
      (status) => this.onStatus(status),
    )
    const batchSize = this.options.batchSize ?? 256
    this.completions = new CompletionQueue(this.source, batchSize)
    this.batch = new RequestBatch(
      this.source,
      this.completions,
      batchSize,
      batchSize * (init.maxSegments ?? 130),
    )
    // Served devices keep the process alive (unref() opts out), like a listening server.
    this.keepAlive = setInterval(() => {}, 1 << 30)
    const signal = this.options.signal
    if (signal) {
      if (signal.aborted) void this.close()
      else signal.addEventListener('abort', () => void this.close(), { once: true })
    }
  }

  /** Handles one batch; complete each request through `batch` now or later. */
  protected abstract handleBatch(batch: RequestBatch): void

  /** Requests the model has taken but not completed yet. */
  protected abstract inFlight(): number

  /** Lets the model finish: flush the backend, release resources. Called once by `close()`. */
  protected abstract shutdown(): Promise<void>

  private onRequests(): void {
    // Keeps serving while closing: detaching resets the device through requests still in flight.
    if (this.draining || this.sourceClosed) return
    this.draining = true
    try {
      for (let turn = 0; turn < BATCHES_PER_TURN; turn++) {
        if (this.batch.fill() === 0) return
        this.handleBatch(this.batch)
        this.completions.flush()
      }
      // More is waiting: continue after other events had their turn (the doorbell stays armed).
      setImmediate(() => this.onRequests())
    } catch (err) {
      this.emit('error', err instanceof Error ? err : new Error(String(err)))
    } finally {
      this.draining = false
    }
  }

  private onStatus(status: number): void {
    const before = this.statusValue
    this.statusValue = status
    this.emit('status', status)
    if (status & STATUS.DRIVER_OK && !(before & STATUS.DRIVER_OK)) {
      this.features = this.source.negotiatedFeatures()
      this.emit('ready', this.features)
    }
    if (status === 0 && before !== 0) this.emit('reset')
  }

  /** The last status the driver set. */
  get status(): number {
    return this.statusValue
  }

  /** Features the driver accepted; meaningful once `ready` was emitted. */
  get negotiatedFeatures(): bigint {
    return this.features
  }

  /** Request and interrupt counters, from the native side. */
  counters(): DeviceCounters {
    return this.source.counters()
  }

  /** Whether the device was attached to the vDPA bus by `attach()`. */
  get attached(): boolean {
    return this.attachedAs !== undefined
  }

  /**
   * Adds the device to the vDPA bus and resolves with the node the kernel made: `/dev/vdX` for a block
   * device with the `virtio` driver, `/dev/vhost-vdpa-N` with `vhost`. The device is served meanwhile.
   */
  async attach(options: AttachOptions = {}): Promise<string> {
    this.assertOpen()
    const driver = options.driver ?? 'virtio'
    const path = await attach(this.name, driver, options)
    this.attachedAs = driver
    return path
  }

  /** Removes the device from the vDPA bus. */
  async detach(options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.attachedAs === undefined) return
    await detach(this.name, options)
    this.attachedAs = undefined
  }

  /** Rewrites config-space bytes; the driver gets a config interrupt once it is running. */
  protected updateConfig(offset: number, data: Buffer): void {
    this.assertOpen()
    this.source.updateConfig(offset, data)
  }

  /** Does not keep the process alive by itself (like `server.unref()`). */
  unref(): this {
    this.keepAlive?.unref()
    return this
  }

  ref(): this {
    this.keepAlive?.ref()
    return this
  }

  get closed(): boolean {
    return this.closing !== undefined
  }

  /**
   * Graceful stop: detaches (if `attach()` attached it), lets in-flight requests finish, flushes the
   * backend, and destroys the device. Safe to call more than once.
   */
  close(): Promise<void> {
    this.closing ??= this.doClose()
    return this.closing
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }

  private async doClose(): Promise<void> {
    try {
      if (this.attachedAs !== undefined) await this.detach()
      const deadline = Date.now() + (this.options.drainTimeoutMs ?? 10_000)
      while (this.inFlight() > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
      this.completions.flush()
      await this.shutdown()
      this.sourceClosed = true
      this.source.close()
    } finally {
      if (this.keepAlive) clearInterval(this.keepAlive)
      this.emit('close')
    }
  }

  protected assertOpen(): void {
    if (this.closing) throw new VduseError(`device ${this.name} is closed`, { code: 'ERR_VDUSE_CLOSED' })
  }
}
