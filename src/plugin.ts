import { createRequire } from 'node:module'
import { isAbsolute, join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'

import type { BlockBackend } from './backends/backend'
import { VduseError } from './errors'

/** What the CLI hands a backend plugin's factory. */
export interface BackendPluginOptions {
  /** The device's name (`--name`). */
  name: string
  /** `--size` in bytes, when given. */
  size?: number
  /** `--read-only`: offer the device read-only. */
  readOnly: boolean
  /** The arguments after `--` on the command line, for the plugin to parse. */
  args: readonly string[]
}

/**
 * A backend plugin: a module (ES or CommonJS; a file or a package) whose default export is this factory.
 * The device owns what it returns: it calls `close()` (if any) when it stops.
 */
export type BackendFactory = (options: BackendPluginOptions) => BlockBackend | Promise<BlockBackend>

/** Types a plugin's factory (`export default defineBackend((options) => …)`); returns it unchanged. */
export function defineBackend(factory: BackendFactory): BackendFactory {
  return factory
}

function pluginError(spec: string, why: string, hint?: string, cause?: unknown): VduseError {
  return new VduseError(`backend plugin "${spec}": ${why}`, { code: 'ERR_VDUSE_INVALID_CONFIG', hint, cause })
}

/**
 * Loads a backend plugin and calls its factory. `spec` is a path (absolute, or starting with `.`:
 * relative to `cwd`) or a package name resolved from `cwd`, like `node` would.
 */
export async function loadBackendPlugin(
  spec: string,
  options: BackendPluginOptions,
  cwd: string = process.cwd(),
): Promise<BlockBackend> {
  let file: string
  try {
    const isPath = isAbsolute(spec) || spec.startsWith('./') || spec.startsWith('../') || spec === '.'
    file = createRequire(join(cwd, 'noop.js')).resolve(isPath ? resolve(cwd, spec) : spec)
  } catch (err) {
    throw pluginError(spec, 'not found', 'give a path (./my-backend.mjs) or an installed package name', err)
  }
  let mod: { default?: unknown }
  try {
    mod = (await import(pathToFileURL(file).href)) as { default?: unknown }
  } catch (err) {
    throw pluginError(spec, `failed to load: ${(err as Error).message}`, undefined, err)
  }
  // ES modules: the default export. CommonJS: module.exports (or its `default`, as TypeScript emits it).
  let factory = mod.default
  if (typeof factory !== 'function' && typeof (factory as { default?: unknown })?.default === 'function') {
    factory = (factory as { default: unknown }).default
  }
  if (typeof factory !== 'function') {
    throw pluginError(spec, 'its default export is not a function', 'export default (options) => backend')
  }
  let backend: unknown
  try {
    backend = await (factory as BackendFactory)(options)
  } catch (err) {
    if (err instanceof VduseError) throw err
    throw pluginError(spec, `its factory failed: ${(err as Error)?.message ?? String(err)}`, undefined, err)
  }
  const b = backend as Partial<BlockBackend> | null
  if (!b || typeof b.read !== 'function' || typeof b.write !== 'function' || typeof b.size !== 'number') {
    throw pluginError(spec, 'its factory did not return a backend (size, read(), write())')
  }
  return b as BlockBackend
}
