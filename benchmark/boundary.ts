// The Rust↔JavaScript boundary without a kernel: requests/s through the JavaScript-thread serving path
// (a driver thread fills a real split ring and kicks an eventfd; the JavaScript thread's libuv poll pops
// and validates the chains in Rust, calls the TypeScript model once per batch, and publishes the
// completions) with a no-op model, at batch sizes 1, 16, 64 and 256. Also prints the cost per request
// in nanoseconds. Boundary regressions show here without booting a VM.
//   npm run bench:boundary
import { binding } from '../src/transport/binding'
import type { RequestBatch } from '../src/transport/batch'
import type { RequestSource, Transport } from '../src/transport/source'
import { VirtioDevice } from '../src/virtio/device'
import type { BindingLoopback, LoopbackReport } from '../index'

const REQUESTS_PER_ITERATION = 50_000

let loopback: BindingLoopback | undefined
const loopbackTransport: Transport = {
  open(init, arrays, onBatch): RequestSource {
    const lb = binding.createLoopback(1024, arrays, onBatch, init.pollAuto ?? null)
    loopback = lb
    return {
      read: (t, o, dst, at, n) => lb.read(t, o, dst, at, n),
      write: (t, o, src, at, n) => lb.write(t, o, src, at, n),
      flush: () => lb.flush(),
      isLive: (t) => lb.isLive(t),
      updateConfig: () => {},
      status: () => 4,
      negotiatedFeatures: () => 0n,
      counters: () => lb.counters(),
      statePath: () => null,
      recovered: false,
      close: async () => lb.close(),
    }
  },
}

/** Completes every request at once, status byte included: only the boundary is measured. */
class NoopDevice extends VirtioDevice {
  static create(pollUs: 0 | 'auto' = 0): NoopDevice {
    const d = new NoopDevice({ name: 'loopback', transport: loopbackTransport, batchSize: 256, pollUs })
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
  protected handleRequest(batch: RequestBatch, i: number): void {
    batch.complete(batch.ticket(i), 1, 0)
  }
  protected inFlight(): number {
    return 0
  }
  protected async shutdown(): Promise<void> {}
}

async function main(): Promise<void> {
  const device = NoopDevice.create()
  const lb = loopback!
  const rates: Record<number, number[]> = {}
  for (const batch of [1, 16, 64, 256]) {
    rates[batch] = []
    // One warm-up iteration, then five measured ones.
    for (let it = 0; it < 6; it++) {
      const r = (await lb.run(REQUESTS_PER_ITERATION, batch)) as LoopbackReport
      if (it > 0) rates[batch]!.push(r.requests / (r.elapsedNs / 1e9))
    }
  }
  const inline: Record<number, number> = {}
  for (const batch of [1, 16, 64, 256]) {
    let best = Infinity
    for (let it = 0; it < 6; it++) {
      const r = lb.runInline(REQUESTS_PER_ITERATION, batch)
      if (it > 0) best = Math.min(best, r.elapsedNs / r.requests)
    }
    inline[batch] = best
  }
  const c = device.counters()
  console.log(
    `requests through the JavaScript-thread serving path (no-op TypeScript model), ${REQUESTS_PER_ITERATION} per iteration:`,
  )
  console.table(
    Object.entries(rates).map(([batch, r]) => {
      const sorted = [...r].sort((a, b) => a - b)
      const median = sorted[Math.floor(sorted.length / 2)]!
      return {
        batch: Number(batch),
        'requests/s (median)': Math.round(median),
        'ns/request': Math.round(1e9 / median),
        min: Math.round(sorted[0]!),
        max: Math.round(sorted[sorted.length - 1]!),
        iterations: r.length,
      }
    }),
  )
  console.log("the same path with the driver on the JavaScript thread (no wake-ups): the boundary's own cost")
  console.table(
    Object.entries(inline).map(([batch, ns]) => ({
      batch: Number(batch),
      'ns/request (best of 5)': Math.round(ns),
      'requests/s': Math.round(1e9 / ns),
    })),
  )
  console.log(
    `model calls: ${c.jsCalls}, wake-ups: ${c.wakeups}, requests: ${c.requests}, interrupts: ${c.interrupts}`,
  )
  await device.close()

  // What `pollUs: 'auto'` makes of this machine: the cap it sizes from a one-request wake-up's cost.
  const polling = NoopDevice.create('auto')
  const lbPoll = loopback!
  let perSecond = 0
  for (let it = 0; it < 3; it++) {
    const r = (await lbPoll.run(REQUESTS_PER_ITERATION / 5, 1)) as LoopbackReport
    perSecond = r.requests / (r.elapsedNs / 1e9)
  }
  const p = polling.counters()
  console.log(
    `pollUs 'auto' here: a cap of ${p.pollCapUs.toFixed(1)} µs; batch 1 at ${Math.round(perSecond)} requests/s ` +
      `(${p.polled} of ${p.jsCalls} batches found by polling)`,
  )
  await polling.close()
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
