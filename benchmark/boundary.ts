// The Rust↔JavaScript boundary without a kernel: requests/s through the binding's batch path (a real
// split ring, queue processing, the doorbell, drain and complete) with a no-op TypeScript model, at
// batch sizes 1, 16, 64 and 256. Boundary regressions show here without booting a VM.
//   npm run bench:boundary
import { binding } from '../src/transport/binding'
import type { RequestBatch } from '../src/transport/batch'
import type { Transport } from '../src/transport/native'
import type { RequestSource } from '../src/transport/source'
import { VirtioDevice } from '../src/virtio/device'
import type { BindingLoopback, LoopbackReport } from '../index'

const REQUESTS_PER_ITERATION = 20_000

let loopback: BindingLoopback | undefined
const loopbackTransport: Transport = {
  open(init, onRequests, onStatus): RequestSource {
    const lb = binding.createLoopback(init, onRequests, onStatus)
    loopback = lb
    return {
      drain: (h, r, s) => lb.drain(h, r, s),
      region: (slot, key) => lb.region(slot, key),
      complete: (done, n) => lb.complete(done, n),
      updateConfig: () => {},
      status: () => 4,
      negotiatedFeatures: () => 0n,
      counters: () => ({
        kicks: 0,
        batches: 0,
        requests: 0,
        completions: 0,
        interrupts: 0,
        badChains: 0,
        staleCompletions: 0,
        inFlight: 0,
        pending: 0,
      }),
      close: () => {},
    }
  },
}

/** Completes every request at once: only the boundary is measured. */
class NoopDevice extends VirtioDevice {
  static create(): NoopDevice {
    const d = new NoopDevice({ name: 'loopback', transport: loopbackTransport, batchSize: 512 })
    d.open({
      deviceId: 2,
      features: 0n,
      config: Buffer.alloc(0),
      numQueues: 1,
      queueSize: 1024,
      maxSegments: 3,
    })
    return d
  }
  protected handleBatch(batch: RequestBatch): void {
    for (let i = 0; i < batch.count; i++) batch.complete(i, 1)
  }
  protected inFlight(): number {
    return 0
  }
  protected async shutdown(): Promise<void> {}
}

async function main(): Promise<void> {
  const device = NoopDevice.create()
  const lb = loopback!.driver()
  const rates: Record<number, number[]> = {}
  for (const batch of [1, 16, 64, 256]) {
    rates[batch] = []
    // One warm-up iteration, then five measured ones.
    for (let it = 0; it < 6; it++) {
      const r = (await lb.run(REQUESTS_PER_ITERATION, batch)) as LoopbackReport
      if (it > 0) rates[batch]!.push(r.requests / (r.elapsedNs / 1e9))
    }
  }
  console.log(
    `requests through the binding's batch path (no-op TypeScript model), ${REQUESTS_PER_ITERATION} per iteration:`,
  )
  console.table(
    Object.entries(rates).map(([batch, r]) => {
      const sorted = [...r].sort((a, b) => a - b)
      return {
        batch: Number(batch),
        'requests/s (median)': Math.round(sorted[Math.floor(sorted.length / 2)]!),
        min: Math.round(sorted[0]!),
        max: Math.round(sorted[sorted.length - 1]!),
        iterations: r.length,
      }
    }),
  )
  await device.close()
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
