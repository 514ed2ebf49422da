// `vduse fs`: a virtio-fs device served by this process — an in-memory file system, a plugin's, or a host
// directory shared natively (--shared-dir) — for `mount -t virtiofs TAG /mnt` (or a VM over vhost-vdpa).
// Events, signals and exit codes as for `vduse blk`; SIGUSR2 (a handover) is refused: a file system's
// session state lives in this process.
import { FsDevice } from '../devices/fs/fs-device'
import { PassthroughMount, type FileSystem } from '../devices/fs/filesystem'
import { MemoryFs } from '../devices/fs/memory-fs'
import { logs, setLogLevel, type LogRecord } from '../log'
import { loadFsPlugin } from '../plugin'
import type { FsCommand } from './args'
import { onStopSignals } from './signals'
import { vhostUser } from '../transport/native'
import { deviceError } from './events'

type Emit = (event: Record<string, unknown>) => void

export async function serveFs(cmd: FsCommand, emit: Emit): Promise<number> {
  setLogLevel(cmd.logLevel)
  const src = cmd.source
  const fs: FileSystem | undefined =
    src.kind === 'memory'
      ? memoryFs(src.size, src.mounts)
      : src.kind === 'plugin'
        ? await loadFsPlugin(src.module, {
            name: cmd.name,
            tag: cmd.tag,
            readOnly: cmd.readOnly,
            args: src.args,
          })
        : undefined
  const device = await FsDevice.create({
    name: cmd.name,
    tag: cmd.tag,
    ...(src.kind === 'shared'
      ? {
          sharedDir: src.dir,
          cache: src.cache,
          writebackCache: src.writeback,
          xattr: src.xattr,
          allowDevices: src.allowDevices,
          crossMounts: src.crossMounts,
        }
      : fs === undefined
        ? {}
        : { fs }),
    requestQueues: cmd.requestQueues,
    queueSize: cmd.queueSize,
    readOnly: cmd.readOnly,
    replaceStale: cmd.replace,
    pollUs: 'auto',
    ...(cmd.timeoutMs === undefined ? {} : { requestTimeoutMs: cmd.timeoutMs }),
    ...(cmd.vhostUser === undefined
      ? {}
      : { transport: vhostUser(cmd.vhostUser, { connect: cmd.vhostUserConnect ?? false }) }),
  })
  const name = device.name
  device.on('error', (err) => emit(deviceError(name, err)))
  device.on('requestError', (err) => emit({ event: 'request-error', name, message: err.message }))
  device.on('drained', (info) => emit({ event: 'drained', name, ...info }))
  device.on('session', (s) => emit({ event: 'session', name, ...s }))
  const onLog = (r: LogRecord): void => emit({ event: 'log', level: r.level, message: r.message })
  logs.on('log', onLog)
  const stats = (): Record<string, unknown> => ({
    name,
    stats: device.stats,
    ...(src.kind === 'memory' && src.mounts.length > 0 ? { mounts: device.mountStats } : {}),
    counters: device.counters(),
  })

  let stopping: Promise<number> | undefined
  let stage = ''
  /** A stop signal during the attach aborts it; the stop waits until it has given up. */
  const attachAbort = new AbortController()
  let attaching: Promise<unknown> | undefined
  const stop = (signal: string): Promise<number> => {
    stopping ??= (async () => {
      if (attaching) {
        stage = 'the attach to give up'
        attachAbort.abort()
        await attaching.catch(() => {})
      }
      stage = 'the device to detach and be destroyed'
      await device.close()
      emit({ event: 'stopped', signal, ...stats() })
      return 0
    })()
    return stopping
  }
  process.on('SIGUSR1', () => emit({ event: 'stats', ...stats() }))
  process.on('SIGUSR2', () => {
    // Nothing could take it over: the FUSE session (nodes, open files) lives in this process.
    emit({
      event: 'handover-refused',
      name,
      code: 'ERR_VDUSE_NOT_RECOVERABLE',
      message: `${name} cannot be handed over: a virtio-fs session dies with its server; still serving`,
      hint: 'stop it (SIGTERM) and start it again',
    })
  })
  const stopped = new Promise<number>((resolve, reject) => {
    onStopSignals({
      first: (sig) => void stop(sig).then(resolve, reject),
      second: (sig) => {
        emit({ event: 'stopping', name, signal: sig, waitingFor: stage })
        process.stderr.write(`vduse: still stopping: waiting for ${stage}; ${sig} again forces an exit\n`)
      },
      third: (sig) => {
        emit({ event: 'forced', name, signal: sig })
        process.stderr.write('vduse: forced exit: `vduse destroy --all` removes what is left\n')
      },
    })
    device.on('broken', (err) => {
      emit({ event: 'broken', name, code: err.code, message: err.message, hint: err.hint })
      stop('broken').then(
        () => resolve(1),
        () => resolve(1),
      )
    })
  })

  try {
    let path = device.path
    if (cmd.attach !== 'none') {
      attaching = device.attach({ driver: cmd.attach, signal: attachAbort.signal })
      path = (await attaching) as string
    }
    if (stopping) return stopped
    emit({ event: 'ready', name, path: path ?? null, tag: cmd.tag, requestQueues: device.requestQueues })
  } catch (err) {
    // A stop signal aborted the attach: the stop, under way, finishes the device.
    if (stopping) return stopped
    await device
      .close()
      .catch((e: Error) =>
        emit({ event: 'log', level: 'error', message: `cleanup after a failed attach: ${e.message}` }),
      )
    throw err
  } finally {
    attaching = undefined
  }
  return stopped
}

function memoryFs(size: number, mounts: { path: string; dir: string }[]): MemoryFs {
  const fs = new MemoryFs({ maxBytes: size })
  for (const m of mounts) fs.mount(m.path, new PassthroughMount({ dir: m.dir }))
  return fs
}
