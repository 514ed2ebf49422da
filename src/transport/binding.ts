// The generated napi-rs loader at the package root (index.js) picks the prebuilt `.node` for this platform.
// Everything native goes through this one module, so the rest of the library never touches the loader.
//
// Loaded on first use, not on import: device models, backends and the in-process transport work on any
// OS and architecture, without the native binary (tests of a model on a laptop, say).
import type * as Binding from '../../index'

let loaded: typeof Binding | undefined

function load(): typeof Binding {
  loaded ??= require('../../index') as typeof Binding
  return loaded
}

/** The native binding, loaded when a member is first used. */
export const binding: typeof Binding = new Proxy({} as typeof Binding, {
  get: (_target, key) => Reflect.get(load(), key),
  has: (_target, key) => Reflect.has(load(), key),
})
