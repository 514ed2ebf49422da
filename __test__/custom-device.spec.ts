// The "Writing a device" example (examples/custom-device.ts): a virtio device built from the public API
// alone, driven by the in-process transport's fake driver.
import test from 'ava'

import { InProcessTransport, STATUS } from '../src'
import { PatternDisk } from '../examples/custom-device'
import { BlkDriver, T } from './helpers/blk-driver'

test('a device model written from the public API serves reads, refuses writes, answers GET_ID', async (t) => {
  const transport = new InProcessTransport()
  const disk = await PatternDisk.create({ name: 'pattern', sectors: 2048, transport })
  disk.unref()
  transport.start()
  t.truthy(disk.status & STATUS.DRIVER_OK)
  t.is(transport.offeredFeatures & ((1n << 5n) | (1n << 6n)), (1n << 5n) | (1n << 6n), 'RO and BLK_SIZE')
  t.is(transport.config.readBigUInt64LE(0), 2048n)
  const driver = new BlkDriver(transport)
  const res = await driver.read(5, 3 * 512)
  t.is(res.status, 0)
  t.is(res.used, 3 * 512 + 1)
  for (let s = 0; s < 3; s++) t.is(res.data.readBigUInt64LE(s * 512), BigInt(5 + s))
  t.is((await driver.write(0, Buffer.alloc(512))).status, 2, 'UNSUPP')
  const id = await driver.simple(T.GET_ID, [], 20)
  t.is(id.data.subarray(0, 12).toString(), 'pattern-disk')
  t.is((await driver.read(0, 100)).status, 1, 'a partial sector is IOERR')
  t.is(disk.served, 1)
  await disk.close()
  t.true(disk.closed)
})
