/** Every stable error code. Match on `error.code`, never on the message. */
export const ERROR_CODES = [
  'ERR_VDUSE_UNAVAILABLE',
  'ERR_VDUSE_PERMISSION',
  'ERR_VDUSE_EXISTS',
  'ERR_VDUSE_NOT_FOUND',
  'ERR_VDUSE_BUSY',
  'ERR_VDUSE_INVALID_CONFIG',
  'ERR_VDUSE_BROKEN',
  'ERR_VDUSE_NOT_RECOVERABLE',
  'ERR_VDUSE_MISMATCH',
  'ERR_VDUSE_UNREACHABLE',
  'ERR_VDUSE_REFUSED',
  'ERR_VDUSE_PROTOCOL',
  'ERR_VDUSE_SYSCALL',
  'ERR_VDUSE_ATTACH',
  'ERR_VDUSE_CLOSED',
  'ERR_VDUSE_TIMEOUT',
  'ERR_VDUSE_NATIVE',
] as const

export type VduseErrorCode = (typeof ERROR_CODES)[number]

export interface VduseErrorOptions {
  code: VduseErrorCode
  errno?: number | undefined
  syscall?: string | undefined
  hint?: string | undefined
  cause?: unknown
}

/** Every error the library raises on purpose: a stable `code`, plus `errno`/`syscall` where a system call failed. */
export class VduseError extends Error {
  readonly code: VduseErrorCode
  readonly errno: number | undefined
  readonly syscall: string | undefined
  /** What the user can do about it, when there is something to do. */
  readonly hint: string | undefined

  constructor(message: string, options: VduseErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'VduseError'
    this.code = options.code
    this.errno = options.errno
    this.syscall = options.syscall
    this.hint = options.hint
  }
}

const KNOWN_CODES: ReadonlySet<string> = new Set(ERROR_CODES)

interface NativeErrorRecord {
  code?: unknown
  message?: unknown
  errno?: unknown
  syscall?: unknown
  hint?: unknown
}

/**
 * Turns an error thrown by the native binding into a `VduseError`. The binding sets `code` and packs
 * `message`, `errno`, `syscall` and `hint` as JSON into the message; anything else is passed through.
 */
export function fromNativeError(err: unknown): unknown {
  if (!(err instanceof Error)) return err
  let record: NativeErrorRecord = {}
  try {
    record = JSON.parse(err.message) as NativeErrorRecord
  } catch {
    record = { message: err.message }
  }
  // Errors from async native work carry their code only inside the record.
  const own = (err as { code?: unknown }).code
  const code = typeof own === 'string' && KNOWN_CODES.has(own) ? own : record.code
  if (typeof code !== 'string' || !KNOWN_CODES.has(code)) return err
  return new VduseError(typeof record.message === 'string' ? record.message : err.message, {
    code: code as VduseErrorCode,
    // Negative, as Node's own system errors are (-13 for EACCES).
    errno: typeof record.errno === 'number' ? -Math.abs(record.errno) : undefined,
    syscall: typeof record.syscall === 'string' ? record.syscall : undefined,
    hint: typeof record.hint === 'string' ? record.hint : undefined,
  })
}

/** Calls into the binding, rethrowing its errors as `VduseError`s. */
export function native<T>(call: () => T): T {
  try {
    return call()
  } catch (err) {
    throw fromNativeError(err)
  }
}

/** Awaits a native promise, rethrowing its rejection as a `VduseError`. */
export async function nativeAsync<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call()
  } catch (err) {
    throw fromNativeError(err)
  }
}
