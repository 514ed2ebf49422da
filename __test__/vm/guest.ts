// Helpers for specs that run inside the test guest (scripts/vm/run): real kernel, real modules.
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'

export const execFileAsync = promisify(execFile)

/** Refuses to run outside the guest: these specs load and unload kernel modules. */
export function assertInGuest(): void {
  if (process.env.VDUSE_IN_VM !== '1') {
    throw new Error('in-guest specs change kernel state; run them with `npm run test:vm` (scripts/vm/run)')
  }
}

/** Loads a module shipped in the guest's initramfs. */
export async function modprobe(...modules: string[]): Promise<void> {
  const root = process.env.VDUSE_VM_MODROOT
  if (!root) throw new Error('VDUSE_VM_MODROOT is not set')
  for (const m of modules) await execFileAsync('modprobe', ['-d', root, m])
}

export async function loadedModules(): Promise<Set<string>> {
  const { stdout } = await execFileAsync('cat', ['/proc/modules'])
  return new Set(stdout.split('\n').map((line) => line.split(' ')[0] ?? ''))
}
