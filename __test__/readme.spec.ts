// The README's TypeScript blocks are code, not prose: each is type-checked, as a user's ES module, against
// the package's published types (`vduse` resolves to this package through node_modules, its exports map
// and dist/*.d.ts). A `<!-- readme-check: … -->` comment right above a block supplies what a snippet takes
// as given (declarations), invisible on the rendered page. The guest runs the first block for real
// (__test__/vm/readme.spec.ts).
import test from 'ava'
import { execFile } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { readmeBlocks } from './helpers/readme'

const ROOT = join(__dirname, '..')

function typeCheck(blocks: Array<{ line: number; code: string }>): Promise<{ ok: boolean; output: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'vduse-readme-'))
  mkdirSync(join(dir, 'node_modules'))
  symlinkSync(ROOT, join(dir, 'node_modules', 'vduse'))
  symlinkSync(join(ROOT, 'node_modules', '@types'), join(dir, 'node_modules', '@types'))
  const files = blocks.map((b) => {
    const file = `readme-line-${b.line}.mts`
    writeFileSync(join(dir, file), b.code)
    return file
  })
  writeFileSync(
    join(dir, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: {
        target: 'ES2022',
        module: 'nodenext',
        moduleResolution: 'nodenext',
        lib: ['ES2022'],
        types: ['node'],
        strict: true,
        noEmit: true,
        skipLibCheck: true,
      },
      files,
    }),
  )
  return new Promise((resolve) => {
    execFile(join(ROOT, 'node_modules/.bin/tsc'), ['-p', dir], (err, stdout, stderr) => {
      rmSync(dir, { recursive: true, force: true })
      resolve({ ok: !err, output: stdout + stderr })
    })
  })
}

test('every TypeScript block of the README type-checks against the published types', async (t) => {
  const blocks = readmeBlocks()
  t.true(blocks.length >= 5, `found ${blocks.length} blocks`)
  const { ok, output } = await typeCheck(blocks)
  t.true(ok, output)
})

test('the check can fail: a wrong call in a block is reported', async (t) => {
  const bad = {
    line: 0,
    code: "import { BlockDevice } from 'vduse'\nawait BlockDevice.create({ name: 1 })\n",
  }
  const { ok, output } = await typeCheck([bad])
  t.false(ok)
  t.regex(output, /readme-line-0\.mts.*error TS/)
})
