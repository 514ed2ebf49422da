import { execFile } from 'node:child_process'
import { access, readdir, readFile, readlink, realpath, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import { AbortError, VduseError } from '../errors'

/** Which kernel driver takes the device: the host's own virtio driver, or vhost-vdpa for a VM. */
export type AttachDriver = 'virtio' | 'vhost'

const BUS = '/sys/bus/vdpa'

function vdpa(args: string[], signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    // Asynchronous on purpose: the kernel's probe inside `vdpa dev add` waits for I/O that this very
    // process serves on its JavaScript thread.
    execFile('vdpa', args, { signal, timeout: 120_000 }, (err, _stdout, stderr) => {
      if (!err) return resolve()
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT'
      reject(
        new VduseError(
          missing
            ? 'the `vdpa` tool is not installed'
            : `vdpa ${args.join(' ')} failed: ${stderr.trim() || err.message}`,
          {
            code: 'ERR_VDUSE_ATTACH',
            hint: missing
              ? 'install iproute2 (it provides `vdpa`)'
              : 'attaching needs root (CAP_NET_ADMIN in the initial network namespace) and the vdpa modules: ' +
                'modprobe virtio_vdpa (or vhost_vdpa)',
            cause: err,
          },
        ),
      )
    })
  })
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path)
    return true
  } catch {
    return false
  }
}

async function currentDriver(name: string): Promise<string | undefined> {
  try {
    return (await readlink(join(BUS, 'devices', name, 'driver'))).split('/').pop()
  } catch {
    return undefined
  }
}

async function poll<T>(
  what: string,
  deadline: number,
  probe: () => Promise<T | undefined>,
  signal?: AbortSignal,
): Promise<T> {
  for (;;) {
    const found = await probe()
    if (found !== undefined) return found
    signal?.throwIfAborted()
    if (Date.now() > deadline) {
      throw new VduseError(`timed out waiting for ${what}`, { code: 'ERR_VDUSE_ATTACH' })
    }
    await new Promise((r) => setTimeout(r, 50))
  }
}

/**
 * The node the bound driver created: /dev/vdX (block), the interface name (net), the mount tag (fs), or
 * /dev/vhost-vdpa-N.
 */
async function nodeFor(name: string, driver: AttachDriver): Promise<string | undefined> {
  const dir = join(BUS, 'devices', name)
  const entries = await readdir(dir).catch(() => [] as string[])
  if (driver === 'vhost') {
    const vhost = entries.find((e) => e.startsWith('vhost-vdpa-'))
    return vhost && (await exists(`/dev/${vhost}`)) ? `/dev/${vhost}` : undefined
  }
  for (const e of entries.filter((e) => e.startsWith('virtio'))) {
    const tag = await virtiofsTag(join(dir, e))
    if (tag !== undefined) return tag
    const block = await readdir(join(dir, e, 'block')).catch(() => [] as string[])
    if (block[0] && (await exists(`/dev/${block[0]}`))) return `/dev/${block[0]}`
    const net = await readdir(join(dir, e, 'net')).catch(() => [] as string[])
    if (net[0]) return net[0]
  }
  return undefined
}

/** The tag a virtio-fs device was registered under (what `mount -t virtiofs` takes), once it is. */
async function virtiofsTag(virtioDir: string): Promise<string | undefined> {
  const driver = await readlink(join(virtioDir, 'driver')).catch(() => '')
  if (!driver.endsWith('/virtiofs')) return undefined
  const self = await realpath(virtioDir).catch(() => virtioDir)
  for (const n of await readdir('/sys/fs/virtiofs').catch(() => [] as string[])) {
    const dev = await realpath(join('/sys/fs/virtiofs', n, 'device')).catch(() => '')
    if (dev === self) return readSysfs(join('/sys/fs/virtiofs', n, 'tag'))
  }
  return undefined
}

/**
 * Adds VDUSE device `name` to the vDPA bus and binds it to the requested driver; resolves with the
 * node the driver created. Never blocks the JavaScript thread: the device keeps being served meanwhile.
 */
export async function attach(
  name: string,
  driver: AttachDriver,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
): Promise<string> {
  const kernelDriver = driver === 'virtio' ? 'virtio_vdpa' : 'vhost_vdpa'
  if (!(await exists(join(BUS, 'drivers', kernelDriver)))) {
    throw new VduseError(`the ${kernelDriver} driver is not loaded`, {
      code: 'ERR_VDUSE_ATTACH',
      hint: `modprobe ${kernelDriver}`,
    })
  }
  const timeoutMs = options.timeoutMs ?? 60_000
  const deadline = Date.now() + timeoutMs
  // The whole attach is bounded, the `vdpa` call included (it is killed when time runs out).
  const expiry = AbortSignal.timeout(timeoutMs)
  const signal = options.signal ? AbortSignal.any([options.signal, expiry]) : expiry
  try {
    await vdpa(['dev', 'add', 'name', name, 'mgmtdev', 'vduse'], signal)
    // With both drivers loaded the first registered one wins; move the device if it is the wrong one.
    const bound = await currentDriver(name)
    if (bound !== kernelDriver) {
      if (bound !== undefined) await writeFile(join(BUS, 'drivers', bound, 'unbind'), name)
      await writeFile(join(BUS, 'devices', name, 'driver_override'), kernelDriver)
      await writeFile(join(BUS, 'drivers', kernelDriver, 'bind'), name)
    }
    return await poll(`the ${driver} node of ${name}`, deadline, () => nodeFor(name, driver), signal)
  } catch (err) {
    // Leave nothing behind: the device may be on the bus even when `vdpa dev add` was interrupted (the
    // kernel finishes an add before the killed tool exits, and the tool has exited by now).
    let leftover = ''
    if (await isAttached(name)) {
      await detach(name).catch((e: Error) => (leftover = ` (and detaching it again failed: ${e.message})`))
    }
    if (expiry.aborted && !options.signal?.aborted) {
      throw new VduseError(`attaching ${name} took longer than ${timeoutMs} ms${leftover}`, {
        code: 'ERR_VDUSE_TIMEOUT',
        hint: 'the driver probe waits for I/O this process serves: keep its event loop free while attaching',
        cause: err,
      })
    }
    if (options.signal?.aborted) {
      throw new AbortError(`attaching ${name} was aborted${leftover}`, { cause: options.signal.reason })
    }
    if (leftover && err instanceof Error) err.message += leftover
    throw err
  }
}

/** Removes the device from the vDPA bus (the kernel resets it; the device keeps being served meanwhile). */
export async function detach(name: string, options: { signal?: AbortSignal } = {}): Promise<void> {
  try {
    await vdpa(['dev', 'del', name], options.signal)
  } catch (err) {
    if (options.signal?.aborted) {
      throw new AbortError(`detaching ${name} was aborted`, { cause: options.signal.reason })
    }
    throw err
  }
}

/** Where device `name` is attached now, if it is: the driver and the node it made. */
export async function currentAttachment(
  name: string,
): Promise<{ driver: AttachDriver; path: string } | undefined> {
  const bound = await currentDriver(name)
  const driver = bound === 'virtio_vdpa' ? 'virtio' : bound === 'vhost_vdpa' ? 'vhost' : undefined
  if (driver === undefined) return undefined
  const path = await nodeFor(name, driver)
  return path === undefined ? undefined : { driver, path }
}

/** Whether `name` is on the vDPA bus now. */
export async function isAttached(name: string): Promise<boolean> {
  return exists(join(BUS, 'devices', name))
}

/** The driver a vDPA device is bound to, if any (for `vduse list`). */
export async function boundDriver(name: string): Promise<string | undefined> {
  return currentDriver(name)
}

export async function readSysfs(path: string): Promise<string | undefined> {
  return readFile(path, 'utf8').then(
    (s) => s.trim(),
    () => undefined,
  )
}
