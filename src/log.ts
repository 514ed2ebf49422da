import { EventEmitter } from 'node:events'
import { debuglog } from 'node:util'

import { binding } from './transport/binding'

/** One record of the native side's log (a device broken, chains refused, requests fenced). */
export interface LogRecord {
  level: 'error' | 'warn' | 'info' | 'debug' | 'trace'
  /** The Rust module that logged it. */
  target: string
  message: string
  /** Records dropped by the rate limit just before this one. */
  dropped: number
}

export type LogLevel = LogRecord['level'] | 'off'

/**
 * The native side's log records, process-wide: `logs.on('log', (record) => …)`. Without a listener,
 * warnings and errors are printed with `process.emitWarning`; `NODE_DEBUG=vduse` prints everything.
 */
export const logs = new EventEmitter<{ log: [record: LogRecord] }>()

const debug = debuglog('vduse')
let installed = false
let level: LogLevel = 'info'

/** How verbose the native log is (default `info`). */
export function setLogLevel(next: LogLevel): void {
  level = next
  if (installed) binding.setLogSink(sink, level)
}

function sink(raw: { level: string; target: string; message: string; dropped: number }): void {
  const record = raw as LogRecord
  if (record.dropped > 0) debug('(%d log records dropped by the rate limit)', record.dropped)
  debug('%s %s: %s', record.level, record.target, record.message)
  if (logs.listenerCount('log') > 0) logs.emit('log', record)
  else if (record.level === 'error' || record.level === 'warn') {
    process.emitWarning(record.message, { code: 'VDUSE_NATIVE', detail: record.target })
  }
}

/** Routes native log records here (once, when the first device is created). */
export function installLogSink(): void {
  if (installed) return
  installed = true
  binding.setLogSink(sink, level)
}
