import { ConfigLayout } from '../../virtio/config-layout'
import { FeatureSet } from '../../virtio/features'

export const VIRTIO_ID_NET = 1

/** Queue indexes of the one queue pair VDUSE allows (no control queue ⇒ no multiqueue). */
export const RX_QUEUE = 0
export const TX_QUEUE = 1

/** virtio-net feature bits (virtio 1.2, 5.1.3) this model implements. */
const NET_FEATURE_BITS = {
  /** The device takes frames with a partial checksum (TX checksum offload). */
  CSUM: { bit: 0 },
  /** The driver takes frames with a partial checksum (RX). */
  GUEST_CSUM: { bit: 1 },
  MTU: { bit: 3 },
  MAC: { bit: 5 },
  GUEST_TSO4: { bit: 7, requires: ['GUEST_CSUM'] },
  GUEST_TSO6: { bit: 8, requires: ['GUEST_CSUM'] },
  HOST_TSO4: { bit: 11, requires: ['CSUM'] },
  HOST_TSO6: { bit: 12, requires: ['CSUM'] },
  MRG_RXBUF: { bit: 15 },
  STATUS: { bit: 16 },
} as const
export type NetFeature = keyof typeof NET_FEATURE_BITS
export const NET_FEATURES = new FeatureSet<NetFeature>(NET_FEATURE_BITS)

/** The offloads, in the order a backend declares them. */
export const OFFLOAD_FEATURES: readonly NetFeature[] = [
  'CSUM',
  'GUEST_CSUM',
  'HOST_TSO4',
  'HOST_TSO6',
  'GUEST_TSO4',
  'GUEST_TSO6',
]

/** `struct virtio_net_config` up to `mtu` (the MAC's six bytes are written separately). */
export const NET_CONFIG = new ConfigLayout(12, {
  status: { offset: 6, type: 'u16' },
  max_virtqueue_pairs: { offset: 8, type: 'u16' },
  mtu: { offset: 10, type: 'u16' },
})
export const LINK_UP = 1

/** `struct virtio_net_hdr_v1`: with VERSION_1 every frame starts with these 12 bytes (num_buffers too). */
export const NET_HDR_BYTES = 12
export const HDR = {
  flags: 0,
  gsoType: 1,
  hdrLen: 2,
  gsoSize: 4,
  csumStart: 6,
  csumOffset: 8,
  numBuffers: 10,
}
export const HDR_F_NEEDS_CSUM = 1
export const HDR_F_DATA_VALID = 2
export const GSO = { NONE: 0, TCPV4: 1, UDP: 3, TCPV6: 4, ECN: 0x80 } as const

export const ETH_HLEN = 14
/** Largest frame: a 64 KiB GSO packet plus its Ethernet and VLAN headers. */
export const MAX_FRAME = 65_535 + ETH_HLEN + 4
/** The smallest segment a GSO packet may ask for (Linux's `tcp_min_snd_mss` default): cutting one packet
 * makes a bounded number of segments. */
export const MIN_MSS = 48
