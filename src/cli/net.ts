// `vduse net`: virtio-net NICs served by this process — one bridged natively to a kernel tap, or several
// wired to one native in-process switch. Events, signals and exit codes as for `vduse blk`.
import { NetDevice, type NetDeviceOptions } from '../devices/net/net-device'
import { NetSwitch } from '../devices/net/switch'
import { logs, setLogLevel, type LogRecord } from '../log'
import { vhostUser } from '../transport/native'
import type { NetCommand } from './args'
import { onStopSignals } from './signals'
import { deviceError } from './events'

type Emit = (event: Record<string, unknown>) => void

function statsOf(nic: NetDevice, sw: NetSwitch | undefined): Record<string, unknown> {
  return {
    name: nic.name,
    stats: nic.stats,
    counters: nic.counters(),
    ...(nic.tapName === undefined ? {} : { tap: nic.tapCounters() }),
    ...(nic.portCounters() === undefined ? {} : { port: nic.portCounters() }),
    ...(sw === undefined ? {} : { switch: sw.stats }),
  }
}

export async function serveNet(cmd: NetCommand, emit: Emit): Promise<number> {
  setLogLevel(cmd.logLevel)
  const sw = cmd.tap === undefined ? new NetSwitch() : undefined
  const nics: NetDevice[] = []
  const closeAll = async (): Promise<void> => {
    // Detach and destroy every NIC, even if one fails; the first failure is reported.
    const results = await Promise.allSettled(nics.map((n) => n.close()))
    const failed = results.find((r) => r.status === 'rejected')
    if (failed) throw failed.reason
  }
  try {
    for (const [i, name] of cmd.names.entries()) {
      const options: NetDeviceOptions = {
        name,
        offloads: cmd.offloads,
        queueSize: cmd.queueSize,
        replaceStale: cmd.replace,
      }
      if (cmd.tap !== undefined) options.tap = cmd.tap
      if (sw !== undefined) options.switch = sw
      if (cmd.mac !== undefined) options.mac = cmd.mac
      if (cmd.mtu !== undefined) options.mtu = cmd.mtu
      const socket = cmd.vhostUser?.[i]
      if (socket !== undefined)
        options.transport = vhostUser(socket, { connect: cmd.vhostUserConnect ?? false })
      const nic = await NetDevice.create(options)
      nics.push(nic)
      nic.on('error', (err) => emit(deviceError(name, err)))
      nic.on('drained', (info) => emit({ event: 'drained', name, ...info }))
    }
  } catch (err) {
    await closeAll().catch(() => {})
    throw err
  }
  const onLog = (r: LogRecord): void => emit({ event: 'log', level: r.level, message: r.message })
  logs.on('log', onLog)

  let stopping: Promise<number> | undefined
  let stage = ''
  /** A stop signal during an attach aborts it; the stop waits until it has given up. */
  const attachAbort = new AbortController()
  let attaching: Promise<unknown> | undefined
  const stop = (signal: string): Promise<number> => {
    stopping ??= (async () => {
      if (attaching) {
        stage = 'the attach to give up'
        attachAbort.abort()
        await attaching.catch(() => {})
      }
      stage = 'the NICs to detach and be destroyed'
      await closeAll()
      for (const nic of nics) emit({ event: 'stopped', signal, ...statsOf(nic, sw) })
      return 0
    })()
    return stopping
  }
  process.on('SIGUSR1', () => {
    for (const nic of nics) emit({ event: 'stats', ...statsOf(nic, sw) })
  })
  // No handover for NICs: their receive buffers, switch ports and taps live in this process.
  process.on('SIGUSR2', () => {
    for (const nic of nics) {
      emit({
        event: 'handover-refused',
        name: nic.name,
        code: 'ERR_VDUSE_NOT_RECOVERABLE',
        message: `${nic.name} cannot be handed over: a NIC's state lives in this process; still serving`,
        hint: 'stop it (SIGTERM) and start it again',
      })
    }
  })
  const stopped = new Promise<number>((resolve, reject) => {
    onStopSignals({
      first: (sig) => void stop(sig).then(resolve, reject),
      second: (sig) => {
        for (const nic of nics) emit({ event: 'stopping', name: nic.name, signal: sig, waitingFor: stage })
        process.stderr.write(`vduse: still stopping: waiting for ${stage}; ${sig} again forces an exit\n`)
      },
      third: (sig) => {
        for (const nic of nics) emit({ event: 'forced', name: nic.name, signal: sig })
        process.stderr.write('vduse: forced exit: `vduse destroy --all` removes what is left\n')
      },
    })
    for (const nic of nics) {
      nic.on('broken', (err) => {
        emit({ event: 'broken', name: nic.name, code: err.code, message: err.message, hint: err.hint })
        stop('broken').then(
          () => resolve(1),
          () => resolve(1),
        )
      })
    }
  })

  try {
    for (const nic of nics) {
      let path = nic.path
      if (cmd.attach !== 'none') {
        attaching = nic.attach({ driver: cmd.attach, signal: attachAbort.signal })
        path = (await attaching) as string
        attaching = undefined
      }
      if (stopping) return stopped
      emit({
        event: 'ready',
        name: nic.name,
        path: path ?? null,
        mac: nic.mac,
        mtu: nic.mtu,
        features: nic.offeredFeatures,
        ...(nic.tapName === undefined ? {} : { tap: nic.tapName }),
      })
    }
  } catch (err) {
    attaching = undefined
    // A stop signal aborted the attach: the stop, under way, finishes the NICs.
    if (stopping) return stopped
    // A failed attach leaves nothing behind: every NIC of this command goes.
    await closeAll().catch((e: Error) =>
      emit({ event: 'log', level: 'error', message: `cleanup after a failed attach: ${e.message}` }),
    )
    throw err
  }
  return stopped
}
