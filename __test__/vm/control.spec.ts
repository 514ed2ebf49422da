import test from 'ava'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { getApiVersion, VduseError } from '../../src'
import { assertInGuest, execFileAsync, loadedModules, modprobe } from './guest'

const execFileP = promisify(execFile)

test.before(() => assertInGuest())

test('the kernel speaks VDUSE API version 0 through our native call', (t) => {
  t.is(getApiVersion(), 0)
})

test('an unprivileged process gets ERR_VDUSE_PERMISSION', async (t) => {
  const probe = [
    `const { getApiVersion } = require(${JSON.stringify(join(__dirname, '../../src'))});`,
    'try { getApiVersion(); console.log(JSON.stringify({ ok: true })) }',
    'catch (e) { console.log(JSON.stringify({ code: e.code, errno: e.errno, hint: e.hint })) }',
  ].join('\n')
  const { stdout } = await execFileP(
    'setpriv',
    ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--import=tsx', '-e', probe],
    { env: { ...process.env, HOME: '/tmp' } },
  )
  const result = JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as {
    code?: string
    errno?: number
    hint?: string
  }
  t.is(result.code, 'ERR_VDUSE_PERMISSION')
  t.is(result.errno, -13)
  t.regex(result.hint ?? '', /root|access/)
})

test('without the vduse module the call fails with ERR_VDUSE_UNAVAILABLE, and works once it is loaded', async (t) => {
  t.true((await loadedModules()).has('vduse'), 'the guest boots with vduse loaded')
  await execFileAsync('rmmod', ['vduse'])
  try {
    const err = t.throws(() => getApiVersion(), { instanceOf: VduseError })
    t.is(err?.code, 'ERR_VDUSE_UNAVAILABLE')
    t.regex(err?.hint ?? '', /modprobe vduse/)
  } finally {
    await modprobe('vduse')
  }
  t.is(getApiVersion(), 0)
})
