// What the host-side benchmarks share: the peers scripts/peers/fetch unpacks (QEMU 10, virtiofsd), a
// server's CPU time, and waiting for a server's vhost-user socket.
import { execFile, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'

const exec = promisify(execFile)
const ROOT = join(__dirname, '..')

export async function peers(): Promise<Record<string, string>> {
  const { stdout } = await exec(join(ROOT, 'scripts/peers/fetch'), [], { cwd: ROOT })
  return Object.fromEntries(
    stdout
      .split('\n')
      .filter((l) => l.includes('='))
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  )
}

/** utime+stime of a process, in seconds. */
export function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
  return (Number(fields[11]) + Number(fields[12])) / 100
}

export async function waitForSocket(sock: string, proc: ChildProcess): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (proc.exitCode !== null) throw new Error(`server exited (${proc.exitCode})`)
    try {
      readFileSync(sock)
    } catch (err) {
      if ((err as { code?: string }).code === 'ENXIO') return // a socket exists
    }
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`no socket at ${sock}`)
}
