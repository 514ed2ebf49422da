import { VduseError } from '../errors'

/** A virtio feature bit, by name, with the features it cannot be offered without. */
export interface FeatureDefinition {
  readonly bit: number
  readonly requires?: readonly string[]
}

/** Feature bits every device gets from the transport (the kernel requires VERSION_1 and ACCESS_PLATFORM). */
export const TRANSPORT_FEATURES = {
  RING_INDIRECT_DESC: { bit: 28 },
  RING_EVENT_IDX: { bit: 29 },
  VERSION_1: { bit: 32 },
  ACCESS_PLATFORM: { bit: 33 },
} as const satisfies Record<string, FeatureDefinition>

/**
 * Named feature bits of one device type. Turns names into the 64-bit mask the kernel wants (checking
 * dependencies) and masks back into names (for negotiated features, logs and errors).
 */
export class FeatureSet<Name extends string> {
  readonly #definitions: Readonly<Record<Name, FeatureDefinition>>
  constructor(definitions: Readonly<Record<Name, FeatureDefinition>>) {
    this.#definitions = definitions
    for (const [name, def] of Object.entries(definitions) as [Name, FeatureDefinition][]) {
      if (!Number.isInteger(def.bit) || def.bit < 0 || def.bit > 63) {
        throw new VduseError(`feature ${name}: bit ${def.bit} is not in 0..63`, {
          code: 'ERR_VDUSE_INVALID_CONFIG',
        })
      }
    }
  }

  /** The mask for `names`; throws `ERR_VDUSE_INVALID_CONFIG` if one needs a feature that is not in the list. */
  mask(names: Iterable<Name>): bigint {
    const set = new Set(names)
    let mask = 0n
    for (const name of set) {
      const def = this.#definitions[name]
      if (def === undefined) {
        throw new VduseError(`unknown feature ${name}`, { code: 'ERR_VDUSE_INVALID_CONFIG' })
      }
      for (const dep of def.requires ?? []) {
        if (!set.has(dep as Name)) {
          throw new VduseError(`feature ${name} requires ${dep}`, { code: 'ERR_VDUSE_INVALID_CONFIG' })
        }
      }
      mask |= 1n << BigInt(def.bit)
    }
    return mask
  }

  /** The names of the bits set in `mask` that this set defines. */
  names(mask: bigint): Name[] {
    return (Object.keys(this.#definitions) as Name[]).filter((n) => this.has(mask, n))
  }

  has(mask: bigint, name: Name): boolean {
    return ((mask >> BigInt(this.#definitions[name].bit)) & 1n) === 1n
  }
}
