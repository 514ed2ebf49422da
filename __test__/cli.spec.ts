import test from 'ava'
import { execFile } from 'node:child_process'
import { join } from 'node:path'

import { parseCommand, parseSize, UsageError } from '../src/cli/args'
import { EventLimiter } from '../src/cli/limiter'

const CLI = join(__dirname, '../src/cli/main.ts')

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import=tsx', CLI, ...args], (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr })
    })
  })
}

test('sizes take binary suffixes', (t) => {
  t.is(parseSize('4096', 'x'), 4096)
  t.is(parseSize('64M', 'x'), 64 << 20)
  t.is(parseSize('1G', 'x'), 1 << 30)
  t.is(parseSize('2k', 'x'), 2048)
  t.is(parseSize('1GiB', 'x'), 1 << 30)
  t.throws(() => parseSize('12Q', '--memory'), { instanceOf: UsageError, message: /--memory/ })
  t.throws(() => parseSize('0', 'x'), { instanceOf: UsageError })
})

test('blk options parse into a command with defaults', (t) => {
  t.deepEqual(parseCommand(['blk', '--name', 'd0', '--memory', '64M', '--json']), {
    command: 'blk',
    name: 'd0',
    backend: { kind: 'memory', size: 64 << 20 },
    queues: 1,
    queueSize: 256,
    readOnly: false,
    attach: 'virtio',
    pollUs: 'auto',
    replace: false,
    recover: false,
    json: true,
    logLevel: 'warn',
  })
  t.like(parseCommand(['blk', '--name', 'p0', '--null', '1M', '--poll-us', '0']), { pollUs: 0 })
  t.like(parseCommand(['blk', '--name', 'p1', '--null', '1M', '--poll-us', '250']), { pollUs: 250 })
  t.like(parseCommand(['blk', '--name', 'p2', '--null', '1M', '--poll-us', 'auto']), { pollUs: 'auto' })
  t.like(parseCommand(['blk', '--name', 'p3', '--file', '/tmp/x.img']), { pollUs: 0 })
  t.like(parseCommand(['blk', '--name', 'p4', '--file', '/tmp/x.img', '--poll-us', 'auto']), {
    pollUs: 'auto',
  })
  const c = parseCommand([
    'blk',
    '--name',
    'd1',
    '--file',
    '/tmp/x.img',
    '--size',
    '1G',
    '--direct',
    '--queues',
    '4',
    '--queue-size',
    '1024',
    '--block-size',
    '4096',
    '--read-only',
    '--serial',
    'S1',
    '--attach',
    'vhost',
    '--timeout',
    '5000',
  ])
  t.like(c, {
    backend: { kind: 'file', path: '/tmp/x.img', size: 1 << 30, direct: true },
    queues: 4,
    queueSize: 1024,
    blockSize: 4096,
    readOnly: true,
    serial: 'S1',
    attach: 'vhost',
    timeoutMs: 5000,
  })
  t.like(parseCommand(['blk', '--name', 'd2', '--file', '/tmp/x.img', '--recover']), { recover: true })
  t.like(
    parseCommand([
      'blk',
      '--name',
      'n0',
      '--nbd',
      'nbd://10.0.0.1/vol',
      '--connections',
      '4',
      '--reconnect-timeout',
      '9000',
    ]),
    { backend: { kind: 'nbd', uri: 'nbd://10.0.0.1/vol', connections: 4, reconnectTimeoutMs: 9000 } },
  )
  t.is(
    (parseCommand(['blk', '--name', 'n0', '--nbd', 'nbd://h/']) as { blockSize?: number }).blockSize,
    undefined,
  )
  t.like(
    parseCommand(['blk', '--name', 'p0', '--backend', './b.mjs', '--size', '16M', '--', '--label', 'x']),
    {
      backend: { kind: 'plugin', module: './b.mjs', size: 16 << 20, args: ['--label', 'x'] },
    },
  )
  t.deepEqual(parseCommand(['list', '--json']), { command: 'list', json: true })
  t.deepEqual(parseCommand(['destroy', 'd0']), { command: 'destroy', name: 'd0', all: false })
  t.deepEqual(parseCommand(['destroy', '--all']), { command: 'destroy', all: true })
  t.like(parseCommand(['blk', '--name', 'd0', '--null', '1M', '--log-level', 'debug']), { logLevel: 'debug' })
  t.deepEqual(parseCommand([]), { command: 'help' })
  t.deepEqual(
    parseCommand(['net', '--name', 'n0', '--tap', 'tap0', '--mac', '02:00:00:00:00:01', '--mtu', '9000']),
    {
      command: 'net',
      names: ['n0'],
      tap: 'tap0',
      mac: '02:00:00:00:00:01',
      mtu: 9000,
      offloads: true,
      queueSize: 256,
      attach: 'virtio',
      replace: false,
      json: false,
      logLevel: 'warn',
    },
  )
  t.like(parseCommand(['net', '--switch', '--name', 'a', '--name', 'b', '--no-offloads', '--json']), {
    names: ['a', 'b'],
    offloads: false,
    json: true,
  })
})

test('bad usage is a UsageError naming the problem', (t) => {
  const bad: [string[], RegExp][] = [
    [['blk', '--memory', '1M'], /--name/],
    [['blk', '--name', 'x'], /exactly one of/],
    [['blk', '--name', 'x', '--memory', '1M', '--null', '1M'], /exactly one of/],
    [['blk', '--name', 'x', '--memory', '1M', '--queue-size', '100'], /power of two/],
    [['blk', '--name', 'x', '--memory', '1M', '--block-size', '1024'], /512 or 4096/],
    [['blk', '--name', 'x', '--memory', '1M', '--attach', 'pci'], /virtio, vhost or none/],
    [['blk', '--name', 'a/b', '--memory', '1M'], /--name/],
    [['blk', '--name', 'x', '--memory', '1M', '--size', '2M'], /goes with --file or --backend/],
    [['blk', '--name', 'x', '--memory', '1M', '--', 'extra'], /for a --backend plugin/],
    [['blk', '--name', 'x', '--memory', '1M', '--bogus'], /bogus/],
    [['blk', '--name', 'x', '--file', 'f', '--replace', '--recover'], /exclude each other/],
    [['blk', '--name', 'x', '--file', 'f', '--size', '1M', '--recover'], /drop --size/],
    [['blk', '--name', 'x', '--memory', '1M', '--connections', '2'], /go with --nbd/],
    [['blk', '--name', 'x', '--nbd', 'nbd://h/', '--connections', '99'], /--connections/],
    [['frobnicate'], /unknown command/],
    [['destroy'], /exactly one/],
    [['destroy', 'd0', '--all'], /not both/],
    [['blk', '--name', 'x', '--null', '1M', '--log-level', 'loud'], /--log-level must be one of/],
    [['blk', '--name', 'x', '--memory', '1M', '--no-lock'], /goes with --file/],
    [['blk', '--name', 'x', '--memory', '1M', '--poll-us', 'fast'], /--poll-us must be 'auto' or/],
    [['blk', '--name', 'x', '--memory', '1M', '--poll-us', ''], /--poll-us must be 'auto' or/],
    [['blk', '--name', 'x', '--memory', '1M', '--poll-us', '2000'], /--poll-us/],
    [['net', '--tap', 't0'], /--name/],
    [['net', '--name', 'a'], /exactly one of --tap TAP, --switch/],
    [['net', '--name', 'a', '--tap', 't0', '--switch'], /exactly one of/],
    [['net', '--name', 'a', '--name', 'b', '--tap', 't0'], /one --name/],
    [['net', '--name', 'a', '--name', 'a', '--switch'], /different/],
    [['net', '--name', 'a', '--name', 'b', '--switch', '--mac', '02:00:00:00:00:01'], /one --name/],
    [['net', '--name', 'a', '--switch', '--mtu', '20'], /--mtu/],
    [['net', '--name', 'a', '--tap', 'a/b'], /interface name/],
    [['net', '--name', 'a', '--switch', '--memory', '1M'], /memory/],
  ]
  for (const [args, message] of bad)
    t.throws(() => parseCommand(args), { instanceOf: UsageError, message }, args.join(' '))
})

test('the CLI exits 2 on bad usage with one clear line, and prints help', async (t) => {
  const bad = await run(['blk', '--name', 'x'])
  t.is(bad.code, 2)
  t.regex(bad.stderr, /^vduse: blk needs exactly one of .*\nTry 'vduse --help'\.\n$/)
  const help = await run(['--help'])
  t.is(help.code, 0)
  t.regex(help.stdout, /Usage:\n {2}vduse blk --name NAME/)
})

test('without VDUSE the CLI says so in one line with the fix, and exits non-zero', async (t) => {
  const res = await run(['blk', '--name', 'nokernel', '--memory', '1M', '--json'])
  t.is(res.code, 1)
  t.regex(res.stderr, /^vduse: .*\(ERR_VDUSE_UNAVAILABLE\) — load the module with `modprobe vduse`/)
  t.is(res.stderr.trim().split('\n').length, 1)
  const event = JSON.parse(res.stdout.trim()) as { event: string; code: string; v: number; ts: string }
  t.deepEqual([event.event, event.code, event.v], ['error', 'ERR_VDUSE_UNAVAILABLE', 2])
  t.true(Math.abs(Date.parse(event.ts) - Date.now()) < 60_000, 'an ISO timestamp')
})

test('request-error events are limited to 10 a second; the next one says how many were held back', (t) => {
  const limiter = new EventLimiter(10)
  const passed = Array.from({ length: 25 }, (_, i) => limiter.admit(1000 + i).pass)
  t.is(passed.filter(Boolean).length, 10)
  t.is(limiter.total, 15)
  t.deepEqual(limiter.admit(2000), { pass: true, held: 15 })
  t.deepEqual(limiter.admit(2001), { pass: true, held: 0 })
})

test('fs options parse; wrong ones are usage errors', (t) => {
  t.deepEqual(parseCommand(['fs', '--name', 'f0', '--memory', '--json']), {
    command: 'fs',
    name: 'f0',
    tag: 'f0',
    source: { kind: 'memory', size: 1 << 30, mounts: [] },
    requestQueues: 1,
    queueSize: 256,
    readOnly: false,
    attach: 'virtio',
    replace: false,
    json: true,
    logLevel: 'warn',
  })
  const plugin = parseCommand([
    'fs',
    '--name',
    'f0',
    '--tag',
    'share',
    '--backend',
    './x.mjs',
    '--',
    'a',
    'b',
  ])
  t.like(plugin, { tag: 'share', source: { kind: 'plugin', module: './x.mjs', args: ['a', 'b'] } })
  t.throws(() => parseCommand(['fs', '--name', 'f0']), { message: /exactly one of --memory/ })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--memory', '--backend', 'x']), {
    instanceOf: UsageError,
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--tag', 'x'.repeat(37), '--memory']), {
    message: /--tag/,
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--backend', 'x', '--size', '1G']), {
    message: /--size/,
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--memory', '--', 'x']), { message: /plugin/ })
  t.like(
    parseCommand(['fs', '--name', 'f0', '--memory', '--mount', '/data=/srv/d', '--mount', '/a/b=/srv/e=f']),
    {
      source: {
        kind: 'memory',
        mounts: [
          { path: '/data', dir: '/srv/d' },
          { path: '/a/b', dir: '/srv/e=f' },
        ],
      },
    },
  )
  for (const bad of ['data=/srv', '/=/srv', '/data=', '/data']) {
    t.throws(() => parseCommand(['fs', '--name', 'f0', '--memory', '--mount', bad]), {
      message: /--mount needs/,
    })
  }
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--memory', '--mount', '/d=/y', '--mount', '/d/=/z']), {
    message: /each PATH once/,
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--shared-dir', '/x', '--mount', '/d=/y']), {
    message: /--mount goes with --memory/,
  })
  const share = parseCommand([
    'fs',
    '--name',
    'f0',
    '--shared-dir',
    '/srv/share',
    '--cache',
    'always',
    '--writeback',
    '--xattr',
    'off',
    '--readonly',
  ])
  t.like(share, {
    readOnly: true,
    source: {
      kind: 'shared',
      dir: '/srv/share',
      cache: 'always',
      writeback: true,
      xattr: 'off',
      allowDevices: false,
    },
  })
  t.like(parseCommand(['fs', '--name', 'f0', '--shared-dir', '/s']), {
    readOnly: false,
    source: { kind: 'shared', cache: 'auto', xattr: 'user', writeback: false },
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--shared-dir', '/s', '--memory']), {
    message: /exactly one of/,
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--memory', '--cache', 'never']), {
    message: /--cache goes with --shared-dir/,
  })
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--shared-dir', '/s', '--cache', 'sometimes']), {
    message: /--cache must be/,
  })
  t.throws(
    () => parseCommand(['fs', '--name', 'f0', '--shared-dir', '/s', '--cache', 'never', '--writeback']),
    {
      message: /--writeback needs/,
    },
  )
  t.throws(() => parseCommand(['fs', '--name', 'f0', '--shared-dir', '/s', '--timeout', '5']), {
    message: /--timeout is for/,
  })
})

test('vduse fs without VDUSE fails with a code and a hint (exit 1)', async (t) => {
  const r = await run(['fs', '--name', 'nofs', '--memory', '--json'])
  t.is(r.code, 1)
  const e = JSON.parse(r.stdout.trim().split('\n').pop()!) as { event: string; code: string }
  t.is(e.event, 'error')
  t.regex(e.code, /ERR_VDUSE_(UNAVAILABLE|PERMISSION)/)
})

test('--help per command shows that command', async (t) => {
  const net = await run(['net', '--help'])
  t.is(net.code, 0)
  t.regex(net.stdout, /vduse net --name NAME --tap TAP/)
  t.notRegex(net.stdout, /vduse blk/)
  t.regex(net.stdout, /--switch/)
  const fs = await run(['fs', '--help'])
  t.regex(fs.stdout, /vduse fs --name NAME --tag TAG/)
  t.notRegex(fs.stdout, /--tap/)
  const blk = await run(['blk', '--help'])
  t.regex(blk.stdout, /--nbd URI/)
  t.notRegex(blk.stdout, /Options for net/)
  const all = await run(['--help'])
  t.regex(all.stdout, /Options for net/)
})
