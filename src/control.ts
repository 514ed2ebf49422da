import { release } from 'node:os'

import { native, nativeAsync, type VduseError } from './errors'
import { detach, isAttached } from './transport/attach'
import { binding } from './transport/binding'
import { sleep } from './wait'
import type { StateSummary } from '../index'

/**
 * The VDUSE API version the kernel speaks (0 on Linux 6.12).
 *
 * @throws {VduseError} `ERR_VDUSE_UNAVAILABLE` when `/dev/vduse/control` is missing (load the module with
 *   `modprobe vduse`), `ERR_VDUSE_PERMISSION` when this process may not open it.
 */
export function getApiVersion(options: { controlPath?: string } = {}): number {
  return native(() => binding.getApiVersion(options.controlPath))
}

/** What this machine's VDUSE offers (see `kernelSupport`). */
export interface KernelSupport {
  /** The API version `/dev/vduse/control` speaks (0 on Linux 6.12, 1 on 7.3; devices are made with 0). */
  apiVersion: number
  /** The `VDUSE_GET_FEATURES` mask (Linux 7.3+), or null where the kernel has no such call. */
  features: number | null
  /** The kernel tells the device when a queue is ready (VDUSE_F_QUEUE_READY). */
  queueReady: boolean
  /** The kernel may suspend the device (VDUSE_F_SUSPEND). */
  suspend: boolean
  /** VDUSE allows virtio-fs devices (Linux 6.15+). */
  fs: boolean
  /** The running kernel's release (`uname -r`). */
  release: string
}

/**
 * Probes what the kernel's VDUSE offers: its API version and feature mask, and which device types it
 * allows. Throws like `getApiVersion` when VDUSE is missing.
 */
export function kernelSupport(options: { controlPath?: string } = {}): KernelSupport {
  const apiVersion = getApiVersion(options)
  const features = native(() => binding.getVduseFeatures(options.controlPath)) ?? null
  return {
    apiVersion,
    features,
    queueReady: features !== null && (features & 1) !== 0,
    suspend: features !== null && (features & 2) !== 0,
    fs: kernelAtLeast(release(), 6, 15),
    release: release(),
  }
}

/** Whether a kernel release string (`7.3.4+deb13-amd64`) is at least `major.minor`. */
export function kernelAtLeast(rel: string, major: number, minor: number): boolean {
  const m = /^(\d+)\.(\d+)/.exec(rel)
  if (!m) return false
  const [a, b] = [Number(m[1]), Number(m[2])]
  return a > major || (a === major && b >= minor)
}

/** Names of all VDUSE devices on this machine (any process's, including stale ones left by dead processes). */
export function listDevices(): string[] {
  return native(() => binding.listDevices())
}

/** What a device's state file says (its kind, backend identity, last server), or null without one. */
export type DeviceState = StateSummary

/** Reads device `name`'s state file (in `stateDir`, default `/run/vduse`) without changing it. */
export function inspectState(name: string, options: { stateDir?: string | null } = {}): DeviceState | null {
  const dir = options.stateDir === null ? '' : options.stateDir
  return native(() => binding.inspectState(name, dir)) ?? null
}

/**
 * Destroys a VDUSE device that no process serves (e.g. left by a crash). It must be detached from the
 * vDPA bus first (`vdpa dev del NAME`).
 *
 * @throws {VduseError} `ERR_VDUSE_NOT_FOUND`, or `ERR_VDUSE_BUSY` while attached or served.
 */
export function destroyDevice(name: string): void {
  native(() => binding.destroyDevice(name))
}

/**
 * Removes a device that no live process serves (left by a crash): takes it over — answering the kernel
 * and, with the dead server's state file, failing the requests it left in flight so that the detach does
 * not hang — then detaches and destroys it. Returns false if there was no such device.
 *
 * @throws {VduseError} `ERR_VDUSE_BUSY` if a live process still serves it.
 */
export async function removeStaleDevice(
  name: string,
  options: { stateDir?: string | null | undefined } = {},
): Promise<boolean> {
  if (!listDevices().includes(name)) return false
  const stateDir = options.stateDir === null ? '' : options.stateDir
  const deadline = Date.now() + 30_000
  for (let attempt = 0; ; attempt++) {
    // Answers the device's messages (and fails what the dead server left in flight) while it goes.
    const reclaim = native(() => binding.reclaimDevice(name, stateDir))
    // The dead server may have left a detach in progress (its own stop, stuck on requests the reclaim now
    // fails): ours may then fail; what counts is that the device leaves the bus.
    if (attempt === 0 && (await isAttached(name))) await detach(name).catch(() => {})
    while ((await isAttached(name)) && Date.now() < deadline) await sleep(50)
    try {
      await nativeAsync(() => reclaim.destroy())
      return true
    } catch (err) {
      // Still held: a detach in progress may be waiting for one more answer (its final reset), which the
      // next reclaim gives — the kernel hands an unanswered message to the next reader.
      if ((err as VduseError).code !== 'ERR_VDUSE_BUSY' || Date.now() > deadline) throw err
    }
  }
}
