import type { DeviceCounters } from '../../index'

/**
 * Where requests come from and where completions go: the native VDUSE binding, or the in-process
 * transport used by tests. Both speak the same batch format, so device models cannot tell them apart.
 *
 * Batch format (filled by `drain`): `reqs` holds `[slot, queue, firstSegment, readable << 16 | writable]`
 * per request; `segs` holds `[regionKey, offset, length]` per buffer piece, readable ones first.
 */
export interface RequestSource {
  drain(header: Uint32Array, reqs: Uint32Array, segs: Float64Array): number
  /** The memory region `regionKey` of request `slot`, as one ArrayBuffer (cached by the caller). */
  region(slot: number, regionKey: number): ArrayBuffer
  /** `[slot, usedLength]` pairs. */
  complete(done: Uint32Array, count: number): void
  /** Native block I/O, where available: `[slot, fd, kind, position, skip]` per request. */
  fileIo?(ops: Float64Array, count: number): void
  updateConfig(offset: number, data: Buffer): void
  status(): number
  negotiatedFeatures(): bigint
  counters(): DeviceCounters
  close(): void
}

export type { DeviceCounters }
