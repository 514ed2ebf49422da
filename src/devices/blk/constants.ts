import { ConfigLayout } from '../../virtio/config-layout'
import { FeatureSet } from '../../virtio/features'

export const VIRTIO_ID_BLOCK = 2
export const SECTOR = 512

/** Request types (virtio 1.2, 5.2.6). */
export const REQ = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  DISCARD: 11,
  WRITE_ZEROES: 13,
} as const

/** Status byte values. */
export const BLK_STATUS = { OK: 0, IOERR: 1, UNSUPP: 2 } as const

const BLK_FEATURE_BITS = {
  SIZE_MAX: { bit: 1 },
  SEG_MAX: { bit: 2 },
  RO: { bit: 5 },
  BLK_SIZE: { bit: 6 },
  FLUSH: { bit: 9 },
  TOPOLOGY: { bit: 10 },
  MQ: { bit: 12 },
  DISCARD: { bit: 13 },
  WRITE_ZEROES: { bit: 14 },
} as const
export type BlkFeature = keyof typeof BLK_FEATURE_BITS
export const BLK_FEATURES = new FeatureSet<BlkFeature>(BLK_FEATURE_BITS)

/** `struct virtio_blk_config` up to the write-zeroes fields. */
export const BLK_CONFIG = new ConfigLayout(60, {
  capacity: { offset: 0, type: 'u64' },
  size_max: { offset: 8, type: 'u32' },
  seg_max: { offset: 12, type: 'u32' },
  cylinders: { offset: 16, type: 'u16' },
  heads: { offset: 18, type: 'u8' },
  sectors: { offset: 19, type: 'u8' },
  blk_size: { offset: 20, type: 'u32' },
  physical_block_exp: { offset: 24, type: 'u8' },
  alignment_offset: { offset: 25, type: 'u8' },
  min_io_size: { offset: 26, type: 'u16' },
  opt_io_size: { offset: 28, type: 'u32' },
  writeback: { offset: 32, type: 'u8' },
  num_queues: { offset: 34, type: 'u16' },
  max_discard_sectors: { offset: 36, type: 'u32' },
  max_discard_seg: { offset: 40, type: 'u32' },
  discard_sector_alignment: { offset: 44, type: 'u32' },
  max_write_zeroes_sectors: { offset: 48, type: 'u32' },
  max_write_zeroes_seg: { offset: 52, type: 'u32' },
  write_zeroes_may_unmap: { offset: 56, type: 'u8' },
})

/** Bytes of the request header (`type`, `ioprio`, `sector`) and of one discard/write-zeroes range. */
export const HEADER_BYTES = 16
export const RANGE_BYTES = 16
/** The GET_ID answer: up to 20 bytes, not necessarily NUL-terminated. */
export const ID_BYTES = 20
/** Most ranges per DISCARD / WRITE_ZEROES request, and sectors per range. */
export const MAX_RANGES = 16
export const MAX_RANGE_SECTORS = 0x40_0000
