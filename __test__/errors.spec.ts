import test from 'ava'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { ERROR_CODES, getApiVersion, VduseError } from '../src'
import { fromNativeError } from '../src/errors'
import { binding } from '../src/transport/binding'

test('a missing control node is ERR_VDUSE_UNAVAILABLE with a modprobe hint', (t) => {
  const err = t.throws(() => getApiVersion({ controlPath: '/nonexistent/vduse/control' }), {
    instanceOf: VduseError,
  })
  t.is(err?.code, 'ERR_VDUSE_UNAVAILABLE')
  t.is(err?.errno, -2)
  t.is(err?.syscall, 'open')
  t.regex(err?.hint ?? '', /modprobe vduse/)
  t.regex(err?.message ?? '', /\/nonexistent\/vduse\/control/)
})

test('a node that is not VDUSE fails the ioctl with errno and syscall', (t) => {
  const file = join(mkdtempSync(join(tmpdir(), 'vduse-test-')), 'control')
  writeFileSync(file, '')
  const err = t.throws(() => getApiVersion({ controlPath: file }), { instanceOf: VduseError })
  t.is(err?.code, 'ERR_VDUSE_SYSCALL')
  t.is(err?.errno, -25) // ENOTTY, negative as in Node
  t.is(err?.syscall, 'ioctl(VDUSE_GET_API_VERSION)')
})

test('native errors with unknown codes pass through untouched', (t) => {
  const plain = new Error('boom')
  t.is(fromNativeError(plain), plain)
  const other = Object.assign(new Error('x'), { code: 'ERR_SOMETHING_ELSE' })
  t.is(fromNativeError(other), other)
  t.is(fromNativeError('a string'), 'a string')
})

test('the binding throws structured errors: properties, a plain message', (t) => {
  const err = t.throws(() => binding.getApiVersion('/nonexistent/vduse/control')) as Error &
    Record<string, unknown>
  t.false(err instanceof VduseError) // the raw binding; the public API wraps it
  t.is(err.code, 'ERR_VDUSE_UNAVAILABLE')
  t.is(err.errno, -2)
  t.is(err.syscall, 'open')
  t.regex(String(err.hint), /modprobe vduse/)
  t.notRegex(err.message, /^\{/)
  t.regex(err.message, /\/nonexistent\/vduse\/control/)
})

test('async native work rejects with the same structured errors', async (t) => {
  const err = (await t.throwsAsync(binding.fallocate(-1, 0, 0, 4096))) as Error & Record<string, unknown>
  t.is(err.code, 'ERR_VDUSE_SYSCALL')
  t.is(err.errno, -9) // EBADF
  t.is(err.syscall, 'fallocate')
  t.notRegex(err.message, /^\{/)
})

test('a native error keeps its message', (t) => {
  const err = fromNativeError(Object.assign(new Error('plain text'), { code: 'ERR_VDUSE_BUSY' }))
  t.true(err instanceof VduseError)
  t.is((err as VduseError).message, 'plain text')
  t.is((err as VduseError).code, 'ERR_VDUSE_BUSY')
})

test('every code the Rust side can raise is a documented VduseError code', (t) => {
  const rust = ['crates/vduse-core/src/error.rs', 'crates/vduse-node/src/error.rs']
    .map((f) => readFileSync(join(__dirname, '..', f), 'utf8'))
    .join('\n')
  const raised = new Set(rust.match(/ERR_VDUSE_[A-Z_]+/g))
  t.true(raised.size >= 10)
  const readme = readFileSync(join(__dirname, '..', 'README.md'), 'utf8')
  for (const code of raised) {
    t.true((ERROR_CODES as readonly string[]).includes(code), `${code} is missing from ERROR_CODES`)
    const wrapped = fromNativeError(Object.assign(new Error('{}'), { code }))
    t.true(wrapped instanceof VduseError, `${code} is not turned into a VduseError`)
  }
  for (const code of ERROR_CODES) t.true(readme.includes(code), `${code} is not in the README's table`)
})
