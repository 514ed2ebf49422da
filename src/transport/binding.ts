// The generated napi-rs loader at the package root (index.js) picks the prebuilt `.node` for this platform.
// Everything native goes through this one module, so the rest of the library never touches the loader.
import * as binding from '../../index'

export { binding }
