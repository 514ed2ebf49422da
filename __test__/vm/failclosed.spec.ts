// Failure paths on the real kernel that must fail closed: a handover (SIGUSR2) while a write of the old
// server is still running is refused and the device keeps serving — once the write returns, the handover
// goes through and the successor takes over with every acknowledged write; a close whose detach fails
// changes nothing and can be retried.
import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { BlockDevice, MemoryBackend } from '../../src'
import { assertInGuest, CLI, sh, startCli, until } from './guest'

test.before(() => assertInGuest())

const exists = async (path: string): Promise<boolean> =>
  (await sh(`[ -e ${path} ] && echo yes || true`)).trim() === 'yes'

test('SIGUSR2 while a write hangs in the backend is refused, the device keeps serving, and a later handover keeps every write', async (t) => {
  const image = '/tmp/ho.img'
  await sh(`rm -f ${image} /tmp/ho.held /tmp/ho.go; truncate -s 64M ${image}`)
  const plugin = join(__dirname, 'fixtures/holding-backend.mjs')
  const args = ['blk', '--name', 'ho', '--backend', plugin, '--size', '64M', '--json']
  const plugged = [
    '--',
    '--image',
    image,
    '--hold-at',
    String(8 << 20),
    '--held',
    '/tmp/ho.held',
    '--go',
    '/tmp/ho.go',
  ]
  let server = startCli([...args, ...plugged])
  t.teardown(async () => {
    await sh('touch /tmp/ho.go')
    server.child.kill('SIGTERM')
    await server.exit
  })
  const dev = (await server.next('ready')).path as string
  await sh(`head -c 64k /dev/urandom > /tmp/ho-held; head -c 1M /dev/urandom > /tmp/ho-other`)
  // A write the backend holds…
  const held = sh(`dd if=/tmp/ho-held of=${dev} bs=64k seek=128 oflag=direct status=none`)
  await until('the backend to hold the write', () => exists('/tmp/ho.held'), 60_000)
  // …so the handover is refused: this server's write could land after the successor's.
  server.child.kill('SIGUSR2')
  const refused = await server.next('handover-refused')
  t.is(refused.code, 'ERR_VDUSE_BUSY')
  // Still serving.
  await sh(`dd if=/tmp/ho-other of=${dev} bs=1M seek=1 oflag=direct status=none`)
  // The storage answers again: the write completes, and the next handover goes through.
  await sh('touch /tmp/ho.go')
  await held
  server.child.kill('SIGUSR2')
  t.like(await server.next('released'), { name: 'ho' })
  t.is(await server.exit, 0)
  server = startCli([...args, '--recover', ...plugged])
  t.like(await server.next('ready'), { path: dev, recovered: true })
  await sh(`dd if=${dev} of=/tmp/ho-back bs=64k skip=128 count=1 iflag=direct status=none; cmp /tmp/ho-held /tmp/ho-back
    dd if=${dev} of=/tmp/ho-back bs=1M skip=1 count=1 iflag=direct status=none; cmp /tmp/ho-other /tmp/ho-back`)
  server.child.kill('SIGTERM')
  t.is(await server.exit, 0)
  const img = readFileSync(image)
  t.true(img.subarray(8 << 20, (8 << 20) + 65536).equals(readFileSync('/tmp/ho-held')))
  t.true(img.subarray(1 << 20, 2 << 20).equals(readFileSync('/tmp/ho-other')))
  t.false((await sh(`node ${CLI} list --json`)).includes('"ho"'))
})

test('a close whose detach fails changes nothing: the device still serves, and close() again finishes it', async (t) => {
  const device = await BlockDevice.create({
    name: 'fc-detach',
    backend: new MemoryBackend(16 << 20),
    replaceStale: true,
  })
  const dev = await device.attach()
  const path = process.env.PATH
  process.env.PATH = '/nonexistent'
  const err = await device.close().then(
    () => undefined,
    (e: { code?: string }) => e,
  )
  process.env.PATH = path
  t.is(err?.code, 'ERR_VDUSE_ATTACH', '`vdpa` could not run')
  t.false(device.closed, 'nothing was torn down')
  await sh(
    `dd if=/dev/zero of=${dev} bs=4k count=16 oflag=direct status=none; dd if=${dev} of=/dev/null bs=4k count=16 iflag=direct status=none`,
  )
  await device.close()
  t.true(device.closed)
  t.false((await sh(`node ${CLI} list --json`)).includes('"fc-detach"'))
})
