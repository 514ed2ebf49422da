/** Device status bits (virtio 1.x, 2.1). */
export const STATUS = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const

export function statusNames(status: number): string[] {
  if (status === 0) return ['RESET']
  return Object.entries(STATUS)
    .filter(([, bit]) => (status & bit) !== 0)
    .map(([name]) => name)
}
