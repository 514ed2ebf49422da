/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/**
 * Polls `done` every `everyMs` until it holds or `deadline` (a `Date.now()` time) passes; whether it
 * held. For conditions no event announces (native I/O going quiet, calls returning): never blocks.
 */
export async function waitFor(done: () => boolean, deadline: number, everyMs = 5): Promise<boolean> {
  while (!done()) {
    if (Date.now() >= deadline) return false
    await sleep(everyMs)
  }
  return true
}
