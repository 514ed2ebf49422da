import { constants } from 'node:fs'
import { open, readFile, type FileHandle } from 'node:fs/promises'

import { VduseError, nativeAsync } from '../errors'
import { binding } from '../transport/binding'
import type { BlockBackend, BlockIo } from './backend'

const FALLOC_FL_KEEP_SIZE = 0x01
const FALLOC_FL_PUNCH_HOLE = 0x02
const FALLOC_FL_ZERO_RANGE = 0x10

export interface FileBackendOptions {
  readOnly?: boolean
  /** Bypass the page cache (O_DIRECT); guest buffers must then be block-aligned, as they are for Linux guests. */
  direct?: boolean
  /** Create (or grow) a regular file to this size. */
  size?: number
}

/**
 * A regular file or a block device. Data moves natively between the file and guest memory (preadv/
 * pwritev on native threads); flush is fdatasync, discard punches holes, write-zeroes zeroes ranges.
 */
export class FileBackend implements BlockBackend {
  private constructor(
    private readonly handle: FileHandle,
    private bytes: number,
    readonly readOnly: boolean,
    private readonly regular: boolean,
    readonly path: string,
    /**
     * `file:DEV:INO[:BIRTH]` or `blockdev:RDEV`: the same storage after a restart, even under another
     * path. A block device is named by its number only: re-pointing a loop device is not detected.
     */
    readonly id: string,
  ) {}

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
    const st = await handle.stat()
    let size: number
    if (st.isBlockDevice()) {
      const major = Math.floor(st.rdev / 256) & 0xfff
      const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00)
      size = Number(await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')) * 512
    } else if (st.isFile()) {
      if (options.size !== undefined && st.size < options.size) await handle.truncate(options.size)
      size = options.size ?? st.size
    } else {
      await handle.close()
      throw new VduseError(`${path} is neither a regular file nor a block device`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    if (size <= 0) {
      await handle.close()
      throw new VduseError(`${path} is empty; give a size to create it`, { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    // Device and inode name the file; its birth time tells a file recreated under a recycled inode
    // number apart (where the file system records one).
    const big = await handle.stat({ bigint: true })
    const id = st.isBlockDevice()
      ? `blockdev:${big.rdev}`
      : `file:${big.dev}:${big.ino}${big.birthtimeNs > 0n ? `:${big.birthtimeNs}` : ''}`
    return new FileBackend(handle, size, readOnly, st.isFile(), path, id)
  }

  get size(): number {
    return this.bytes
  }

  get fd(): number {
    return this.handle.fd
  }

  // The JavaScript path, used where native I/O is not available (the in-process transport).
  async read(io: BlockIo): Promise<void> {
    const parts: Promise<unknown>[] = []
    io.forEach((buf, start, length, at) => {
      parts.push(this.handle.read(buf, start, length, at))
    })
    await Promise.all(parts)
  }

  async write(io: BlockIo): Promise<void> {
    const parts: Promise<unknown>[] = []
    io.forEach((buf, start, length, at) => {
      parts.push(this.handle.write(buf, start, length, at))
    })
    await Promise.all(parts)
  }

  async flush(): Promise<void> {
    await this.handle.datasync()
  }

  async discard(offset: number, length: number): Promise<void> {
    if (!this.regular) return
    await nativeAsync(() =>
      binding.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
    )
  }

  async writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    const mode = unmap && this.regular ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE
    try {
      await nativeAsync(() => binding.fallocate(this.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length))
    } catch {
      // Not supported here (e.g. a block device without zeroing support): write zeroes.
      const zero = Buffer.alloc(Math.min(length, 1 << 20))
      for (let done = 0; done < length;) {
        const n = Math.min(zero.length, length - done)
        await this.handle.write(zero, 0, n, offset + done)
        done += n
      }
    }
  }

  async resize(size: number): Promise<void> {
    if (!this.regular) {
      throw new VduseError('only a regular file can be resized', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    await this.handle.truncate(size)
    this.bytes = size
  }

  async close(): Promise<void> {
    if (!this.readOnly) await this.handle.datasync().catch(() => {})
    await this.handle.close()
  }
}
