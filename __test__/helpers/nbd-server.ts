// Real NBD servers for tests: qemu-nbd (Debian qemu-utils) and nbdkit, started and killed by the test.
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync } from 'node:fs'
import { connect, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const dir = mkdtempSync(join(tmpdir(), 'vduse-nbd-'))
let sockets = 0

/** A fresh UNIX socket path. */
export function socketPath(): string {
  return join(dir, `s${sockets++}.sock`)
}

/** A free TCP port on 127.0.0.1. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number }
      s.close(() => resolve(port))
    })
  })
}

export interface Server {
  proc: ChildProcess
  uri: string
  /** SIGKILL, and wait until it is gone. */
  kill(): Promise<void>
}

async function listening(where: { path: string } | { port: number }, proc: ChildProcess): Promise<void> {
  const deadline = Date.now() + 10_000
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`the server exited with ${proc.exitCode}`)
    if (!('path' in where) || existsSync(where.path)) {
      const ok = await new Promise<boolean>((resolve) => {
        const c = connect('path' in where ? { path: where.path } : { host: '127.0.0.1', port: where.port })
        c.once('connect', () => {
          c.destroy()
          resolve(true)
        })
        c.once('error', () => resolve(false))
      })
      if (ok) return
    }
    if (Date.now() > deadline) throw new Error('the server did not start listening')
    await new Promise((r) => setTimeout(r, 20))
  }
}

function server(cmd: string, args: string[], where: { path: string } | { port: number }, uri: string) {
  return (async (): Promise<Server> => {
    const proc = spawn(cmd, args, { stdio: 'ignore' })
    await listening(where, proc)
    return {
      proc,
      uri,
      kill: () =>
        new Promise<void>((resolve) => {
          if (proc.exitCode !== null || proc.signalCode !== null) return resolve()
          proc.once('exit', () => resolve())
          proc.kill('SIGKILL')
        }),
    }
  })()
}

/** qemu-nbd serving `file` (raw) on a UNIX socket or on 127.0.0.1:`port`. */
export function qemuNbd(
  file: string,
  at: { path: string } | { port: number },
  opts: { name?: string; readOnly?: boolean; shared?: number } = {},
): Promise<Server> {
  const name = opts.name ?? ''
  const args = ['--format=raw', '--persistent', `--shared=${opts.shared ?? 8}`, '--cache=writeback']
  if (name) args.push(`--export-name=${name}`)
  if (opts.readOnly) args.push('--read-only')
  if ('path' in at) args.push(`--socket=${at.path}`)
  else args.push('--bind=127.0.0.1', `--port=${at.port}`)
  args.push(file)
  const uri =
    'path' in at
      ? `nbd+unix:///${name}?socket=${at.path}`
      : `nbd://127.0.0.1:${at.port}/${encodeURIComponent(name)}`
  return server('qemu-nbd', args, at, uri)
}

/** nbdkit with `plugin` (and its arguments), foreground, on a UNIX socket or on 127.0.0.1:`port`. */
export function nbdkit(
  at: { path: string } | { port: number },
  plugin: string[],
  opts: { filters?: string[]; readOnly?: boolean } = {},
): Promise<Server> {
  const args = ['--foreground', '--exit-with-parent']
  if ('path' in at) args.push(`--unix=${at.path}`)
  else args.push('--ipaddr=127.0.0.1', `--port=${at.port}`)
  if (opts.readOnly) args.push('--readonly')
  for (const f of opts.filters ?? []) args.push(`--filter=${f}`)
  args.push(...plugin)
  const uri = 'path' in at ? `nbd+unix:///?socket=${at.path}` : `nbd://127.0.0.1:${at.port}/`
  return server('nbdkit', args, at, uri)
}
