import test from 'ava'

import { BLK_FEATURES, ConfigLayout, FeatureSet, VduseError, statusNames } from '../src'

test('feature names turn into the mask the kernel wants, and back', (t) => {
  const mask = BLK_FEATURES.mask(['FLUSH', 'MQ', 'DISCARD'])
  t.is(mask, (1n << 9n) | (1n << 12n) | (1n << 13n))
  t.deepEqual(BLK_FEATURES.names(mask), ['FLUSH', 'MQ', 'DISCARD'])
  t.true(BLK_FEATURES.has(mask, 'MQ'))
  t.false(BLK_FEATURES.has(mask, 'RO'))
})

test('a feature offered without the one it requires is refused with a clear error', (t) => {
  const set = new FeatureSet({ A: { bit: 1 }, B: { bit: 2, requires: ['A'] } })
  const err = t.throws(() => set.mask(['B']), { instanceOf: VduseError })
  t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG')
  t.regex(err?.message ?? '', /B requires A/)
  t.is(set.mask(['A', 'B']), 6n)
  t.throws(() => new FeatureSet({ X: { bit: 64 } }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
})

test('config layouts encode little-endian and check sizes', (t) => {
  const layout = new ConfigLayout(16, {
    a: { offset: 0, type: 'u64' },
    b: { offset: 8, type: 'u32' },
    c: { offset: 12, type: 'u16' },
    d: { offset: 14, type: 'u8' },
  })
  const buf = layout.encode({ a: 0x0102030405060708n, b: 0xaabbccdd, c: 0x1234, d: 7 })
  t.deepEqual([...buf], [8, 7, 6, 5, 4, 3, 2, 1, 0xdd, 0xcc, 0xbb, 0xaa, 0x34, 0x12, 7, 0])
  t.is(layout.decode(buf, 'b'), 0xaabbccddn)
  t.deepEqual(layout.encodeField('c', 1), { offset: 12, data: Buffer.from([1, 0]) })
  const err = t.throws(() => layout.encode({ d: 256 }), { instanceOf: VduseError })
  t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG')
  t.throws(() => layout.encode({ b: -1 }), { instanceOf: VduseError })
  t.throws(() => layout.encode({ c: 1.5 }), { instanceOf: VduseError })
  t.throws(() => new ConfigLayout(4, { x: { offset: 2, type: 'u32' } }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  t.throws(
    () => new ConfigLayout(8, { x: { offset: 2, type: 'u32' } }),
    { code: 'ERR_VDUSE_INVALID_CONFIG' },
    'misaligned',
  )
})

test('status bits have names', (t) => {
  t.deepEqual(statusNames(0), ['RESET'])
  t.deepEqual(statusNames(0x0f), ['ACKNOWLEDGE', 'DRIVER', 'DRIVER_OK', 'FEATURES_OK'])
})
