// The virtio-net model over the in-process transport: a fake driver posts receive buffers and sends
// frames exactly as Linux's virtio_net does (a 12-byte virtio_net_hdr_v1 first).
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import test from 'ava'
import { createResponder } from '../examples/net-responder'

import { InProcessTransport, NET_FEATURES, NetDevice, NetSwitch, vhostUser, type NetHeader } from '../src'

const HDR = 12
let n = 0

async function nic(options: Partial<Parameters<typeof NetDevice.create>[0]> = {}, accept?: bigint) {
  const transport = new InProcessTransport()
  const device = await NetDevice.create({ name: `n${n++}`, transport, ...options })
  device.unref()
  transport.start(accept)
  return { device, transport }
}

function header(
  fields: Partial<
    Record<'flags' | 'gsoType' | 'hdrLen' | 'gsoSize' | 'csumStart' | 'csumOffset', number>
  > = {},
): Buffer {
  const h = Buffer.alloc(HDR)
  h[0] = fields.flags ?? 0
  h[1] = fields.gsoType ?? 0
  h.writeUInt16LE(fields.hdrLen ?? 0, 2)
  h.writeUInt16LE(fields.gsoSize ?? 0, 4)
  h.writeUInt16LE(fields.csumStart ?? 0, 6)
  h.writeUInt16LE(fields.csumOffset ?? 0, 8)
  return h
}

function frame(dst: string, src: string, size: number, fill = 0xab): Buffer {
  const f = Buffer.alloc(size, fill)
  Buffer.from(dst.split(':').map((x) => parseInt(x, 16))).copy(f, 0)
  Buffer.from(src.split(':').map((x) => parseInt(x, 16))).copy(f, 6)
  f.writeUInt16BE(0x0800, 12)
  return f
}

const tick = () => new Promise((r) => setImmediate(r))

test('config space and features: MAC, MTU, link up, one queue pair; offloads optional', async (t) => {
  const { device, transport } = await nic({ mac: '52:54:00:12:34:56', mtu: 9000 })
  const c = transport.config
  t.is(c.subarray(0, 6).toString('hex'), '525400123456')
  t.is(c.readUInt16LE(6), 1, 'link up')
  t.is(c.readUInt16LE(8), 1, 'max_virtqueue_pairs')
  t.is(c.readUInt16LE(10), 9000)
  t.true(NET_FEATURES.has(transport.offeredFeatures, 'CSUM'))
  t.is(transport.offeredFeatures & (1n << 17n), 0n, 'no CTRL_VQ (VDUSE refuses it)')
  t.true(device.negotiatedNetFeatures.includes('MRG_RXBUF'))
  device.setLink(false)
  t.is(transport.config.readUInt16LE(6), 0)
  t.is(transport.configInterrupts, 1)
  await device.close()
  const plain = await nic({ offloads: false })
  t.deepEqual([...plain.device.offeredFeatures].sort(), ['MAC', 'MRG_RXBUF', 'MTU', 'STATUS'])
  await plain.device.close()
  await t.throwsAsync(nic({ mac: '01:00:5e:00:00:01' }), { message: /unicast/ })
  await t.throwsAsync(nic({ mtu: 10 }), { message: /mtu/ })
})

test('receive buffers are held until a frame arrives; a frame spans buffers with MRG_RXBUF', async (t) => {
  const { device, transport } = await nic()
  const posted = [0, 1, 2].map(() => transport.request([], [1024], 0))
  await tick()
  t.is(device.rxBuffers, 3)
  t.is(transport.inFlight, 3, 'held, not completed')
  const f = frame('ff:ff:ff:ff:ff:ff', '02:00:00:00:00:01', 1500)
  t.true(device.send(f))
  const [a, b] = await Promise.all([posted[0]!, posted[1]!])
  t.is(a.used, 1024)
  t.is(b.used, HDR + 1500 - 1024)
  t.is(a.writable[0]!.readUInt16LE(10), 2, 'num_buffers')
  t.deepEqual(Buffer.concat([a.writable[0]!.subarray(HDR), b.writable[0]!.subarray(0, b.used)]), f)
  t.is(device.rxBuffers, 1)
  t.is(device.stats.rxFrames, 1)
  await device.close()
})

test('backpressure: with no buffers a frame is dropped and counted, and writable says when they are back', async (t) => {
  const { device, transport } = await nic()
  t.false(device.send(frame('02:00:00:00:00:02', '02:00:00:00:00:01', 60)))
  t.is(device.stats.rxNoBuffers, 1)
  const writable = new Promise<void>((resolve) => device.once('writable', resolve))
  const posted = transport.request([], [2048], 0)
  await writable
  t.true(device.send(frame('02:00:00:00:00:02', '02:00:00:00:00:01', 60)))
  t.is((await posted).used, HDR + 60)
  // More frames than buffers: the extra ones are dropped, never queued without bound.
  const few = [0, 1].map(() => transport.request([], [2048], 0))
  await tick()
  let sent = 0
  for (let i = 0; i < 10; i++) if (device.send(frame('02:00:00:00:00:02', '02:00:00:00:00:01', 100))) sent++
  t.is(sent, 2)
  t.is(device.stats.rxNoBuffers, 1 + 8)
  await Promise.all(few)
  await device.close()
})

test('a reset gives held receive buffers back at once; later frames use the new ones only', async (t) => {
  const { device, transport } = await nic()
  const old = [0, 1].map(() => transport.request([], [2048], 0))
  await tick()
  t.is(device.rxBuffers, 2)
  t.is(transport.renegotiate(), 2)
  for (const r of await Promise.all(old)) t.true(r.fenced)
  t.is(device.rxBuffers, 0, 'forgotten on reset')
  const fresh = transport.request([], [2048], 0)
  await tick()
  t.true(device.send(frame('02:00:00:00:00:02', '02:00:00:00:00:01', 64)))
  t.is((await fresh).used, HDR + 64)
  // An IOTLB change under held buffers gives them back to the driver empty (not lost until its next
  // reset); the device keeps running, and the model forgets them.
  const held = transport.request([], [2048], 0)
  await tick()
  t.is(transport.remap(), 0, 'nothing fenced')
  t.like(await held, { fenced: false, used: 0 })
  t.false(device.send(frame('02:00:00:00:00:02', '02:00:00:00:00:01', 64)), 'no live buffer left')
  t.is(device.rxBuffers, 0)
  await device.close()
})

test('TX: frames reach listeners with their header; malformed ones are dropped and counted', async (t) => {
  const { device, transport } = await nic({ mtu: 1500 })
  const seen: Array<{ frame: Buffer; header: NetHeader }> = []
  device.on('frame', (f, h) => seen.push({ frame: Buffer.from(f), header: { ...h } }))
  const good = frame('02:00:00:00:00:02', '02:00:00:00:00:01', 1514)
  const r = await transport.request([header(), good], [], 1)
  t.is(r.used, 0)
  const gsoFrame = frame('02:00:00:00:00:02', '02:00:00:00:00:01', 30_000)
  const tso = header({ flags: 1, gsoType: 1, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16 })
  await transport.request([tso, gsoFrame.subarray(0, 100), gsoFrame.subarray(100)], [], 1)
  t.is(seen.length, 2)
  t.deepEqual(seen[0]!.frame, good)
  t.deepEqual(seen[1]!.frame, gsoFrame)
  t.like(seen[1]!.header, { flags: 1, gsoType: 1, gsoSize: 1448, csumStart: 34, csumOffset: 16 })
  const bad = [
    [header(), Buffer.alloc(10)], // shorter than an Ethernet header
    [Buffer.alloc(6)], // not even a virtio-net header
    [header(), frame('02:00:00:00:00:02', '02:00:00:00:00:01', 1600)], // over the MTU without GSO
    [header({ gsoType: 1, gsoSize: 1448 }), gsoFrame], // GSO without a partial checksum
    [header({ flags: 1, csumStart: 1990, csumOffset: 16 }), good.subarray(0, 2000 - 14)], // checksum outside
    [header({ gsoType: 3, flags: 1, gsoSize: 1400, csumStart: 34, csumOffset: 6 }), gsoFrame], // UFO: not offered
    [header({ flags: 0x40 }), good], // flags the driver may not set
    [header({ flags: 1, gsoType: 1, hdrLen: 54, gsoSize: 1, csumStart: 34, csumOffset: 16 }), gsoFrame], // 1-byte segments
    [
      header({ flags: 1, gsoType: 1, hdrLen: 14, gsoSize: 1448, csumStart: 0, csumOffset: 0 }),
      good.subarray(0, 30),
    ], // no room for IP and TCP
  ]
  for (const parts of bad) t.is((await transport.request(parts, [], 1)).used, 0)
  t.is(device.stats.txMalformed, bad.length)
  t.is(seen.length, 2, 'none of them reached a listener')
  t.is(device.stats.txFrames, 2)
  await device.close()
})

test('offloads a receiver did not negotiate: checksums are completed, large GSO frames refused', async (t) => {
  // The driver accepts MAC/MTU/STATUS/MRG_RXBUF only.
  const { device, transport } = await nic(
    {},
    NET_FEATURES.mask(['MAC', 'MTU', 'STATUS', 'MRG_RXBUF']) | (1n << 32n),
  )
  const posted = transport.request([], [4096], 0)
  await tick()
  // A UDP/IPv4 frame with a partial checksum: the pseudo-header sum is in the field.
  const f = frame('02:00:00:00:00:02', '02:00:00:00:00:01', 14 + 20 + 8 + 32, 0x11)
  f.writeUInt16BE(0x1234, 14 + 20 + 6)
  t.true(device.send(f, { flags: 1, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 34, csumOffset: 6 }))
  const got = (await posted).writable[0]!
  t.is(got[0], 0, 'no NEEDS_CSUM for this driver')
  // Verify as a receiver would: the pseudo-header's sum (0x1234 here) plus the segment folds to 0xffff.
  let sum = 0x1234
  for (let i = HDR + 34; i < HDR + f.length; i += 2) sum += got.readUInt16BE(i)
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16)
  t.is(sum, 0xffff, 'the completed checksum verifies')
  t.false(
    device.send(Buffer.alloc(30_000), {
      flags: 1,
      gsoType: 1,
      hdrLen: 54,
      gsoSize: 1448,
      csumStart: 34,
      csumOffset: 16,
    }),
  )
  t.is(device.stats.rxRefused, 1)
  await device.close()
})

test('the switch learns addresses, forwards unicast, floods broadcast and unknown destinations', async (t) => {
  const a = await nic({ mac: '02:00:00:00:00:0a' })
  const b = await nic({ mac: '02:00:00:00:00:0b' })
  const c = await nic({ mac: '02:00:00:00:00:0c' })
  const sw = new NetSwitch().connect(a.device).connect(b.device).connect(c.device)
  const rx = (x: { transport: InProcessTransport }) => x.transport.request([], [2048], 0)
  let bRx = rx(b)
  let cRx = rx(c)
  await tick()
  // a → broadcast: flooded to b and c.
  await a.transport.request([header(), frame('ff:ff:ff:ff:ff:ff', '02:00:00:00:00:0a', 60)], [], 1)
  t.is((await bRx).used, HDR + 60)
  t.is((await cRx).used, HDR + 60)
  t.is(sw.stats.flooded, 1)
  // b → a: a was learned; only a receives it.
  const aRx = rx(a)
  cRx = rx(c)
  await tick()
  await b.transport.request([header(), frame('02:00:00:00:00:0a', '02:00:00:00:00:0b', 80)], [], 1)
  t.is((await aRx).used, HDR + 80)
  t.is(c.device.rxBuffers, 1, 'c did not get it')
  t.is(sw.stats.forwarded, 1)
  // a → b, now learned too.
  bRx = rx(b)
  await tick()
  await a.transport.request([header(), frame('02:00:00:00:00:0b', '02:00:00:00:00:0a', 90)], [], 1)
  t.is((await bRx).used, HDR + 90)
  t.is(sw.stats.forwarded, 2)
  sw.disconnect(c.device)
  t.is(sw.ports.length, 2)
  for (const x of [a, b, c]) await x.device.close()
  void cRx
})

test('the ~40-line responder example answers ARP and ping', async (t) => {
  const transport = new InProcessTransport()
  const nic = await createResponder({ name: `resp${n++}`, transport })
  nic.unref()
  transport.start()
  const peer = '02:00:00:00:80:01'
  // ARP: who has 10.80.0.2? tell 10.80.0.1
  const arp = frame('ff:ff:ff:ff:ff:ff', peer, 42)
  arp.writeUInt16BE(0x0806, 12)
  Buffer.from([0, 1, 8, 0, 6, 4, 0, 1]).copy(arp, 14)
  arp.fill(0, 22)
  Buffer.from(peer.split(':').map((x) => parseInt(x, 16))).copy(arp, 22)
  Buffer.from([10, 80, 0, 1]).copy(arp, 28)
  Buffer.from([10, 80, 0, 2]).copy(arp, 38)
  let rx = transport.request([], [2048], 0)
  await tick()
  await transport.request([header(), arp], [], 1)
  let got = (await rx).writable[0]!.subarray(HDR, (await rx).used)
  t.is(got.readUInt16BE(20), 2, 'ARP reply')
  t.is(got.subarray(22, 28).toString('hex'), '020000008002')
  t.deepEqual([...got.subarray(28, 32)], [10, 80, 0, 2])
  // ICMP echo request 10.80.0.1 → 10.80.0.2
  const ping = frame('02:00:00:00:80:02', peer, 14 + 20 + 8 + 16, 0x5a)
  Buffer.from([0x45, 0, 0, 44, 0, 1, 0, 0, 64, 1, 0, 0, 10, 80, 0, 1, 10, 80, 0, 2]).copy(ping, 14)
  Buffer.from([8, 0, 0, 0, 0, 7, 0, 1]).copy(ping, 34)
  rx = transport.request([], [2048], 0)
  await tick()
  await transport.request([header(), ping], [], 1)
  got = (await rx).writable[0]!.subarray(HDR, (await rx).used)
  t.is(got[34], 0, 'echo reply')
  t.deepEqual([...got.subarray(26, 34)], [10, 80, 0, 2, 10, 80, 0, 1])
  const fold = (b: Buffer) => {
    let s = 0
    for (let i = 0; i + 1 < b.length; i += 2) s += b.readUInt16BE(i)
    while (s > 0xffff) s = (s & 0xffff) + (s >>> 16)
    return s
  }
  t.is(fold(got.subarray(14, 34)), 0xffff, 'IP header checksum')
  t.is(fold(got.subarray(34)), 0xffff, 'ICMP checksum')
  await nic.close()
})

test("port security: a NIC sending from another port's address cannot take its traffic; a flood of new addresses evicts nobody", async (t) => {
  const a = await nic({ mac: '02:00:00:00:00:1a' })
  const b = await nic({ mac: '02:00:00:00:00:1b' })
  const evil = await nic({ mac: '02:00:00:00:00:1e' })
  const sw = new NetSwitch({ maxMacsPerPort: 8 })
  sw.connect(a.device).connect(b.device).connect(evil.device)
  const send = (x: { transport: InProcessTransport }, dst: string, src: string) =>
    x.transport.request([header(), frame(dst, src, 60)], [], 1)
  // a and b make themselves known.
  await send(a, 'ff:ff:ff:ff:ff:ff', '02:00:00:00:00:1a')
  await send(b, 'ff:ff:ff:ff:ff:ff', '02:00:00:00:00:1b')
  t.is(sw.portOf('02:00:00:00:00:1a'), a.device)
  // The hostile NIC claims a's address: dropped, and a keeps it.
  const spoofed = sw.stats.spoofed
  await send(evil, 'ff:ff:ff:ff:ff:ff', '02:00:00:00:00:1a')
  t.is(sw.stats.spoofed, spoofed + 1)
  t.is(sw.portOf('02:00:00:00:00:1a'), a.device, 'a keeps its address')
  // …and then floods new source addresses: only its own share is learned; a and b stay.
  for (let i = 0; i < 5000; i++) {
    const mac = `06:00:00:00:${((i >> 8) & 0xff).toString(16).padStart(2, '0')}:${(i & 0xff).toString(16).padStart(2, '0')}`
    await send(evil, '02:00:00:00:00:1e', mac)
  }
  t.true(sw.stats.unlearned >= 5000 - 8)
  t.is(sw.portOf('02:00:00:00:00:1a'), a.device)
  t.is(sw.portOf('02:00:00:00:00:1b'), b.device)
  // b → a is still unicast to a alone: the hostile port sees none of it.
  const aRx = a.transport.request([], [2048], 0)
  await tick()
  const before = sw.stats.forwarded
  const seen = () => evil.device.stats.rxFrames + evil.device.stats.rxNoBuffers
  const evilBefore = seen()
  await send(b, '02:00:00:00:00:1a', '02:00:00:00:00:1b')
  t.is((await aRx).used, HDR + 60)
  t.is(sw.stats.forwarded, before + 1)
  t.is(seen(), evilBefore, 'nothing was offered to the hostile NIC')
  for (const x of [a, b, evil]) await x.device.close()
})

test('the switch drops frames from a group or the all-zero source address', async (t) => {
  const a = await nic({ mac: '02:00:00:00:02:0a' })
  const b = await nic({ mac: '02:00:00:00:02:0b' })
  const sw = new NetSwitch().connect(a.device).connect(b.device)
  const bRx = b.transport.request([], [2048], 0)
  await tick()
  await a.transport.request([header(), frame('ff:ff:ff:ff:ff:ff', '03:00:00:00:00:01', 60)], [], 1)
  await a.transport.request([header(), frame('ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00', 60)], [], 1)
  t.is(sw.stats.invalid, 2)
  t.is(sw.stats.flooded, 0)
  t.is(b.device.rxBuffers, 1, 'b got neither')
  for (const x of [a, b]) await x.device.close()
  void bRx
})

test('an address that went quiet may move to another port (a VM that migrated)', async (t) => {
  const a = await nic({ mac: '02:00:00:00:00:2a' })
  const b = await nic({ mac: '02:00:00:00:00:2b' })
  const sw = new NetSwitch({ macAgeMs: 50 })
  sw.connect(a.device).connect(b.device)
  await a.transport.request([header(), frame('ff:ff:ff:ff:ff:ff', '02:00:00:00:00:77', 60)], [], 1)
  t.is(sw.portOf('02:00:00:00:00:77'), a.device)
  await new Promise((r) => setTimeout(r, 80))
  await b.transport.request([header(), frame('ff:ff:ff:ff:ff:ff', '02:00:00:00:00:77', 60)], [], 1)
  t.is(sw.portOf('02:00:00:00:00:77'), b.device)
  t.is(sw.stats.spoofed, 0)
  for (const x of [a, b]) await x.device.close()
})

test('a GSO frame passed on loses the ECN bit the driver never negotiated', async (t) => {
  const { device, transport } = await nic({})
  const posted = transport.request([], [65_600], 0)
  await tick()
  const f = frame('02:00:00:00:00:02', '02:00:00:00:00:01', 14 + 20 + 20 + 3000, 0x11)
  t.true(
    device.send(f, { flags: 1, gsoType: 0x81, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16 }),
  )
  const got = (await posted).writable[0]!
  t.is(got[1], 1, 'TCPV4 without ECN')
  await device.close()
})

test('a TCP GSO frame for a driver without TSO is segmented here: lengths, ids, sequence numbers, flags and checksums', async (t) => {
  // The driver accepts no offloads at all: every segment must arrive complete.
  const { device, transport } = await nic(
    {},
    NET_FEATURES.mask(['MAC', 'MTU', 'STATUS', 'MRG_RXBUF']) | (1n << 32n),
  )
  const posted = [0, 1, 2].map(() => transport.request([], [2048], 0))
  await tick()
  const payload = Buffer.alloc(2500)
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff
  const f = Buffer.alloc(14 + 20 + 20 + payload.length)
  Buffer.from('020000000002020000000001', 'hex').copy(f, 0)
  f.writeUInt16BE(0x0800, 12)
  Buffer.from([0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]).copy(f, 14)
  f.writeUInt16BE(20 + 20 + payload.length, 16)
  f.writeUInt16BE(40000, 34)
  f.writeUInt16BE(80, 36)
  f.writeUInt32BE(0xfffffc00, 38) // the sequence number wraps during the packet
  f[46] = 5 << 4
  f[47] = 0x18 | 0x80 | 0x01 // PSH | ACK… CWR, FIN
  payload.copy(f, 54)
  const ok = device.send(f, {
    flags: 1,
    gsoType: 1,
    hdrLen: 54,
    gsoSize: 1000,
    csumStart: 34,
    csumOffset: 16,
  })
  t.true(ok)
  const fold = (s: number) => {
    while (s > 0xffff) s = (s & 0xffff) + (s >>> 16)
    return s
  }
  const sum = (b: Buffer, from: number, to: number, extra = 0) => {
    let s = extra
    for (let i = from; i + 1 < to; i += 2) s += b.readUInt16BE(i)
    if ((to - from) & 1) s += b[to - 1]! << 8
    return fold(s)
  }
  const segments = await Promise.all(posted)
  const back = Buffer.alloc(payload.length)
  for (const [i, r] of segments.entries()) {
    const s = r.writable[0]!.subarray(HDR, r.used)
    const n = i < 2 ? 1000 : 500
    t.is(s.length, 54 + n)
    t.is(s.readUInt16BE(16), 40 + n, 'IP total length')
    t.is(s.readUInt16BE(18), 0x1234 + i, 'IP id')
    t.is(sum(s, 14, 34), 0xffff, 'IP header checksum')
    t.is(s.readUInt32BE(38), (0xfffffc00 + i * 1000) >>> 0, 'sequence number')
    t.is(s[47], [0x90, 0x10, 0x19][i], 'ACK on all, CWR on the first, FIN and PSH on the last')
    t.is(sum(s, 34, s.length, sum(s, 26, 34, 6 + 20 + n)), 0xffff, 'TCP checksum with its pseudo-header')
    s.copy(back, i * 1000, 54)
  }
  t.true(back.equals(payload))
  await device.close()
})

test('{ switch } on the in-process transport plugs the NIC in through JavaScript', async (t) => {
  const sw = new NetSwitch()
  const a = await nic({ mac: '02:00:00:00:01:0a', switch: sw })
  const b = await nic({ mac: '02:00:00:00:01:0b', switch: sw })
  t.deepEqual(sw.ports, [a.device, b.device])
  t.is(a.device.portCounters(), undefined, 'not a native port')
  const bRx = b.transport.request([], [2048], 0)
  await tick()
  await a.transport.request([header(), frame('ff:ff:ff:ff:ff:ff', '02:00:00:00:01:0a', 60)], [], 1)
  t.is((await bRx).used, HDR + 60)
  t.is(sw.portOf('02:00:00:00:01:0a'), a.device)
  for (const x of [a, b]) await x.device.close()
})

test('a switch has native ports or JavaScript-connected ones, never both; a NIC is on a tap or a switch', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-sw-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  // A native port without a kernel: a NIC on a vhost-user socket (no client needed to exist).
  const sw = new NetSwitch()
  const native = await NetDevice.create({
    name: 'sw-native',
    switch: sw,
    transport: vhostUser(join(dir, 'n.sock')),
  })
  t.truthy(native.portCounters(), 'a native port')
  t.deepEqual(sw.ports, [native])
  t.throws(() => native.send(Buffer.alloc(60)), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  const js = await nic()
  t.throws(() => sw.connect(js.device), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await native.close()
  t.deepEqual(sw.ports, [], 'a closed port leaves')
  t.deepEqual(native.portCounters(), {
    txFrames: 0,
    txBytes: 0,
    txMalformed: 0,
    rxFrames: 0,
    rxBytes: 0,
    rxNoBuffers: 0,
    rxRefused: 0,
  })
  // The other way round: JavaScript ports first, then a native one is refused.
  const other = new NetSwitch().connect(js.device)
  await t.throwsAsync(
    NetDevice.create({ name: 'sw-native2', switch: other, transport: vhostUser(join(dir, 'm.sock')) }),
    { code: 'ERR_VDUSE_INVALID_CONFIG' },
  )
  await t.throwsAsync(nic({ tap: 'tap9', switch: other }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  t.throws(() => new NetSwitch({ maxMacsPerPort: 0 }), { code: 'ERR_VDUSE_INVALID_CONFIG' })
  await js.device.close()
})
