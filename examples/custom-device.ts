// A virtio device written from the public API alone: a read-only virtio-blk disk whose every sector
// reads as its own number, in ~70 lines. It shows what a device model does — declare features and a
// config space, open the device, answer request batches — without BlockDevice's help. Run it over the
// kernel (`node --import tsx examples/custom-device.ts`, as root) or in-process (the test does).
import { ConfigLayout, FeatureSet, VirtioDevice, type RequestBatch, type VirtioDeviceOptions } from '../src'

const VIRTIO_ID_BLOCK = 2
const SECTOR = 512
const FEATURES = new FeatureSet({ RO: { bit: 5 }, BLK_SIZE: { bit: 6 } })
const CONFIG = new ConfigLayout(24, {
  capacity: { offset: 0, type: 'u64' },
  blk_size: { offset: 20, type: 'u32' },
})
const IN = 0
const GET_ID = 8
const [OK, IOERR, UNSUPP] = [0, 1, 2]

export class PatternDisk extends VirtioDevice {
  readonly #sector = Buffer.alloc(SECTOR)
  #served = 0

  static async create(options: VirtioDeviceOptions & { sectors: number }): Promise<PatternDisk> {
    const disk = new PatternDisk(options)
    await disk.prepare() // replaceStale, an aborted signal
    disk.open({
      deviceId: VIRTIO_ID_BLOCK,
      features: FEATURES.mask(['RO', 'BLK_SIZE']),
      config: CONFIG.encode({ capacity: BigInt(options.sectors), blk_size: SECTOR }),
      numQueues: 1,
      queueSize: 256,
      maxSegments: 130, // header + data buffers + status
    })
    await disk.opened()
    return disk
  }

  get served(): number {
    return this.#served
  }

  // Called for each request of a batch, on the JavaScript thread; complete now or later by ticket.
  protected handleRequest(batch: RequestBatch, i: number): void {
    const ticket = batch.ticket(i)
    const writable = batch.writableBytes(i) // data in + the status byte
    if (writable < 1 || batch.headLength(i) < 16) return batch.complete(ticket, 0)
    const type = batch.view.getUint32(batch.headOffset(i), true)
    const first = Number(batch.view.getBigUint64(batch.headOffset(i) + 8, true))
    const data = writable - 1
    if (type === GET_ID) {
      const n = batch.write(ticket, 0, Buffer.from('pattern-disk'))
      return batch.complete(ticket, n + 1, OK)
    }
    if (type !== IN) return batch.complete(ticket, 1, UNSUPP) // read-only: writes are refused too
    if (data % SECTOR !== 0) return batch.complete(ticket, 1, IOERR)
    for (let s = 0; s < data / SECTOR; s++) {
      this.#sector.fill(0).writeBigUInt64LE(BigInt(first + s))
      if (batch.write(ticket, s * SECTOR, this.#sector) < 0) return // the request was fenced
    }
    this.#served++
    batch.complete(ticket, data + 1, OK)
  }

  // Nothing is held between batches: every request is answered while its batch is handled.
  protected inFlight(): number {
    return 0
  }

  protected async shutdown(): Promise<void> {}
}

if (require.main === module) {
  void (async () => {
    const disk = await PatternDisk.create({ name: 'pattern0', sectors: 2048, replaceStale: true })
    console.log(`a 1 MiB pattern disk at ${await disk.attach()}; Ctrl-C stops it`)
    process.once('SIGINT', () => void disk.close())
  })()
}
