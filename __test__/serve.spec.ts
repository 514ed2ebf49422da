// The JavaScript-thread server (crates/vduse-node/src/serve.rs) without a kernel: a driver thread fills a
// real split ring and kicks; Node's own loop serves it exactly as it serves a VDUSE device.
import test from 'ava'

import type { BindingLoopback, LoopbackReport } from '../index'
import type { RequestBatch } from '../src/transport/batch'
import { VirtioDevice } from '../src/virtio/device'
import { loopbackTransport } from './helpers/loopback'

class LoopbackDevice extends VirtioDevice {
  loopback!: BindingLoopback
  /** How long the model works on each request (busy), so that a wake-up has a known least cost. */
  workNs = 0n
  static create(pollUs: 0 | 'auto'): LoopbackDevice {
    const { transport, loopback } = loopbackTransport(256)
    const d = new LoopbackDevice({ name: 'loopback', transport, pollUs })
    d.open({
      deviceId: 2,
      features: 0n,
      config: Buffer.alloc(0),
      numQueues: 1,
      queueSize: 256,
      maxSegments: 3,
    })
    d.loopback = loopback()
    return d
  }
  protected handleRequest(batch: RequestBatch, i: number): void {
    if (this.workNs > 0n) {
      const until = process.hrtime.bigint() + this.workNs
      while (process.hrtime.bigint() < until);
    }
    batch.complete(batch.ticket(i), 1, 0)
  }
  protected inFlight(): number {
    return 0
  }
  protected async shutdown(): Promise<void> {}
}

test("pollUs 'auto' sizes its cap from served wake-ups, within 16–1000 µs; every request completes once", async (t) => {
  const device = LoopbackDevice.create('auto')
  t.is(device.counters().pollCapUs, 16, 'the floor until a wake-up was measured')
  const r = (await device.loopback.run(3000, 1)) as LoopbackReport
  const c = device.counters()
  t.is(r.requests, 3000)
  t.is(c.requests, 3000)
  t.is(c.completions, 3000)
  t.is(c.staleCompletions, 0)
  t.true(c.pollCapUs >= 16 && c.pollCapUs <= 1000, `cap ${c.pollCapUs} µs`)
  t.log(`auto cap here: ${c.pollCapUs} µs; ${c.polled} of ${c.jsCalls} batches found by polling`)
  await device.close()
})

test("pollUs 'auto' follows what a wake-up costs: 40 µs of model work puts the cap at 16 × 40 µs or more", async (t) => {
  const device = LoopbackDevice.create('auto')
  device.workNs = 40_000n
  await device.loopback.run(300, 1)
  const c = device.counters()
  t.is(c.completions, 300)
  t.true(c.pollCapUs >= 640, `cap ${c.pollCapUs} µs`)
  await device.close()
})

test('pollUs 0 never polls', async (t) => {
  const device = LoopbackDevice.create(0)
  await device.loopback.run(500, 1)
  const c = device.counters()
  t.is(c.completions, 500)
  t.is(c.pollCapUs, 0)
  t.is(c.polled, 0)
  t.is(c.wakeups, c.jsCalls, 'every batch took a wake-up')
  await device.close()
})
