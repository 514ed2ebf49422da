import type { NetDevice, NetHeader } from './net-device'

/** Most MAC addresses the switch remembers; a guest sending from random addresses cannot grow it further. */
const MAX_LEARNED = 4096

export interface NetSwitchStats {
  /** Frames forwarded to one port, flooded to all others, or dropped (their destination is their source port). */
  forwarded: number
  flooded: number
  filtered: number
}

/**
 * An Ethernet switch in the process: wires `NetDevice`s together. It learns which port each source MAC
 * address lives behind, forwards frames to the learned port, and floods broadcast, multicast and
 * unknown-destination frames to every other port. Each frame is copied once, from the sender's buffers
 * into each receiver's; offload headers pass through (a receiver that did not negotiate them gets
 * checksums completed, or the frame dropped and counted in its `rxRefused`).
 */
export class NetSwitch {
  readonly stats: NetSwitchStats = { forwarded: 0, flooded: 0, filtered: 0 }
  readonly #ports: NetDevice[] = []
  readonly #listeners = new Map<NetDevice, (frame: Buffer, header: NetHeader) => void>()
  /** MAC (as a 48-bit number) → port; insertion order is age order, for eviction. */
  readonly #table = new Map<number, NetDevice>()

  /** Plugs a NIC into the switch. */
  connect(port: NetDevice): this {
    if (this.#listeners.has(port)) return this
    const listener = (frame: Buffer, header: NetHeader): void => this.#forward(port, frame, header)
    this.#listeners.set(port, listener)
    this.#ports.push(port)
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
    for (const [mac, p] of this.#table) if (p === port) this.#table.delete(mac)
    return this
  }

  get ports(): readonly NetDevice[] {
    return this.#ports
  }

  #forward(from: NetDevice, frame: Buffer, header: NetHeader): void {
    // Source MAC at 6..12, destination at 0..6; as numbers, no allocation.
    const src = frame.readUIntBE(6, 6)
    if ((frame[6]! & 1) === 0 && this.#table.get(src) !== from) {
      this.#table.delete(src) // re-insert: now the newest
      this.#table.set(src, from)
      if (this.#table.size > MAX_LEARNED) this.#table.delete(this.#table.keys().next().value!)
    }
    const to = (frame[0]! & 1) === 0 ? this.#table.get(frame.readUIntBE(0, 6)) : undefined
    if (to !== undefined) {
      if (to === from) {
        this.stats.filtered++
        return
      }
      this.stats.forwarded++
      to.send(frame, header)
      return
    }
    this.stats.flooded++
    for (const port of this.#ports) if (port !== from) port.send(frame, header)
  }
}
