import type { BindingSwitch } from '../../../index'
import { VduseError } from '../../errors'
import { binding } from '../../transport/binding'
import type { NetDevice, NetHeader } from './net-device'

/** MAC addresses one port may have learned at once (a flood of new ones from it is not learned). */
const DEFAULT_MACS_PER_PORT = 64
/** An address not heard from for this long may move to another port (a VM that migrated). */
const DEFAULT_MAC_AGE_MS = 300_000

export interface NetSwitchOptions {
  /**
   * Addresses one port may have learned at once (default 64): a port sending from ever-new addresses
   * fills only its own share, never evicting other ports' hosts (and never turning the switch into a hub).
   */
  maxMacsPerPort?: number
  /**
   * How long a learned address belongs to its port after it was last heard from (ms, default 300 000).
   * Until then a frame from another port with that source address is dropped (`spoofed`): no port can
   * take over another's unicast traffic. After it, the address may move.
   */
  macAgeMs?: number
}

export interface NetSwitchStats {
  /** Frames forwarded to one port, flooded to all others, or dropped (their destination is their source port). */
  forwarded: number
  flooded: number
  filtered: number
  /** Frames dropped because their source address belongs to another port. */
  spoofed: number
  /** New source addresses not learned because their port has its share (`maxMacsPerPort`). */
  unlearned: number
  /** Frames dropped because their source is a group (multicast) or the all-zero address. */
  invalid: number
}

interface Learned {
  port: NetDevice
  /** When the port last sent from this address (ms). */
  seen: number
}

/**
 * An Ethernet switch in the process: wires `NetDevice`s together. It learns which port each source MAC
 * address lives behind, forwards frames to the learned port, and floods broadcast, multicast and
 * unknown-destination frames to every other port. Offload headers pass through: a receiver that did not
 * negotiate them gets checksums completed and TCP segmentation-offload packets cut into segments.
 *
 * Two ways to plug a NIC in, one per switch:
 * - **natively** (the fast path): create the NIC with `{ switch: sw }` on a native transport (VDUSE or
 *   vhost-user). Frames then move from one NIC's transmit ring into another's receive buffers on the
 *   sender's native queue thread — no JavaScript per frame, interrupts batched — and the NIC has no
 *   `frame` events and no `send()`; its counters are `portCounters()`.
 * - **through JavaScript**: `connect(nic)` (or `{ switch: sw }` on the in-process transport). Every
 *   frame is a `frame` event and a `send()`: the place for a forwarding function of your own, a capture,
 *   or a NIC that also talks to JavaScript.
 *
 * Port security: an address learned on one port stays there while it is in use (`macAgeMs` after it was
 * last heard from); another port sending from it is dropped (`spoofed`). Each port learns at most
 * `maxMacsPerPort` addresses, so a port flooding new ones cannot evict the others' hosts.
 */
export class NetSwitch {
  /** Counters of the JavaScript path (the native switch's are added in `stats`). */
  readonly #stats: NetSwitchStats = {
    forwarded: 0,
    flooded: 0,
    filtered: 0,
    spoofed: 0,
    unlearned: 0,
    invalid: 0,
  }
  readonly #ports: NetDevice[] = []
  /** The native switch, once a native port was plugged in. */
  #native: BindingSwitch | undefined
  /** Native ports by device name (the native switch names the port an address was learned on). */
  readonly #nativePorts = new Map<string, NetDevice>()
  readonly #listeners = new Map<NetDevice, (frame: Buffer, header: NetHeader) => void>()
  /** MAC (as a 48-bit number) → its port. */
  readonly #table = new Map<number, Learned>()
  /** Addresses learned per port. */
  readonly #learned = new Map<NetDevice, number>()
  readonly #maxPerPort: number
  readonly #ageMs: number

  constructor(options: NetSwitchOptions = {}) {
    this.#maxPerPort = options.maxMacsPerPort ?? DEFAULT_MACS_PER_PORT
    this.#ageMs = options.macAgeMs ?? DEFAULT_MAC_AGE_MS
    if (!Number.isInteger(this.#maxPerPort) || this.#maxPerPort < 1 || this.#maxPerPort > 0xffff_ffff) {
      throw new VduseError('maxMacsPerPort must be a positive integer', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    if (!Number.isFinite(this.#ageMs) || this.#ageMs < 0) {
      throw new VduseError('macAgeMs must be a non-negative number', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
  }

  /** What the switch did with its ports' frames (native and JavaScript paths together). */
  get stats(): NetSwitchStats {
    const s = { ...this.#stats }
    if (this.#native) {
      const n = this.#native.stats()
      s.forwarded += n.forwarded
      s.flooded += n.flooded
      s.filtered += n.filtered
      s.spoofed += n.spoofed
      s.unlearned += n.unlearned
      s.invalid += n.invalid
    }
    return s
  }

  /**
   * @internal The id of the native switch (`DeviceInit.switchId`) a NIC created with `{ switch: this }` on
   * a native transport becomes a port of. Refused while JavaScript-connected ports exist.
   */
  nativeSwitchId(port: NetDevice): number {
    if (this.#listeners.size > 0) throw NetSwitch.#mixed()
    this.#native ??= new binding.BindingSwitch(this.#maxPerPort, this.#ageMs)
    // Counted from now on, while it is being created: a connect() meanwhile is refused.
    this.#nativePorts.set(port.name, port)
    return this.#native.id
  }

  /** @internal The native port `port` is served: it leaves when it closes. */
  plugged(port: NetDevice): void {
    port.once('close', () => this.unplug(port))
  }

  /** @internal A native port that closed, or whose creation failed. */
  unplug(port: NetDevice): void {
    if (this.#nativePorts.get(port.name) === port) this.#nativePorts.delete(port.name)
  }

  static #mixed(): VduseError {
    return new VduseError('a switch has native ports or JavaScript-connected ones, not both', {
      code: 'ERR_VDUSE_INVALID_CONFIG',
      hint: 'create every NIC of this switch with { switch } on VDUSE or vhost-user, or connect() them all',
    })
  }

  /** Plugs a NIC into the switch through JavaScript: its frames are `frame` events, forwarded by `send()`. */
  connect(port: NetDevice): this {
    if (this.#listeners.has(port)) return this
    if (this.#nativePorts.size > 0) throw NetSwitch.#mixed()
    const listener = (frame: Buffer, header: NetHeader): void => this.#forward(port, frame, header)
    this.#listeners.set(port, listener)
    this.#ports.push(port)
    this.#learned.set(port, 0)
    port.on('frame', listener)
    return this
  }

  /** Unplugs a NIC; frames learned behind it are flooded again. */
  disconnect(port: NetDevice): this {
    const listener = this.#listeners.get(port)
    if (!listener) return this
    port.off('frame', listener)
    this.#listeners.delete(port)
    this.#ports.splice(this.#ports.indexOf(port), 1)
    for (const [mac, l] of this.#table) if (l.port === port) this.#table.delete(mac)
    this.#learned.delete(port)
    return this
  }

  /** The NICs plugged in (native ports until they close). */
  get ports(): readonly NetDevice[] {
    return this.#nativePorts.size > 0 ? [...this.#nativePorts.values()] : this.#ports
  }

  /** The port an address was learned on, if any (for tests and diagnostics). */
  portOf(mac: string): NetDevice | undefined {
    if (this.#native && this.#nativePorts.size > 0) {
      const name = this.#native.portOf(Buffer.from(mac.replaceAll(':', ''), 'hex'))
      return name === null ? undefined : this.#nativePorts.get(name)
    }
    return this.#table.get(parseInt(mac.replaceAll(':', ''), 16))?.port
  }

  #forward(from: NetDevice, frame: Buffer, header: NetHeader): void {
    // Source MAC at 6..12, destination at 0..6; as numbers, no allocation.
    const src = frame.readUIntBE(6, 6)
    if ((frame[6]! & 1) === 1 || src === 0) {
      // No station sends from a group or the zero address (Linux's bridge drops these too).
      this.#stats.invalid++
      return
    }
    if (!this.#learn(src, from)) {
      this.#stats.spoofed++
      return
    }
    const to = (frame[0]! & 1) === 0 ? this.#table.get(frame.readUIntBE(0, 6))?.port : undefined
    if (to !== undefined) {
      if (to === from) {
        this.#stats.filtered++
        return
      }
      this.#stats.forwarded++
      to.send(frame, header)
      return
    }
    this.#stats.flooded++
    for (const port of this.#ports) if (port !== from) port.send(frame, header)
  }

  /** Learns (or refreshes) `src` behind `from`; false when another port owns it. */
  #learn(src: number, from: NetDevice): boolean {
    const now = Date.now()
    const known = this.#table.get(src)
    if (known !== undefined) {
      if (known.port === from) {
        known.seen = now
        return true
      }
      if (now - known.seen < this.#ageMs) return false
      // Not heard from on its port for a while: it moved.
      this.#table.delete(src)
      this.#learned.set(known.port, this.#learned.get(known.port)! - 1)
    }
    const count = this.#learned.get(from)!
    if (count >= this.#maxPerPort) {
      // Its share is full: an address of its own that aged out makes room; otherwise this one is not learned.
      if (!this.#evictAged(from, now)) {
        this.#stats.unlearned++
        return true
      }
    }
    this.#table.set(src, { port: from, seen: now })
    this.#learned.set(from, this.#learned.get(from)! + 1)
    return true
  }

  /** Forgets the oldest aged address of `port`, if it has one. */
  #evictAged(port: NetDevice, now: number): boolean {
    for (const [mac, l] of this.#table) {
      if (l.port === port && now - l.seen >= this.#ageMs) {
        this.#table.delete(mac)
        this.#learned.set(port, this.#learned.get(port)! - 1)
        return true
      }
    }
    return false
  }
}
