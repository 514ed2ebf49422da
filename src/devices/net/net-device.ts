import { randomBytes } from 'node:crypto'

import { VduseError } from '../../errors'
import { STATUS_JOINED, type RequestBatch } from '../../transport/batch'
import type { PortCounters } from '../../transport/source'
import { VirtioDevice, type VirtioDeviceEvents, type VirtioDeviceOptions } from '../../virtio/device'
import type { NetSwitch } from './switch'
import {
  ETH_HLEN,
  GSO,
  HDR,
  HDR_F_NEEDS_CSUM,
  LINK_UP,
  MAX_FRAME,
  MIN_MSS,
  NET_CONFIG,
  NET_FEATURES,
  NET_HDR_BYTES,
  OFFLOAD_FEATURES,
  RX_QUEUE,
  TX_QUEUE,
  VIRTIO_ID_NET,
  type NetFeature,
} from './constants'

/**
 * The virtio-net header of a frame: checksum and segmentation offload state. A frame with
 * `NEEDS_CSUM` carries a partial checksum (the receiver completes it from `csumStart`, storing it at
 * `csumStart + csumOffset`); one with a `gsoType` is a large packet to cut into `gsoSize` segments.
 */
export interface NetHeader {
  flags: number
  gsoType: number
  hdrLen: number
  gsoSize: number
  csumStart: number
  csumOffset: number
}

export interface NetDeviceOptions extends VirtioDeviceOptions {
  /** The MAC address, `aa:bb:cc:dd:ee:ff` (default: a random locally administered one). */
  mac?: string
  /** The largest MTU the driver may set (default 1500; 68–65535). */
  mtu?: number
  /**
   * Offer checksum and segmentation offloads (CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6; default
   * true). Frames then carry partial checksums and up to 64 KiB payloads in both directions.
   */
  offloads?: boolean
  /** Ring size per queue, a power of two (default 256). */
  queueSize?: number
  /**
   * Bridge the NIC to this kernel tap interface (created if it does not exist; "" lets the kernel name
   * one): frames then move natively between the driver and the tap, on native threads — no `frame`
   * events, no `send`. The tap mirrors the offloads the driver negotiated (TUNSETOFFLOAD).
   */
  tap?: string
  /**
   * Plug the NIC into this switch. On VDUSE or vhost-user it becomes a native port: frames move between
   * the switch's NICs on native threads — no `frame` events, no `send` (counters: `portCounters()`). On
   * the in-process transport it is connected through JavaScript (`NetSwitch.connect`).
   */
  switch?: NetSwitch
}

/** Counters of the virtio-net model. */
export interface NetStats {
  /** Frames the driver sent (TX) and their bytes. */
  txFrames: number
  txBytes: number
  /** TX frames dropped as malformed: too short or long, or a header the negotiated features forbid. */
  txMalformed: number
  /** Frames handed to the driver (RX) and their bytes. */
  rxFrames: number
  rxBytes: number
  /** Frames `send` dropped because the driver had posted too few receive buffers (backpressure). */
  rxNoBuffers: number
  /** Frames `send` dropped because the driver cannot take them (too large, or offloads it refused). */
  rxRefused: number
  /** Receive buffers posted by the driver that could not hold even a header. */
  rxMalformed: number
}

export interface NetDeviceEvents extends VirtioDeviceEvents {
  /**
   * A frame the driver sent. `frame` (Ethernet header onward) and `header` are views the device reuses:
   * valid during the call only — copy what you keep.
   */
  frame: [frame: Buffer, header: NetHeader]
  /** Receive buffers became available after `send` had to drop a frame for lack of them. */
  writable: []
}

/** Parses `aa:bb:cc:dd:ee:ff`; refuses multicast (bit 0 of the first byte) addresses. */
function parseMac(mac: string): Buffer {
  const parts = mac.split(/[:-]/)
  const bytes = Buffer.from(parts.map((p) => Number.parseInt(p, 16)))
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-f]{1,2}$/i.test(p)) || (bytes[0]! & 1) === 1) {
    throw new VduseError(`mac ${mac} is not a unicast MAC address (aa:bb:cc:dd:ee:ff)`, {
      code: 'ERR_VDUSE_INVALID_CONFIG',
    })
  }
  return bytes
}

export function formatMac(mac: Uint8Array): string {
  return Array.from(mac.subarray(0, 6), (b) => b.toString(16).padStart(2, '0')).join(':')
}

/** Folds the Internet checksum of `data[start, end)` into `sum` (ones' complement, 16-bit words). */
function checksum(data: Uint8Array, start: number, end: number, sum = 0): number {
  let i = start
  for (; i + 1 < end; i += 2) sum += (data[i]! << 8) | data[i + 1]!
  if (i < end) sum += data[i]! << 8
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16)
  return sum
}

/**
 * A virtio-net NIC served by TypeScript: the kernel shows it as a network interface (virtio-vdpa) or
 * hands it to a VM (vhost-vdpa). Frames the driver sends arrive as `frame` events; `send()` gives it
 * frames. One queue pair (VDUSE has no control queue). Receive buffers the driver posts are held until a
 * frame arrives — never queued frames: with no buffer free, `send` drops the frame, counts it and
 * returns false (backpressure), and `writable` says when buffers are back.
 */
export class NetDevice extends VirtioDevice<NetDeviceEvents> {
  readonly mac: string
  readonly mtu: number
  /** The features offered to the driver. */
  readonly offeredFeatures: readonly NetFeature[]
  readonly stats: NetStats = {
    txFrames: 0,
    txBytes: 0,
    txMalformed: 0,
    rxFrames: 0,
    rxBytes: 0,
    rxNoBuffers: 0,
    rxRefused: 0,
    rxMalformed: 0,
  }
  readonly #macBytes: Buffer
  readonly #queueSize: number
  // Receive buffers held, oldest first: a ring of tickets and their writable sizes (no allocation).
  readonly #rxTickets: Float64Array
  readonly #rxSizes: Uint32Array
  #rxHead = 0
  #rxCount = 0
  #starved = false
  #link = true
  // Negotiated, decoded from the features each batch carries (so never those of another session).
  #session = -1
  #mergeable = false
  #guestCsum = false
  #guestTso4 = false
  #guestTso6 = false
  #hostCsum = false
  #hostTso4 = false
  #hostTso6 = false
  // TX: one frame at a time is copied out of the driver's buffers into this, and handed to listeners.
  readonly #tx = Buffer.alloc(NET_HDR_BYTES + MAX_FRAME)
  readonly #txHeader: NetHeader = { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 }
  readonly #rxHdr = Buffer.alloc(NET_HDR_BYTES)
  /** One segment of a large packet cut in software (sent before the next is built). */
  readonly #segmentBuf = Buffer.alloc(MAX_FRAME)
  readonly #segmentHeader: NetHeader = {
    flags: 0,
    gsoType: 0,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: 0,
    csumOffset: 0,
  }
  readonly #csum = Buffer.alloc(2)
  readonly #tap: string | undefined
  readonly #switch: NetSwitch | undefined
  /** Served natively as a port of `#switch`. */
  #port = false

  /** Creates the device and starts serving it; attach it with `attach()`. */
  static async create(options: NetDeviceOptions): Promise<NetDevice> {
    const device = new NetDevice(options)
    try {
      await device.prepare()
      device.#start()
      await device.opened()
    } catch (err) {
      if (device.#port) device.#switch!.unplug(device)
      throw err
    }
    if (device.#port) device.#switch!.plugged(device)
    else device.#switch?.connect(device)
    return device
  }

  private constructor(options: NetDeviceOptions) {
    super(options)
    this.#macBytes = options.mac === undefined ? NetDevice.#randomMac() : parseMac(options.mac)
    this.mac = formatMac(this.#macBytes)
    this.mtu = options.mtu ?? 1500
    if (!Number.isInteger(this.mtu) || this.mtu < 68 || this.mtu > 65_535) {
      throw new VduseError('mtu must be an integer from 68 to 65535', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    const queueSize = options.queueSize ?? 256
    if (!Number.isInteger(queueSize) || queueSize < 4 || queueSize > 32768 || queueSize & (queueSize - 1)) {
      throw new VduseError('queueSize must be a power of two from 4 to 32768', {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    this.#queueSize = queueSize
    this.#rxTickets = new Float64Array(queueSize)
    this.#rxSizes = new Uint32Array(queueSize)
    this.#tap = options.tap
    if (this.#tap !== undefined && (this.#tap.length > 15 || /[\s/\0]/.test(this.#tap))) {
      throw new VduseError(
        `tap ${JSON.stringify(this.#tap)} is not an interface name (up to 15 characters)`,
        {
          code: 'ERR_VDUSE_INVALID_CONFIG',
        },
      )
    }
    this.#switch = options.switch
    if (this.#tap !== undefined && this.#switch !== undefined) {
      throw new VduseError('a NIC is bridged to a tap or plugged into a switch, not both', {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    const features: NetFeature[] = ['MAC', 'MTU', 'STATUS', 'MRG_RXBUF']
    if (options.offloads ?? true) features.push(...OFFLOAD_FEATURES)
    this.offeredFeatures = features
  }

  static #randomMac(): Buffer {
    const mac = randomBytes(6)
    mac[0] = (mac[0]! & 0xfc) | 0x02 // locally administered, unicast
    return mac
  }

  #start(): void {
    const switchId =
      this.#switch !== undefined && this.nativeTransport ? this.#switch.nativeSwitchId(this) : undefined
    this.#port = switchId !== undefined
    const config = NET_CONFIG.encode({ status: LINK_UP, max_virtqueue_pairs: 1, mtu: this.mtu })
    this.#macBytes.copy(config, 0)
    this.open({
      deviceId: VIRTIO_ID_NET,
      features: NET_FEATURES.mask(this.offeredFeatures),
      config,
      numQueues: 2,
      queueSize: this.#queueSize,
      // Linux posts up to MAX_SKB_FRAGS + 2 buffers per receive chain (big packets without MRG_RXBUF).
      maxSegments: Math.min(this.#queueSize, 64),
      kind: 'net',
      heldQueues: [RX_QUEUE],
      ...(this.#tap === undefined ? {} : { tap: this.#tap }),
      ...(switchId === undefined ? {} : { switchId }),
    })
  }

  #negotiated(session: number): void {
    this.#session = session
    const features = BigInt(session)
    const has = (f: NetFeature): boolean => NET_FEATURES.has(features, f)
    this.#mergeable = has('MRG_RXBUF')
    this.#guestCsum = has('GUEST_CSUM')
    this.#guestTso4 = has('GUEST_TSO4')
    this.#guestTso6 = has('GUEST_TSO6')
    this.#hostCsum = has('CSUM')
    this.#hostTso4 = has('HOST_TSO4')
    this.#hostTso6 = has('HOST_TSO6')
  }

  /** The negotiated virtio-net features, by name (after `ready`). */
  get negotiatedNetFeatures(): NetFeature[] {
    return NET_FEATURES.names(this.negotiatedFeatures)
  }

  /** The tap interface a bridged NIC moves its frames through (`tap` option), as the kernel named it. */
  get tapName(): string | undefined {
    return this.source.tapName
  }

  /** Frames a bridged NIC moved natively: to the tap (tx), from it (rx), and those dropped. */
  tapCounters(): { txFrames: number; txDropped: number; rxFrames: number; rxDropped: number } | undefined {
    return this.source.tapCounters?.()
  }

  /** Frames a native switch port moved (`switch` option on a native transport), named as `stats`. */
  portCounters(): PortCounters | undefined {
    return this.source.portCounters?.()
  }

  /** Receive buffers the driver has posted and the device holds now. */
  get rxBuffers(): number {
    return this.#rxCount
  }

  get link(): boolean {
    return this.#link
  }

  /** Sets the link up or down: the driver gets a config interrupt (`ip link` shows carrier/NO-CARRIER). */
  setLink(up: boolean): void {
    this.#link = up
    const { offset, data } = NET_CONFIG.encodeField('status', up ? LINK_UP : 0)
    this.updateConfig(offset, data)
  }

  /**
   * Gives the driver a frame (Ethernet header onward), with its offload state (default: a complete
   * frame). One copy into the driver's posted buffers; the completion is published with others of this
   * event-loop turn. Returns false — and counts why — when the frame was dropped: no buffers posted
   * (wait for `writable`), too large for the driver, or offloads it did not accept.
   */
  /**
   * Software segmentation (TSO done here): a TCP packet over IPv4 or IPv6 (no VLAN tag, no IPv6
   * extension headers) cut into `gsoSize` segments, each with its own IP length, IPv4 id and checksum,
   * TCP sequence number and flags (FIN and PSH on the last, CWR on the first), and a partial TCP checksum
   * that `send` completes for a driver without GUEST_CSUM. False (and counted) if any segment was not
   * delivered, or the packet is not one this can cut.
   */
  #segment(frame: Uint8Array, header: NetHeader, gso: number): boolean {
    const f = Buffer.from(frame.buffer, frame.byteOffset, frame.length)
    const v4 = gso === GSO.TCPV4
    const ip = ETH_HLEN
    const ethertype = f.length > ETH_HLEN ? f.readUInt16BE(12) : 0
    const ipLen = v4 ? (f[ip]! & 0x0f) * 4 : 40
    const tcp = ip + ipLen
    const mss = header.gsoSize
    const fits =
      ethertype === (v4 ? 0x0800 : 0x86dd) &&
      f.length >= tcp + 20 &&
      (v4 ? f[ip]! >> 4 === 4 && ipLen >= 20 && f[ip + 9] === 6 : f[ip]! >> 4 === 6 && f[ip + 6] === 6)
    const tcpLen = fits ? (f[tcp + 12]! >> 4) * 4 : 0
    const payload = tcp + tcpLen
    if (!fits || tcpLen < 20 || payload >= f.length || mss < MIN_MSS || payload + mss > this.mtu + ETH_HLEN) {
      this.stats.rxRefused++
      return false
    }
    const seg = this.#segmentBuf
    const h = this.#segmentHeader
    const seq = f.readUInt32BE(tcp + 4)
    const flags = f[tcp + 13]!
    const id = v4 ? f.readUInt16BE(ip + 4) : 0
    let ok = true
    for (let at = payload, i = 0; at < f.length; at += mss, i++) {
      const n = Math.min(mss, f.length - at)
      const last = at + n >= f.length
      f.copy(seg, 0, 0, payload)
      f.copy(seg, payload, at, at + n)
      const segLen = payload + n
      if (v4) {
        seg.writeUInt16BE(ipLen + tcpLen + n, ip + 2)
        seg.writeUInt16BE((id + i) & 0xffff, ip + 4)
        seg.writeUInt16BE(0, ip + 10)
        seg.writeUInt16BE(~checksum(seg, ip, ip + ipLen) & 0xffff, ip + 10)
      } else {
        seg.writeUInt16BE(tcpLen + n, ip + 4)
      }
      seg.writeUInt32BE((seq + (at - payload)) >>> 0, tcp + 4)
      // FIN and PSH belong to the last segment, CWR to the first.
      seg[tcp + 13] = flags & ~((last ? 0 : 0x09) | (i === 0 ? 0 : 0x80)) & 0xff
      // The pseudo-header sum in the checksum field, as a partial checksum carries it.
      const pseudo = v4
        ? checksum(seg, ip + 12, ip + 20, 6 + tcpLen + n)
        : checksum(seg, ip + 8, ip + 40, 6 + tcpLen + n)
      seg.writeUInt16BE(pseudo, tcp + 16)
      h.flags = HDR_F_NEEDS_CSUM
      h.csumStart = tcp
      h.csumOffset = 16
      ok = this.send(seg.subarray(0, segLen), h) && ok
    }
    return ok
  }

  send(frame: Uint8Array, header?: NetHeader): boolean {
    if (this.#tap !== undefined || this.#port) {
      throw new VduseError(
        `this NIC is ${this.#port ? 'a native switch port' : 'bridged to a tap'}: its frames move natively`,
        { code: 'ERR_VDUSE_INVALID_CONFIG' },
      )
    }
    const len = frame.length
    const gso = header ? header.gsoType & ~GSO.ECN : GSO.NONE
    // A large TCP packet for a driver that cannot take it whole: cut it here, as its NIC would have.
    if ((gso === GSO.TCPV4 && !this.#guestTso4) || (gso === GSO.TCPV6 && !this.#guestTso6)) {
      return this.#segment(frame, header!, gso)
    }
    const partial = header !== undefined && (header.flags & HDR_F_NEEDS_CSUM) !== 0
    if (
      len < ETH_HLEN ||
      len > MAX_FRAME ||
      (gso === GSO.NONE && len > this.mtu + ETH_HLEN + 4) ||
      (gso === GSO.TCPV4 && !this.#guestTso4) ||
      (gso === GSO.TCPV6 && !this.#guestTso6) ||
      (gso !== GSO.NONE && gso !== GSO.TCPV4 && gso !== GSO.TCPV6) ||
      (partial && header.csumStart + header.csumOffset + 2 > len)
    ) {
      this.stats.rxRefused++
      return false
    }
    const need = NET_HDR_BYTES + len
    // Find enough live buffers for the whole frame before writing any of it.
    let buffers = 0
    let room = 0
    while (room < need) {
      if (buffers === this.#rxCount) {
        this.stats.rxNoBuffers++
        this.#starved = true
        return false
      }
      const k = (this.#rxHead + buffers) % this.#queueSize
      if (!this.isLive(this.#rxTickets[k]!)) {
        this.#dropRx(buffers) // fenced since it was posted: forget it
        continue
      }
      room += this.#rxSizes[k]!
      buffers++
      if (!this.#mergeable) break
    }
    if (room < need) {
      this.stats.rxRefused++ // without MRG_RXBUF a frame takes one buffer, and this one is too small
      return false
    }
    const hdr = this.#rxHdr
    hdr.fill(0)
    if (partial && this.#guestCsum) {
      hdr[HDR.flags] = HDR_F_NEEDS_CSUM
      hdr.writeUInt16LE(header.csumStart, HDR.csumStart)
      hdr.writeUInt16LE(header.csumOffset, HDR.csumOffset)
    }
    if (gso !== GSO.NONE) {
      // Without the ECN bit: the driver never negotiated GUEST_ECN (a received large packet needs no
      // resegmentation, so the CWR handling that bit asks for does not arise here).
      hdr[HDR.gsoType] = gso
      hdr.writeUInt16LE(header!.hdrLen, HDR.hdrLen)
      hdr.writeUInt16LE(header!.gsoSize, HDR.gsoSize)
    }
    hdr.writeUInt16LE(buffers, HDR.numBuffers)
    // Header, then the frame across the buffers, each completed with what it got — as one unit: the
    // driver sees all of them at once, never the first without the rest.
    this.completions.reserve(buffers)
    const first = this.#rxHead
    let done = 0
    let whole = true
    for (let b = 0; b < buffers; b++) {
      const k = (first + b) % this.#queueSize
      const ticket = this.#rxTickets[k]!
      let at = 0
      if (b === 0) {
        whole &&= this.batch.write(ticket, 0, hdr, 0, NET_HDR_BYTES) === NET_HDR_BYTES
        at = NET_HDR_BYTES
      }
      const n = Math.min(this.#rxSizes[k]! - at, len - done)
      whole &&= this.batch.write(ticket, at, frame, done, n) === n
      if (b === 0 && partial && !this.#guestCsum) this.#completeChecksum(ticket, frame, header)
      done += n
      this.#rxSizes[k] = at + n // now: what the buffer holds
    }
    // A buffer that could not take its part (it died meanwhile): the frame goes out as runts.
    for (let b = 0; b < buffers; b++) {
      const k = (first + b) % this.#queueSize
      this.completions.complete(
        this.#rxTickets[k]!,
        whole ? this.#rxSizes[k]! : 0,
        b + 1 < buffers ? STATUS_JOINED : -1,
      )
    }
    this.#rxHead = (first + buffers) % this.#queueSize
    this.#rxCount -= buffers
    this.stats.rxFrames++
    this.stats.rxBytes += len
    return true
  }

  /** The driver takes no partial checksums: finish the one in `frame`, in the copy it received. */
  #completeChecksum(ticket: number, frame: Uint8Array, header: NetHeader): void {
    const field = header.csumStart + header.csumOffset
    // The field holds the pseudo-header sum the sender left there; the checksum covers it too.
    const sum = checksum(frame, header.csumStart, frame.length)
    const value = ~sum & 0xffff
    this.#csum.writeUInt16BE(value === 0 ? 0xffff : value, 0)
    this.batch.write(ticket, NET_HDR_BYTES + field, this.#csum, 0, 2)
  }

  /** Forgets the receive buffer `offset` places after the oldest (it was fenced). */
  #dropRx(offset: number): void {
    // Move the older ones up by one; rare (only after a fence), so a shift is fine.
    for (let i = offset; i > 0; i--) {
      const to = (this.#rxHead + i) % this.#queueSize
      const from = (this.#rxHead + i - 1) % this.#queueSize
      this.#rxTickets[to] = this.#rxTickets[from]!
      this.#rxSizes[to] = this.#rxSizes[from]!
    }
    this.#rxHead = (this.#rxHead + 1) % this.#queueSize
    this.#rxCount--
  }

  protected handleRequest(batch: RequestBatch, i: number): void {
    if (batch.features(i) !== this.#session) this.#negotiated(batch.features(i))
    const ticket = batch.ticket(i)
    if (batch.queue(i) === RX_QUEUE) return this.#postRx(batch, ticket, i)
    if (batch.queue(i) === TX_QUEUE) return this.#transmit(batch, ticket, i)
    batch.complete(ticket, 0)
  }

  #postRx(batch: RequestBatch, ticket: number, i: number): void {
    const size = batch.writableBytes(i)
    // Dead buffers (given back or fenced under an IOTLB change, which tells no one) make room.
    if (this.#rxCount === this.#queueSize) this.onFenced()
    if (size < NET_HDR_BYTES || this.#rxCount === this.#queueSize) {
      this.stats.rxMalformed++
      return batch.complete(ticket, 0)
    }
    const k = (this.#rxHead + this.#rxCount) % this.#queueSize
    this.#rxTickets[k] = ticket
    this.#rxSizes[k] = size
    this.#rxCount++
    if (this.#starved) {
      this.#starved = false
      queueMicrotask(() => this.emit('writable'))
    }
  }

  #transmit(batch: RequestBatch, ticket: number, i: number): void {
    const total = batch.readableBytes(i)
    const len = total - NET_HDR_BYTES
    if (len < ETH_HLEN || len > MAX_FRAME) return this.#malformed(batch, ticket)
    const view = batch.view
    const h = batch.headOffset(i)
    const header = this.#txHeader
    header.flags = view.getUint8(h + HDR.flags)
    header.gsoType = view.getUint8(h + HDR.gsoType)
    header.hdrLen = view.getUint16(h + HDR.hdrLen, true)
    header.gsoSize = view.getUint16(h + HDR.gsoSize, true)
    header.csumStart = view.getUint16(h + HDR.csumStart, true)
    header.csumOffset = view.getUint16(h + HDR.csumOffset, true)
    // No ECN bit: HOST_ECN is not offered.
    const gso = header.gsoType
    const partial = (header.flags & HDR_F_NEEDS_CSUM) !== 0
    if (
      (header.flags & ~HDR_F_NEEDS_CSUM) !== 0 ||
      (partial && (!this.#hostCsum || header.csumStart + header.csumOffset + 2 > len)) ||
      (gso === GSO.NONE && len > this.mtu + ETH_HLEN + 4) ||
      (gso === GSO.TCPV4 && !this.#hostTso4) ||
      (gso === GSO.TCPV6 && !this.#hostTso6) ||
      (gso !== GSO.NONE &&
        ((gso !== GSO.TCPV4 && gso !== GSO.TCPV6) ||
          header.gsoSize < MIN_MSS ||
          header.gsoSize > this.mtu ||
          len < ETH_HLEN + 20 + 20 ||
          header.hdrLen > len ||
          !partial))
    ) {
      return this.#malformed(batch, ticket)
    }
    if (batch.read(ticket, 0, this.#tx, 0, total) !== total) return batch.complete(ticket, 0)
    // The buffers are free for the driver again as soon as the frame is copied out.
    batch.complete(ticket, 0)
    this.stats.txFrames++
    this.stats.txBytes += len
    this.emit('frame', this.#tx.subarray(NET_HDR_BYTES, total), header)
  }

  #malformed(batch: RequestBatch, ticket: number): void {
    this.stats.txMalformed++
    batch.complete(ticket, 0)
  }

  /** Receive buffers whose tickets died (a reset, an IOTLB change) are forgotten. */
  protected override onFenced(): void {
    let kept = 0
    for (let i = 0; i < this.#rxCount; i++) {
      const k = (this.#rxHead + i) % this.#queueSize
      if (!this.isLive(this.#rxTickets[k]!)) continue
      const to = (this.#rxHead + kept) % this.#queueSize
      this.#rxTickets[to] = this.#rxTickets[k]!
      this.#rxSizes[to] = this.#rxSizes[k]!
      kept++
    }
    this.#rxCount = kept
  }

  // Held receive buffers are not work in progress: nothing to wait for at close.
  protected inFlight(): number {
    return 0
  }

  protected async shutdown(): Promise<void> {}
}
