import { openSync, closeSync, constants, readFileSync } from 'node:fs'
import { join } from 'node:path'

import { FileBackend, type FileBackendOptions } from '../backends/file'
import { MemoryBackend } from '../backends/memory'
import { NbdBackend } from '../backends/nbd'
import { NullBackend } from '../backends/null'
import type { BlockBackend } from '../backends/backend'
import { inspectState, listDevices, removeStaleDevice } from '../control'
import { loadBackendPlugin } from '../plugin'
import { BlockDevice } from '../devices/blk/block-device'
import { VduseError } from '../errors'
import { logs, setLogLevel, type LogRecord } from '../log'
import { boundDriver, currentAttachment, isAttached, readSysfs } from '../transport/attach'
import { vhostUser } from '../transport/native'
import { helpFor, parseCommand, UsageError, type BlkCommand } from './args'
import { EventLimiter } from './limiter'
import { deviceError } from './events'
import { serveFs } from './fs'
import { serveNet } from './net'
import { onStopSignals } from './signals'

type Emit = (event: Record<string, unknown>) => void

/** Version of the JSON events' shape (`v`): fields are only added within a version. */
export const EVENT_SCHEMA = 2

/** Every JSON event carries the schema version and when it happened. */
function envelope(e: Record<string, unknown>): Record<string, unknown> {
  return { ...e, v: EVENT_SCHEMA, ts: new Date().toISOString() }
}

function fail(err: unknown, json: boolean): number {
  const e = err instanceof Error ? err : new Error(String(err))
  const code = (e as { code?: string }).code
  const hint = e instanceof VduseError ? e.hint : undefined
  if (json)
    process.stdout.write(JSON.stringify(envelope({ event: 'error', code, message: e.message, hint })) + '\n')
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
        // One connection per queue where the server allows several (at most 16).
        connections: spec.connections ?? Math.min(cmd.queues, 16),
        ...(spec.hangTimeoutMs === undefined ? {} : { hangTimeoutMs: spec.hangTimeoutMs }),
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
      const options: FileBackendOptions = { readOnly, direct: spec.direct, lock: spec.lock }
      if (spec.size !== undefined) options.size = spec.size
      return FileBackend.open(spec.path, options)
    }
  }
}

async function serveBlk(cmd: BlkCommand, emit: Emit): Promise<number> {
  setLogLevel(cmd.logLevel)
  const backend = await openBackend(cmd, emit)
  let device: BlockDevice
  try {
    const options: Parameters<typeof BlockDevice.create>[0] = {
      name: cmd.name,
      backend,
      queues: cmd.queues,
      queueSize: cmd.queueSize,
      // Unless given, the backend's storage decides (an NBD server's or a disk's block size).
      ...(cmd.blockSize === undefined ? {} : { logicalBlockSize: cmd.blockSize }),
      readOnly: cmd.readOnly,
      replaceStale: cmd.replace,
      recover: cmd.recover,
    }
    if (cmd.serial !== undefined) options.serial = cmd.serial
    options.pollUs = cmd.pollUs
    // With --nbd too: a request past its deadline fails, and its connection is closed (it cannot land later).
    if (cmd.timeoutMs !== undefined) options.requestTimeoutMs = cmd.timeoutMs
    if (cmd.vhostUser !== undefined)
      options.transport = vhostUser(cmd.vhostUser, { connect: cmd.vhostUserConnect ?? false })
    device = await BlockDevice.create(options)
  } catch (err) {
    await backend.close?.()
    throw err
  }
  // At most 10 request-error events a second: a failing backend must not flood the log. What was held
  // back is counted in the next one (`suppressed`) and in the stop event.
  const requestErrors = new EventLimiter(10)
  device.on('requestError', (err) => {
    const { pass, held } = requestErrors.admit()
    if (!pass) return
    const code = (err as { code?: unknown }).code
    emit({
      event: 'request-error',
      name: cmd.name,
      message: err.message,
      ...(typeof code === 'string' ? { code } : {}),
      ...(held > 0 ? { suppressed: held } : {}),
    })
  })
  device.on('error', (err) => emit(deviceError(cmd.name, err)))
  device.on('drained', (info) => emit({ event: 'drained', name: cmd.name, ...info }))
  const onLog = (r: LogRecord): void =>
    emit({ event: 'log', name: cmd.name, level: r.level, message: r.message })
  logs.on('log', onLog)

  let stopping: Promise<number> | undefined
  /** What a stop is waiting for, for a user who signals again. */
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
      try {
        stage = 'the device to detach, its requests in flight to finish, and the backend to flush'
        await device.close()
      } finally {
        stage = 'the backend to close'
        await backend.close?.()
      }
      emit({
        event: 'stopped',
        name: cmd.name,
        signal,
        stats: device.stats,
        counters: device.counters(),
        ...nbdSummary(backend),
        ...(requestErrors.total > 0 ? { requestErrorsSuppressed: requestErrors.total } : {}),
      })
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
    let stopSignal: string | undefined
    onStopSignals({
      first: (sig) => {
        // During a handover the stop waits for its outcome: done, the server exits; refused, it stops.
        if (handing) stopSignal = sig
        else stop(sig).then(resolve, reject)
      },
      second: (sig) => {
        const inFlight = device.counters().inFlight
        emit({ event: 'stopping', name: cmd.name, signal: sig, waitingFor: stage, inFlight })
        process.stderr.write(
          `vduse: still stopping ${cmd.name}: waiting for ${stage} (${inFlight} in flight); ` +
            `${sig} again forces an exit\n`,
        )
      },
      third: (sig) => {
        emit({ event: 'forced', name: cmd.name, signal: sig, inFlight: device.counters().inFlight })
        process.stderr.write(
          `vduse: forced exit: ${cmd.name} is left as it is; \`vduse destroy ${cmd.name}\` removes it\n`,
        )
      },
    })
    // A handover (an upgrade): stop serving but leave the device where it is, for `--recover`. One that
    // is refused (something of this server could still write after the successor) changes nothing: the
    // device keeps serving and a later SIGUSR2 tries again.
    let handing = false
    const handover = (): void => {
      if (stopping || handing) return // a stop, or this very handover, is under way
      handing = true
      const attempt = (async () => {
        try {
          await device.release()
        } finally {
          // Refused (not closed): still serving, the backend stays open.
          if (device.closed) await backend.close?.()
        }
        emit({ event: 'released', name: cmd.name, stats: device.stats, counters: device.counters() })
        return 0
      })()
      attempt.then(resolve, (err: unknown) => {
        if (device.closed) return reject(err)
        handing = false
        const e = err as { message?: string; code?: string; hint?: string }
        emit({
          event: 'handover-refused',
          name: cmd.name,
          message: e.message ?? String(err),
          ...(e.code === undefined ? {} : { code: e.code }),
          ...(e.hint === undefined ? {} : { hint: e.hint }),
        })
        // A stop signal that came while the handover was being decided stops the device now.
        if (stopSignal) stop(stopSignal).then(resolve, reject)
      })
    }
    // `on`, not `once`: a SIGUSR2 during a handover must not fall back to the default action (exit).
    process.on('SIGUSR2', handover)
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
    if (cmd.attach !== 'none' && !device.attached) {
      attaching = device.attach({ driver: cmd.attach, signal: attachAbort.signal })
      path = (await attaching) as string
    }
  } catch (err) {
    // A stop signal aborted the attach: the stop, under way, finishes the device.
    if (stopping) return stopped
    // A failed attach leaves nothing on the bus; should the cleanup still fail, say so.
    await device.close().catch((e: Error) =>
      emit({
        event: 'log',
        name: cmd.name,
        level: 'error',
        message: `cleanup after a failed attach: ${e.message}`,
      }),
    )
    await backend.close?.()
    throw err
  } finally {
    attaching = undefined
  }
  if (stopping) return stopped
  emit({
    event: 'ready',
    name: cmd.name,
    path: path ?? null,
    size: device.size,
    queues: cmd.queues,
    features: device.offeredFeatures,
    ...(device.recovered ? { recovered: true, resubmitted: device.counters().resubmitted } : {}),
    ...nbdSummary(backend),
  })
  return stopped
}

/** With --nbd: whether requests go the native path, and what the client did so far. */
function nbdSummary(backend: BlockBackend): { nbd?: Record<string, unknown> } {
  if (!(backend instanceof NbdBackend)) return {}
  return {
    nbd: {
      native: backend.nativePath,
      connections: backend.connections,
      commandsSent: backend.commandsSent,
      reconnects: backend.reconnects,
      shutdownRetries: backend.shutdownRetries,
      probes: backend.probes,
      hungCut: backend.hungCut,
    },
  }
}

/** One device in `vduse list`. */
interface ListRow {
  name: string
  /** What the device is (from its state file): `blk`, … ; null when it keeps none. */
  type: string | null
  /** Bytes, when the device is attached as a block device here. */
  size: number | null
  queues: number | null
  queueSize: number | null
  /** served: a live process serves it; stale: its server died; recoverable: stale, and `--recover` can take it. */
  state: 'served' | 'stale' | 'recoverable'
  served: boolean
  stale: boolean
  recoverable: boolean
  attached: boolean
  driver: string | null
  /** The node its driver made: /dev/vdX, an interface, or /dev/vhost-vdpa-N. */
  path: string | null
  /** The process serving it (served), or the last one that did (stale). */
  pid: number | null
  backend: string | null
  servings: number | null
}

async function listRows(): Promise<ListRow[]> {
  const rows: ListRow[] = []
  for (const name of listDevices()) {
    let served = false
    try {
      closeSync(openSync(join('/dev/vduse', name), constants.O_RDWR | constants.O_NONBLOCK))
    } catch (err) {
      served = (err as NodeJS.ErrnoException).code === 'EBUSY'
    }
    const attached = await isAttached(name)
    const at = attached ? await currentAttachment(name) : undefined
    // Reading the state file changes nothing, whoever serves the device.
    const state = inspectState(name)
    // Its server died and left a state file naming storage that outlives it: `vduse blk --recover`.
    const recoverable = !served && state !== null && state.backend !== '' && state.kind === 'blk'
    let size: number | null = null
    if (at?.path.startsWith('/dev/vd')) {
      const sectors = Number(await readSysfs(`/sys/block/${at.path.slice(5)}/size`))
      if (Number.isFinite(sectors)) size = sectors * 512
    }
    rows.push({
      name,
      type: state?.kind ?? null,
      size,
      queues: state?.numQueues ?? null,
      queueSize: state?.queueSize ?? null,
      state: served ? 'served' : recoverable ? 'recoverable' : 'stale',
      served,
      stale: !served,
      recoverable,
      attached,
      driver: attached ? ((await boundDriver(name)) ?? null) : null,
      path: at?.path ?? null,
      pid: state?.pid || null,
      backend: state?.backend || null,
      servings: state?.servings ?? null,
    })
  }
  return rows
}

function human(bytes: number | null): string {
  if (bytes === null) return '-'
  const units = ['B', 'K', 'M', 'G', 'T']
  let v = bytes
  let u = 0
  while (v >= 1024 && u < units.length - 1 && v % 1024 === 0) {
    v /= 1024
    u++
  }
  return `${v}${units[u]}`
}

/** `vduse list`: every VDUSE device, whether a live process serves it, and where it is attached. */
async function list(json: boolean): Promise<number> {
  const rows = await listRows()
  if (json) {
    process.stdout.write(JSON.stringify(rows) + '\n')
    return 0
  }
  if (rows.length === 0) {
    process.stdout.write('no VDUSE devices\n')
    return 0
  }
  const table = [
    ['NAME', 'TYPE', 'SIZE', 'QUEUES', 'ATTACHED', 'PID', 'STATE'],
    ...rows.map((r) => [
      r.name,
      r.type ?? '-',
      human(r.size),
      r.queues === null ? '-' : `${r.queues}x${r.queueSize}`,
      r.attached ? (r.path ?? r.driver ?? 'yes (no driver)') : '-',
      r.pid === null ? '-' : String(r.pid),
      r.state,
    ]),
  ]
  const widths = table[0]!.map((_, c) => Math.max(...table.map((row) => row[c]!.length)))
  for (const row of table) {
    process.stdout.write(
      row.map((cell, c) => (c === row.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ') + '\n',
    )
  }
  return 0
}

async function destroy(names: string[], all: boolean): Promise<number> {
  if (all) {
    // Every stale device; the served ones are their servers' business.
    names = (await listRows()).filter((r) => r.stale).map((r) => r.name)
    if (names.length === 0) process.stdout.write('no stale VDUSE devices\n')
  }
  let failed = 0
  for (const name of names) {
    try {
      if (!listDevices().includes(name)) {
        throw new VduseError(`no VDUSE device named "${name}"`, { code: 'ERR_VDUSE_NOT_FOUND' })
      }
      await removeStaleDevice(name)
      process.stdout.write(`destroyed ${name}\n`)
    } catch (err) {
      if (!all) throw err
      failed++
      fail(err, false)
    }
  }
  return failed > 0 ? 1 : 0
}

/** Whether stdout still takes events: a reader that went away (`… --json | head -1`) must not stop the server. */
let stdoutOpen = true
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (!stdoutOpen) return
  stdoutOpen = false
  process.stderr.write(
    `vduse: stdout is closed (${err.code ?? err.message}): events are no longer printed; still serving\n`,
  )
})

function printEvent(e: Record<string, unknown>): void {
  if (!stdoutOpen) return
  try {
    process.stdout.write(JSON.stringify(e) + '\n')
  } catch {
    stdoutOpen = false
  }
}

export async function main(argv: readonly string[]): Promise<number> {
  let json = argv.includes('--json')
  try {
    const cmd = parseCommand(argv)
    switch (cmd.command) {
      case 'help':
        process.stdout.write(helpFor(cmd.topic))
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
        return await destroy(cmd.name === undefined ? [] : [cmd.name], cmd.all)
      case 'blk':
      case 'net':
      case 'fs': {
        json = cmd.json
        const emit: Emit = json
          ? (e) => printEvent(envelope(e))
          : (e) => {
              if (e.event === 'ready')
                process.stderr.write(
                  `vduse: ${String(e.name)} ready at ${String(e.path ?? '(not attached)')}\n`,
                )
              else if (e.event === 'stopped') process.stderr.write(`vduse: ${String(e.name)} stopped\n`)
              else process.stderr.write(`vduse: ${String(e.event)}: ${String(e.message ?? '')}\n`)
            }
        if (cmd.command === 'fs') return await serveFs(cmd, emit)
        return cmd.command === 'blk' ? await serveBlk(cmd, emit) : await serveNet(cmd, emit)
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
