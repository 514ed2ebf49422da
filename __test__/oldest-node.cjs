// Run by scripts/oldest-node under the oldest Node.js `engines` allows (ava itself needs a newer one): the
// built package must load and work there. Plain CommonJS against dist/, no test framework.
'use strict'
const assert = require('node:assert/strict')
const { execFile } = require('node:child_process')
const { mkdtempSync, rmSync } = require('node:fs')
const { tmpdir } = require('node:os')
const { join } = require('node:path')
const { promisify } = require('node:util')

const vduse = require('../dist/index.js')
const run = promisify(execFile)
const results = []

async function check(name, fn) {
  try {
    await fn()
    results.push(true)
    console.log(`  ✔ ${name}`)
  } catch (err) {
    results.push(false)
    console.log(`  ✘ ${name}\n${err && err.stack ? err.stack : err}`)
  }
}

async function main() {
  console.log(`node ${process.version}`)
  await check('the CLI starts and prints its help', async () => {
    const { stdout } = await run(process.execPath, ['dist/cli/main.js', 'blk', '--help'])
    assert.match(stdout, /--vhost-user SOCK/)
  })
  await check(
    'a BlockDevice over vhost-user serves QEMU 10 (libblkio): write, read back, flush',
    async () => {
      const dir = mkdtempSync(join(tmpdir(), 'vduse-oldest-'))
      const sock = join(dir, 'd.sock')
      const controller = new AbortController()
      const disk = await vduse.BlockDevice.create({
        name: 'oldest-node',
        backend: new vduse.MemoryBackend(16 << 20),
        transport: vduse.vhostUser(sock),
        signal: controller.signal,
      })
      try {
        const { stdout } = await run(
          process.env.QEMU_IO,
          [
            '--image-opts',
            `driver=virtio-blk-vhost-user,path=${sock},cache.direct=on`,
            '-c',
            'write -P 0x5c 0 1M',
            '-c',
            'read -P 0x5c 0 1M',
            '-c',
            'flush',
          ],
          { timeout: 60_000 },
        )
        assert.doesNotMatch(stdout, /fail|error/i)
        assert.equal(disk.stats.ioErrors, 0)
      } finally {
        await disk.close()
        rmSync(dir, { recursive: true, force: true })
      }
    },
  )
  await check('errors are VduseErrors with stable codes', async () => {
    assert.throws(
      () => new vduse.MemoryBackend(-1),
      (e) => e instanceof vduse.VduseError && e.code === 'ERR_VDUSE_INVALID_CONFIG',
    )
  })
  const passed = results.filter(Boolean).length
  const failed = results.length - passed
  console.log(`\n  ${passed} tests passed`)
  if (failed > 0) console.log(`  ${failed} tests failed`)
  process.exitCode = failed > 0 ? 1 : 0
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
