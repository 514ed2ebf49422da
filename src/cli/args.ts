import { parseArgs } from 'node:util'

import type { LogLevel } from '../log'

const LOG_LEVELS: readonly LogLevel[] = ['off', 'error', 'warn', 'info', 'debug', 'trace']

/** A usage error: printed with the help hint, exit code 2. */
export class UsageError extends Error {
  override name = 'UsageError'
}

export const HELP = `Usage:
  vduse blk --name NAME (--memory SIZE | --file PATH | --nbd URI | --null SIZE) [options]
  vduse blk --name NAME --backend MODULE [--size SIZE] [options] [-- plugin arguments]
  vduse net --name NAME --tap TAP [--mac MAC] [options]
  vduse net --switch --name NAME [--name NAME …] [options]
  vduse fs --name NAME --tag TAG (--memory [--size SIZE] | --shared-dir DIR | --backend MODULE) [options]
           [-- plugin args]
  vduse list [--json]
  vduse destroy NAME | --all

Serve a virtio-blk device from this process through VDUSE (Linux >= 5.15; as root, with
\`modprobe vduse virtio_vdpa\`), until SIGINT, SIGTERM or SIGHUP (finish, flush, detach, destroy; a
second signal says what the stop waits for, a third forces an exit). SIGUSR1 prints stats. SIGUSR2 hands
the device over instead: stop serving and leave it attached for \`vduse blk --recover\` (an upgrade).

Backends (exactly one):
  --memory SIZE          a RAM disk of SIZE bytes (suffixes K, M, G, T)
  --file PATH            a regular file or block device; data moves natively
  --nbd URI              an NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
                         (qemu-nbd, nbdkit, …); reconnects by itself when the connection drops
  --null SIZE            discards writes, reads return whatever is in the buffers
  --backend MODULE       a backend plugin: a file (./my-backend.mjs) or a package whose default export
                         is (options) => BlockBackend; it gets --size, --read-only and what follows --

Options for blk:
  --size SIZE            with --file: create or grow the file to SIZE; with --backend: for the plugin
  --direct               with --file: O_DIRECT
  --no-lock              with --file: take no image lock (QEMU's locking protocol; unsafe if
                         another process writes the image)
  --block-size 512|4096  logical block size (default: the storage's, else 512)
  --queues N             virtqueues (default 1)
  --queue-size N         ring size, a power of two (default 256)
  --read-only            offer the device read-only
  --serial S             serial number (up to 20 bytes)
  --attach virtio|vhost|none
                         bind to virtio_vdpa (a /dev/vdX here, the default), to vhost_vdpa
                         (/dev/vhost-vdpa-N for a VM), or leave it detached
  --vhost-user SOCK      serve over a vhost-user socket instead of VDUSE (no kernel module needed):
                         a VMM connects to SOCK (QEMU: -chardev socket,id=c,path=SOCK -device
                         vhost-user-blk-pci,chardev=c; libblkio: virtio-blk-vhost-user), one at a
                         time; the ready event's path is SOCK. Excludes --attach, --recover, --replace
  --connect              with --vhost-user: connect to a VMM listening on SOCK (QEMU: server=on) instead
                         of listening, and again whenever it goes (blk, net and fs)
  --timeout MS           fail a request whose backend call takes longer (default: no limit, as the
                         kernel's NBD client). With --nbd the request's connection is closed too, so
                         its copy cannot land later; the connection's other requests are sent again
  --hang-timeout MS      with --nbd: a connection with requests in flight that receives nothing for MS
                         is probed with a small read; unanswered for MS more, it counts as hung and is
                         replaced, its requests sent again (default 30000; 0: never)
  --poll-us N|auto       poll the rings up to N µs before sleeping (adaptive, only at low depth and
                         while no request waits on a JavaScript backend): lower latency at queue
                         depth 1 for CPU time. 0: never (the default with --file); auto (the
                         default otherwise): a cap of 16 times what serving a one-request wake-up
                         costs here, 16–1000 µs
  --connections N        with --nbd: connections when the server allows several (default: --queues)
  --reconnect-timeout MS with --nbd: how long requests wait for the server to come back before they
                         fail with an I/O error (default 60000); reconnecting goes on after that
  --replace              replace a stale device of the same name left by a dead process
  --recover              take over the device of the same name whose server died (same backend and
                         options), serving again what it left in flight; the driver sees a pause.
                         Creates the device if there is none
  --json                 one JSON event per line on stdout (ready, stopped, released, error, …), each
                         with "v" (schema version) and "ts" (ISO time)
  --log-level LEVEL      native log records to report: off, error, warn (default), info, debug, trace

Options for net (virtio-net NICs; the kernel shows each as a network interface, or hands it to a VM):
  --tap TAP              bridge the NIC to kernel tap interface TAP (created if missing); frames move
                         natively, never through JavaScript
  --switch               wire every --name NIC to one Ethernet switch in this process (MAC learning)
  --mac MAC              the NIC's MAC address (one NIC; default: random, locally administered)
  --mtu N                the largest MTU the driver may set (default 1500)
  --no-offloads          offer no checksum or segmentation offloads
  --vhost-user SOCK      serve the NIC over a vhost-user socket instead of VDUSE (QEMU: -chardev
                         socket,id=c,path=SOCK -netdev vhost-user,id=n,chardev=c -device
                         virtio-net-pci,netdev=n); repeat it, one per --name, in order
  --attach, --replace, --json, --log-level, --queue-size   as for blk

Options for fs (virtio-fs, Linux >= 6.15: \`mount -t virtiofs TAG /mnt\`, or hand it to a VM):
  --tag TAG              the mount tag (1–36 bytes; default: the name)
  --memory               serve an in-memory file system (MemoryFs); --size caps its data (default 1G)
  --mount PATH=DIR       with --memory: mount host directory DIR at PATH of it (repeatable), served
                         natively as with --shared-dir (a submount: renames across it are copies)
  --shared-dir DIR       share this host directory, served natively (no JavaScript per request); the
                         driver reaches nothing outside it (names resolved beneath it, symlinks never
                         followed on the host)
  --cache POLICY         with --shared-dir: never | auto (default) | always — what the driver caches
  --writeback            with --shared-dir: let the driver cache writes (not with --cache never)
  --xattr POLICY         with --shared-dir: off | user (default: user.* only) | all
  --allow-devices        with --shared-dir: let the driver create device nodes (default: EPERM); the
                         driver creates files as any uid it names: share a nosuid,nodev mount
  --cross-mounts         with --shared-dir: enter file systems mounted inside DIR (default: EACCES;
                         procfs, sysfs and the like never)
  --backend MODULE       a file-system plugin whose default export is (options) => FileSystem; it gets
                         --name, --tag, --read-only and what follows --
  --request-queues N     request queues besides the high-priority one (default 1)
  --read-only            refuse every change (EROFS); --readonly is the same
  --timeout MS           answer a file-system call that takes longer with ETIMEDOUT (default: no limit)
  --vhost-user SOCK      serve over a vhost-user socket instead of VDUSE (QEMU: -chardev socket,id=c,
                         path=SOCK -device vhost-user-fs-pci,chardev=c,tag=TAG); the ready event's path
                         is SOCK
  --attach, --replace, --json, --log-level, --queue-size   as for blk (the ready event's path is the tag)

Other commands:
  list                   VDUSE devices on this machine: type, size, queues, where attached, owning pid,
                         state (served, stale, or recoverable with --recover); --json: an array
  destroy NAME           detach and destroy a stale device; --all: every stale device

  -h, --help             this help
  --version              the package version
`

/** The help for one command (`vduse net --help`), or all of it. */
export function helpFor(topic?: 'blk' | 'net' | 'fs'): string {
  if (topic === undefined) return HELP
  const usage = HELP.split('\n')
    .filter((l) => l.startsWith(`  vduse ${topic} `))
    .join('\n')
  const section = (from: string, to: string): string => {
    const start = HELP.indexOf(from)
    return HELP.slice(start, HELP.indexOf(to, start)).trimEnd()
  }
  if (topic === 'blk') {
    const intro = HELP.slice(HELP.indexOf('Serve a virtio-blk'), HELP.indexOf('Options for net'))
    return `Usage:\n${usage}\n\n${intro.trimEnd()}\n`
  }
  const body =
    topic === 'net'
      ? section('Options for net', 'Options for fs')
      : section('Options for fs', 'Other commands')
  return `Usage:\n${usage}\n\n${body}\n`
}

function checkName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/.test(name) || name === 'control') {
    throw new UsageError(`--name "${name}": use letters, digits, '.', '_' and '-' (not "control")`)
  }
}

/** A path a UNIX socket can be bound at. */
function checkSocketPath(path: string): void {
  if (path === '' || Buffer.byteLength(path) > 107)
    throw new UsageError(`--vhost-user "${path}": a socket path is 1 to 107 bytes`)
}

function parseLogLevel(text: string | undefined): LogLevel {
  if (text === undefined) return 'warn'
  if (!LOG_LEVELS.includes(text as LogLevel)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`)
  }
  return text as LogLevel
}

function parseNet(args: readonly string[]): NetCommand | { command: 'help'; topic: 'net' } {
  let parsed
  try {
    parsed = parseArgs({
      args: args as string[],
      strict: true,
      options: {
        name: { type: 'string', multiple: true },
        tap: { type: 'string' },
        switch: { type: 'boolean' },
        mac: { type: 'string' },
        mtu: { type: 'string' },
        'no-offloads': { type: 'boolean' },
        'queue-size': { type: 'string' },
        attach: { type: 'string' },
        'vhost-user': { type: 'string', multiple: true },
        connect: { type: 'boolean' },
        replace: { type: 'boolean' },
        json: { type: 'boolean' },
        'log-level': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    })
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  const v = parsed.values
  if (v.help) return { command: 'help', topic: 'net' }
  const names = v.name ?? []
  if (names.length === 0) throw new UsageError('net needs --name NAME')
  for (const name of names) checkName(name)
  if (new Set(names).size !== names.length) throw new UsageError('each --name must be different')
  if ((v.tap === undefined) === !v.switch)
    throw new UsageError('net needs exactly one of --tap TAP, --switch')
  if (v.tap !== undefined) {
    if (names.length !== 1) throw new UsageError('--tap bridges one NIC: give one --name')
    if (!/^[A-Za-z0-9._-]{1,15}$/.test(v.tap))
      throw new UsageError(`--tap "${v.tap}" is not an interface name`)
  }
  if (v.mac !== undefined && names.length !== 1) throw new UsageError('--mac goes with one --name')
  const queueSize = parseQueueSize(v['queue-size'])
  const attach = parseAttach(v.attach)
  const sockets = v['vhost-user']
  if (sockets !== undefined) {
    if (sockets.length !== names.length)
      throw new UsageError('--vhost-user: give one socket per --name, in the same order')
    for (const sock of sockets) checkSocketPath(sock)
    if (new Set(sockets).size !== sockets.length)
      throw new UsageError('each --vhost-user socket must be different')
    if (v.attach !== undefined)
      throw new UsageError('--vhost-user and --attach exclude each other: a VMM connects to the socket')
    if (v.replace) throw new UsageError('--replace is for VDUSE devices, not --vhost-user')
  }
  const cmd: NetCommand = {
    command: 'net',
    names,
    offloads: !(v['no-offloads'] ?? false),
    queueSize,
    attach: sockets === undefined ? attach : 'none',
    replace: v.replace ?? false,
    json: v.json ?? false,
    logLevel: parseLogLevel(v['log-level']),
  }
  if (v.tap !== undefined) cmd.tap = v.tap
  if (v.mac !== undefined) cmd.mac = v.mac
  if (sockets !== undefined) cmd.vhostUser = sockets
  if (v.connect) {
    if (sockets === undefined) throw new UsageError('--connect goes with --vhost-user')
    cmd.vhostUserConnect = true
  }
  const mtu = parseInteger(v.mtu, '--mtu', 68, 65535)
  if (mtu !== undefined) cmd.mtu = mtu
  return cmd
}

function parseFs(args: readonly string[]): FsCommand | { command: 'help'; topic: 'fs' } {
  const split = args.indexOf('--')
  const own = split < 0 ? args : args.slice(0, split)
  const pluginArgs = split < 0 ? [] : args.slice(split + 1)
  let parsed
  try {
    parsed = parseArgs({
      args: own as string[],
      strict: true,
      options: {
        name: { type: 'string' },
        tag: { type: 'string' },
        memory: { type: 'boolean' },
        size: { type: 'string' },
        backend: { type: 'string' },
        'request-queues': { type: 'string' },
        'queue-size': { type: 'string' },
        'read-only': { type: 'boolean' },
        readonly: { type: 'boolean' },
        'shared-dir': { type: 'string' },
        cache: { type: 'string' },
        writeback: { type: 'boolean' },
        xattr: { type: 'string' },
        'allow-devices': { type: 'boolean' },
        'cross-mounts': { type: 'boolean' },
        mount: { type: 'string', multiple: true },
        timeout: { type: 'string' },
        attach: { type: 'string' },
        'vhost-user': { type: 'string' },
        connect: { type: 'boolean' },
        replace: { type: 'boolean' },
        json: { type: 'boolean' },
        'log-level': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    })
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  const v = parsed.values
  if (v.help) return { command: 'help', topic: 'fs' }
  const shared = v['shared-dir']
  if (v.name === undefined) throw new UsageError('fs needs --name NAME')
  checkName(v.name)
  const tag = v.tag ?? v.name
  if (Buffer.byteLength(tag) > 36 || tag.length === 0) throw new UsageError('--tag must be 1–36 bytes')
  if ([v.memory, v.backend, shared].filter((x) => x !== undefined && x !== false).length !== 1)
    throw new UsageError('fs needs exactly one of --memory, --shared-dir DIR, --backend MODULE')
  if (shared === '') throw new UsageError('--shared-dir needs a directory')
  for (const o of ['cache', 'writeback', 'xattr', 'allow-devices', 'cross-mounts'] as const) {
    if (v[o] !== undefined && shared === undefined) throw new UsageError(`--${o} goes with --shared-dir`)
  }
  const cache = v.cache ?? 'auto'
  if (cache !== 'never' && cache !== 'auto' && cache !== 'always')
    throw new UsageError('--cache must be never, auto or always')
  const xattr = v.xattr ?? 'user'
  if (xattr !== 'off' && xattr !== 'user' && xattr !== 'all')
    throw new UsageError('--xattr must be off, user or all')
  if (cache === 'never' && v.writeback) throw new UsageError('--writeback needs --cache auto or always')
  if (shared !== undefined && v.timeout !== undefined)
    throw new UsageError('--timeout is for --memory and --backend (a shared directory is served natively)')
  if (v.backend === undefined && pluginArgs.length > 0)
    throw new UsageError('arguments after -- are for a --backend plugin')
  if (v.size !== undefined && !v.memory) throw new UsageError('--size goes with --memory')
  const mounts = (v.mount ?? []).map((m) => {
    const at = m.indexOf('=')
    const path = m.slice(0, at)
    const dir = m.slice(at + 1)
    if (at < 0 || !path.startsWith('/') || path === '/' || dir === '')
      throw new UsageError(
        `--mount needs PATH=DIR (an absolute path in the file system, a host directory), not ${m}`,
      )
    return { path, dir }
  })
  if (mounts.length > 0 && !v.memory) throw new UsageError('--mount goes with --memory')
  const paths = mounts.map((m) => m.path.replace(/\/+$/, ''))
  if (new Set(paths).size !== paths.length) throw new UsageError('--mount: each PATH once')
  const queueSize = parseQueueSize(v['queue-size'])
  const attach = parseAttach(v.attach)
  if (v['vhost-user'] !== undefined) {
    checkSocketPath(v['vhost-user'])
    if (v.attach !== undefined)
      throw new UsageError('--vhost-user and --attach exclude each other: a VMM connects to the socket')
    if (v.replace) throw new UsageError('--replace is for VDUSE devices, not --vhost-user')
  }
  const cmd: FsCommand = {
    command: 'fs',
    name: v.name,
    tag,
    source: v.memory
      ? { kind: 'memory', size: v.size === undefined ? 1 << 30 : parseSize(v.size, '--size'), mounts }
      : shared !== undefined
        ? {
            kind: 'shared',
            dir: shared,
            cache,
            writeback: v.writeback ?? false,
            xattr,
            allowDevices: v['allow-devices'] ?? false,
            crossMounts: v['cross-mounts'] ?? false,
          }
        : { kind: 'plugin', module: v.backend!, args: pluginArgs },
    requestQueues: parseInteger(v['request-queues'], '--request-queues', 1, 64) ?? 1,
    queueSize,
    readOnly: (v['read-only'] ?? false) || (v.readonly ?? false),
    attach: v['vhost-user'] === undefined ? attach : 'none',
    replace: v.replace ?? false,
    json: v.json ?? false,
    logLevel: parseLogLevel(v['log-level']),
  }
  const timeout = parseInteger(v.timeout, '--timeout', 1, 3_600_000)
  if (timeout !== undefined) cmd.timeoutMs = timeout
  if (v['vhost-user'] !== undefined) cmd.vhostUser = v['vhost-user']
  if (v.connect) {
    if (v['vhost-user'] === undefined) throw new UsageError('--connect goes with --vhost-user')
    cmd.vhostUserConnect = true
  }
  return cmd
}

/** `--queue-size`: a power of two from 4 to 32768 (default 256). */
function parseQueueSize(text: string | undefined): number {
  const queueSize = parseInteger(text, '--queue-size', 4, 32768) ?? 256
  if ((queueSize & (queueSize - 1)) !== 0) throw new UsageError('--queue-size must be a power of two')
  return queueSize
}

/** `--attach`: virtio (default), vhost or none. */
function parseAttach(text: string | undefined): 'virtio' | 'vhost' | 'none' {
  const attach = text ?? 'virtio'
  if (attach !== 'virtio' && attach !== 'vhost' && attach !== 'none') {
    throw new UsageError('--attach must be virtio, vhost or none')
  }
  return attach
}

const SIZE = /^(\d+)([KMGT]i?B?|[kmgt])?$/

/** Parses "64M", "1G", "4096" (binary suffixes). */
export function parseSize(text: string, what: string): number {
  const m = SIZE.exec(text.trim())
  if (!m) throw new UsageError(`${what}: "${text}" is not a size (like 4096, 64M, 1G)`)
  const unit = (m[2] ?? '').charAt(0).toUpperCase()
  const shift = { '': 0, K: 10, M: 20, G: 30, T: 40 }[unit] ?? 0
  const value = Number(m[1]) * 2 ** shift
  if (!Number.isSafeInteger(value) || value <= 0) throw new UsageError(`${what}: ${text} is out of range`)
  return value
}

function parseInteger(text: string | undefined, what: string, min: number, max: number): number | undefined {
  if (text === undefined) return undefined
  const n = Number(text)
  if (!Number.isInteger(n) || n < min || n > max)
    throw new UsageError(`${what} must be an integer from ${min} to ${max}`)
  return n
}

export type Backend =
  | { kind: 'memory'; size: number }
  | { kind: 'null'; size: number }
  | { kind: 'file'; path: string; size?: number; direct: boolean; lock: boolean }
  | { kind: 'nbd'; uri: string; connections?: number; reconnectTimeoutMs?: number; hangTimeoutMs?: number }
  | { kind: 'plugin'; module: string; size?: number; args: string[] }

export interface BlkCommand {
  command: 'blk'
  name: string
  backend: Backend
  queues: number
  queueSize: number
  /** Unset: 512, or what the backend needs (an NBD server's minimum block size). */
  blockSize?: 512 | 4096
  readOnly: boolean
  serial?: string
  attach: 'virtio' | 'vhost' | 'none'
  /** Serve over a vhost-user socket at this path instead of through VDUSE. */
  vhostUser?: string
  /** With `vhostUser`: connect to a VMM listening there instead of listening. */
  vhostUserConnect?: boolean
  timeoutMs?: number
  pollUs: number | 'auto'
  replace: boolean
  recover: boolean
  json: boolean
  logLevel: LogLevel
}

export interface NetCommand {
  command: 'net'
  names: string[]
  /** A tap to bridge the (one) NIC to; undefined: the NICs share an in-process switch. */
  tap?: string
  mac?: string
  mtu?: number
  offloads: boolean
  queueSize: number
  attach: 'virtio' | 'vhost' | 'none'
  /** One vhost-user socket per NIC (in `names` order) instead of VDUSE. */
  vhostUser?: string[]
  /** With `vhostUser`: connect to a VMM listening there instead of listening. */
  vhostUserConnect?: boolean
  replace: boolean
  json: boolean
  logLevel: LogLevel
}

export interface FsCommand {
  command: 'fs'
  name: string
  tag: string
  source:
    | { kind: 'memory'; size: number; mounts: { path: string; dir: string }[] }
    | { kind: 'plugin'; module: string; args: string[] }
    | {
        kind: 'shared'
        dir: string
        cache: 'never' | 'auto' | 'always'
        writeback: boolean
        xattr: 'off' | 'user' | 'all'
        allowDevices: boolean
        crossMounts: boolean
      }
  requestQueues: number
  queueSize: number
  readOnly: boolean
  timeoutMs?: number
  attach: 'virtio' | 'vhost' | 'none'
  /** Serve over a vhost-user socket at this path (QEMU: vhost-user-fs-pci) instead of through VDUSE. */
  vhostUser?: string
  /** With `vhostUser`: connect to a VMM listening there instead of listening. */
  vhostUserConnect?: boolean
  replace: boolean
  json: boolean
  logLevel: LogLevel
}

export type Command =
  | BlkCommand
  | NetCommand
  | FsCommand
  | { command: 'list'; json: boolean }
  | { command: 'destroy'; name?: string; all: boolean }
  | { command: 'help'; topic?: 'blk' | 'net' | 'fs' }
  | { command: 'version' }

export function parseCommand(argv: readonly string[]): Command {
  const [command, ...rest] = argv
  if (command === undefined || command === '-h' || command === '--help' || command === 'help')
    return { command: 'help' }
  if (command === '--version') return { command: 'version' }
  if (command === 'net') return parseNet(rest)
  if (command === 'fs') return parseFs(rest)
  // Everything after `--` belongs to a backend plugin.
  const split = rest.indexOf('--')
  const own = split < 0 ? rest : rest.slice(0, split)
  const pluginArgs = split < 0 ? [] : rest.slice(split + 1)
  let parsed
  try {
    parsed = parseArgs({
      args: own as string[],
      allowPositionals: true,
      strict: true,
      options: {
        name: { type: 'string' },
        memory: { type: 'string' },
        file: { type: 'string' },
        null: { type: 'string' },
        nbd: { type: 'string' },
        backend: { type: 'string' },
        connections: { type: 'string' },
        'reconnect-timeout': { type: 'string' },
        'hang-timeout': { type: 'string' },
        size: { type: 'string' },
        direct: { type: 'boolean' },
        'no-lock': { type: 'boolean' },
        queues: { type: 'string' },
        'queue-size': { type: 'string' },
        'block-size': { type: 'string' },
        'read-only': { type: 'boolean' },
        serial: { type: 'string' },
        attach: { type: 'string' },
        'vhost-user': { type: 'string' },
        connect: { type: 'boolean' },
        timeout: { type: 'string' },
        'poll-us': { type: 'string' },
        replace: { type: 'boolean' },
        recover: { type: 'boolean' },
        json: { type: 'boolean' },
        all: { type: 'boolean' },
        'log-level': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    })
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  const { values: v, positionals } = parsed
  if (v.help) return command === 'blk' ? { command: 'help', topic: 'blk' } : { command: 'help' }
  switch (command) {
    case 'list':
      if (positionals.length > 0) throw new UsageError('list takes no arguments')
      return { command: 'list', json: v.json ?? false }
    case 'destroy': {
      if (v.all) {
        if (positionals.length > 0) throw new UsageError('destroy takes a device name or --all, not both')
        return { command: 'destroy', all: true }
      }
      if (positionals.length !== 1) throw new UsageError('destroy takes exactly one device name (or --all)')
      return { command: 'destroy', name: positionals[0]!, all: false }
    }
    case 'blk':
      break
    default:
      throw new UsageError(`unknown command "${command}"`)
  }
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`)
  if (!v.name) throw new UsageError('blk needs --name NAME')
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/.test(v.name) || v.name === 'control') {
    throw new UsageError(`--name "${v.name}": use letters, digits, '.', '_' and '-' (not "control")`)
  }
  const chosen = (['memory', 'file', 'nbd', 'null', 'backend'] as const).filter((k) => v[k] !== undefined)
  if (chosen.length !== 1) {
    throw new UsageError(
      'blk needs exactly one of --memory SIZE, --file PATH, --nbd URI, --null SIZE, --backend MODULE',
    )
  }
  if (v.backend === undefined && pluginArgs.length > 0) {
    throw new UsageError('arguments after -- are for a --backend plugin')
  }
  let backend: Backend
  if (v.memory !== undefined) backend = { kind: 'memory', size: parseSize(v.memory, '--memory') }
  else if (v.null !== undefined) backend = { kind: 'null', size: parseSize(v.null, '--null') }
  else if (v.backend !== undefined) {
    backend = { kind: 'plugin', module: v.backend, args: pluginArgs }
    if (v.size !== undefined) backend.size = parseSize(v.size, '--size')
  } else if (v.nbd !== undefined) {
    backend = { kind: 'nbd', uri: v.nbd }
    const connections = parseInteger(v.connections, '--connections', 1, 16)
    if (connections !== undefined) backend.connections = connections
    const reconnect = parseInteger(v['reconnect-timeout'], '--reconnect-timeout', 1, 86_400_000)
    if (reconnect !== undefined) backend.reconnectTimeoutMs = reconnect
    const hang = parseInteger(v['hang-timeout'], '--hang-timeout', 0, 86_400_000)
    if (hang !== undefined) backend.hangTimeoutMs = hang
  } else {
    backend = { kind: 'file', path: v.file!, direct: v.direct ?? false, lock: !(v['no-lock'] ?? false) }
    if (v.size !== undefined) backend.size = parseSize(v.size, '--size')
  }
  if (v.direct && backend.kind !== 'file') throw new UsageError('--direct goes with --file')
  if (v['no-lock'] && backend.kind !== 'file') throw new UsageError('--no-lock goes with --file')
  if (v.size !== undefined && backend.kind !== 'file' && backend.kind !== 'plugin') {
    throw new UsageError('--size goes with --file or --backend')
  }
  if (
    backend.kind !== 'nbd' &&
    (v.connections !== undefined || v['reconnect-timeout'] !== undefined || v['hang-timeout'] !== undefined)
  ) {
    throw new UsageError('--connections, --reconnect-timeout and --hang-timeout go with --nbd')
  }
  const blockSize = parseInteger(v['block-size'], '--block-size', 512, 4096)
  if (blockSize !== undefined && blockSize !== 512 && blockSize !== 4096)
    throw new UsageError('--block-size must be 512 or 4096')
  const queueSize = parseQueueSize(v['queue-size'])
  const attach = parseAttach(v.attach)
  if (v.replace && v.recover) throw new UsageError('--replace and --recover exclude each other')
  if (v['vhost-user'] !== undefined) {
    checkSocketPath(v['vhost-user'])
    if (v.attach !== undefined)
      throw new UsageError('--vhost-user and --attach exclude each other: a VMM connects to the socket')
    if (v.recover || v.replace)
      throw new UsageError('--recover and --replace are for VDUSE devices, not --vhost-user')
  }
  // Growing the image before the takeover is checked would change what a refused restart must leave alone.
  // (A plugin's --size is its argument, not a change to storage.)
  if (v.recover && v.size !== undefined && v.file !== undefined)
    throw new UsageError('--recover takes the image as it is: drop --size')
  if (v.serial !== undefined && Buffer.byteLength(v.serial) > 20)
    throw new UsageError('--serial is at most 20 bytes')
  // The CLI is a dedicated server: it polls by default, with a cap sized from this machine's cost of a
  // wake-up (a library device leaves the JavaScript thread to its application: `pollUs` defaults to 0).
  // Not for --file or --nbd: their native threads need the CPU that polling would take (in a 2-vCPU
  // guest run --file randwrite QD16 fell from 14,540 to 8,243 IOPS with it).
  const pollText = v['poll-us']
  if (pollText !== undefined && pollText !== 'auto' && !/^\d+$/.test(pollText))
    throw new UsageError("--poll-us must be 'auto' or an integer from 0 to 1000")
  const pollUs =
    pollText === 'auto' || (pollText === undefined && backend.kind !== 'file' && backend.kind !== 'nbd')
      ? 'auto'
      : (parseInteger(pollText, '--poll-us', 0, 1000) ?? 0)
  const cmd: BlkCommand = {
    command: 'blk',
    name: v.name,
    backend,
    queues: parseInteger(v.queues, '--queues', 1, 64) ?? 1,
    queueSize,
    readOnly: v['read-only'] ?? false,
    attach: v['vhost-user'] === undefined ? attach : 'none',
    pollUs,
    replace: v.replace ?? false,
    recover: v.recover ?? false,
    json: v.json ?? false,
    logLevel: 'warn',
  }
  if (v['log-level'] !== undefined) {
    if (!LOG_LEVELS.includes(v['log-level'] as LogLevel)) {
      throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`)
    }
    cmd.logLevel = v['log-level'] as LogLevel
  }
  if (blockSize !== undefined) cmd.blockSize = blockSize
  if (v.serial !== undefined) cmd.serial = v.serial
  if (v['vhost-user'] !== undefined) cmd.vhostUser = v['vhost-user']
  if (v.connect) {
    if (v['vhost-user'] === undefined) throw new UsageError('--connect goes with --vhost-user')
    cmd.vhostUserConnect = true
  }
  const timeout = parseInteger(v.timeout, '--timeout', 1, 3_600_000)
  if (timeout !== undefined) cmd.timeoutMs = timeout
  return cmd
}
