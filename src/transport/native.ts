import { native, nativeAsync } from '../errors'
import { binding } from './binding'
import type { DeviceEvent, DeviceInit, RequestSource, Transport } from './source'

/** The real thing: a VDUSE device in the kernel, served on this JavaScript thread by the native binding. */
export const vduseTransport: Transport = {
  open(init, arrays, onBatch, onEvent) {
    const device = native(() =>
      binding.createDevice(
        init,
        { reqs: arrays.reqs, heads: arrays.heads, done: arrays.done, ctl: arrays.ctl },
        onBatch,
        (e) => onEvent(toEvent(e)),
      ),
    )
    const source: RequestSource = {
      read: (t, o, dst, at, n) => device.read(t, o, dst, at, n),
      write: (t, o, src, at, n) => device.write(t, o, src, at, n),
      flush: () => device.flush(),
      isLive: (t) => device.isLive(t),
      submitIo: (ops, n) => device.submitIo(ops, n),
      ioQuiet: () => device.ioIsQuiet(),
      ioRangeQuiet: (fd, offset, length) => device.ioRangeIsQuiet(fd, offset, length),
      ioGhosts: () => device.ioGhosts(),
      releasable: () => device.statePath() != null,
      updateConfig: (offset, data) => native(() => device.updateConfig(offset, data)),
      status: () => device.status(),
      negotiatedFeatures: () => device.negotiatedFeatures(),
      counters: () => device.counters(),
      statePath: () => device.statePath() ?? null,
      recovered: device.recovered,
      close: () => nativeAsync(async () => void (await device.close())),
      release: () => nativeAsync(async () => void (await native(() => device.release()))),
      tapName: device.tapName ?? undefined,
      tapCounters: () => device.tapStats() ?? undefined,
    }
    return source
  },
}

function toEvent(e: {
  kind: string
  status?: number | null
  features?: bigint | null
  reason?: string | null
  waitedMs?: number | null
  fenced?: number | null
  revoked?: boolean | null
}): DeviceEvent {
  const out: DeviceEvent = { kind: e.kind as DeviceEvent['kind'] }
  if (e.status != null) out.status = e.status
  if (e.features != null) out.features = e.features
  if (e.reason != null) out.reason = e.reason as 'reset' | 'iotlb'
  if (e.waitedMs != null) out.waitedMs = e.waitedMs
  if (e.fenced != null) out.fenced = e.fenced
  if (e.revoked != null) out.revoked = e.revoked
  return out
}

export type { DeviceInit }
