// A tiny virtio-blk driver over the in-process transport: builds requests the way Linux does.
import { BlockDevice, InProcessTransport, type BlockBackend } from '../../src'

export const T = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 } as const
/** virtio-blk status bytes. */
export const S = { OK: 0, IOERR: 1, UNSUPP: 2 }

type BlockDeviceExtra = Partial<Parameters<typeof BlockDevice.create>[0]>

/**
 * A `setup(backend, extra)` for one spec: a block device (named `prefix` and a number) over a started
 * in-process transport, with a driver for it.
 */
export function blkSetup(prefix: string) {
  let n = 0
  return async (backend: BlockBackend, extra: BlockDeviceExtra = {}) => {
    const transport = new InProcessTransport()
    const device = await BlockDevice.create({ name: `${prefix}${n++}`, backend, transport, ...extra })
    device.unref()
    transport.start()
    return { device, transport, driver: new BlkDriver(transport) }
  }
}

export function header(type: number, sector: number): Buffer {
  const h = Buffer.alloc(16)
  h.writeUInt32LE(type, 0)
  h.writeBigUInt64LE(BigInt(sector), 8)
  return h
}

export function range(sector: number, sectors: number, flags = 0): Buffer {
  const r = Buffer.alloc(16)
  r.writeBigUInt64LE(BigInt(sector), 0)
  r.writeUInt32LE(sectors, 8)
  r.writeUInt32LE(flags, 12)
  return r
}

export class BlkDriver {
  constructor(readonly transport: InProcessTransport) {}

  async read(
    sector: number,
    length: number,
    queue = 0,
  ): Promise<{ status: number; data: Buffer; used: number }> {
    const res = await this.transport.request([header(T.IN, sector)], [length, 1], queue)
    return { status: res.writable[1]![0]!, data: res.writable[0]!, used: res.used }
  }

  async write(sector: number, data: Buffer, queue = 0): Promise<{ status: number; used: number }> {
    const res = await this.transport.request([header(T.OUT, sector), data], [1], queue)
    return { status: res.writable[0]![0]!, used: res.used }
  }

  async simple(
    type: number,
    payload: Buffer[] = [],
    dataIn = 0,
  ): Promise<{ status: number; used: number; data: Buffer }> {
    const res = await this.transport.request([header(type, 0), ...payload], dataIn > 0 ? [dataIn, 1] : [1])
    const status = res.writable[res.writable.length - 1]![0]!
    return { status, used: res.used, data: res.writable[0]! }
  }
}
