import { VduseError } from '../errors'

export type FieldType = 'u8' | 'u16' | 'u32' | 'u64'

export interface FieldDefinition {
  readonly offset: number
  readonly type: FieldType
}

const WIDTH: Record<FieldType, number> = { u8: 1, u16: 2, u32: 4, u64: 8 }
const MAX: Record<FieldType, bigint> = {
  u8: 0xffn,
  u16: 0xffffn,
  u32: 0xffff_ffffn,
  u64: 0xffff_ffff_ffff_ffffn,
}

export type ConfigValues<F extends string> = Partial<Record<F, number | bigint>>

/**
 * A device's config space, declared field by field. Encodes little-endian (as virtio 1.x requires),
 * checks that fields fit the space and that values fit their fields.
 */
export class ConfigLayout<F extends string> {
  constructor(
    readonly size: number,
    readonly fields: Readonly<Record<F, FieldDefinition>>,
  ) {
    if (!Number.isInteger(size) || size < 0 || size > 4096) {
      throw new VduseError(`config space size ${size} must be 0..4096 bytes`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    for (const [name, f] of Object.entries(fields) as [F, FieldDefinition][]) {
      if (f.offset < 0 || f.offset + WIDTH[f.type] > size || f.offset % WIDTH[f.type] !== 0) {
        throw new VduseError(
          `config field ${name} (${f.type} at ${f.offset}) does not fit or is misaligned`,
          { code: 'ERR_VDUSE_INVALID_CONFIG' },
        )
      }
    }
  }

  /** The whole config space with `values` set (others zero). */
  encode(values: ConfigValues<F>): Buffer {
    const buf = Buffer.alloc(this.size)
    for (const [name, value] of Object.entries(values) as [F, number | bigint | undefined][]) {
      if (value !== undefined) this.#write(buf, name, value)
    }
    return buf
  }

  /** The bytes of one field (for a live update of just that field). */
  encodeField(name: F, value: number | bigint): { offset: number; data: Buffer } {
    const f = this.#field(name)
    const data = Buffer.alloc(WIDTH[f.type])
    this.#write(data, name, value, 0)
    return { offset: f.offset, data }
  }

  decode(buf: Buffer, name: F): bigint {
    const f = this.#field(name)
    switch (f.type) {
      case 'u8':
        return BigInt(buf.readUInt8(f.offset))
      case 'u16':
        return BigInt(buf.readUInt16LE(f.offset))
      case 'u32':
        return BigInt(buf.readUInt32LE(f.offset))
      case 'u64':
        return buf.readBigUInt64LE(f.offset)
    }
  }

  #field(name: F): FieldDefinition {
    const f = this.fields[name]
    if (f === undefined) throw new VduseError(`no config field ${name}`, { code: 'ERR_VDUSE_INVALID_CONFIG' })
    return f
  }

  #write(buf: Buffer, name: F, value: number | bigint, at?: number): void {
    const f = this.#field(name)
    const offset = at ?? f.offset
    if (typeof value === 'number' && !Number.isSafeInteger(value)) {
      throw new VduseError(`config field ${name}: ${value} is not an integer`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    const v = BigInt(value)
    if (v < 0n || v > MAX[f.type]) {
      throw new VduseError(`config field ${name}: ${v} does not fit in ${f.type}`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    switch (f.type) {
      case 'u8':
        buf.writeUInt8(Number(v), offset)
        break
      case 'u16':
        buf.writeUInt16LE(Number(v), offset)
        break
      case 'u32':
        buf.writeUInt32LE(Number(v), offset)
        break
      case 'u64':
        buf.writeBigUInt64LE(v, offset)
        break
    }
  }
}
