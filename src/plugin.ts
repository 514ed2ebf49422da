import { existsSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, isAbsolute, join, resolve } from 'node:path'
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
 * A device never closes its backend: the CLI closes what the factory returned once the device is gone
 * (through the API, close it yourself after the device).
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
 * Resolves a package name (with an optional subpath) from `cwd` as `import` would: through node_modules
 * upwards, and the package's `exports` with the `import` and `node` conditions — so a package that
 * exports only an ES module is found, and a dual package gives its ES build. Packages without `exports`
 * resolve as they always did (`main`, `index.js`).
 */
function resolvePackage(spec: string, cwd: string): string {
  const parts = spec.split('/')
  const nameParts = spec.startsWith('@') ? 2 : 1
  const name = parts.slice(0, nameParts).join('/')
  const subpath = parts.length > nameParts ? `./${parts.slice(nameParts).join('/')}` : '.'
  for (let dir = resolve(cwd); ; dir = dirname(dir)) {
    const root = join(dir, 'node_modules', name)
    const manifest = join(root, 'package.json')
    if (existsSync(manifest)) {
      const pkg = JSON.parse(readFileSync(manifest, 'utf8')) as { exports?: unknown; name?: string }
      if (pkg.exports !== undefined) {
        const target = exportTarget(pkg.exports, subpath)
        if (target === undefined) throw new Error(`${name} exports nothing for ${subpath} to import`)
        return join(root, target)
      }
      return createRequire(join(root, 'noop.js')).resolve(subpath === '.' ? root : join(root, subpath))
    }
    if (dir === dirname(dir)) break
  }
  throw new Error(`no package ${name} in node_modules from ${cwd} upwards`)
}

/** The conditions `import` matches, in Node's order of preference. */
const IMPORT_CONDITIONS = new Set(['node', 'import', 'default'])

/**
 * What a package's `exports` gives `import` for `subpath` (`.` or `./x`): exact keys, then `*` patterns
 * (the longest prefix wins), then conditions (`import`, `node`, `default`, in the map's order) and
 * fallback arrays — the rules of Node's ESM resolver, for what a plugin needs.
 */
function exportTarget(exports: unknown, subpath: string): string | undefined {
  const isSubpathMap =
    typeof exports === 'object' &&
    exports !== null &&
    !Array.isArray(exports) &&
    Object.keys(exports).every((k) => k.startsWith('.'))
  if (!isSubpathMap) return subpath === '.' ? conditional(exports, undefined) : undefined
  const map = exports as Record<string, unknown>
  if (Object.hasOwn(map, subpath) && !subpath.includes('*')) return conditional(map[subpath], undefined)
  let best: { key: string; match: string } | undefined
  for (const key of Object.keys(map)) {
    const star = key.indexOf('*')
    if (star < 0 || key.indexOf('*', star + 1) >= 0) continue
    const [prefix, suffix] = [key.slice(0, star), key.slice(star + 1)]
    if (subpath.startsWith(prefix) && subpath.endsWith(suffix) && subpath.length >= key.length - 1) {
      if (!best || prefix.length > best.key.indexOf('*')) {
        best = { key, match: subpath.slice(prefix.length, subpath.length - suffix.length) }
      }
    }
  }
  return best ? conditional(map[best.key], best.match) : undefined
}

/** A target through conditions and fallbacks; `null` (excluded) and unknown conditions give nothing. */
function conditional(target: unknown, match: string | undefined): string | undefined {
  if (typeof target === 'string') {
    if (!target.startsWith('./')) return undefined
    return match === undefined ? target : target.replaceAll('*', match)
  }
  if (Array.isArray(target)) {
    for (const t of target) {
      const found = conditional(t, match)
      if (found !== undefined) return found
    }
    return undefined
  }
  if (typeof target === 'object' && target !== null) {
    for (const [condition, t] of Object.entries(target)) {
      if (IMPORT_CONDITIONS.has(condition)) return conditional(t, match)
    }
  }
  return undefined
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
    file = isPath
      ? createRequire(join(cwd, 'noop.js')).resolve(resolve(cwd, spec))
      : resolvePackage(spec, cwd)
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
