import { createRequire } from 'node:module'
import { isAbsolute, join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'

import type { BlockBackend } from './backends/backend'
import type { FileSystem } from './devices/fs/filesystem'
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
 * Loads a plugin module and returns its default export, which must be a function. `spec` is a path
 * (absolute, or starting with `.`: relative to `cwd`) or a package name resolved from `cwd`, like `node`
 * would.
 */
async function loadFactory(spec: string, cwd: string): Promise<(options: never) => unknown> {
  let file: string
  try {
    const isPath = isAbsolute(spec) || spec.startsWith('./') || spec.startsWith('../') || spec === '.'
    file = createRequire(join(cwd, 'noop.js')).resolve(isPath ? resolve(cwd, spec) : spec)
  } catch (err) {
    throw pluginError(spec, 'not found', 'give a path (./my-plugin.mjs) or an installed package name', err)
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
    throw pluginError(spec, 'its default export is not a function', 'export default (options) => …')
  }
  return factory as (options: never) => unknown
}

/** Calls a plugin's factory; its failure becomes a plugin error (a VduseError passes as it is). */
async function produce<O, T>(spec: string, factory: (options: O) => T | Promise<T>, options: O): Promise<T> {
  try {
    return await factory(options)
  } catch (err) {
    if (err instanceof VduseError) throw err
    throw pluginError(spec, `its factory failed: ${(err as Error)?.message ?? String(err)}`, undefined, err)
  }
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
  const factory = (await loadFactory(spec, cwd)) as BackendFactory
  const b = (await produce(spec, factory, options)) as Partial<BlockBackend> | null
  if (!b || typeof b.read !== 'function' || typeof b.write !== 'function' || typeof b.size !== 'number') {
    throw pluginError(spec, 'its factory did not return a backend (size, read(), write())')
  }
  return b as BlockBackend
}

/** What the CLI hands a file-system plugin's factory (`vduse fs --backend MODULE`). */
export interface FsPluginOptions {
  /** The device's name (`--name`). */
  name: string
  /** The mount tag (`--tag`). */
  tag: string
  /** `--read-only`: the device refuses changes. */
  readOnly: boolean
  /** The arguments after `--` on the command line, for the plugin to parse. */
  args: readonly string[]
}

/** A file-system plugin: a module whose default export is this factory. */
export type FsFactory = (options: FsPluginOptions) => FileSystem | Promise<FileSystem>

/** Types a file-system plugin's factory (`export default defineFileSystem((options) => …)`). */
export function defineFileSystem(factory: FsFactory): FsFactory {
  return factory
}

/** Loads a file-system plugin and calls its factory (`spec` as for `loadBackendPlugin`). */
export async function loadFsPlugin(
  spec: string,
  options: FsPluginOptions,
  cwd: string = process.cwd(),
): Promise<FileSystem> {
  const factory = (await loadFactory(spec, cwd)) as FsFactory
  const fs = (await produce(spec, factory, options)) as Partial<FileSystem> | null
  const methods = ['lookup', 'getattr', 'readdir', 'read'] as const
  if (!fs || methods.some((m) => typeof fs[m] !== 'function')) {
    throw pluginError(
      spec,
      'its factory did not return a file system (lookup(), getattr(), readdir(), read())',
    )
  }
  return fs as FileSystem
}
