// What `npm run demo` runs inside the test guest: the kernel's VDUSE control node answering our native code.
import { release } from 'node:os'

import { getApiVersion } from '../src'

const version = getApiVersion()
console.log(`kernel ${release()}: /dev/vduse/control speaks VDUSE API version ${version}`)
