// What a user gets from npm: `npm pack` output installs into an empty project and its CLI runs there.
// Packs the root package and this platform's native package (npm/<platform> plus the built .node), installs
// both tarballs offline into a fresh `npm init -y` project and uses them only through that project.
import test from 'ava'
import { execFile } from 'node:child_process'
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const ROOT = join(__dirname, '..')
const PKG = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
  name: string
  version: string
  napi: { binaryName: string; packageName: string }
}
const EXPORTS = ['BlockDevice', 'MemoryBackend', 'InProcessTransport', 'VduseError']

/** This machine's napi-rs platform (`linux-x64-gnu`, …), if it is one the package ships a binary for. */
function platform(): string | undefined {
  if (process.platform !== 'linux' || (process.arch !== 'x64' && process.arch !== 'arm64')) return undefined
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return `linux-${process.arch}-${report?.header?.glibcVersionRuntime ? 'gnu' : 'musl'}`
}
const PLATFORM = platform()
const BINARY = PLATFORM && `${PKG.napi.binaryName}.${PLATFORM}.node`
const skipReason = !PLATFORM
  ? `no prebuilt binary for ${process.platform}-${process.arch}`
  : !existsSync(join(ROOT, 'npm', PLATFORM, 'package.json'))
    ? `no npm/${PLATFORM} package`
    : !existsSync(join(ROOT, BINARY!))
      ? `${BINARY} is not built`
      : undefined

// The children must not see this process's npm context: `npx ava` exports npm_config_local_prefix (the
// repo), so an `npm install` in the empty project would otherwise install into the repo. Nor tsx
// (NODE_OPTIONS) or a loader override: the installed package runs in plain Node and finds its own binary.
const ENV: NodeJS.ProcessEnv = {}
for (const [k, v] of Object.entries(process.env)) {
  if (!/^(npm_|NODE_OPTIONS$|INIT_CWD$|NAPI_RS_)/i.test(k)) ENV[k] = v
}
Object.assign(ENV, { npm_config_update_notifier: 'false', npm_config_loglevel: 'warn' })

interface Run {
  code: number
  stdout: string
  stderr: string
}

function sh(cmd: string, args: string[], cwd: string): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd, env: ENV, timeout: 45_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0
      resolve({
        code,
        stdout,
        stderr: err && typeof err.code !== 'number' ? `${stderr}\n${err.message}` : stderr,
      })
    })
  })
}

/** Runs a command that must succeed; a failure reports its exit code, stdout and stderr. */
async function ok(cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await sh(cmd, args, cwd)
  if (r.code !== 0) {
    throw new Error(
      `\`${cmd} ${args.join(' ')}\` in ${cwd} exited ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`,
    )
  }
  return r.stdout
}

interface PackResult {
  name: string
  version: string
  filename: string
  files: Array<{ path: string }>
}

async function pack(dir: string, dest: string, dryRun = false): Promise<PackResult> {
  const args = ['pack', '--json', '--pack-destination', dest, ...(dryRun ? ['--dry-run'] : [])]
  const out = await ok('npm', args, dir)
  return (JSON.parse(out) as PackResult[])[0]!
}

const tmp = mkdtempSync(join(tmpdir(), 'vduse-pack-'))
test.after.always(() => rmSync(tmp, { recursive: true, force: true }))
// An empty npm cache of its own: the install below must work from the two tarballs alone.
ENV.npm_config_cache = join(tmp, 'npm-cache')

test.before(() => {
  if (!existsSync(join(ROOT, 'dist/index.js')))
    throw new Error('dist/ is missing: run `npm run build:ts` before this spec (scripts/test builds first)')
})

test('the root tarball holds the library, CLI, loader, types, README and licenses, and nothing else', async (t) => {
  const dry = await pack(ROOT, tmp, true)
  const files = dry.files.map((f) => f.path).sort()
  t.is(dry.name, PKG.name)
  t.is(dry.version, PKG.version)
  for (const f of [
    'package.json',
    'README.md',
    'LICENSE-MIT',
    'LICENSE-APACHE',
    'index.js',
    'index.d.ts',
    'bin/vduse.js',
    'dist/index.js',
    'dist/index.d.ts',
    'dist/cli/main.js',
    'dist/transport/binding.js',
  ])
    t.true(files.includes(f), `${f} is in the tarball`)
  t.deepEqual(
    files.filter((f) => !/^(dist|bin)\//.test(f) && !f.endsWith('.md') && !f.startsWith('LICENSE')),
    ['index.d.ts', 'index.js', 'package.json'],
    'nothing at the top level but the loader and its types',
  )
  t.deepEqual(
    files.filter((f) => /\.node$|__test__|\.spec\.|^(src|crates|scripts|npm|target)\//.test(f)),
    [],
    'no binaries, tests or sources',
  )
  // Every compiled module has its declarations next to it (the `types` entry points into them).
  for (const js of files.filter((f) => f.startsWith('dist/') && f.endsWith('.js')))
    t.true(files.includes(js.replace(/\.js$/, '.d.ts')), `${js} has a .d.ts`)
})

const install = skipReason ? test.skip : test.serial
const title = `the packed tarballs install offline into an empty project, whose CLI and API work${skipReason ? ` (skipped: ${skipReason})` : ''}`

install(title, async (t) => {
  const nativeName = `${PKG.napi.packageName}-${PLATFORM!}`

  // The root package as npm would publish it (`napi prepublish` adds its optionalDependencies only then).
  const root = await pack(ROOT, tmp)
  t.is(root.name, PKG.name)
  t.false(
    root.files.some((f) => f.path.endsWith('.node')),
    'the root tarball has no native binary',
  )

  // This platform's package, staged as the release workflow fills it: npm/<platform> plus the built binary.
  const stage = join(tmp, 'stage')
  cpSync(join(ROOT, 'npm', PLATFORM!), stage, { recursive: true })
  cpSync(join(ROOT, BINARY!), join(stage, BINARY!))
  const native = await pack(stage, tmp)
  t.is(native.name, nativeName)
  t.is(native.version, PKG.version, 'the platform package has the root version')
  t.deepEqual(native.files.map((f) => f.path).sort(), [BINARY!, 'README.md', 'package.json'].sort())

  // An empty project. --offline works: the root package has no dependencies (its optionalDependencies are
  // added by `napi prepublish` at publish time), so npm needs no registry metadata for two local tarballs.
  const app = join(tmp, 'app')
  mkdirSync(app)
  await ok('npm', ['init', '-y'], app)
  await ok(
    'npm',
    ['install', '--offline', '--no-audit', '--no-fund', join(tmp, root.filename), join(tmp, native.filename)],
    app,
  )
  t.false(existsSync(join(app, 'node_modules/vduse', BINARY!)), 'no binary next to the installed loader')

  // `npx --no -- vduse`: --no never fetches a `vduse` from the registry; `--` keeps npm from taking
  // `--version` and `--help` for itself (`npx --no vduse --version` prints npm's version).
  const npx = (...args: string[]) => sh('npx', ['--no', '--', 'vduse', ...args], app)
  const version = await npx('--version')
  t.is(version.code, 0, version.stderr)
  t.is(version.stdout.trim(), PKG.version)
  const help = await npx('--help')
  t.is(help.code, 0, help.stderr)
  t.regex(help.stdout, /vduse blk --name NAME/)

  // `list` loads the native binding (from the platform package: the loader has no file next to it). Without
  // /dev/vduse there are no devices, which is not an error.
  const list = await npx('list', '--json')
  t.is(list.code, 0, list.stderr)
  t.true(Array.isArray(JSON.parse(list.stdout)), list.stdout)

  // Serving needs /dev/vduse/control: the CLI fails with the typed code, as JSON and on stderr (exit 1).
  if (existsSync('/dev/vduse/control')) {
    t.log('/dev/vduse/control exists: not checking ERR_VDUSE_UNAVAILABLE')
  } else {
    const blk = await npx('blk', '--name', 'vduse-pack-test', '--memory', '1M', '--json')
    t.is(blk.code, 1, blk.stderr)
    const event = JSON.parse(blk.stdout.trim().split('\n').pop()!) as { hint?: string }
    t.like(event, { event: 'error', code: 'ERR_VDUSE_UNAVAILABLE' })
    t.regex(event.hint ?? '', /modprobe vduse/, 'the error says what to do')
    t.regex(blk.stderr, /^vduse: .*\/dev\/vduse\/control.*\(ERR_VDUSE_UNAVAILABLE\)/m)
  }

  // CommonJS and ESM (named imports through Node's CJS export detection) see the same public API; the
  // binding comes from the platform package.
  const names = JSON.stringify(EXPORTS)
  const cjs = await ok(
    'node',
    [
      '-e',
      `const m = require('vduse')
       const missing = ${names}.filter((k) => typeof m[k] !== 'function')
       if (missing.length) throw new Error('missing: ' + missing)
       try { m.getApiVersion({ controlPath: '/nonexistent/vduse-control' }); throw new Error('no error') }
       catch (e) { if (!(e instanceof m.VduseError) || e.code !== 'ERR_VDUSE_UNAVAILABLE') throw e }
       console.log(require.resolve('${nativeName}'))`,
    ],
    app,
  )
  t.is(cjs.trim(), join(app, 'node_modules', nativeName, BINARY!))
  const esm = await ok(
    'node',
    [
      '--input-type=module',
      '-e',
      `import { ${EXPORTS.join(', ')} } from 'vduse'
       const m = await import('vduse')
       for (const k of ${names}) if (typeof m[k] !== 'function' || m[k] !== m.default[k]) throw new Error(k)
       console.log(typeof BlockDevice, typeof MemoryBackend, typeof InProcessTransport, typeof VduseError)`,
    ],
    app,
  )
  t.is(esm.trim(), 'function function function function')

  // A virtio-blk device on a RAM disk, driven in-process through the public API only: no kernel, and the
  // native binding is never loaded.
  writeFileSync(
    join(app, 'in-process.cjs'),
    `const assert = require('node:assert/strict')
const { BlockDevice, MemoryBackend, InProcessTransport, BLK_REQUEST, BLK_STATUS } = require('vduse')

const header = (type, sector) => {
  const h = Buffer.alloc(16)
  h.writeUInt32LE(type, 0)
  h.writeBigUInt64LE(BigInt(sector), 8)
  return h
}

async function main() {
  const backend = new MemoryBackend(1 << 20)
  const transport = new InProcessTransport()
  const device = await BlockDevice.create({ name: 'pack0', backend, transport })
  transport.start()
  assert.equal(transport.config.readBigUInt64LE(0), BigInt((1 << 20) / 512), 'capacity in sectors')
  const data = Buffer.alloc(4096)
  for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff
  const w = await transport.request([header(BLK_REQUEST.OUT, 8), data], [1])
  assert.equal(w.writable[0][0], BLK_STATUS.OK)
  assert.deepEqual(backend.contents.subarray(8 * 512, 8 * 512 + 4096), data)
  const r = await transport.request([header(BLK_REQUEST.IN, 8)], [4096, 1])
  assert.equal(r.writable[1][0], BLK_STATUS.OK)
  assert.deepEqual(r.writable[0], data)
  await device.close()
  const loaded = Object.keys(require.cache).filter((k) => k.endsWith('.node'))
  assert.deepEqual(loaded, [], 'no native addon loaded')
  console.log('in-process ok')
}
main().catch((err) => {
  console.error(err)
  process.exit(1)
})
`,
  )
  t.is((await ok('node', ['in-process.cjs'], app)).trim(), 'in-process ok')

  // The published types resolve and type-check under strict NodeNext, from CommonJS and from ESM. The
  // declarations use Node's types, which a TypeScript user of the package has installed.
  const types = `import { BlockDevice, InProcessTransport, MemoryBackend, VduseError, type VduseErrorCode } from 'vduse'
const transport: InProcessTransport = new InProcessTransport()
const code: VduseErrorCode = 'ERR_VDUSE_UNAVAILABLE'
export async function f(): Promise<string[]> {
  const d = await BlockDevice.create({ name: 'x', backend: new MemoryBackend(4096), transport })
  const e = new VduseError('m', { code })
  return [...d.offeredFeatures, e.code]
}
`
  writeFileSync(join(app, 'types-cjs.ts'), types)
  writeFileSync(join(app, 'types-esm.mts'), types)
  mkdirSync(join(app, 'node_modules/@types'))
  symlinkSync(join(ROOT, 'node_modules/@types/node'), join(app, 'node_modules/@types/node'))
  const tsc = join(ROOT, 'node_modules/.bin/tsc')
  const flags = ['--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext']
  await ok(tsc, [...flags, 'types-cjs.ts', 'types-esm.mts'], app)
  // A wrong use is caught: the types are real, not `any`.
  writeFileSync(
    join(app, 'types-bad.ts'),
    `import { MemoryBackend } from 'vduse'\nnew MemoryBackend('big')\n`,
  )
  const bad = await sh(tsc, [...flags, 'types-bad.ts'], app)
  t.not(bad.code, 0)
  t.regex(bad.stdout, /TS2345/)
})
