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
  'ERR_VDUSE_FENCED',
  'ERR_VDUSE_INVALID_ARGUMENT',
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

/**
 * How an operation given an aborted `signal` fails, as Node's own APIs do: `name` 'AbortError', `code`
 * 'ABORT_ERR', and the signal's `reason` as `cause`.
 */
export class AbortError extends Error {
  readonly code = 'ABORT_ERR'

  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'AbortError'
  }
}

/** Throws an `AbortError` if `signal` is aborted. */
export function throwIfAborted(signal: AbortSignal | undefined, what = 'The operation'): void {
  if (signal?.aborted) throw new AbortError(`${what} was aborted`, { cause: signal.reason })
}

const KNOWN_CODES: ReadonlySet<string> = new Set(ERROR_CODES)

/**
 * Turns an error thrown by the native binding into a `VduseError`. The binding throws `Error`s that carry
 * `code` and, where known, `errno` (negative), `syscall` and `hint` as properties; anything else (an
 * engine error) passes through untouched.
 */
export function fromNativeError(err: unknown): unknown {
  if (!(err instanceof Error) || err instanceof VduseError) return err
  const fields = err as Error & { code?: unknown; errno?: unknown; syscall?: unknown; hint?: unknown }
  const code = fields.code
  if (typeof code !== 'string' || !KNOWN_CODES.has(code)) return err
  return new VduseError(err.message, {
    code: code as VduseErrorCode,
    errno: typeof fields.errno === 'number' ? -Math.abs(fields.errno) : undefined,
    syscall: typeof fields.syscall === 'string' ? fields.syscall : undefined,
    hint: typeof fields.hint === 'string' ? fields.hint : undefined,
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

/** An Error from anything thrown (a string, null, an object without a prototype, one whose toString throws). */
export function asError(err: unknown): Error {
  if (err instanceof Error) return err
  let text: string
  try {
    text = String(err)
  } catch {
    text = Object.prototype.toString.call(err)
  }
  return new Error(text)
}
