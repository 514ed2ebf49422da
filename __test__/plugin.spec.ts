// Backend plugins: modules whose default export is a factory, loaded by path or by package name.
import test from 'ava'
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

import { BlockDevice, InProcessTransport, loadBackendPlugin, type VduseError } from '../src'
import { BlkDriver } from './helpers/blk-driver'

const EXAMPLE = resolve(__dirname, '../examples/plugin-backend')
const options = { name: 'p', size: 1 << 20, readOnly: false, args: ['--label', 'abc'] }

test('the example plugin loads by path and serves: unwritten blocks read as its label', async (t) => {
  const backend = await loadBackendPlugin('./examples/plugin-backend', options, resolve(__dirname, '..'))
  t.is(backend.size, 1 << 20)
  const transport = new InProcessTransport()
  const device = await BlockDevice.create({ name: 'plugin0', backend, transport })
  device.unref()
  transport.start()
  const driver = new BlkDriver(transport)
  const first = await driver.read(0, 4096)
  t.is(first.data.toString('latin1', 0, 9), 'abcabcabc')
  // A write across a block boundary reads back; its neighbours keep the pattern.
  const data = Buffer.alloc(8192, 0x5a)
  t.is((await driver.write(4, data)).status, 0)
  const back = await driver.read(0, 16384)
  t.true(back.data.subarray(2048, 2048 + 8192).equals(data))
  t.is(back.data.toString('latin1', 0, 6), 'abcabc')
  t.is(
    back.data.toString('latin1', 10240, 10243),
    first.data.toString('latin1', 10240 % 4096, (10240 % 4096) + 3),
  )
  await device.close()
})

test('a plugin installed as a package loads by name, resolved from the working directory', async (t) => {
  const project = mkdtempSync(join(tmpdir(), 'vduse-plugin-'))
  mkdirSync(join(project, 'node_modules'))
  symlinkSync(EXAMPLE, join(project, 'node_modules', 'vduse-example-pattern-disk'))
  const backend = await loadBackendPlugin('vduse-example-pattern-disk', options, project)
  t.is(backend.size, 1 << 20)
})

test('CommonJS plugins work; broken ones get a typed error that names the problem', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-plugin-'))
  const write = (name: string, text: string): string => {
    writeFileSync(join(dir, name), text)
    return `./${name}`
  }
  const body = `(o) => ({ size: o.size, read() {}, write() {} })`
  t.is((await loadBackendPlugin(write('a.cjs', `module.exports = ${body}`), options, dir)).size, 1 << 20)
  t.is((await loadBackendPlugin(write('b.cjs', `exports.default = ${body}`), options, dir)).size, 1 << 20)
  const cases: Array<[string, RegExp]> = [
    ['./missing.mjs', /not found/],
    [write('c.mjs', 'export default 42'), /default export is not a function/],
    [write('d.mjs', 'export default () => { throw new Error("no size") }'), /factory failed: no size/],
    [write('e.mjs', 'export default () => ({ size: 1 })'), /did not return a backend/],
    [write('f.mjs', 'export default syntax error'), /failed to load/],
  ]
  for (const [spec, message] of cases) {
    const err = await t.throwsAsync<VduseError>(loadBackendPlugin(spec, options, dir))
    t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG', spec)
    t.regex(err!.message, message)
  }
})

test('packages resolve as import would: an exports map with only `import`, and a dual package gives its ES build', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-exports-'))
  const pkg = (name: string, manifest: object, files: Record<string, string>) => {
    const root = join(dir, 'node_modules', name)
    mkdirSync(root, { recursive: true })
    writeFileSync(join(root, 'package.json'), JSON.stringify({ name, ...manifest }))
    for (const [f, text] of Object.entries(files)) writeFileSync(join(root, f), text)
  }
  const backend = (label: string) =>
    `export default () => ({ size: 4096, label: '${label}', read() {}, write() {} })`
  pkg('import-only', { exports: { '.': { import: './index.mjs' } } }, { 'index.mjs': backend('esm') })
  pkg(
    'dual',
    { main: './index.cjs', exports: { import: './index.mjs', require: './index.cjs' } },
    {
      'index.mjs': backend('esm'),
      'index.cjs': "module.exports = () => ({ size: 4096, label: 'cjs', read() {}, write() {} })",
    },
  )
  pkg('@scope/sub', { exports: { './extra': { import: './extra.mjs' } } }, { 'extra.mjs': backend('sub') })
  const label = async (spec: string) =>
    ((await loadBackendPlugin(spec, options, join(dir, 'deeper'))) as unknown as { label: string }).label
  mkdirSync(join(dir, 'deeper'))
  t.is(await label('import-only'), 'esm')
  t.is(await label('dual'), 'esm', 'the ES build, as import would pick')
  t.is(await label('@scope/sub/extra'), 'sub')
  const err = await t.throwsAsync<VduseError>(loadBackendPlugin('@scope/sub', options, dir))
  t.is(err?.code, 'ERR_VDUSE_INVALID_CONFIG')
  t.regex(err!.message, /not found/)
})

test('exports maps: patterns, nested conditions, fallbacks, null exclusions', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-exports2-'))
  const root = join(dir, 'node_modules', 'pat')
  mkdirSync(join(root, 'lib'), { recursive: true })
  const exportsMap = {
    './plugins/*': { node: { require: './lib/*.cjs', import: './lib/*.mjs' } },
    './plugins/secret': null,
    './fallback': [{ worker: './nope.mjs' }, './lib/fb.mjs'],
  }
  writeFileSync(join(root, 'package.json'), JSON.stringify({ name: 'pat', exports: exportsMap }))
  const backend = (label: string) =>
    `export default () => ({ size: 4096, label: '${label}', read() {}, write() {} })`
  writeFileSync(join(root, 'lib', 'a.mjs'), backend('a'))
  writeFileSync(join(root, 'lib', 'secret.mjs'), backend('secret'))
  writeFileSync(join(root, 'lib', 'fb.mjs'), backend('fb'))
  const label = async (spec: string) =>
    ((await loadBackendPlugin(spec, options, dir)) as unknown as { label: string }).label
  t.is(await label('pat/plugins/a'), 'a')
  t.is(await label('pat/fallback'), 'fb')
  await t.throwsAsync(loadBackendPlugin('pat/plugins/secret', options, dir), { message: /not found/ })
  await t.throwsAsync(loadBackendPlugin('pat', options, dir), { message: /not found/ })
})
