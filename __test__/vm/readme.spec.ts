// The README's first example, run as a user would run it: an ES module importing `vduse` from
// node_modules, executed with tsx in the guest; then SIGTERM must stop it cleanly.
import test from 'ava'
import { spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'

import { listDevices } from '../../src'
import { readmeBlocks } from '../helpers/readme'
import { assertInGuest, sh } from './guest'

const ROOT = join(__dirname, '../..')

test.before(() => assertInGuest())

test("the README's first example serves a working disk and stops cleanly on SIGTERM", async (t) => {
  const first = readmeBlocks()[0]!.code
  t.regex(first, /FileBackend\.open\('\/var\/lib\/disk\.img'/)
  const dir = mkdtempSync('/tmp/readme-')
  mkdirSync(join(dir, 'node_modules'))
  symlinkSync(ROOT, join(dir, 'node_modules', 'vduse'))
  // The guest's /var/lib is the host's, read-only: the image goes to the guest's tmpfs instead.
  const image = join(dir, 'disk.img')
  writeFileSync(join(dir, 'example.mts'), first.replace('/var/lib/disk.img', image))
  const child = spawn(join(ROOT, 'node_modules/.bin/tsx'), ['example.mts'], { cwd: dir })
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  const dev = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout }).once('line', resolve)
    void exited.then((code) => reject(new Error(`exited ${code}: ${stderr}`)))
  })
  t.regex(dev, /^\/dev\/vd[a-z]+$/)
  t.is((await sh(`blockdev --getsize64 ${dev}`)).trim(), String(8 * 2 ** 30))
  // virtio_blk uses min(queues, CPUs) of the four queues offered.
  const cpus = Number((await sh('nproc')).trim())
  t.is(Number((await sh(`ls /sys/block/${dev.slice(5)}/mq | wc -l`)).trim()), Math.min(4, cpus))
  await sh(
    `head -c 1M /dev/urandom > ${dir}/chunk; dd if=${dir}/chunk of=${dev} bs=1M seek=5 oflag=direct status=none`,
  )
  await sh(`cmp -n 1M -i 0:5M ${dir}/chunk ${dev}`)
  child.kill('SIGTERM')
  t.is(await exited, 0, stderr)
  t.false(listDevices().includes('disk0'), 'the device is destroyed')
  await sh(`cmp -n 1M -i 0:5M ${dir}/chunk ${image}`) // the data is in the image
})
