import { VduseError, native, nativeAsync } from '../errors'
import type { BatchArrays } from './batch'
import { binding } from './binding'
import type { DeviceEvent, DeviceInit, RequestSource, Transport } from './source'

/** Opens a device through the native binding: in the kernel (VDUSE), or on a vhost-user socket. */
function openNative(
  init: DeviceInit,
  arrays: BatchArrays,
  onBatch: (queue: number, count: number) => void,
  onEvent: (event: DeviceEvent) => void,
): RequestSource {
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
    portCounters: () => device.portStats() ?? undefined,
    fsCounters: () => device.fsStats() ?? undefined,
    fsAnswerMount: (ticket, writable, mount, entrySeconds) =>
      device.fsAnswerMount(ticket, writable, mount, entrySeconds),
    fsMountCounters: () => device.fsMountStats(),
    nbdStart: (info, options, onEvent) => native(() => device.nbdStart(info, options, onEvent)),
    nbdAttach: (slot, socket, structured) => native(() => device.nbdAttach(slot, socket, structured)),
    nbdFlush: (timeoutMs) => nativeAsync(() => native(() => device.nbdFlush(timeoutMs))),
    nbdCounters: () => device.nbdStats() ?? undefined,
    nbdHold: (hold) => device.nbdHold(hold),
  }
  return source
}

/** The real thing: a VDUSE device in the kernel, served on this JavaScript thread by the native binding. */
export const vduseTransport: Transport = { native: true, open: openNative }

/** Options of {@link vhostUser}. */
export interface VhostUserOptions {
  /**
   * Connect to a VMM that listens on the socket (QEMU: `-chardev socket,…,server=on`) instead of listening
   * on it; when the VMM goes away, connect again (every 500 ms) until the device is closed. The socket is
   * the VMM's: `close()` leaves it.
   */
  connect?: boolean
}

/**
 * Serves the device over a vhost-user socket at `socketPath` instead of through VDUSE: any VMM (QEMU
 * `-chardev socket,path=…` with `vhost-user-blk-pci` or `-netdev vhost-user`, cloud-hypervisor,
 * libblkio) connects to it, one client at a time, on hosts without the VDUSE module. The socket is
 * created when the device is (a stale socket file there is replaced) and removed by `close()`. Devices
 * on it are not attached (`attach()` throws); their `path` is the socket.
 */
export function vhostUser(socketPath: string, options: VhostUserOptions = {}): Transport {
  if (typeof socketPath !== 'string' || socketPath === '' || socketPath.includes('\0')) {
    throw new VduseError('vhostUser() needs the path of the socket to listen on', {
      code: 'ERR_VDUSE_INVALID_CONFIG',
    })
  }
  if (Buffer.byteLength(socketPath) > 107) {
    throw new VduseError(`socket path "${socketPath}" is longer than a UNIX socket allows (107 bytes)`, {
      code: 'ERR_VDUSE_INVALID_CONFIG',
      hint: 'use a shorter path, e.g. under /run',
    })
  }
  return {
    native: true,
    socketPath,
    open: (init, arrays, onBatch, onEvent) =>
      openNative(
        { ...init, vhostUser: socketPath, vhostUserConnect: options.connect ?? false },
        arrays,
        onBatch,
        onEvent,
      ),
  }
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
