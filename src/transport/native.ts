import type { DeviceInit } from '../../index'
import { native } from '../errors'
import { binding } from './binding'
import type { RequestSource } from './source'

/** Opens a device: the kernel (VDUSE) by default, or the in-process transport in tests. */
export interface Transport {
  open(init: DeviceInit, onRequests: () => void, onStatus: (status: number) => void): RequestSource
}

/** The real thing: a VDUSE device in the kernel, served by the native binding. */
export const vduseTransport: Transport = {
  open(init, onRequests, onStatus) {
    const device = native(() => binding.createDevice(init, onRequests, onStatus))
    return {
      drain: (h, r, s) => device.drain(h, r, s),
      region: (slot, key) => native(() => device.region(slot, key)),
      complete: (done, n) => device.complete(done, n),
      fileIo: (ops, n) => device.fileIo(ops, n),
      updateConfig: (offset, data) => native(() => device.updateConfig(offset, data)),
      status: () => device.status(),
      negotiatedFeatures: () => device.negotiatedFeatures(),
      counters: () => device.counters(),
      close: () => native(() => device.close()),
    }
  },
}

export type { DeviceInit }
