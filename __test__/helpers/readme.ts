import { readFileSync } from 'node:fs'
import { join } from 'node:path'

const ROOT = join(__dirname, '../..')

/** The README's ```ts blocks, each with its readme-check prelude (if any) and its line number. */
export function readmeBlocks(): Array<{ line: number; code: string }> {
  const lines = readFileSync(join(ROOT, 'README.md'), 'utf8').split('\n')
  const blocks: Array<{ line: number; code: string }> = []
  for (let i = 0; i < lines.length; i++) {
    if (lines[i] !== '```ts') continue
    const prelude = /^<!-- readme-check: (.*) -->$/.exec(lines[i - 1] ?? '')?.[1] ?? ''
    const end = lines.indexOf('```', i + 1)
    blocks.push({ line: i + 1, code: `${prelude}\n${lines.slice(i + 1, end).join('\n')}\nexport {}\n` })
    i = end
  }
  return blocks
}
