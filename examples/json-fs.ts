// A custom file system: a read-only tree from a JSON object (objects are directories, the rest files of
// their JSON text). `vduse fs --name j0 --backend ./examples/json-fs.ts -- tree.json`, or FsDevice.create.
import { readFileSync } from 'node:fs'

import { FsError, S_IF, defineFileSystem } from '../src'
import type { Attr, DirEntry, FileIo, FileSystem } from '../src'

type Json = string | number | boolean | null | Json[] | { [key: string]: Json }
type Node = { attr: Attr; children?: Map<string, number>; data?: Buffer }

export class JsonFs implements FileSystem {
  readonly #nodes: Node[] = []
  constructor(tree: Json) {
    this.#add(tree)
  }

  #add(value: Json): number {
    const ino = this.#nodes.length + 1 // the root is node 1
    const dir = typeof value === 'object' && value !== null && !Array.isArray(value)
    const data = dir ? undefined : Buffer.from(typeof value === 'string' ? value : JSON.stringify(value))
    const t = { sec: 0, nsec: 0 }
    const mode = dir ? S_IF.DIR | 0o555 : S_IF.REG | 0o444
    const size = data?.length ?? 0
    const attr = { ino, mode, nlink: 1, uid: 0, gid: 0, size, atime: t, mtime: t, ctime: t }
    const node: Node = { attr, ...(data ? { data } : { children: new Map<string, number>() }) }
    this.#nodes.push(node)
    if (dir) for (const [name, v] of Object.entries(value)) node.children!.set(name, this.#add(v))
    return ino
  }

  #get(ino: number): Node {
    return this.#nodes[ino - 1] ?? raise('ESTALE')
  }
  lookup(parent: number, name: string): Attr {
    const ino = this.#get(parent).children?.get(name) ?? raise('ENOENT')
    return this.#get(ino).attr
  }
  getattr(ino: number): Attr {
    return this.#get(ino).attr
  }
  *readdir(ino: number, offset: number): Iterable<DirEntry> {
    const entries = [...(this.#get(ino).children ?? raise('ENOTDIR'))]
    for (let i = offset; i < entries.length; i++) {
      const [name, child] = entries[i]!
      yield { name, ino: child, mode: this.#get(child).attr.mode, offset: i + 1 }
    }
  }
  read(ino: number, io: FileIo): number {
    const data = this.#get(ino).data ?? raise('EISDIR')
    const n = Math.max(0, Math.min(io.length, data.length - io.offset))
    return n > 0 && io.copyFrom(data, io.offset, n) ? n : 0
  }
}

function raise(code: 'ENOENT' | 'ENOTDIR' | 'EISDIR' | 'ESTALE'): never {
  throw new FsError(code)
}

// As a `vduse fs --backend` plugin: the argument after `--` names the JSON file.
export default defineFileSystem(({ args }) => new JsonFs(JSON.parse(readFileSync(args[0]!, 'utf8')) as Json))
