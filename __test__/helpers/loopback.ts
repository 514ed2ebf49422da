// A transport over the native batch server without a kernel (`BindingLoopback`): a driver thread fills a
// real split ring and kicks; Node's own loop serves it exactly as it serves a VDUSE device.
import type { BindingLoopback } from '../../index'
import { binding } from '../../src/transport/binding'
import type { Transport } from '../../src/transport/source'

/** A transport whose one device is a loopback of `queueSize` entries; `loopback()` is its driver. */
export function loopbackTransport(queueSize: number): {
  transport: Transport
  loopback: () => BindingLoopback
} {
  let lb: BindingLoopback | undefined
  const transport: Transport = {
    open(init, arrays, onBatch) {
      const created = binding.createLoopback(queueSize, arrays, onBatch, init.pollAuto ?? null)
      lb = created
      return {
        read: (t, o, dst, at, n) => created.read(t, o, dst, at, n),
        write: (t, o, src, at, n) => created.write(t, o, src, at, n),
        flush: () => created.flush(),
        isLive: (t) => created.isLive(t),
        updateConfig: () => {},
        status: () => 4,
        negotiatedFeatures: () => 0n,
        counters: () => created.counters(),
        statePath: () => null,
        recovered: false,
        close: async () => created.close(),
      }
    },
  }
  return { transport, loopback: () => lb! }
}
