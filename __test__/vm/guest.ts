// Helpers for specs that run inside the test guest (scripts/vm/run): real kernel, real modules.
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
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

/** Runs a shell script without blocking this thread (which serves the device's I/O meanwhile). */
export async function sh(script: string): Promise<string> {
  try {
    const { stdout } = await execFileAsync('sh', ['-ec', script], { maxBuffer: 64 << 20 })
    return stdout
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string }
    throw new Error(`${e.message}\nstdout: ${e.stdout ?? ''}\nstderr: ${e.stderr ?? ''}`)
  }
}

/** The whole-device checks the issue asks of every block device: dd+cmp, fio verify, ext4 with checksums. */
export async function exerciseBlockDevice(dev: string, size: number, tag: string): Promise<void> {
  const mib = Math.min(size >> 20, 64)
  await sh(`
    head -c ${mib}M /dev/urandom > /tmp/pattern-${tag}
    dd if=/tmp/pattern-${tag} of=${dev} bs=1M oflag=direct status=none
    dd if=${dev} of=/tmp/back-${tag} bs=1M count=${mib} iflag=direct status=none
    cmp /tmp/pattern-${tag} /tmp/back-${tag}
    rm -f /tmp/pattern-${tag} /tmp/back-${tag}`)
  await sh(`fio --name=verify-${tag} --filename=${dev} --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --numjobs=2 --size=${Math.max(1, mib >> 2)}M --offset_increment=${Math.max(1, mib >> 2)}M \
    --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 --group_reporting --output-format=terse >/dev/null`)
  await sh(`
    mkfs.ext4 -q -F ${dev}
    mkdir -p /tmp/mnt-${tag}
    mount ${dev} /tmp/mnt-${tag}
    for i in 1 2 3; do head -c $((i*700000)) /dev/urandom > /tmp/mnt-${tag}/f$i; done
    (cd /tmp/mnt-${tag} && sha256sum f* > /tmp/sums-${tag})
    umount /tmp/mnt-${tag}
    fsck.ext4 -f -n ${dev} >/dev/null
    mount ${dev} /tmp/mnt-${tag}
    (cd /tmp/mnt-${tag} && sha256sum -c --quiet /tmp/sums-${tag})
    umount /tmp/mnt-${tag}`)
}

/** QEMU 10's real clients (qemu-io over libblkio), unpacked by scripts/peers/fetch (cached by the host). */
export async function peers(): Promise<{ qemuIo: string; qemuImg: string; qsd10: string; version: string }> {
  const { stdout } = await execFileAsync('scripts/peers/fetch', [], { maxBuffer: 1 << 20 })
  const kv = Object.fromEntries(
    stdout
      .split('\n')
      .filter((l) => l.includes('='))
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  )
  return { qemuIo: kv.QEMU_IO!, qemuImg: kv.QEMU_IMG!, qsd10: kv.QSD10!, version: kv.QEMU_VERSION! }
}

/** Waits until `check()` is true, polling without blocking this thread. */
export async function until(
  what: string,
  check: () => boolean | Promise<boolean>,
  timeoutMs = 20_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

/** A `vduse` CLI process with `--json` events. */
export interface Running {
  child: ChildProcess
  events: Array<Record<string, unknown>>
  next(event: string): Promise<Record<string, unknown>>
  exit: Promise<number | null>
  stderr: () => string
}

/** The CLI entry point (runs the built `dist/`). */
export const CLI = join(__dirname, '../../bin/vduse.js')

/** Starts the CLI; `next(event)` resolves with the first JSON event of that name. */
export function startCli(args: string[]): Running {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  const events: Array<Record<string, unknown>> = []
  const waiters: Array<{ event: string; resolve: (e: Record<string, unknown>) => void }> = []
  let err = ''
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()))
  createInterface({ input: child.stdout! }).on('line', (line) => {
    const e = JSON.parse(line) as Record<string, unknown>
    events.push(e)
    for (const w of waiters.filter((w) => w.event === e.event)) w.resolve(e)
  })
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  return {
    child,
    events,
    exit,
    stderr: () => err,
    next: (event) =>
      new Promise((resolve, reject) => {
        const seen = events.find((e) => e.event === event)
        if (seen) return resolve(seen)
        waiters.push({ event, resolve })
        void exit.then((code) => reject(new Error(`vduse exited (${code}) before "${event}": ${err}`)))
      }),
  }
}
