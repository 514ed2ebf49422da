import { EventEmitter } from 'node:events'
import { connect as netConnect, Socket, type SocketConstructorOpts } from 'node:net'

import type { NbdEventJs } from '../../index'
import { VduseError, native, nativeAsync, type VduseErrorCode } from '../errors'
import { binding } from '../transport/binding'
import {
  kNativeBlock,
  type BlockBackend,
  type BlockBackendCapabilities,
  type BlockIo,
  type NativeBlockHost,
  type NativeBlockOptions,
  type NativeBlockPath,
} from './backend'

// The NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md), client side:
// fixed-newstyle handshake, NBD_OPT_GO, structured replies, many requests in flight per connection.

const OPTION_REPLY_MAGIC_HI = 0x0003e889
const OPTION_REPLY_MAGIC_LO = 0x045565a9
const REQUEST_MAGIC = 0x25609513
const SIMPLE_REPLY_MAGIC = 0x67446698
const STRUCTURED_REPLY_MAGIC = 0x668e33ef

const FLAG_FIXED_NEWSTYLE = 1
const FLAG_NO_ZEROES = 2

const OPT_EXPORT_NAME = 1
const OPT_GO = 7
const OPT_STRUCTURED_REPLY = 8

const REP_ACK = 1
const REP_INFO = 3
const REP_ERR_UNSUP = 0x8000_0001
const REP_ERR_POLICY = 0x8000_0002
const REP_ERR_TLS_REQD = 0x8000_0005
const REP_ERR_UNKNOWN = 0x8000_0006
const REP_ERR_SHUTDOWN = 0x8000_0007
const REP_ERR_BLOCK_SIZE_REQD = 0x8000_0008

const INFO_EXPORT = 0
const INFO_BLOCK_SIZE = 3

/** Transmission flags: what the export supports. */
export const NBD_FLAGS = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
} as const

const CMD_READ = 0
const CMD_WRITE = 1
const CMD_DISC = 2
const CMD_FLUSH = 3
const CMD_TRIM = 4
const CMD_WRITE_ZEROES = 6

const CMD_FLAG_FUA = 1 << 0
const CMD_FLAG_NO_HOLE = 1 << 1

const REPLY_FLAG_DONE = 1
const REPLY_TYPE_NONE = 0
const REPLY_TYPE_OFFSET_DATA = 1
const REPLY_TYPE_OFFSET_HOLE = 2
const REPLY_TYPE_ERROR_BIT = 0x8000

/** Without a server's word on it, the largest payload a client may send or ask for (the spec's 32 MiB). */
const DEFAULT_MAX_PAYLOAD = 32 << 20
/** Trim and write-zeroes ranges are split at this size (their length field is 32 bits). */
const MAX_RANGE = 1 << 30
/** Error chunks and option replies larger than this are a misbehaving server. */
const MAX_SMALL_PAYLOAD = 64 << 10
const ZERO = Buffer.alloc(64 << 10)

/** Where an NBD export is: a TCP host and port, or a UNIX socket; and the export's name. */
export interface NbdAddress {
  host?: string
  port?: number
  socket?: string
  export: string
}

/**
 * Parses an NBD URI (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md):
 * `nbd://host[:port]/export` (port 10809 by default) or `nbd+unix:///export?socket=/path`. TLS
 * (`nbds…`) and vsock are not supported.
 */
export function parseNbdUri(uri: string): NbdAddress {
  const bad = (why: string, hint?: string): never => {
    throw new VduseError(`NBD URI "${uri}": ${why}`, { code: 'ERR_VDUSE_INVALID_CONFIG', hint })
  }
  let url: URL
  try {
    url = new URL(uri)
  } catch {
    return bad('not a URI', 'use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH')
  }
  const scheme = url.protocol.slice(0, -1)
  if (scheme.startsWith('nbds'))
    bad('TLS is not supported', 'serve the export without TLS on a trusted network')
  const name = decodeURIComponent(url.pathname.replace(/^\//, ''))
  if (Buffer.byteLength(name) > 4096) bad('the export name is longer than 4096 bytes')
  if (scheme === 'nbd') {
    if (!url.hostname) bad('no host')
    const port = url.port === '' ? 10809 : Number(url.port)
    return { host: url.hostname.replace(/^\[(.*)\]$/, '$1'), port, export: name }
  }
  if (scheme === 'nbd+unix') {
    if (url.hostname) bad('nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)')
    const socket = url.searchParams.get('socket')
    if (!socket) bad('nbd+unix needs ?socket=PATH')
    return { socket: socket!, export: name }
  }
  return bad(`unsupported scheme "${scheme}"`, 'use nbd:// or nbd+unix://')
}

function formatAddress(a: NbdAddress): string {
  const name = encodeURIComponent(a.export)
  if (a.socket !== undefined) return `nbd+unix:///${name}?socket=${a.socket}`
  const host = a.host!.includes(':') ? `[${a.host}]` : a.host!
  return `nbd://${host}:${a.port ?? 10809}/${name}`
}

export interface NbdBackendOptions {
  /** Offer the export read-only even if the server allows writes. */
  readOnly?: boolean
  /**
   * Connections to open when the server allows several (CAN_MULTI_CONN); requests go to the least busy
   * one. Default 1. Ignored (one connection) when the server does not allow it.
   */
  connections?: number
  /** Give up connecting (and handshaking) after this long (default 10 000 ms). */
  connectTimeoutMs?: number
  /**
   * A connection with requests in flight that receives nothing for this long is probed with a one-block
   * read; if that gets no answer for this long again, the connection counts as hung: it is closed, and
   * its requests are sent again on a new one (default 30 000 ms; 0: never). A slow command on a live
   * server is never cut.
   */
  hangTimeoutMs?: number
  /**
   * While the server is unreachable, requests wait this long for a new connection before they fail with
   * an I/O error (default 60 000 ms). Reconnecting goes on regardless: once the server is back, the
   * device serves again.
   */
  reconnectTimeoutMs?: number
  /**
   * Bytes of acknowledged, unflushed writes kept to send again should the server restart without its
   * cache (default 256 MiB; a background flush starts at a quarter of it). Past it, writes are not kept,
   * and the first flush after every connection was lost fails instead of claiming them durable.
   */
  keepUnflushedBytes?: number
  /**
   * Serve a device natively where its transport can (VDUSE, vhost-user): requests go between the
   * driver's memory and the server's sockets on native threads, never through JavaScript, with the same
   * semantics as above (default true). The connections are opened again for it when the device is
   * created; the in-process transport always uses the JavaScript path.
   */
  native?: boolean
}

/** What the server said about the export. */
export interface NbdExportInfo {
  size: number
  /** Transmission flags (`NBD_FLAGS`). */
  flags: number
  minBlockSize: number
  preferredBlockSize: number
  maxBlockSize: number
  /** Whether the server stated its block sizes (NBD_INFO_BLOCK_SIZE); otherwise they are defaults. */
  blockSizesAdvertised?: boolean
  structuredReplies: boolean
}

export interface NbdBackendEvents {
  /** A connection was lost; its requests wait for a new one. */
  disconnected: [info: { connection: number; error: Error }]
  /** A connection was replaced after `attempts` tries and `downMs`. */
  reconnected: [info: { connection: number; attempts: number; downMs: number }]
  /** A reconnect attempt failed (the server is down, or now serves a different export). */
  reconnectFailed: [info: { connection: number; attempts: number; error: VduseError }]
  /** Requests failed with an I/O error because no connection came back within `reconnectTimeoutMs`. */
  unavailable: [info: { failed: number; error: VduseError }]
}

/** What a kept change without data (TRIM, WRITE_ZEROES) counts against `keepUnflushedBytes`. */
const RANGE_COST = 64

/** An acknowledged change a flush has not made durable yet (kept to send again after a restart). */
interface Retained {
  type: number
  flags: number
  offset: number
  length: number
  data: Buffer | undefined
  seq: number
}

function noop(): void {}

interface Request {
  parts: number
  error: Error | undefined
  resolve: () => void
  reject: (err: Error) => void
}

/** One command on the wire (a request larger than the server's limit is several). */
interface Op {
  type: number
  flags: number
  offset: number
  length: number
  /** Where this command's data starts within its request's data. */
  at: number
  /** WRITE: the payload. */
  data: Buffer | undefined
  /** READ: where the reply's data goes. Also what tells a fenced request (its signal) before a resend. */
  io: BlockIo | undefined
  /** Discard / write-zeroes: aborted when the request is fenced or timed out. */
  signal: AbortSignal | undefined
  /** Where the first read chunk started (relative to `offset`); it ends at `first + covered` until a second. */
  first: number
  /** Read chunks as [start, end) pairs once there are several: overlap detection. */
  chunks: number[] | undefined
  request: Request
  /** READ bytes received (structured replies), checked against `length` at the end. */
  covered: number
  /** The server's error (errno), 0 if none. */
  error: number
  /** When the request was submitted: it is resent after a lost connection only within `reconnectTimeoutMs`. */
  born: number
  /** What it is beyond a request: a liveness probe, or an acknowledged write sent again after a restart. */
  kind: OpKind
  /** FLUSH: the last acknowledged write it covers (`NbdBackend`'s acknowledgement sequence when sent). */
  mark: number
}

const OpKind = { Request: 0, Probe: 1, Replay: 2 } as const
type OpKind = (typeof OpKind)[keyof typeof OpKind]

/** ESHUTDOWN: the server is going away and did not execute the command (it is sent again elsewhere). */
const ESHUTDOWN = 108

/** Reply parser states. */
const Parse = { Magic: 0, Header: 1, Collect: 2, Data: 3, Skip: 4 } as const

/** Handshake reading: whole messages from a byte stream, before the transmission phase. */
class Reader {
  #chunks: Buffer[] = []
  #have = 0
  #waiter: { n: number; resolve: (b: Buffer) => void } | undefined
  failed: Error | undefined
  #reject: ((err: Error) => void) | undefined

  push(chunk: Buffer): void {
    // The handshake is a few small messages: a server that floods it is broken or hostile.
    if (this.#have + chunk.length > MAX_SMALL_PAYLOAD + 64) {
      return this.fail(protocol('the server sent more than a handshake needs'))
    }
    this.#chunks.push(chunk)
    this.#have += chunk.length
    this.#wake()
  }

  fail(err: Error): void {
    this.failed ??= err
    this.#reject?.(err)
  }

  read(n: number): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed)
    return new Promise((resolve, reject) => {
      this.#waiter = { n, resolve }
      this.#reject = reject
      this.#wake()
    })
  }

  /** What arrived beyond the handshake (a server sends nothing unasked, so this is empty). */
  rest(): Buffer {
    return Buffer.concat(this.#chunks)
  }

  #wake(): void {
    const w = this.#waiter
    if (!w || this.#have < w.n) return
    const all = this.#chunks.length === 1 ? this.#chunks[0]! : Buffer.concat(this.#chunks)
    this.#chunks = all.length > w.n ? [all.subarray(w.n)] : []
    this.#have -= w.n
    this.#waiter = undefined
    this.#reject = undefined
    w.resolve(all.subarray(0, w.n))
  }
}

function nbdError(code: VduseErrorCode, message: string, hint?: string, cause?: unknown): VduseError {
  return new VduseError(message, { code, hint, cause })
}

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
}

/** One connection to the server: handshake, then commands out and replies in. */
/** What a connection tells its backend about commands, besides losing them all when it dies. */
interface ConnectionHooks {
  /** A command finished (before its request hears of it). */
  done(op: Op): void
  /** The server refused to execute a command because it is shutting down: send it elsewhere. */
  retry(op: Op): void
}

class Connection {
  readonly socket: Socket
  readonly inflight = new Map<number, Op>()
  info: NbdExportInfo | undefined
  dead = false
  #reader: Reader | undefined = new Reader()
  #nextCookie = 1
  #corked = false
  // Reply parser state.
  #state: number = Parse.Magic
  readonly #header = Buffer.alloc(20)
  #headerHave = 0
  #headerWant = 4
  #scratch = Buffer.alloc(64)
  #collectHave = 0
  #collectWant = 0
  #remaining = 0
  #dataAt = 0
  #op: Op | undefined
  #cookie = 0
  #chunkType = 0
  #chunkFlags = 0
  #onClosed: ((err: Error) => void) | undefined
  #connectFailed: ((err: Error) => void) | undefined
  /** What the backend does with finished commands, and with ones the server refused to execute. */
  #hooks: ConnectionHooks | undefined
  /** When anything was last received, or the connection went from idle to busy: hang detection. */
  lastProgress = 0
  /** When a liveness probe was sent (0: none outstanding). */
  probeSent = 0
  /** The server said it is shutting down (ESHUTDOWN): nothing new is sent; it closes once idle. */
  draining = false
  readonly openedAt = Date.now()

  readonly #receive: Buffer

  /** Given an open socket (`fd`): no connect to wait for. */
  readonly #connected: boolean

  constructor(
    readonly index: number,
    address: NbdAddress,
    receive: Buffer,
    fd?: number,
  ) {
    this.#receive = receive
    const opts =
      address.socket !== undefined ? { path: address.socket } : { host: address.host!, port: address.port! }
    // Replies are parsed out of one buffer per connection as they arrive: no allocation per read.
    const onread = {
      buffer: this.#receive,
      callback: (n: number, buf: Uint8Array) => this.#onRead(n, buf as Buffer),
    }
    this.#connected = fd !== undefined
    this.socket =
      fd === undefined
        ? netConnect({ ...opts, noDelay: true, onread })
        : // `onread` is a Socket option too (the types only list it for connect()).
          new Socket({ fd, readable: true, writable: true, onread } as SocketConstructorOpts)
    this.socket.on('error', (err) => this.close(err))
    this.socket.on('close', () => this.close(new Error('the server closed the connection')))
    // A peer host that vanishes without a word is noticed even while every command is slow.
    if (address.socket === undefined && fd === undefined) this.socket.setKeepAlive(true, 10_000)
  }

  /**
   * Gives the session away after the handshake (the native engine holds the socket's twin): this side
   * stops reading and closes its descriptor without a word to the server. Throws if the server sent
   * anything beyond the handshake (it would be lost).
   */
  handOver(): void {
    if (this.dead || this.#state !== Parse.Magic || this.#headerHave !== 0 || this.inflight.size > 0) {
      throw protocol('data before any request')
    }
    this.dead = true
    this.#onClosed = undefined
    this.socket.pause()
    this.socket.destroy()
  }

  /**
   * Called once, when the connection is lost (not when `disconnect()` closes it on purpose) — at once if
   * it already was.
   */
  whenClosed(fn: (err: Error) => void, hooks?: ConnectionHooks): void {
    this.#hooks = hooks
    if (this.dead && this.#lostWith) {
      const err = this.#lostWith
      queueMicrotask(() => fn(err))
      return
    }
    this.#onClosed = fn
  }

  /** Why the connection was lost, once it was (and nobody was told yet). */
  #lostWith: Error | undefined

  /** Usable for new commands. */
  get ready(): boolean {
    return !this.dead && !this.draining
  }

  close(err: Error): void {
    if (this.dead) return
    this.dead = true
    this.#reader?.fail(err)
    this.#connectFailed?.(err)
    this.socket.destroy()
    if (this.#onClosed) this.#onClosed(err)
    else this.#lostWith = err
  }

  /** Handshake: fixed newstyle, structured replies, NBD_OPT_GO (falling back to EXPORT_NAME). */
  async handshake(address: NbdAddress): Promise<NbdExportInfo> {
    const r = this.#reader!
    // Settles on connect, on an error, or when close() gives up (the connect timeout): a connect that
    // hangs (dropped SYNs) must not hang the caller.
    await new Promise<void>((resolve, reject) => {
      if (r.failed) return reject(r.failed)
      if (this.#connected) return resolve()
      this.#connectFailed = reject
      this.socket.once('connect', resolve)
    })
    this.#connectFailed = undefined
    const hello = await r.read(18)
    if (hello.toString('latin1', 0, 8) !== 'NBDMAGIC') throw protocol('the peer is not an NBD server')
    if (hello.toString('latin1', 8, 16) !== 'IHAVEOPT') {
      throw nbdError(
        'ERR_VDUSE_REFUSED',
        'the server speaks the old-style NBD handshake',
        'use a newstyle server',
      )
    }
    const serverFlags = hello.readUInt16BE(16)
    const fixed = (serverFlags & FLAG_FIXED_NEWSTYLE) !== 0
    const noZeroes = (serverFlags & FLAG_NO_ZEROES) !== 0
    const clientFlags = Buffer.alloc(4)
    clientFlags.writeUInt32BE((fixed ? FLAG_FIXED_NEWSTYLE : 0) | (noZeroes ? FLAG_NO_ZEROES : 0))
    this.socket.write(clientFlags)
    const name = Buffer.from(address.export, 'utf8')

    let structured = false
    if (fixed) {
      this.#sendOption(OPT_STRUCTURED_REPLY, Buffer.alloc(0))
      const reply = await this.#readOptionReply(OPT_STRUCTURED_REPLY)
      structured = reply.type === REP_ACK
      // An error reply just means simple replies only.
      const go = Buffer.alloc(4 + name.length + 2 + 2)
      go.writeUInt32BE(name.length, 0)
      name.copy(go, 4)
      go.writeUInt16BE(1, 4 + name.length)
      go.writeUInt16BE(INFO_BLOCK_SIZE, 6 + name.length)
      this.#sendOption(OPT_GO, go)
      const info: NbdExportInfo = {
        size: -1,
        flags: 0,
        minBlockSize: 1,
        preferredBlockSize: 4096,
        maxBlockSize: DEFAULT_MAX_PAYLOAD,
        structuredReplies: structured,
      }
      for (;;) {
        const reply = await this.#readOptionReply(OPT_GO)
        if (reply.type === REP_INFO && reply.data.length >= 2) {
          const kind = reply.data.readUInt16BE(0)
          if (kind === INFO_EXPORT && reply.data.length >= 12) {
            info.size = readU64(reply.data, 2)
            info.flags = reply.data.readUInt16BE(10)
          } else if (kind === INFO_BLOCK_SIZE && reply.data.length >= 14) {
            info.minBlockSize = reply.data.readUInt32BE(2)
            info.preferredBlockSize = reply.data.readUInt32BE(6)
            info.maxBlockSize = reply.data.readUInt32BE(10)
            info.blockSizesAdvertised = true
          }
          continue
        }
        if (reply.type === REP_ACK) {
          if (info.size < 0) throw protocol('NBD_OPT_GO succeeded without saying the export size')
          return this.#established(info)
        }
        if (reply.type === REP_ERR_UNSUP) break // an old server: NBD_OPT_EXPORT_NAME below
        throw refusal(address, reply.type, reply.data)
      }
    }
    // NBD_OPT_EXPORT_NAME: no reply on failure (the server closes), no block size information.
    this.#sendOption(OPT_EXPORT_NAME, name)
    const answer = await r.read(noZeroes ? 10 : 134).catch((err: Error) => {
      throw nbdError(
        'ERR_VDUSE_REFUSED',
        `the server closed the connection when asked for export "${address.export}"`,
        'check the export name',
        err,
      )
    })
    return this.#established({
      size: readU64(answer, 0),
      flags: answer.readUInt16BE(8),
      minBlockSize: 1,
      preferredBlockSize: 4096,
      maxBlockSize: DEFAULT_MAX_PAYLOAD,
      structuredReplies: structured,
    })
  }

  #established(info: NbdExportInfo): NbdExportInfo {
    this.info = info
    const rest = this.#reader!.rest()
    this.#reader = undefined
    if (rest.length > 0) this.#parse(rest, rest.length)
    return info
  }

  #sendOption(option: number, data: Buffer): void {
    const h = Buffer.alloc(16)
    h.write('IHAVEOPT', 0, 'latin1')
    h.writeUInt32BE(option, 8)
    h.writeUInt32BE(data.length, 12)
    this.socket.write(data.length > 0 ? Buffer.concat([h, data]) : h)
  }

  async #readOptionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.#reader!.read(20)
    if (h.readUInt32BE(0) !== OPTION_REPLY_MAGIC_HI || h.readUInt32BE(4) !== OPTION_REPLY_MAGIC_LO) {
      throw protocol('bad option reply magic')
    }
    if (h.readUInt32BE(8) !== option) throw protocol('an option reply for another option')
    const length = h.readUInt32BE(16)
    if (length > MAX_SMALL_PAYLOAD) throw protocol(`an option reply of ${length} bytes`)
    const data = length > 0 ? Buffer.from(await this.#reader!.read(length)) : Buffer.alloc(0)
    return { type: h.readUInt32BE(12), data }
  }

  /** Sends one command. Commands sent in one event-loop turn leave in one write. */
  send(op: Op): void {
    const cookie = this.#nextCookie++
    const h = Buffer.allocUnsafe(28)
    h.writeUInt32BE(REQUEST_MAGIC, 0)
    h.writeUInt16BE(op.flags, 4)
    h.writeUInt16BE(op.type, 6)
    h.writeUInt32BE(Math.floor(cookie / 0x1_0000_0000), 8)
    h.writeUInt32BE(cookie >>> 0, 12)
    writeU64(h, 16, op.offset)
    h.writeUInt32BE(op.length, 24)
    if (this.inflight.size === 0) this.lastProgress = Date.now()
    op.covered = 0
    op.error = 0
    op.chunks = undefined
    this.inflight.set(cookie, op)
    if (!this.#corked) {
      this.#corked = true
      this.socket.cork()
      process.nextTick(() => {
        this.#corked = false
        this.socket.uncork()
      })
    }
    this.socket.write(h)
    if (op.data) this.socket.write(op.data)
  }

  /** Ends the session politely (NBD_CMD_DISC) and closes. */
  disconnect(): void {
    if (this.dead) return
    this.#onClosed = undefined
    const h = Buffer.alloc(28)
    h.writeUInt32BE(REQUEST_MAGIC, 0)
    h.writeUInt16BE(CMD_DISC, 6)
    this.socket.end(h)
    this.dead = true
    setTimeout(() => this.socket.destroy(), 1000).unref()
  }

  #onRead(n: number, buf: Buffer): boolean {
    if (this.dead) return false
    if (this.#reader) {
      // The handshake reads whole messages; the receive buffer is reused, so keep a copy.
      this.#reader.push(Buffer.from(buf.subarray(0, n)))
      return true
    }
    this.lastProgress = Date.now()
    try {
      this.#parse(buf, n)
    } catch (err) {
      this.close(err as Error)
      return false
    }
    return true
  }

  /** The reply parser: replies are taken apart as bytes arrive; read data goes straight to the request. */
  #parse(buf: Buffer, n: number): void {
    let p = 0
    while (p < n) {
      switch (this.#state) {
        case Parse.Magic:
        case Parse.Header: {
          const take = Math.min(this.#headerWant - this.#headerHave, n - p)
          buf.copy(this.#header, this.#headerHave, p, p + take)
          p += take
          this.#headerHave += take
          if (this.#headerHave < this.#headerWant) break
          if (this.#state === Parse.Magic) {
            const magic = this.#header.readUInt32BE(0)
            if (magic === SIMPLE_REPLY_MAGIC) this.#headerWant = 16
            else if (magic === STRUCTURED_REPLY_MAGIC && this.info?.structuredReplies) this.#headerWant = 20
            else throw protocol(`bad reply magic 0x${magic.toString(16)}`)
            this.#state = Parse.Header
            break
          }
          this.#onHeader()
          break
        }
        case Parse.Collect: {
          const take = Math.min(this.#collectWant - this.#collectHave, n - p)
          buf.copy(this.#scratch, this.#collectHave, p, p + take)
          p += take
          this.#collectHave += take
          if (this.#collectHave === this.#collectWant) this.#onCollected()
          break
        }
        case Parse.Data: {
          const take = Math.min(this.#remaining, n - p)
          // A request that is gone (fenced, timed out) refuses the copy; its bytes are consumed all the same.
          this.#op!.io?.copyFrom(buf, p, take, this.#dataAt)
          p += take
          this.#dataAt += take
          this.#remaining -= take
          if (this.#remaining === 0) this.#chunkDone()
          break
        }
        case Parse.Skip: {
          const take = Math.min(this.#remaining, n - p)
          p += take
          this.#remaining -= take
          if (this.#remaining === 0) this.#chunkDone()
          break
        }
      }
    }
  }

  #lookup(): Op {
    const hi = this.#header.readUInt32BE(8)
    const cookie = hi * 0x1_0000_0000 + this.#header.readUInt32BE(12)
    const op = this.inflight.get(cookie)
    if (!op) throw protocol(`a reply to cookie ${cookie}, which is not in flight`)
    this.#cookie = cookie
    return op
  }

  #onHeader(): void {
    const op = (this.#op = this.#lookup())
    if (this.#headerWant === 16) {
      // A simple reply: an error, or success (followed by the data, for a read).
      this.#chunkFlags = REPLY_FLAG_DONE
      this.#chunkType = REPLY_TYPE_NONE
      const error = this.#header.readUInt32BE(4)
      if (error !== 0) op.error = error
      else if (op.type === CMD_READ) {
        if (this.info?.structuredReplies) throw protocol('a simple reply with data to a read')
        op.covered = op.length
        return this.#expectData(op.at, op.length)
      }
      return this.#chunkDone()
    }
    this.#chunkFlags = this.#header.readUInt16BE(4)
    this.#chunkType = this.#header.readUInt16BE(6)
    const length = this.#header.readUInt32BE(16)
    switch (this.#chunkType) {
      case REPLY_TYPE_NONE:
        if (length !== 0 || !(this.#chunkFlags & REPLY_FLAG_DONE)) throw protocol('a bad NONE chunk')
        return this.#chunkDone()
      case REPLY_TYPE_OFFSET_DATA:
        if (op.type !== CMD_READ || length <= 8) throw protocol('a bad OFFSET_DATA chunk')
        this.#remaining = length - 8
        return this.#collect(8)
      case REPLY_TYPE_OFFSET_HOLE:
        if (op.type !== CMD_READ || length !== 12) throw protocol('a bad OFFSET_HOLE chunk')
        return this.#collect(12)
      default:
        if (this.#chunkType & REPLY_TYPE_ERROR_BIT) {
          if (length < 6 || length > MAX_SMALL_PAYLOAD) throw protocol(`an error chunk of ${length} bytes`)
          return this.#collect(length)
        }
        // A chunk type we did not ask for and do not know: skip it.
        if (length === 0) return this.#chunkDone()
        this.#remaining = length
        this.#state = Parse.Skip
    }
  }

  #collect(n: number): void {
    if (this.#scratch.length < n) this.#scratch = Buffer.alloc(n)
    this.#collectHave = 0
    this.#collectWant = n
    this.#state = Parse.Collect
  }

  #onCollected(): void {
    const op = this.#op!
    switch (this.#chunkType) {
      case REPLY_TYPE_OFFSET_DATA: {
        const offset = readU64(this.#scratch, 0)
        const length = this.#remaining
        if (offset < op.offset || offset + length > op.offset + op.length) {
          throw protocol('read data outside the requested range')
        }
        cover(op, offset - op.offset, length)
        return this.#expectData(op.at + (offset - op.offset), length)
      }
      case REPLY_TYPE_OFFSET_HOLE: {
        const offset = readU64(this.#scratch, 0)
        const length = this.#scratch.readUInt32BE(8)
        if (offset < op.offset || offset + length > op.offset + op.length) {
          throw protocol('a hole outside the requested range')
        }
        cover(op, offset - op.offset, length)
        for (let done = 0; done < length;) {
          const n = Math.min(ZERO.length, length - done)
          op.io?.copyFrom(ZERO, 0, n, op.at + (offset - op.offset) + done)
          done += n
        }
        return this.#chunkDone()
      }
      default: {
        // An error chunk: errno first (0 is not an error; a broken server — still fail the request).
        op.error = this.#scratch.readUInt32BE(0) || 5
        return this.#chunkDone()
      }
    }
  }

  #expectData(at: number, length: number): void {
    this.#dataAt = at
    this.#remaining = length
    this.#state = Parse.Data
    if (length === 0) this.#chunkDone()
  }

  #chunkDone(): void {
    this.#state = Parse.Magic
    this.#headerHave = 0
    this.#headerWant = 4
    if (!(this.#chunkFlags & REPLY_FLAG_DONE)) return
    const op = this.#op!
    // Checked while the op is still in flight: the connection's loss then resends it.
    if (op.error === 0 && op.type === CMD_READ && op.covered !== op.length) {
      throw protocol(`a read reply covered ${op.covered} of ${op.length} bytes`)
    }
    this.#op = undefined
    this.inflight.delete(this.#cookie)
    if (op.error === ESHUTDOWN && this.#hooks) {
      // Not executed: the command goes to another connection, and this one takes nothing new.
      this.draining = true
      this.#hooks.retry(op)
      if (this.inflight.size === 0) this.#softDisconnect()
      return
    }
    this.#hooks?.done(op)
    finish(op, op.error)
    if (this.draining && this.inflight.size === 0) this.#softDisconnect()
  }

  /** After ESHUTDOWN, once idle: NBD_CMD_DISC, as the protocol asks, then the connection is lost. */
  #softDisconnect(): void {
    const h = Buffer.alloc(28)
    h.writeUInt32BE(REQUEST_MAGIC, 0)
    h.writeUInt16BE(CMD_DISC, 6)
    const err = new Error('the server is shutting down (ESHUTDOWN)')
    const timer = setTimeout(() => this.close(err), 1000)
    timer.unref()
    this.socket.end(h, () => {
      clearTimeout(timer)
      this.close(err)
    })
  }
}

/** Read chunks must not overlap (else a gap could pass for full coverage). Most replies are one chunk. */
const MAX_CHUNKS = 4096
function cover(op: Op, start: number, length: number): void {
  if (length <= 0) throw protocol('an empty read chunk')
  if (op.covered === 0) {
    op.first = start
  } else {
    const list = (op.chunks ??= [op.first, op.first + op.covered])
    if (list.length >= 2 * MAX_CHUNKS) throw protocol(`more than ${MAX_CHUNKS} chunks for one read`)
    for (let k = 0; k < list.length; k += 2) {
      if (start < list[k + 1]! && list[k]! < start + length) throw protocol('overlapping read chunks')
    }
    list.push(start, start + length)
  }
  op.covered += length
}

function readU64(b: Buffer, at: number): number {
  const v = b.readUInt32BE(at) * 0x1_0000_0000 + b.readUInt32BE(at + 4)
  if (!Number.isSafeInteger(v)) throw protocol('a 64-bit value beyond 2^53')
  return v
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x1_0000_0000), at)
  b.writeUInt32BE(v >>> 0, at + 4)
}

function protocol(message: string): VduseError {
  return nbdError('ERR_VDUSE_PROTOCOL', `NBD server: ${message}`, 'the server broke the NBD protocol')
}

function refusal(address: NbdAddress, type: number, data: Buffer): VduseError {
  const said = data.length > 0 ? `: ${data.toString('utf8')}` : ''
  const what = `export "${address.export}"`
  switch (type) {
    case REP_ERR_UNKNOWN:
      return nbdError('ERR_VDUSE_REFUSED', `the server has no ${what}${said}`, 'check the export name')
    case REP_ERR_POLICY:
      return nbdError('ERR_VDUSE_REFUSED', `the server refused ${what}${said}`, 'check its access rules')
    case REP_ERR_TLS_REQD:
      return nbdError(
        'ERR_VDUSE_REFUSED',
        `the server requires TLS for ${what}${said}`,
        'TLS is not supported: serve the export without TLS on a trusted network, or through a local TLS proxy',
      )
    case REP_ERR_SHUTDOWN:
      return nbdError('ERR_VDUSE_REFUSED', `the server is shutting down${said}`)
    case REP_ERR_BLOCK_SIZE_REQD:
      return nbdError('ERR_VDUSE_REFUSED', `the server requires block-size negotiation${said}`)
    default:
      return nbdError('ERR_VDUSE_REFUSED', `the server refused ${what} (error 0x${type.toString(16)})${said}`)
  }
}

function finish(op: Op, errno: number): void {
  const req = op.request
  if (errno !== 0 && !req.error) {
    const name = ERRNO_NAMES[errno] ?? `errno ${errno}`
    req.error = new VduseError(`NBD server: ${name}`, { code: 'ERR_VDUSE_SYSCALL', errno: -errno })
  }
  op.io = undefined
  op.data = undefined
  if (--req.parts > 0) return
  if (req.error) req.reject(req.error)
  else req.resolve()
}

function isCancelled(o: Op): boolean {
  // `cancelled` where the BlockIo has it: reading `signal` may create one per request.
  if (o.io) return o.io.cancelled ?? o.io.signal.aborted
  return o.signal?.aborted === true
}

function cancelled(): VduseError {
  return new VduseError('the request was cancelled (driver reset, or it timed out)', {
    code: 'ERR_VDUSE_TIMEOUT',
  })
}

function failRequest(op: Op, err: Error): void {
  op.request.error ??= err
  finish(op, 0)
}

/**
 * A block device backed by an NBD export (qemu-nbd, nbdkit, rbd-nbd, cloud block services).
 *
 * Many requests are in flight on a connection; with `connections` > 1 and a server that allows
 * multi-conn, on several. Read replies are parsed as they arrive and copied straight into the driver's
 * buffers; write data leaves from one device-owned copy. Features follow the export's flags: FLUSH
 * (or FUA on every write when the server can only do that), TRIM → discard, WRITE_ZEROES.
 *
 * When a connection drops, its requests are sent again on a new one, with backoff; the device stays up.
 * A server that answers ESHUTDOWN (a graceful stop) did not execute the command: it is sent again too,
 * and the connection takes nothing new and closes once idle — a restart is never an I/O error. A
 * connection counts as hung only when it stopped answering everything: after `hangTimeoutMs` of silence
 * with commands in flight a small read probes it, and it is cut when that gets no answer either — one
 * slow command (a long flush, trim or write) on a live server is never cut. Requests wait up to
 * `reconnectTimeoutMs`, then fail with an I/O error (`unavailable` event); reconnecting goes on, and a
 * server that comes back is served again. A reconnect to an export that shrank or lost a capability in
 * use is refused (`reconnectFailed`). A request that stops mattering while the server has it (the
 * device's `requestTimeoutMs`, a driver reset) fails; its connection is closed and the call stays running
 * until that connection is replaced (the device keeps newer writes to its bytes waiting meanwhile); the
 * connection's other commands are sent again.
 *
 * Flushes tell the truth across server restarts: changes the server acknowledged but no flush has made
 * durable yet (the export offers FLUSH: it may cache them) are kept, up to `keepUnflushedBytes` (the
 * newest change of a range replaces an older one; a background flush starts at a quarter), and after
 * any connection loss they are sent again — once nothing else is in flight, one at a time, in order —
 * before anything new. Past the limit nothing is kept until a flush covers it, and the first flush after
 * a loss meanwhile fails (EIO): some acknowledged writes may be gone.
 */
export class NbdBackend extends EventEmitter<NbdBackendEvents> implements BlockBackend {
  readonly size: number
  readonly readOnly: boolean
  /** `nbd:` and the export's canonical URI: the same export after a restart (`recover`). */
  readonly id: string
  readonly info: NbdExportInfo
  /** Logical block size to offer: the server's minimum block size, at least 512. */
  readonly blockSize: 512 | 4096
  /** The block sizes of the export, and FUA when the server offers it. */
  readonly capabilities: BlockBackendCapabilities
  flush?: () => Promise<void>
  discard?: (offset: number, length: number, signal?: AbortSignal) => Promise<void>
  writeZeroes?: (offset: number, length: number, unmap: boolean, signal?: AbortSignal) => Promise<void>

  readonly #address: NbdAddress
  readonly #options: Required<NbdBackendOptions>
  readonly #conns: Array<Connection | undefined>
  /** Commands waiting for a connection, oldest first. */
  #waiting: Op[] = []
  /** Since when no connection has been ready (0: one is). */
  #downSince = 0
  readonly #maxPayload: number
  readonly #receive: Buffer[] = []
  #timer: NodeJS.Timeout | undefined
  /** Per connection: its pending reconnect (timer, attempts, down since). */
  readonly #redial: Array<{ timer: NodeJS.Timeout | undefined; attempts: number; since: number }> = []
  #closed = false
  #reconnects = 0
  #shutdownRetries = 0
  #hungCut = 0
  #probes = 0
  /** The device's native data path, once it took the requests over (`kNativeBlock`). */
  #host: NativeBlockHost | undefined
  /** A device chose the native path (one device per backend). */
  #nativeTaken = false
  /** The export may cache writes (it offers FLUSH): acknowledged ones are kept until a flush. */
  readonly #volatile: boolean
  /** Largest TRIM / WRITE_ZEROES per command. */
  readonly #maxRange: number
  #ackSeq = 0
  /** Kept changes in acknowledgement order; a newer change of the same range replaces an older one. */
  readonly #retained = new Map<string, Retained>()
  #retainedBytes = 0
  /** The last acknowledged change that could not be kept (0: none), until a flush covers it. */
  #unkeptUntil = 0
  /** A connection was lost while unkept changes were unflushed: the next flush must fail. */
  #maybeLost = false
  /**
   * A connection was lost while changes were kept: they go again, one at a time and in order, once
   * nothing else is in flight; nothing new goes out until then.
   */
  #replayPending = false
  /** The kept changes still to send again, and the one on the wire. */
  #replayQueue: Retained[] = []
  #replayOp: Op | undefined
  #backgroundFlush = false
  /** Requests fenced while the server had them: settled once their connection is replaced. */
  readonly #fenced: Op[][] = []
  readonly #hooks: ConnectionHooks = { done: (o) => this.#done(o), retry: (o) => this.#retry(o) }
  readonly #sent: number[] = []

  /** Connects to the export at `uri` (see `parseNbdUri`) or `address`. */
  static async connect(target: string | NbdAddress, options: NbdBackendOptions = {}): Promise<NbdBackend> {
    const address = typeof target === 'string' ? parseNbdUri(target) : target
    const opts: Required<NbdBackendOptions> = {
      readOnly: options.readOnly ?? false,
      connections: options.connections ?? 1,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      hangTimeoutMs: options.hangTimeoutMs ?? 30_000,
      reconnectTimeoutMs: options.reconnectTimeoutMs ?? 60_000,
      keepUnflushedBytes: options.keepUnflushedBytes ?? 256 << 20,
      native: options.native ?? true,
    }
    if (!Number.isSafeInteger(opts.keepUnflushedBytes) || opts.keepUnflushedBytes < 0) {
      throw new VduseError('keepUnflushedBytes must be a whole number of bytes', {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    if (!Number.isInteger(opts.connections) || opts.connections < 1 || opts.connections > 16) {
      throw new VduseError('connections must be 1..16', { code: 'ERR_VDUSE_INVALID_CONFIG' })
    }
    const receive = [Buffer.allocUnsafe(256 << 10)]
    const first = await openConnection(0, address, receive[0]!, opts.connectTimeoutMs)
    const info = first.info!
    const wanted = info.flags & NBD_FLAGS.CAN_MULTI_CONN ? opts.connections : 1
    const conns = [first]
    // Nothing is left open when the connect fails (a later connection, or an export this cannot serve).
    try {
      for (let i = 1; i < wanted; i++) {
        receive.push(Buffer.allocUnsafe(256 << 10))
        const c = await openConnection(i, address, receive[i]!, opts.connectTimeoutMs)
        conns.push(c)
        checkSame(info, c.info!, { multiConn: true, blockSize: 512, maxPayload: 0, size: info.size })
      }
      return new NbdBackend(address, opts, info, conns, receive)
    } catch (err) {
      for (const c of conns) c.disconnect()
      throw err
    }
  }

  private constructor(
    address: NbdAddress,
    options: Required<NbdBackendOptions>,
    info: NbdExportInfo,
    conns: Connection[],
    receive: Buffer[],
  ) {
    super()
    this.#address = address
    this.#options = options
    this.info = info
    this.#receive.push(...receive)
    this.#conns = conns
    this.id = `nbd:${formatAddress(address)}`
    if (info.minBlockSize > 4096) {
      throw new VduseError(
        `the export's minimum block size is ${info.minBlockSize}; at most 4096 is supported`,
        {
          code: 'ERR_VDUSE_INVALID_CONFIG',
        },
      )
    }
    this.blockSize = info.minBlockSize > 512 ? 4096 : 512
    // A tail smaller than a block cannot be addressed by the driver.
    this.size = info.size - (info.size % this.blockSize)
    if (this.size <= 0) {
      throw new VduseError(`the export is ${info.size} bytes: smaller than a block`, {
        code: 'ERR_VDUSE_INVALID_CONFIG',
      })
    }
    this.readOnly = options.readOnly || (info.flags & NBD_FLAGS.READ_ONLY) !== 0
    // Split at a multiple of the block size, so every piece of an aligned request stays aligned.
    const limit = Math.min(info.maxBlockSize || DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD)
    this.#maxPayload = Math.max(this.blockSize, limit - (limit % this.blockSize))
    const has = (flag: number): boolean => (info.flags & flag) !== 0
    // Without FLUSH but with FUA, the device asks for FUA on every write (io.fua).
    const preferred = info.preferredBlockSize
    this.capabilities = {
      logicalBlockSize: this.blockSize,
      fua: has(NBD_FLAGS.SEND_FUA),
      ...(preferred > this.blockSize && preferred % this.blockSize === 0 && preferred <= this.#maxPayload
        ? { optimalIoSize: preferred }
        : {}),
    }
    this.#volatile = has(NBD_FLAGS.SEND_FLUSH)
    // The server's maximum, where it gave one, bounds commands without payload too.
    const range =
      info.blockSizesAdvertised && info.maxBlockSize > 0 ? Math.min(MAX_RANGE, info.maxBlockSize) : MAX_RANGE
    this.#maxRange = Math.max(this.blockSize, range - (range % this.blockSize))
    if (has(NBD_FLAGS.SEND_FLUSH)) this.flush = () => this.#flush()
    if (!this.readOnly && has(NBD_FLAGS.SEND_TRIM)) {
      this.discard = (offset, length, signal) => this.#ranges(CMD_TRIM, offset, length, 0, signal)
    }
    if (!this.readOnly && has(NBD_FLAGS.SEND_WRITE_ZEROES)) {
      this.writeZeroes = (offset, length, unmap, signal) =>
        this.#ranges(CMD_WRITE_ZEROES, offset, length, unmap ? 0 : CMD_FLAG_NO_HOLE, signal)
    }
    for (const c of conns) this.#watch(c)
    this.#redial = conns.map(() => ({ timer: undefined, attempts: 0, since: 0 }))
  }

  /** Connections ready now. */
  get connections(): number {
    if (this.#host) return this.#host.nbdCounters()?.connections ?? 0
    return this.#conns.filter((c) => c && !c.dead).length
  }

  /** Whether a device serves this export natively (requests never reach `read`/`write`). */
  get nativePath(): boolean {
    return this.#host !== undefined
  }

  /** Connections lost and replaced, since the start. */
  get reconnects(): number {
    return this.#host ? (this.#host.nbdCounters()?.reconnects ?? 0) : this.#reconnects
  }

  /** Commands the server refused while shutting down (ESHUTDOWN), sent again elsewhere. */
  get shutdownRetries(): number {
    return this.#shutdownRetries + (this.#host?.nbdCounters()?.shutdownRetries ?? 0)
  }

  /** Connections cut as hung. */
  get hungCut(): number {
    return this.#hungCut + (this.#host?.nbdCounters()?.hungCut ?? 0)
  }

  /** Quiet connections probed (the probes that showed them alive). */
  get probes(): number {
    return this.#probes + (this.#host?.nbdCounters()?.probes ?? 0)
  }

  /**
   * Takes the device's native data path (see `kNativeBlock`): opens every connection again for it
   * (dialled natively, handshaken here, checked to reach the same export), then closes the JavaScript
   * ones. Rejects — the device is not created — when a connection cannot be opened.
   */
  [kNativeBlock](): NativeBlockPath | undefined {
    if (!this.#options.native || this.#closed) return undefined
    if (this.#nativeTaken) {
      throw new VduseError('this NbdBackend already serves a device natively', {
        code: 'ERR_VDUSE_BUSY',
        hint: 'connect one NbdBackend per device',
      })
    }
    this.#nativeTaken = true
    return { start: (host, device) => this.#goNative(host, device) }
  }

  async #goNative(host: NativeBlockHost, device: NativeBlockOptions): Promise<void> {
    const has = (flag: number): boolean => (this.info.flags & flag) !== 0
    host.nbdStart(
      {
        size: this.size,
        blockSize: this.blockSize,
        maxPayload: this.#maxPayload,
        maxRange: this.#maxRange,
        volatile: this.#volatile,
        alwaysFua: this.flush === undefined && has(NBD_FLAGS.SEND_FUA),
      },
      {
        connections: this.#conns.length,
        hangTimeoutMs: this.#options.hangTimeoutMs,
        reconnectTimeoutMs: this.#options.reconnectTimeoutMs,
        requestTimeoutMs: device.requestTimeoutMs,
        keepUnflushedBytes: this.#options.keepUnflushedBytes,
      },
      (e) => this.#onNative(e),
    )
    // Native from here on: a connection lost while the others are still being opened is replaced
    // natively too.
    this.#host = host
    try {
      for (let i = 0; i < this.#conns.length; i++) {
        // The server may take one client at a time (qemu-nbd's default): this slot's JavaScript
        // connection goes first.
        this.#conns[i]?.disconnect()
        this.#conns[i] = undefined
        await this.#attachNative(host, i)
      }
    } catch (err) {
      this.#host = undefined
      for (const r of this.#redial) {
        if (r.timer) clearTimeout(r.timer)
        r.timer = undefined
      }
      throw err
    }
    // A flush goes through the native path from now on.
    if (this.flush) this.flush = () => host.nbdFlush(this.#options.reconnectTimeoutMs)
  }

  /** What a new connection must still offer: what this backend uses of the export. */
  #inUse(): { multiConn: boolean; blockSize: number; maxPayload: number; size: number } {
    return {
      multiConn: this.#conns.length > 1,
      blockSize: this.blockSize,
      maxPayload: this.#maxPayload,
      size: this.size,
    }
  }

  /** Opens connection `index` of the native path: dialled natively, handshaken here, then handed over. */
  async #attachNative(host: NativeBlockHost, index: number): Promise<void> {
    const a = this.#address
    const target = a.socket !== undefined ? { path: a.socket } : { host: a.host!, port: a.port ?? 10809 }
    const socket = await nativeAsync(() => binding.nbdDial(target, this.#options.connectTimeoutMs))
    try {
      const conn = await openConnection(
        index,
        a,
        this.#receive[index]!,
        this.#options.connectTimeoutMs,
        false,
        socket.fd,
      )
      try {
        checkSame(this.info, conn.info!, this.#inUse())
        conn.handOver()
      } catch (err) {
        conn.disconnect()
        throw err
      }
      native(() => host.nbdAttach(index, socket, conn.info!.structuredReplies))
    } finally {
      // The engine's half, unless it was attached.
      socket.close()
    }
  }

  /** What the native path tells: a connection lost (it is replaced), or requests that waited too long. */
  #onNative(e: NbdEventJs): void {
    if (this.#closed) return
    if (e.kind === 'unavailable') {
      this.#emitSafely('unavailable', { failed: e.failed ?? 0, error: this.#unreachable() })
      return
    }
    const index = e.slot ?? 0
    const r = this.#redial[index]
    if (!r || r.timer) return
    this.#emitSafely('disconnected', { connection: index, error: new Error(e.message ?? 'connection lost') })
    // Backoff starts over only after a connection that lived.
    if (Date.now() - r.since >= 5000) r.attempts = 0
    r.since = Date.now()
    this.#scheduleReconnect(index)
  }

  /** The canonical URI of the export. */
  get uri(): string {
    return formatAddress(this.#address)
  }

  read(io: BlockIo): Promise<void> {
    return this.#transfer(io, CMD_READ, 0)
  }

  write(io: BlockIo): Promise<void> {
    // The device sets io.fua; a caller that does not know it gets the safe default (FUA when no flush).
    const fua = io.fua ?? (this.flush === undefined && (this.info.flags & NBD_FLAGS.SEND_FUA) !== 0)
    return this.#transfer(io, CMD_WRITE, fua ? CMD_FLAG_FUA : 0)
  }

  #transfer(io: BlockIo, type: number, flags: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const parts = Math.max(1, Math.ceil(io.length / this.#maxPayload))
      const request: Request = { parts, error: undefined, resolve, reject }
      const data = type === CMD_WRITE ? io.buffers[0]! : undefined
      for (let at = 0, k = 0; k < parts; k++, at += this.#maxPayload) {
        const length = Math.min(this.#maxPayload, io.length - at)
        this.#submit({
          type,
          flags,
          offset: io.offset + at,
          length,
          at,
          data: data && (parts === 1 ? data : data.subarray(at, at + length)),
          io,
          request,
          covered: 0,
          error: 0,
          born: 0,
          kind: OpKind.Request,
          mark: 0,
          signal: undefined,
          first: 0,
          chunks: undefined,
        })
      }
    })
  }

  #ranges(
    type: number,
    offset: number,
    length: number,
    flags: number,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    if (signal?.aborted) return Promise.reject(cancelled())
    return new Promise((resolve, reject) => {
      const max = this.#maxRange
      const parts = Math.max(1, Math.ceil(length / max))
      const request: Request = { parts, error: undefined, resolve, reject }
      for (let at = 0, k = 0; k < parts; k++, at += max) {
        this.#submit(op(type, flags, offset + at, Math.min(max, length - at), request, signal))
      }
    })
  }

  #flush(): Promise<void> {
    if (this.#maybeLost) {
      // Reported once, as the kernel reports a lost page-cache write once: the data is still gone.
      this.#maybeLost = false
      return Promise.reject(
        new VduseError(
          'NBD server: writes it acknowledged before every connection was lost were not kept, and may be gone',
          { code: 'ERR_VDUSE_SYSCALL', errno: -5 },
        ),
      )
    }
    return this.#command(CMD_FLUSH, 0, 0, 0)
  }

  #command(type: number, offset: number, length: number, flags: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#submit(op(type, flags, offset, length, { parts: 1, error: undefined, resolve, reject }))
    })
  }

  #submit(o: Op): void {
    if (this.#closed) {
      return failRequest(o, new VduseError('the NBD backend is closed', { code: 'ERR_VDUSE_CLOSED' }))
    }
    o.born = Date.now()
    const conn = this.#replayPending ? undefined : this.#pick()
    if (conn) {
      this.#send(conn, o)
      this.#arm()
      return
    }
    // No connection: wait for one — unless the server has been gone longer than requests may wait.
    if (this.#downSince > 0 && o.born - this.#downSince >= this.#options.reconnectTimeoutMs) {
      return failRequest(o, this.#unreachable())
    }
    this.#waiting.push(o)
    this.#arm()
  }

  #send(conn: Connection, o: Op): void {
    this.#sent[conn.index] = (this.#sent[conn.index] ?? 0) + 1
    // A flush covers what was acknowledged before the server receives it.
    if (o.type === CMD_FLUSH) o.mark = this.#ackSeq
    conn.send(o)
  }

  /** A command finished: keep what a restart could lose, forget what a flush made durable. */
  #done(o: Op): void {
    if (o.kind === OpKind.Probe) return
    if (o.kind === OpKind.Replay) {
      // A change that could not be sent again may be gone: the next flush says so.
      if (o.error !== 0) this.#maybeLost = true
      if (this.#replayOp === o) {
        this.#replayOp = undefined
        this.#replayNext()
      }
      return
    }
    // The last command of the lost session's time finished: the replay may begin.
    if (this.#replayPending) queueMicrotask(() => this.#replayStart())
    if (o.error !== 0 || !this.#volatile) return
    const t = o.type
    if (t === CMD_FLUSH) {
      for (const [key, r] of this.#retained) {
        if (r.seq > o.mark) break
        this.#retained.delete(key)
        this.#retainedBytes -= r.data ? r.length : RANGE_COST
      }
      if (this.#unkeptUntil > 0 && this.#unkeptUntil <= o.mark) this.#unkeptUntil = 0
      return
    }
    const change = t === CMD_WRITE || t === CMD_TRIM || t === CMD_WRITE_ZEROES
    if (!change || o.flags & CMD_FLAG_FUA) return
    const seq = ++this.#ackSeq
    const cost = t === CMD_WRITE ? o.length : RANGE_COST
    if (this.#unkeptUntil > 0 || this.#retainedBytes + cost > this.#options.keepUnflushedBytes) {
      // Past the limit nothing is kept — a partial set sent again could put an older change over a
      // newer one — until a flush covers every change that was not.
      this.#unkeptUntil = seq
      this.#retained.clear()
      this.#retainedBytes = 0
    } else {
      const key = `${t}:${o.offset}:${o.length}`
      const old = this.#retained.get(key)
      if (old) {
        this.#retained.delete(key)
        this.#retainedBytes -= old.data ? old.length : RANGE_COST
      }
      const data = t === CMD_WRITE && o.data ? Buffer.from(o.data) : undefined
      this.#retained.set(key, { type: t, flags: o.flags, offset: o.offset, length: o.length, data, seq })
      this.#retainedBytes += cost
    }
    if (
      (this.#retainedBytes > this.#options.keepUnflushedBytes / 4 || this.#unkeptUntil > 0) &&
      !this.#backgroundFlush &&
      this.flush
    ) {
      this.#backgroundFlush = true
      this.#command(CMD_FLUSH, 0, 0, 0)
        .catch(noop)
        .finally(() => (this.#backgroundFlush = false))
    }
  }

  /** The server refused a command while shutting down: it was not executed; it goes first, elsewhere. */
  #retry(o: Op): void {
    this.#shutdownRetries++
    if (o.kind === OpKind.Probe) return finish(o, 0)
    this.#waiting.unshift(o)
    this.#arm()
    this.#dispatch()
  }

  /**
   * A connection was lost: the server may have restarted without its cache. Changes it acknowledged that
   * no flush made durable are sent again — after everything still in flight elsewhere has finished, one
   * at a time, in the order they were acknowledged — before anything new.
   */
  #replay(): void {
    if (this.#unkeptUntil > 0) this.#maybeLost = true
    // A replay under way starts again from the first change: the server may have lost those too.
    this.#replayQueue = []
    this.#replayOp = undefined
    this.#replayPending = this.#retained.size > 0
  }

  /** Starts the replay once nothing of the lost session's time is in flight and a connection is up. */
  #replayStart(): void {
    if (!this.#replayPending || this.#replayOp || this.#replayQueue.length > 0) return
    for (const c of this.#conns) if (c && !c.dead && c.inflight.size > 0) return
    if (!this.#pick()) return
    this.#replayQueue = [...this.#retained.values()]
    this.#replayNext()
  }

  #replayNext(): void {
    const r = this.#replayQueue.shift()
    if (!r) {
      this.#replayPending = false
      return this.#dispatch()
    }
    const conn = this.#pick()
    if (!conn) {
      // Lost again: it starts over once a connection is back.
      this.#replayQueue = []
      return
    }
    const o = op(r.type, r.flags, r.offset, r.length, {
      parts: 1,
      error: undefined,
      resolve: noop,
      reject: noop,
    })
    o.data = r.data
    o.kind = OpKind.Replay
    o.born = Date.now()
    this.#replayOp = o
    this.#send(conn, o)
    this.#arm()
  }

  /** Commands in flight on connections or waiting for one (probes and replays included). */
  get pending(): number {
    if (this.#host) return this.#host.nbdCounters()?.pending ?? 0
    let n = this.#waiting.length
    for (const c of this.#conns) if (c && !c.dead) n += c.inflight.size
    return n
  }

  /** Acknowledged changes kept until a flush (see the class notes). */
  get unflushed(): { changes: number; bytes: number } {
    const c = this.#host?.nbdCounters()
    if (c) return { changes: c.unflushedChanges, bytes: c.unflushedBytes }
    return { changes: this.#retained.size, bytes: this.#retainedBytes }
  }

  /** Commands sent on each connection (slot) since the start, resends included. */
  get commandsSent(): number[] {
    const c = this.#host?.nbdCounters()
    if (c) return c.sent
    return this.#conns.map((_, i) => this.#sent[i] ?? 0)
  }

  /** The ready connection with the fewest commands in flight. */
  #pick(): Connection | undefined {
    let best: Connection | undefined
    for (const c of this.#conns) {
      if (c && c.ready && (!best || c.inflight.size < best.inflight.size)) best = c
    }
    return best
  }

  #watch(conn: Connection): void {
    conn.whenClosed((err) => this.#lost(conn, err), this.#hooks)
  }

  /** An event nobody's listener may turn into the end of reconnecting (or of the server). */
  #emitSafely<K extends keyof NbdBackendEvents>(event: K, ...args: NbdBackendEvents[K]): void {
    try {
      ;(this.emit as (e: K, ...a: NbdBackendEvents[K]) => boolean)(event, ...args)
    } catch (err) {
      process.emitWarning(err instanceof Error ? err : new Error(String(err)), { code: 'VDUSE_LISTENER' })
    }
  }

  /** A connection died: its commands wait for another, and it is replaced. */
  #lost(conn: Connection, err: Error): void {
    if (this.#conns[conn.index] !== conn) return
    this.#conns[conn.index] = undefined
    const orphans: Op[] = []
    for (const o of conn.inflight.values()) {
      // A probe's question died with its connection; a replay starts over.
      if (o.kind === OpKind.Probe || o.kind === OpKind.Replay) finish(o, 0)
      else orphans.push(o)
    }
    conn.inflight.clear()
    // They were sent before anything that is waiting: they go first.
    this.#waiting = orphans.concat(this.#waiting)
    const allLost = !this.#conns.some((c) => c && !c.dead)
    if (allLost && this.#downSince === 0) this.#downSince = Date.now()
    if (this.#closed) {
      this.#failWaiting(new VduseError('the NBD backend is closed', { code: 'ERR_VDUSE_CLOSED' }))
      return
    }
    // Any loss may be a restart that lost the server's cache (with several connections, each notices on
    // its own clock): what it acknowledged goes again first.
    this.#replay()
    this.#emitSafely('disconnected', { connection: conn.index, error: err })
    this.#replayStart()
    this.#dispatch()
    const r = this.#redial[conn.index]!
    // Backoff starts over only after a connection that lived: one that dies at once keeps backing off.
    if (Date.now() - conn.openedAt >= 5000) r.attempts = 0
    r.since = Date.now()
    this.#scheduleReconnect(conn.index)
    this.#arm()
  }

  #scheduleReconnect(index: number): void {
    const r = this.#redial[index]!
    // 50 ms, doubling, at most 2 s between attempts.
    const delay = Math.min(2000, 50 * 2 ** Math.min(r.attempts, 6))
    // Reconnecting alone does not keep the process alive; requests waiting for it do (the watchdog).
    r.timer = setTimeout(() => {
      // A listener that throws is the listener's bug: surface it as any throwing listener would.
      this.#reconnect(index).catch((err: unknown) =>
        process.nextTick(() => {
          throw err
        }),
      )
    }, delay).unref()
  }

  async #reconnect(index: number): Promise<void> {
    const r = this.#redial[index]!
    r.timer = undefined
    if (this.#closed) return
    r.attempts++
    if (this.#host) return this.#reconnectNative(index)
    let conn: Connection
    try {
      conn = await openConnection(
        index,
        this.#address,
        this.#receive[index]!,
        this.#options.connectTimeoutMs,
        false,
      )
      try {
        checkSame(this.info, conn.info!, this.#inUse())
      } catch (err) {
        conn.disconnect()
        throw err
      }
    } catch (err) {
      if (this.#closed) return
      return this.#reconnectFailed(index, err)
    }
    if (this.#closed) return conn.disconnect()
    this.#conns[index] = conn
    this.#watch(conn)
    this.#downSince = 0
    this.#reconnects++
    this.#emitSafely('reconnected', { connection: index, attempts: r.attempts, downMs: Date.now() - r.since })
    // Requests fenced on the connection this one replaces are settled now (they stayed running until
    // the server saw that connection go).
    const fenced = this.#fenced[index]?.splice(0) ?? []
    for (const o of fenced) failRequest(o, cancelled())
    this.#replayStart()
    this.#dispatch()
  }

  /** A reconnect attempt failed: say so, and try again later. */
  #reconnectFailed(index: number, err: unknown): void {
    const error =
      err instanceof VduseError
        ? err
        : nbdError('ERR_VDUSE_UNREACHABLE', `cannot reconnect to ${this.uri}`, undefined, err)
    this.#emitSafely('reconnectFailed', { connection: index, attempts: this.#redial[index]!.attempts, error })
    this.#scheduleReconnect(index)
  }

  async #reconnectNative(index: number): Promise<void> {
    const r = this.#redial[index]!
    try {
      await this.#attachNative(this.#host!, index)
    } catch (err) {
      // The device is gone: its data path needs no connection any more.
      if (this.#closed || (err instanceof VduseError && err.code === 'ERR_VDUSE_CLOSED')) return
      return this.#reconnectFailed(index, err)
    }
    this.#emitSafely('reconnected', { connection: index, attempts: r.attempts, downMs: Date.now() - r.since })
    r.since = Date.now()
  }

  /** Sends the waiting commands that still matter. */
  #dispatch(): void {
    const now = Date.now()
    let k = 0
    for (; k < this.#waiting.length; k++) {
      const o = this.#waiting[k]!
      // Kept changes sent again after a loss go first, alone: nothing newer may overtake them.
      if (this.#replayPending) break
      const conn = this.#pick()
      if (!conn) break
      // A request fenced (driver reset) or timed out while it waited must not reach the server: a stale
      // write would overwrite newer data.
      if (isCancelled(o)) failRequest(o, cancelled())
      // Bounded retries: a server that takes requests and hangs must not keep one alive forever.
      else if (now - o.born >= this.#options.reconnectTimeoutMs) failRequest(o, this.#unreachable())
      else this.#send(conn, o)
    }
    this.#waiting.splice(0, k)
    if (k > 0) this.#arm()
  }

  #unreachable(): VduseError {
    return nbdError(
      'ERR_VDUSE_UNREACHABLE',
      `the NBD server ${this.uri} has been unreachable for ${this.#options.reconnectTimeoutMs} ms`,
      'requests fail until it is back; reconnecting goes on',
    )
  }

  #failWaiting(err: VduseError): number {
    const failed = this.#waiting.splice(0)
    for (const o of failed) failRequest(o, err)
    return failed.length
  }

  /** The watchdog: hung connections, and requests that waited too long for one. Runs only while needed. */
  #arm(): void {
    if (this.#timer) {
      if (this.#waiting.length > 0) this.#timer.ref()
      return
    }
    if (this.#closed) return
    const period = Math.max(
      20,
      Math.min(250, this.#options.hangTimeoutMs > 0 ? this.#options.hangTimeoutMs / 4 : 250),
    )
    this.#timer = setInterval(() => this.#watchdog(), period)
    // Requests waiting for a connection are work in progress; reply deadlines alone are not.
    if (this.#waiting.length === 0) this.#timer.unref()
  }

  #watchdog(): void {
    const now = Date.now()
    const limit = this.#options.reconnectTimeoutMs
    // Requests that waited too long fail; requests fenced while they waited are dropped.
    let expired = 0
    const error = this.#unreachable()
    this.#waiting = this.#waiting.filter((o) => {
      if (isCancelled(o)) {
        failRequest(o, cancelled())
        return false
      }
      if (now - o.born < limit) return true
      failRequest(o, error)
      expired++
      return false
    })
    if (expired > 0) this.#emitSafely('unavailable', { failed: expired, error })
    const hang = this.#options.hangTimeoutMs
    let busy = false
    for (const c of this.#conns) {
      if (!c || c.dead || c.inflight.size === 0) continue
      busy = true
      // A request that stopped mattering (timed out, fenced) while the server has it: it fails now, and
      // its connection goes, so that its copy cannot land after newer writes. The others are resent.
      let fenced = false
      for (const [cookie, o] of c.inflight) {
        if (o.kind === OpKind.Request && isCancelled(o)) {
          // Not settled yet: until the server has seen this connection go, the call stays running, so
          // the device keeps newer writes to its bytes waiting (it settles when the slot reconnects).
          c.inflight.delete(cookie)
          ;(this.#fenced[c.index] ??= []).push(o)
          fenced = true
        }
      }
      if (fenced) {
        c.close(new Error('a request that timed out or was fenced was in flight: its connection is closed'))
        continue
      }
      if (hang === 0) continue
      // A draining connection (ESHUTDOWN) waits for its last answers, bounded even without a hang timeout.
      if (c.draining && now - c.lastProgress >= (hang || 30_000)) {
        c.close(new Error('the server shut down and stopped answering'))
        continue
      }
      // Liveness, not silence: a quiet connection is asked a small read; only one that answers nothing
      // at all for another `hangTimeoutMs` is cut.
      // Anything received since the probe went out (it was sent to a connection quiet for `hang`) answers it.
      if (c.probeSent > 0 && c.lastProgress >= c.probeSent) c.probeSent = 0
      if (now - c.lastProgress < hang) continue
      if (c.probeSent === 0 && !c.draining) this.#probe(c)
      else if (now - c.probeSent >= hang) {
        this.#hungCut++
        c.close(
          new Error(
            `nothing received for ${now - c.lastProgress} ms with requests in flight, a probe unanswered: ` +
              'the connection is considered hung',
          ),
        )
      }
    }
    if (!busy && this.#waiting.length === 0) {
      clearInterval(this.#timer)
      this.#timer = undefined
    } else if (this.#waiting.length === 0) this.#timer?.unref()
  }

  /** Asks a quiet connection a one-block read: any answer shows the server is alive. */
  #probe(c: Connection): void {
    const o = op(CMD_READ, 0, 0, this.blockSize, { parts: 1, error: undefined, resolve: noop, reject: noop })
    o.kind = OpKind.Probe
    o.born = Date.now()
    c.probeSent = o.born
    this.#probes++
    this.#send(c, o)
  }

  /** Waits (up to `timeoutMs`) for the commands in flight, then ends every session politely. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }

  async close(timeoutMs = 5000): Promise<void> {
    if (this.#closed) return
    const deadline = Date.now() + timeoutMs
    while (Date.now() < deadline && this.#conns.some((c) => c && !c.dead && c.inflight.size > 0)) {
      await new Promise((r) => setTimeout(r, 10))
    }
    this.#closed = true
    if (this.#timer) clearInterval(this.#timer)
    for (const r of this.#redial) if (r.timer) clearTimeout(r.timer)
    this.#failWaiting(new VduseError('the NBD backend is closed', { code: 'ERR_VDUSE_CLOSED' }))
    for (const parked of this.#fenced) for (const o of parked?.splice(0) ?? []) failRequest(o, cancelled())
    for (const c of this.#conns) {
      if (!c) continue
      const orphans = [...c.inflight.values()]
      c.inflight.clear()
      c.disconnect()
      for (const o of orphans)
        failRequest(o, new VduseError('the NBD backend is closed', { code: 'ERR_VDUSE_CLOSED' }))
    }
  }
}

function op(
  type: number,
  flags: number,
  offset: number,
  length: number,
  request: Request,
  signal?: AbortSignal,
): Op {
  return {
    type,
    flags,
    offset,
    length,
    at: 0,
    data: undefined,
    io: undefined,
    request,
    covered: 0,
    error: 0,
    born: 0,
    kind: OpKind.Request,
    mark: 0,
    signal,
    first: 0,
    chunks: undefined,
  }
}

async function openConnection(
  index: number,
  address: NbdAddress,
  receive: Buffer,
  timeoutMs: number,
  keepAlive = true,
  fd?: number,
): Promise<Connection> {
  const conn = new Connection(index, address, receive, fd)
  const where = formatAddress(address)
  const timer = setTimeout(
    () =>
      conn.close(nbdError('ERR_VDUSE_UNREACHABLE', `no NBD handshake from ${where} within ${timeoutMs} ms`)),
    timeoutMs,
  )
  // A background reconnect does not keep the process alive by itself (requests waiting for it do).
  if (!keepAlive) timer.unref()
  try {
    await conn.handshake(address)
    return conn
  } catch (err) {
    conn.close(err as Error)
    if (err instanceof VduseError) throw err
    const e = err as NodeJS.ErrnoException
    throw nbdError(
      'ERR_VDUSE_UNREACHABLE',
      `cannot connect to ${where}: ${e.message}`,
      address.socket !== undefined
        ? 'is the server running, and the socket path right?'
        : 'is the server running, and the host and port right?',
      err,
    )
  } finally {
    clearTimeout(timer)
  }
}

/** A new connection must reach the same export: same size, no capability lost that is in use. */
function checkSame(
  was: NbdExportInfo,
  now: NbdExportInfo,
  use: { multiConn: boolean; blockSize: number; maxPayload: number; size: number },
): void {
  const mismatch = (what: string): never => {
    throw new VduseError(`the export changed: ${what}`, {
      code: 'ERR_VDUSE_MISMATCH',
      hint: 'the server serves a different export under this name; requests fail until the old one is back',
    })
  }
  // An export that grew still holds every block the device has (the device keeps its size).
  if (now.size < use.size) mismatch(`it is now ${now.size} bytes (was ${was.size})`)
  const needed = NBD_FLAGS.SEND_FLUSH | NBD_FLAGS.SEND_FUA | NBD_FLAGS.SEND_TRIM | NBD_FLAGS.SEND_WRITE_ZEROES
  const lost = was.flags & needed & ~now.flags
  if (lost !== 0)
    mismatch(`it lost capabilities (flags 0x${was.flags.toString(16)} → 0x${now.flags.toString(16)})`)
  if (now.flags & NBD_FLAGS.READ_ONLY && !(was.flags & NBD_FLAGS.READ_ONLY)) mismatch('it is read-only now')
  // With several connections, a flush on one covers writes on the others only under multi-conn.
  if (use.multiConn && !(now.flags & NBD_FLAGS.CAN_MULTI_CONN)) mismatch('it no longer allows multi-conn')
  if (now.minBlockSize > Math.max(use.blockSize, was.minBlockSize))
    mismatch(`minimum block size ${now.minBlockSize}`)
  if (use.maxPayload > 0 && now.maxBlockSize > 0 && now.maxBlockSize < use.maxPayload) {
    mismatch(`maximum block size ${now.maxBlockSize}`)
  }
}
