import type {
  BindingNbdSocket,
  DeviceCounters,
  DeviceInit,
  FsCounters,
  NbdCounters,
  NbdEventJs,
  NbdExportJs,
  NbdOptionsJs,
  PortCounters,
} from '../../index'

export type { FsCounters, PortCounters }
import type { BatchArrays } from './batch'

/** Something the kernel-facing side did (from the device's message loop). */
export interface DeviceEvent {
  kind: 'status' | 'drained' | 'broken'
  status?: number
  features?: bigint
  /** Why requests were drained: the driver reset the device, or changed its memory map. */
  reason?: 'reset' | 'iotlb'
  waitedMs?: number
  /** Requests that were still in the model when the drain gave up: their tickets are dead. */
  fenced?: number
  revoked?: boolean
}

/**
 * Where requests come from and where completions go: the native VDUSE binding, or the in-process
 * transport used by tests. Both speak the same batch protocol (see `BatchArrays`), so device models
 * cannot tell them apart.
 */
export interface RequestSource {
  /**
   * Copies readable bytes (driver → device) of request `ticket`, from `offset`, into `dst[at, at+length)`.
   * Returns the bytes copied, or -1 if the request is no longer in flight (completed or fenced).
   */
  read(ticket: number, offset: number, dst: Uint8Array, at: number, length: number): number
  /** Copies `src[at, at+length)` into the writable bytes (device → driver) of `ticket`, from `offset`. */
  write(ticket: number, offset: number, src: Uint8Array, at: number, length: number): number
  /** Publishes the completions the arrays' `done` holds (count in `ctl[0]`). */
  flush(): void
  /** Whether request `ticket` is still in flight: false once it was completed or fenced. */
  isLive(ticket: number): boolean
  /** Native block I/O, where available: `[ticket, fd, kind, position, skip]` per request. */
  submitIo?(ops: Float64Array, count: number): void
  /** Native block I/O: whether nothing is queued, waiting or running right now (callers poll). */
  ioQuiet?(): boolean
  /** Whether no native transfer overlaps bytes `[offset, offset+length)` of `fd` right now. */
  ioRangeQuiet?(fd: number, offset: number, length: number): boolean
  /** Native transfers still running for requests no longer in flight (fenced writes). */
  ioGhosts?(): number
  /** Whether `release` can hand the device over at all (it keeps a state file). */
  releasable?(): boolean
  updateConfig(offset: number, data: Buffer): void
  status(): number
  negotiatedFeatures(): bigint
  counters(): DeviceCounters
  /** The state file that lets a restarted server take the device over, if any. */
  statePath(): string | null
  /** Whether the device was taken over from a server that died (`recover`), rather than created. */
  readonly recovered: boolean
  /** Stops serving and destroys the device. Rejects with ERR_VDUSE_BUSY while it is attached. */
  close(): Promise<void>
  /** Stops serving, leaving the device (attached, with its state file) to a successor (`recover`). */
  release?(): Promise<void>
  /** A NIC served natively (`DeviceInit.tap`): the tap it is bridged to. */
  readonly tapName?: string | undefined
  /** A NIC served natively: its frame counters. */
  tapCounters?(): TapCounters | undefined
  /** A NIC served natively as a switch port (`DeviceInit.switchId`): its frame counters. */
  portCounters?(): PortCounters | undefined
  /** A file system served natively (`DeviceInit.fsShare`): its counters. */
  fsCounters?(): FsCounters | undefined
  /**
   * Host directories mounted in a TypeScript file system's tree (`DeviceInit.fsMounts`): answers the
   * LOOKUP `ticket` of a mount point with mount `mount`'s root (the name valid for `entrySeconds`), and
   * completes it. False if the request is no longer in flight or could hold no answer.
   */
  fsAnswerMount?(ticket: number, writable: number, mount: number, entrySeconds: number): boolean
  /** Counters of each mounted host directory (`DeviceInit.fsMounts`), in order. */
  fsMountCounters?(): FsCounters[]
  /**
   * The native NBD data path of a blk device created with `nbdModel`: its worker threads hand every
   * request to it, served over connections given with `nbdAttach`, without JavaScript. `onEvent` hears of lost connections
   * (give a new one) and of requests that failed waiting for one.
   */
  nbdStart?(info: NbdExportJs, options: NbdOptionsJs, onEvent: (event: NbdEventJs) => void): void
  /** Gives connection `slot` the engine's half of `socket` (handshake done). */
  nbdAttach?(slot: number, socket: BindingNbdSocket, structured: boolean): void
  /** Makes what the NBD data path acknowledged durable (NBD_CMD_FLUSH), within `timeoutMs`. */
  nbdFlush?(timeoutMs: number): Promise<void>
  /** A device served over NBD by its workers: holds new requests back (a handover) or lets them go. */
  nbdHold?(hold: boolean): void
  /** The NBD data path's counters. */
  nbdCounters?(): NbdCounters | undefined
}

/** Frames a natively served NIC moved between the driver and its tap. */
export interface TapCounters {
  txFrames: number
  txDropped: number
  rxFrames: number
  rxDropped: number
}

/** Opens a device: the kernel (VDUSE) by default, a vhost-user socket, or the in-process transport in tests. */
export interface Transport {
  /** Served by the native binding (its logs go to the `log` event). */
  readonly native?: boolean
  /** A vhost-user transport: the socket clients connect to (the device's `path`; it is never attached). */
  readonly socketPath?: string
  open(
    init: DeviceInit,
    arrays: BatchArrays,
    onBatch: (queue: number, count: number) => void,
    onEvent: (event: DeviceEvent) => void,
  ): RequestSource
}

export type { DeviceCounters, DeviceInit }
