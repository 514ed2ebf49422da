export { VduseError } from './errors'
export type { VduseErrorCode, VduseErrorOptions } from './errors'
export { getApiVersion } from './control'
