import { openSync, closeSync, constants, readFileSync } from 'node:fs'
import { join } from 'node:path'

import { FileBackend } from '../backends/file'
import { MemoryBackend } from '../backends/memory'
import { NbdBackend } from '../backends/nbd'
import { NullBackend } from '../backends/null'
import type { BlockBackend } from '../backends/backend'
import { inspectState, listDevices, removeStaleDevice } from '../control'
import { loadBackendPlugin } from '../plugin'
import { BlockDevice } from '../devices/blk/block-device'
import { VduseError } from '../errors'
import { logs, type LogRecord } from '../log'
import { boundDriver, isAttached } from '../transport/attach'
import { HELP, parseCommand, UsageError, type BlkCommand } from './args'

type Emit = (event: Record<string, unknown>) => void

function fail(err: unknown, json: boolean): number {
  const e = err instanceof Error ? err : new Error(String(err))
  const code = (e as { code?: string }).code
  const hint = e instanceof VduseError ? e.hint : undefined
  if (json) process.stdout.write(JSON.stringify({ event: 'error', code, message: e.message, hint }) + '\n')
  process.stderr.write(`vduse: ${e.message}${code ? ` (${code})` : ''}${hint ? ` — ${hint}` : ''}\n`)
  return 1
}

async function openBackend(cmd: BlkCommand, emit: Emit): Promise<BlockBackend> {
  const { backend: spec, readOnly } = cmd
  switch (spec.kind) {
    case 'plugin':
      return loadBackendPlugin(spec.module, {
        name: cmd.name,
        readOnly,
        args: spec.args,
        ...(spec.size === undefined ? {} : { size: spec.size }),
      })
    case 'nbd': {
      const nbd = await NbdBackend.connect(spec.uri, {
        readOnly,
        connections: spec.connections ?? cmd.queues,
        ...(cmd.timeoutMs === undefined ? {} : { hangTimeoutMs: cmd.timeoutMs }),
        ...(spec.reconnectTimeoutMs === undefined ? {} : { reconnectTimeoutMs: spec.reconnectTimeoutMs }),
      })
      const name = cmd.name
      nbd.on('disconnected', (e) =>
        emit({ event: 'nbd-disconnected', name, connection: e.connection, message: e.error.message }),
      )
      nbd.on('reconnected', (e) => emit({ event: 'nbd-reconnected', name, ...e }))
      nbd.on('reconnectFailed', (e) =>
        emit({
          event: 'nbd-reconnect-failed',
          name,
          connection: e.connection,
          attempts: e.attempts,
          code: e.error.code,
          message: e.error.message,
        }),
      )
      nbd.on('unavailable', (e) =>
        emit({
          event: 'nbd-unavailable',
          name,
          failed: e.failed,
          code: e.error.code,
          message: e.error.message,
        }),
      )
      return nbd
    }
    case 'memory':
      return new MemoryBackend(spec.size)
    case 'null':
      return new NullBackend(spec.size)
    case 'file': {
      const options: { readOnly: boolean; direct: boolean; size?: number } = { readOnly, direct: spec.direct }
      if (spec.size !== undefined) options.size = spec.size
      return FileBackend.open(spec.path, options)
    }
  }
}

async function serveBlk(cmd: BlkCommand, emit: Emit): Promise<number> {
  const backend = await openBackend(cmd, emit)
  let device: BlockDevice
  try {
    // An NBD server's minimum block size decides the logical block size unless one is given.
    const needed = backend instanceof NbdBackend ? backend.blockSize : 512
    const blockSize = cmd.blockSize ?? needed
    if (blockSize < needed) {
      throw new VduseError(`--block-size ${blockSize} is below the server's minimum block size ${needed}`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    const options: Parameters<typeof BlockDevice.create>[0] = {
      name: cmd.name,
      backend,
      queues: cmd.queues,
      queueSize: cmd.queueSize,
      logicalBlockSize: blockSize,
      readOnly: cmd.readOnly,
      replaceStale: cmd.replace,
      recover: cmd.recover,
    }
    if (cmd.serial !== undefined) options.serial = cmd.serial
    // NBD handles its own reply deadline (a hung connection is replaced and the request resent).
    if (cmd.timeoutMs !== undefined && cmd.backend.kind !== 'nbd') options.requestTimeoutMs = cmd.timeoutMs
    device = await BlockDevice.create(options)
  } catch (err) {
    await backend.close?.()
    throw err
  }
  device.on('requestError', (err) => emit({ event: 'request-error', name: cmd.name, message: err.message }))
  device.on('error', (err) => emit({ event: 'error', name: cmd.name, message: err.message }))
  device.on('drained', (info) => emit({ event: 'drained', name: cmd.name, ...info }))
  const onLog = (r: LogRecord): void => {
    if (r.level === 'error' || r.level === 'warn')
      emit({ event: 'log', name: cmd.name, level: r.level, message: r.message })
  }
  logs.on('log', onLog)

  let stopping: Promise<number> | undefined
  /** What a stop is waiting for, for a user who signals again. */
  let stage = ''
  const stop = (signal: string): Promise<number> => {
    stopping ??= (async () => {
      try {
        stage = 'the device to detach, its requests in flight to finish, and the backend to flush'
        await device.close()
      } finally {
        stage = 'the backend to close'
        await backend.close?.()
      }
      emit({ event: 'stopped', name: cmd.name, signal, stats: device.stats, counters: device.counters() })
      return 0
    })()
    return stopping
  }
  // Stats on demand.
  process.on('SIGUSR1', () =>
    emit({ event: 'stats', name: cmd.name, stats: device.stats, counters: device.counters() }),
  )
  const stopped = new Promise<number>((resolve, reject) => {
    // The first stop signal stops gracefully; a second says what the stop waits for; a third forces an
    // exit, leaving the device for `vduse destroy` (or `--recover`).
    let signals = 0
    const onSignal = (sig: NodeJS.Signals): void => {
      signals++
      if (signals === 1) {
        stop(sig).then(resolve, reject)
        return
      }
      const inFlight = device.counters().inFlight
      if (signals === 2) {
        emit({ event: 'stopping', name: cmd.name, signal: sig, waitingFor: stage, inFlight })
        process.stderr.write(
          `vduse: still stopping ${cmd.name}: waiting for ${stage} (${inFlight} in flight); ` +
            `${sig} again forces an exit\n`,
        )
        return
      }
      emit({ event: 'forced', name: cmd.name, signal: sig, inFlight })
      process.stderr.write(
        `vduse: forced exit: ${cmd.name} is left as it is; \`vduse destroy ${cmd.name}\` removes it\n`,
      )
      process.exit(130)
    }
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal)
    // A handover (an upgrade): stop serving but leave the device where it is, for `--recover`.
    process.once('SIGUSR2', () => {
      stopping ??= (async () => {
        try {
          await device.release()
        } finally {
          await backend.close?.()
        }
        emit({ event: 'released', name: cmd.name, stats: device.stats, counters: device.counters() })
        return 0
      })()
      stopping.then(resolve, reject)
    })
    // A broken device serves nothing any more: say so, clean up what can be cleaned, exit non-zero.
    device.on('broken', (err) => {
      emit({ event: 'broken', name: cmd.name, code: err.code, message: err.message, hint: err.hint })
      stop('broken').then(
        () => resolve(1),
        () => resolve(1),
      )
    })
  })

  let path = device.path
  try {
    // A recovered device is usually still attached where its dead server left it.
    if (cmd.attach !== 'none' && !device.attached) path = await device.attach({ driver: cmd.attach })
  } catch (err) {
    await device.close().catch(() => {})
    await backend.close?.()
    throw err
  }
  emit({
    event: 'ready',
    name: cmd.name,
    path: path ?? null,
    size: device.size,
    queues: cmd.queues,
    features: device.offeredFeatures,
    ...(device.recovered ? { recovered: true, resubmitted: device.counters().resubmitted } : {}),
  })
  return stopped
}

/** `vduse list`: every VDUSE device, whether a live process serves it, and where it is attached. */
async function list(json: boolean): Promise<number> {
  const rows = []
  for (const name of listDevices()) {
    let served = false
    try {
      closeSync(openSync(join('/dev/vduse', name), constants.O_RDWR | constants.O_NONBLOCK))
    } catch (err) {
      served = (err as NodeJS.ErrnoException).code === 'EBUSY'
    }
    const attached = await isAttached(name)
    const state = served ? null : inspectState(name)
    rows.push({
      name,
      served,
      stale: !served,
      // Its server died and left a state file naming storage that outlives it: `vduse blk --recover`.
      recoverable: state !== null && state.backend !== '' && state.kind === 'blk',
      attached,
      driver: attached ? ((await boundDriver(name)) ?? null) : null,
      ...(state
        ? { kind: state.kind, backend: state.backend || null, lastPid: state.pid, servings: state.servings }
        : {}),
    })
  }
  if (json) for (const r of rows) process.stdout.write(JSON.stringify(r) + '\n')
  else if (rows.length === 0) process.stdout.write('no VDUSE devices\n')
  else {
    for (const r of rows) {
      const where = r.attached ? `attached (${r.driver ?? 'no driver'})` : 'detached'
      const what = r.served ? 'served' : r.recoverable ? 'stale, recoverable' : 'stale'
      process.stdout.write(`${r.name}\t${what}\t${where}\n`)
    }
  }
  return 0
}

async function destroy(name: string): Promise<number> {
  if (!listDevices().includes(name)) {
    throw new VduseError(`no VDUSE device named "${name}"`, { code: 'ERR_VDUSE_NOT_FOUND' })
  }
  await removeStaleDevice(name)
  process.stdout.write(`destroyed ${name}\n`)
  return 0
}

export async function main(argv: readonly string[]): Promise<number> {
  let json = argv.includes('--json')
  try {
    const cmd = parseCommand(argv)
    switch (cmd.command) {
      case 'help':
        process.stdout.write(HELP)
        return 0
      case 'version': {
        const pkg = JSON.parse(readFileSync(join(__dirname, '../../package.json'), 'utf8')) as {
          version: string
        }
        process.stdout.write(`${pkg.version}\n`)
        return 0
      }
      case 'list':
        return await list(cmd.json)
      case 'destroy':
        return await destroy(cmd.name)
      case 'blk': {
        json = cmd.json
        const emit: Emit = json
          ? (e) => process.stdout.write(JSON.stringify(e) + '\n')
          : (e) => {
              if (e.event === 'ready')
                process.stderr.write(
                  `vduse: ${String(e.name)} ready at ${String(e.path ?? '(not attached)')}\n`,
                )
              else if (e.event === 'stopped') process.stderr.write(`vduse: ${String(e.name)} stopped\n`)
              else process.stderr.write(`vduse: ${String(e.event)}: ${String(e.message ?? '')}\n`)
            }
        return await serveBlk(cmd, emit)
      }
    }
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`vduse: ${err.message}\nTry 'vduse --help'.\n`)
      return 2
    }
    return fail(err, json)
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code
      // Nothing else should keep us alive once the command is done.
      setImmediate(() => process.exit(code))
    },
    (err: unknown) => {
      process.stderr.write(`vduse: ${String(err)}\n`)
      process.exit(1)
    },
  )
}
