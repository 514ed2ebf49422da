import { constants } from 'node:fs'
import { open, readFile, type FileHandle } from 'node:fs/promises'

import { VduseError, native, nativeAsync } from '../errors'
import { binding } from '../transport/binding'
import type { BlockBackend, BlockBackendCapabilities, BlockIo } from './backend'

const FALLOC_FL_KEEP_SIZE = 0x01
const FALLOC_FL_PUNCH_HOLE = 0x02
const FALLOC_FL_ZERO_RANGE = 0x10

export interface FileBackendOptions {
  readOnly?: boolean
  /** Bypass the page cache (O_DIRECT); guest buffers must then be block-aligned, as they are for Linux guests. */
  direct?: boolean
  /** Create (or grow) a regular file to this size. */
  size?: number
  /**
   * Lock the image as QEMU does (default true): a writer excludes every other user, readers exclude
   * writers — vduse servers, qemu-nbd, qemu-img and VMs alike. Opening an image in use fails with
   * `ERR_VDUSE_BUSY`. `false` skips the check (and takes no lock): only for images you know are safe to share.
   */
  lock?: boolean
}

/** What sysfs says about a block device's queue (all in bytes; 0 when unknown). */
interface QueueLimits {
  logical: number
  physical: number
  optimal: number
  discardMax: number
}

async function sysfsNumber(path: string): Promise<number> {
  try {
    const n = Number((await readFile(path, 'utf8')).trim())
    return Number.isFinite(n) ? n : 0
  } catch {
    return 0
  }
}

/** The queue limits of block device `major:minor` (a partition's are its disk's). */
async function queueLimits(major: number, minor: number): Promise<QueueLimits> {
  const base = `/sys/dev/block/${major}:${minor}`
  // A partition has no queue directory of its own; its parent (the disk) does.
  const queue =
    (await sysfsNumber(`${base}/queue/logical_block_size`)) > 0 ? `${base}/queue` : `${base}/../queue`
  return {
    logical: await sysfsNumber(`${queue}/logical_block_size`),
    physical: await sysfsNumber(`${queue}/physical_block_size`),
    optimal: await sysfsNumber(`${queue}/optimal_io_size`),
    discardMax: await sysfsNumber(`${queue}/discard_max_bytes`),
  }
}

/** A native call failed because the operation is not supported for this file or range. */
function unsupported(err: unknown): boolean {
  const errno = Math.abs((err as { errno?: number }).errno ?? 0)
  return errno === 95 /* EOPNOTSUPP */ || errno === 22 /* EINVAL */ || errno === 25 /* ENOTTY */
}

function splitDev(dev: number): [number, number] {
  return [Math.floor(dev / 256) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00)]
}

/**
 * A regular file or a block device. Data moves natively between the file and guest memory (preadv/
 * pwritev on native threads); flush is fdatasync; discard punches holes in a file and is BLKDISCARD on a
 * block device (offered only when the device supports it); write-zeroes zeroes ranges. A block device's
 * logical and physical block sizes and optimal I/O size are passed on to the driver. The image is
 * locked while open (see `lock`).
 */
export class FileBackend implements BlockBackend {
  readonly #handle: FileHandle
  #bytes: number
  readonly #regular: boolean
  /** The disk's own logical block size (a block device; 512 for a file): BLKDISCARD's alignment. */
  readonly #diskBlock: number
  readonly #direct: boolean
  /** Native calls (discard, zeroing) queued or running: they name the file by its descriptor number. */
  #nativeCalls = 0
  #nativeIdle: (() => void) | undefined

  private constructor(
    handle: FileHandle,
    bytes: number,
    readonly readOnly: boolean,
    regular: boolean,
    readonly path: string,
    /**
     * `file:DEV:INO[:BIRTH]` or `blockdev:RDEV`: the same storage after a restart, even under another
     * path. A block device is named by its number only: re-pointing a loop device is not detected.
     */
    readonly id: string,
    /** What the storage can do (block sizes, discard), as detected at open. */
    readonly capabilities: BlockBackendCapabilities,
    diskBlock: number,
    direct: boolean,
  ) {
    this.#handle = handle
    this.#bytes = bytes
    this.#regular = regular
    this.#diskBlock = diskBlock
    this.#direct = direct
  }

  /**
   * Runs a native call on the file's descriptor, counted: `close()` waits for the ones queued on the
   * thread pool, or one could run on whatever file reuses the descriptor number.
   */
  async #native(call: () => Promise<void>): Promise<void> {
    if (this.#closing) throw new VduseError(`${this.path} is closed`, { code: 'ERR_VDUSE_CLOSED' })
    this.#nativeCalls++
    try {
      await nativeAsync(call)
    } finally {
      if (--this.#nativeCalls === 0) this.#nativeIdle?.()
    }
  }

  static async open(path: string, options: FileBackendOptions = {}): Promise<FileBackend> {
    const readOnly = options.readOnly ?? false
    let flags = readOnly ? constants.O_RDONLY : constants.O_RDWR
    if (options.direct) flags |= constants.O_DIRECT
    if (options.size !== undefined && !readOnly) flags |= constants.O_CREAT
    let handle: FileHandle
    try {
      handle = await open(path, flags, 0o644)
    } catch (err) {
      const e = err as NodeJS.ErrnoException
      throw new VduseError(`cannot open ${path}: ${e.message}`, {
        code: 'ERR_VDUSE_SYSCALL',
        errno: typeof e.errno === 'number' ? -Math.abs(e.errno) : undefined,
        syscall: 'open',
        cause: err,
      })
    }
    try {
      return await FileBackend.#init(handle, path, options, readOnly)
    } catch (err) {
      await handle.close().catch(() => {})
      throw err
    }
  }

  static async #init(
    handle: FileHandle,
    path: string,
    options: FileBackendOptions,
    readOnly: boolean,
  ): Promise<FileBackend> {
    // Locked before anything is read or changed (a resize below), so a clash changes nothing.
    if (options.lock ?? true) native(() => binding.lockImage(handle.fd, !readOnly))
    const st = await handle.stat()
    let size: number
    let limits: QueueLimits | undefined
    if (st.isBlockDevice()) {
      const [major, minor] = splitDev(st.rdev)
      size = (await sysfsNumber(`/sys/dev/block/${major}:${minor}/size`)) * 512
      limits = await queueLimits(major, minor)
    } else if (st.isFile()) {
      // With O_DIRECT, I/O must be aligned to the logical block size of the disk under the file system.
      if (options.direct) limits = await queueLimits(...splitDev(st.dev))
      if (options.size !== undefined && st.size < options.size) await handle.truncate(options.size)
      size = options.size ?? st.size
    } else {
      throw new VduseError(`${path} is neither a regular file nor a block device`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    if (size <= 0) {
      throw new VduseError(`${path} is empty; give a size to create it`, { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    // Device and inode name the file; its birth time tells a file recreated under a recycled inode
    // number apart (where the file system records one).
    const big = await handle.stat({ bigint: true })
    const id = st.isBlockDevice()
      ? `blockdev:${big.rdev}`
      : `file:${big.dev}:${big.ino}${big.birthtimeNs > 0n ? `:${big.birthtimeNs}` : ''}`
    // Through the page cache any 512-byte I/O works, whatever the disk's sectors: only O_DIRECT needs
    // the device's logical block size. A larger one is then passed on as the physical block size.
    const diskLogical = limits?.logical ?? 0
    if (options.direct && diskLogical > 4096) {
      throw new VduseError(
        `${path}: ${diskLogical}-byte logical blocks are larger than virtio-blk serves (4096)`,
        {
          code: 'ERR_VDUSE_INVALID_CONFIG',
        },
      )
    }
    const logical = options.direct && diskLogical > 512 ? 4096 : 512
    const capabilities: BlockBackendCapabilities = {
      logicalBlockSize: logical,
      // A file punches holes; a block device discards only if its queue says it can.
      discard: st.isFile() || (limits?.discardMax ?? 0) > 0,
      writeZeroesUnmap: st.isFile() || (limits?.discardMax ?? 0) > 0,
    }
    const physical = Math.max(limits?.physical ?? 0, diskLogical)
    if (physical > logical && (physical & (physical - 1)) === 0) capabilities.physicalBlockSize = physical
    const optimal = limits?.optimal ?? 0
    if (optimal > 0 && optimal % logical === 0) capabilities.optimalIoSize = optimal
    const diskBlock = st.isFile() ? 512 : Math.max(512, diskLogical)
    return new FileBackend(
      handle,
      size,
      readOnly,
      st.isFile(),
      path,
      id,
      capabilities,
      diskBlock,
      !!options.direct,
    )
  }

  get size(): number {
    return this.#bytes
  }

  get fd(): number {
    return this.#handle.fd
  }

  // The JavaScript path, used where native I/O is not available (the in-process transport).
  async read(io: BlockIo): Promise<void> {
    const parts: Promise<unknown>[] = []
    io.forEach((buf, start, length, at) => {
      parts.push(this.#handle.read(buf, start, length, at))
    })
    await Promise.all(parts)
  }

  async write(io: BlockIo): Promise<void> {
    const parts: Promise<unknown>[] = []
    io.forEach((buf, start, length, at) => {
      parts.push(this.#handle.write(buf, start, length, at))
    })
    await Promise.all(parts)
  }

  async flush(): Promise<void> {
    await this.#handle.datasync()
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.#regular) {
      await this.#native(() =>
        binding.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
      )
      return
    }
    // BLKDISCARD takes whole disk blocks only (EINVAL otherwise), and the driver may send 512-byte
    // aligned ranges to a 4K disk served through the page cache: discard what lies whole inside (a
    // discard is a hint; the rest keeps its data).
    const b = this.#diskBlock
    const start = Math.ceil(offset / b) * b
    const end = Math.floor((offset + length) / b) * b
    if (end > start) await this.#native(() => binding.blkDiscard(this.fd, start, end - start))
  }

  async writeZeroes(offset: number, length: number, unmap: boolean, signal?: AbortSignal): Promise<void> {
    // Punching a hole reads back as zeroes (on a block device: a discard that guarantees zeroes).
    if (unmap && this.capabilities.writeZeroesUnmap) {
      try {
        const hole = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        await this.#native(() => binding.fallocate(this.fd, hole, offset, length))
        return
      } catch (err) {
        // The device cannot guarantee zeroes after a discard (or not for this range): zero it instead.
        if (!unsupported(err)) throw err
      }
    }
    try {
      await this.#native(() =>
        this.#regular
          ? binding.fallocate(this.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
          : binding.blkZeroOut(this.fd, offset, length),
      )
    } catch (err) {
      // Only "not supported here" (a file system without ZERO_RANGE, a range the disk cannot zero
      // natively) falls back to writing zeroes; a real failure (EIO) is the request's. O_DIRECT needs
      // aligned memory, which a JavaScript buffer is not: no fallback there.
      if (!unsupported(err) || this.#direct) throw err
      const zero = Buffer.alloc(Math.min(length, 1 << 20))
      for (let done = 0; done < length;) {
        if (signal?.aborted) throw signal.reason
        const n = Math.min(zero.length, length - done)
        await this.#handle.write(zero, 0, n, offset + done)
        done += n
      }
    }
  }

  async resize(size: number): Promise<void> {
    if (!this.#regular) {
      throw new VduseError('only a regular file can be resized', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    await this.#handle.truncate(size)
    this.#bytes = size
  }

  #closing: Promise<void> | undefined

  /** Makes written data durable and closes the file (which drops its lock). Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      // No new native call starts from now on (#native refuses); wait for those queued or running.
      while (this.#nativeCalls > 0) await new Promise<void>((resolve) => (this.#nativeIdle = resolve))
      let failed: NodeJS.ErrnoException | undefined
      if (!this.readOnly) {
        await this.#handle.datasync().catch((err: NodeJS.ErrnoException) => {
          failed = err
        })
      }
      await this.#handle.close()
      if (failed) {
        throw new VduseError(`flushing ${this.path} before closing it failed: ${failed.message}`, {
          code: 'ERR_VDUSE_SYSCALL',
          errno: typeof failed.errno === 'number' ? -Math.abs(failed.errno) : undefined,
          syscall: 'fdatasync',
          cause: failed,
        })
      }
    })()
    return this.#closing
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }
}
