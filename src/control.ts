import { native } from './errors'
import { binding } from './transport/binding'

/**
 * The VDUSE API version the kernel speaks (0 on Linux 6.12).
 *
 * @throws {VduseError} `ERR_VDUSE_UNAVAILABLE` when `/dev/vduse/control` is missing (load the module with
 *   `modprobe vduse`), `ERR_VDUSE_PERMISSION` when this process may not open it.
 */
export function getApiVersion(options: { controlPath?: string } = {}): number {
  return native(() => binding.getApiVersion(options.controlPath))
}
