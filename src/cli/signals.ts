// The stop signals every serving command answers the same way.

/**
 * SIGINT, SIGTERM and SIGHUP: the first stops gracefully (`first`), a second says what the stop is
 * waiting for (`second`), a third forces an exit with 130 after `third` has said so.
 */
export function onStopSignals(handlers: {
  first(sig: NodeJS.Signals): void
  second(sig: NodeJS.Signals): void
  third(sig: NodeJS.Signals): void
}): void {
  let signals = 0
  const onSignal = (sig: NodeJS.Signals): void => {
    signals++
    if (signals === 1) return handlers.first(sig)
    if (signals === 2) return handlers.second(sig)
    handlers.third(sig)
    process.exit(130)
  }
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal)
}
