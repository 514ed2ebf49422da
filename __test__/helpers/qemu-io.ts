// QEMU 10's block tools (qemu-io, qemu-img) over libblkio's virtio-blk-vhost-user driver — the
// virtio-blk driver code a VMM uses — against a device served on a vhost-user socket.
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'

import { peers } from '../vm/guest'

const execFileAsync = promisify(execFile)

let cached: ReturnType<typeof peers> | undefined
/** QEMU 10's clients, unpacked by scripts/peers/fetch (cached; fetched once if missing). */
export function clients(): ReturnType<typeof peers> {
  cached ??= peers()
  return cached
}

/** The `--image-opts` of a vhost-user disk at `sock`. */
export const image = (sock: string): string => `driver=virtio-blk-vhost-user,path=${sock},cache.direct=on`

/** Runs qemu-io against the socket with `commands`; resolves with its output (rejects on failure). */
export function qemuIo(sock: string, ...commands: string[]): Promise<string> {
  return qemuIoWith([], sock, ...commands)
}

/** `qemuIo` with options of qemu-io's own before the image (`-t writeback`, say). */
export async function qemuIoWith(options: string[], sock: string, ...commands: string[]): Promise<string> {
  const { qemuIo } = await clients()
  const args = [...options, '--image-opts', image(sock), ...commands.flatMap((c) => ['-c', c])]
  const { stdout, stderr } = await execFileAsync(qemuIo, args, { timeout: 120_000, maxBuffer: 16 << 20 })
  // qemu-io reports a failed command on stdout and an unknown or malformed one on stderr, and exits 0.
  if (/error|fail|pattern verification/i.test(stdout) || stderr.trim() !== '')
    throw new Error(`qemu-io: ${stdout}${stderr ? `\nstderr: ${stderr}` : ''}`)
  return stdout
}
