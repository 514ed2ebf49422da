// Events the serving commands share.

/**
 * A recoverable error while serving (the device goes on) — not the `error` event, which means the
 * command failed and exits 1.
 */
export function deviceError(name: string, err: Error): Record<string, unknown> {
  const code = (err as { code?: unknown }).code
  return { event: 'device-error', name, message: err.message, ...(typeof code === 'string' ? { code } : {}) }
}
