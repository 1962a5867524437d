// The NBD wire format (fixed-newstyle handshake, simple and structured replies): pure functions
// and two incremental decoders, no sockets. docs/protocols/nbd.md says which parts of
// NetworkBlockDevice/nbd doc/proto.md we speak; this file must match that spec byte for byte.
// Every integer on the wire is big-endian.
//
// Decoders are pull-based (`push` bytes, then call `next` until it returns undefined) because the
// meaning of the next bytes depends on what the server decided about the previous message: after
// a successful NBD_OPT_GO they are transmission requests, after a failed one they are options.
// The server calls `startTransmission()` between two `next()` calls and nothing is misparsed.
//
// Buffer ownership, decided once here (STYLE habit 2):
// - `push` takes ownership of a chunk: the caller must never write into it afterwards. Sockets
//   hand out a fresh buffer per read, and testing.ts's pipe copies, so nobody does. The decoders
//   never write into a pushed chunk either.
// - A WRITE payload (or any option/reply body) lying inside one chunk is handed out as a view of
//   that chunk; one spanning chunks is copied into an allocation holding just that payload.
//   Either way it is memory nothing will rewrite, so a device may keep it (a volume may queue it
//   as a block) without copying. A small payload viewing a chunk more than twice its size is
//   copied so that a 4 KiB write kept by a device does not pin a 64 KiB socket read.
// - A decoder made with `readBuffer` is not pushed chunks: it says where each socket read lands
//   (`readTarget`, for net's `onread`). A WRITE payload, once started, gets a buffer of its own of
//   exactly its length and the reads after its header land in it; everything else lands in one
//   read buffer that the next read overwrites, so nothing decoded from it is handed out as a view
//   (the part of a payload that came in the same read as its header is copied once).
// - Encoders never copy a READ payload: they return it as its own part of a Buffer[] so the
//   socket writes it from the device's buffer (writev). The device must not change a buffer it
//   returned from read(); MemoryDevice returns fresh ones.

import { BufferPool } from '../core/buffer-pool.js';
import { TorusError } from '../core/errors.js';

// ---------------------------------------------------------------------------------------------
// Constants (names as in proto.md, without the NBD_ prefix)

/** "NBDMAGIC" */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the second greeting word and the first word of every option. */
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
export const KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;

export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
} as const;

export function isErrorReply(replyType: number): boolean {
  return replyType >= REP_ERR;
}

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CmdFlag = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

export function isErrorChunk(type: number): boolean {
  return (type & 0x8000) !== 0;
}

/** base:allocation descriptor flags. */
export const State = { HOLE: 1 << 0, ZERO: 1 << 1 } as const;

/** The error numbers proto.md allows on the wire; anything else a client treats as EINVAL. */
export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type Errno = (typeof Errno)[keyof typeof Errno];

const ERRNO_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(Errno).map(([k, v]) => [v, k]));
export function errnoName(n: number): string {
  return ERRNO_NAMES[n] ?? `errno ${n}`;
}

const CMD_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(Cmd).map(([k, v]) => [v, k]));
export function commandName(n: number): string {
  return CMD_NAMES[n] ?? `command ${n}`;
}

const OPT_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(Opt).map(([k, v]) => [v, k]));
export function optionName(n: number): string {
  return OPT_NAMES[n] ?? `option ${n}`;
}

export const BASE_ALLOCATION = 'base:allocation';

export const GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_HEADER_SIZE = 20;
/** Size of the reply to NBD_OPT_EXPORT_NAME with and without the 124 reserved zero bytes. */
export const EXPORT_NAME_REPLY_SIZE = 134;
export const EXPORT_NAME_REPLY_SIZE_NO_ZEROES = 10;

/** proto.md: strings (export names, queries, messages) MUST be at most 4096 bytes. */
export const MAX_STRING_BYTES = 4096;
/**
 * Largest option body we accept. The largest legitimate ones are INFO/GO and the meta-context
 * options: a 4096-byte name plus a few 4096-byte queries. A client announcing more (up to the
 * 4 GiB a u32 allows) is refused from the header alone, before any of its body is buffered.
 */
export const DEFAULT_MAX_OPTION_LENGTH = 64 * 1024;
/**
 * Largest READ or WRITE payload: 32 MiB, the size proto.md says no server should treat as
 * denial of service, and the maximum block size we advertise.
 */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Largest body the client-side decoder accepts in option replies and structured chunks. */
const DEFAULT_MAX_REPLY_LENGTH = DEFAULT_MAX_PAYLOAD + 64;

const TWO32 = 2 ** 32;
const MAX_U32 = 0xffffffff;

// ---------------------------------------------------------------------------------------------
// Small writers and readers

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO32) >>> 0, at);
  buf.writeUInt32BE(value % TWO32 >>> 0, at + 4);
}

/**
 * A u64 as a JavaScript number. Exact up to 2^53; above that the value is approximate but still
 * above 2^53, which is all a range check against an export size (< 2^53) needs.
 */
function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO32 + buf.readUInt32BE(at + 4);
}

function checkU64(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new TorusError('INVALID_ARGUMENT', `${what} ${value} is not a u64 this codec can encode exactly`);
}

function checkU32(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > MAX_U32) throw new TorusError('INVALID_ARGUMENT', `${what} ${value} does not fit in a u32`);
}

function checkU16(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw new TorusError('INVALID_ARGUMENT', `${what} ${value} does not fit in a u16`);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decodes a protocol string: valid UTF-8, no NUL, at most 4096 bytes. PROTOCOL otherwise. */
export function decodeString(bytes: Uint8Array, what: string): string {
  if (bytes.length > MAX_STRING_BYTES) throw new TorusError('PROTOCOL', `${what} is ${bytes.length} bytes, over the ${MAX_STRING_BYTES}-byte limit`);
  if (bytes.includes(0)) throw new TorusError('PROTOCOL', `${what} contains a NUL byte`);
  try {
    return utf8.decode(bytes);
  } catch {
    throw new TorusError('PROTOCOL', `${what} is not valid UTF-8`);
  }
}

/** A string for the wire, cut on a character boundary to at most `max` bytes. */
export function encodeString(text: string, max = MAX_STRING_BYTES): Buffer {
  const full = Buffer.from(text, 'utf8');
  if (full.length <= max) return full;
  let end = max;
  // back up over UTF-8 continuation bytes so the cut lands on a character boundary
  while (end > 0 && ((full[end] ?? 0) & 0xc0) === 0x80) end--;
  return full.subarray(0, end);
}

// ---------------------------------------------------------------------------------------------
// Handshake: server side

export function encodeGreeting(handshakeFlags: number = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES): Buffer {
  checkU16(handshakeFlags, 'handshake flags');
  const b = Buffer.allocUnsafe(GREETING_SIZE);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and the zeroes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  checkU64(size, 'export size');
  checkU16(transmissionFlags, 'transmission flags');
  const b = Buffer.alloc(noZeroes ? EXPORT_NAME_REPLY_SIZE_NO_ZEROES : EXPORT_NAME_REPLY_SIZE);
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

export function encodeOptionReply(option: number, replyType: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  checkU32(option, 'option');
  checkU32(replyType, 'reply type');
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(replyType, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** An error reply; the message is for humans and is cut to the 4096-byte string limit. */
export function encodeOptionError(option: number, replyType: number, message = ''): Buffer {
  if (!isErrorReply(replyType)) throw new TorusError('INVALID_ARGUMENT', `reply type ${replyType} is not an error`);
  return encodeOptionReply(option, replyType, encodeString(message));
}

/** NBD_REP_SERVER for NBD_OPT_LIST: the name, then an optional human-readable description. */
export function encodeRepServer(option: number, name: string, description = ''): Buffer {
  const n = encodeString(name);
  const d = encodeString(description);
  const data = Buffer.allocUnsafe(4 + n.length + d.length);
  data.writeUInt32BE(n.length, 0);
  data.set(n, 4);
  data.set(d, 4 + n.length);
  return encodeOptionReply(option, Rep.SERVER, data);
}

export interface BlockSizeConstraints {
  readonly minimum: number;
  readonly preferred: number;
  readonly maximum: number;
}

export type InfoItem =
  | { readonly type: typeof Info.EXPORT; readonly size: number; readonly flags: number }
  | { readonly type: typeof Info.NAME; readonly name: string }
  | { readonly type: typeof Info.DESCRIPTION; readonly description: string }
  | ({ readonly type: typeof Info.BLOCK_SIZE } & BlockSizeConstraints);

export function encodeInfoReply(option: number, item: InfoItem): Buffer {
  let data: Buffer;
  switch (item.type) {
    case Info.EXPORT:
      checkU64(item.size, 'export size');
      checkU16(item.flags, 'transmission flags');
      data = Buffer.allocUnsafe(12);
      data.writeUInt16BE(Info.EXPORT, 0);
      writeU64(data, item.size, 2);
      data.writeUInt16BE(item.flags, 10);
      break;
    case Info.NAME:
    case Info.DESCRIPTION: {
      const s = encodeString(item.type === Info.NAME ? item.name : item.description);
      data = Buffer.allocUnsafe(2 + s.length);
      data.writeUInt16BE(item.type, 0);
      data.set(s, 2);
      break;
    }
    case Info.BLOCK_SIZE:
      checkU32(item.minimum, 'minimum block size');
      checkU32(item.preferred, 'preferred block size');
      checkU32(item.maximum, 'maximum block size');
      data = Buffer.allocUnsafe(14);
      data.writeUInt16BE(Info.BLOCK_SIZE, 0);
      data.writeUInt32BE(item.minimum, 2);
      data.writeUInt32BE(item.preferred, 6);
      data.writeUInt32BE(item.maximum, 10);
      break;
  }
  return encodeOptionReply(option, Rep.INFO, data);
}

export function encodeMetaContextReply(option: number, contextId: number, name: string): Buffer {
  checkU32(contextId, 'context id');
  const n = encodeString(name);
  const data = Buffer.allocUnsafe(4 + n.length);
  data.writeUInt32BE(contextId, 0);
  data.set(n, 4);
  return encodeOptionReply(option, Rep.META_CONTEXT, data);
}

// ---------------------------------------------------------------------------------------------
// Handshake: option bodies the server parses (throw PROTOCOL when malformed; the server answers
// NBD_REP_ERR_INVALID and carries on) and the client-side encoders for them.

export interface InfoRequest {
  readonly name: string;
  /** NBD_INFO_* types the client asked for, in its order, duplicates kept. */
  readonly requests: readonly number[];
}

/** Body of NBD_OPT_INFO and NBD_OPT_GO. */
export function parseInfoRequest(data: Buffer): InfoRequest {
  if (data.length < 6) throw new TorusError('PROTOCOL', `INFO/GO body of ${data.length} bytes is shorter than 6`);
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) throw new TorusError('PROTOCOL', `INFO/GO name length ${nameLength} overruns the ${data.length}-byte body`);
  const name = decodeString(data.subarray(4, 4 + nameLength), 'export name');
  const count = data.readUInt16BE(4 + nameLength);
  const rest = data.length - 6 - nameLength;
  if (rest !== count * 2) throw new TorusError('PROTOCOL', `INFO/GO lists ${count} information requests in ${rest} bytes`);
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { name, requests };
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  const n = Buffer.from(req.name, 'utf8');
  checkU16(req.requests.length, 'information request count');
  const b = Buffer.allocUnsafe(6 + n.length + 2 * req.requests.length);
  b.writeUInt32BE(n.length, 0);
  b.set(n, 4);
  b.writeUInt16BE(req.requests.length, 4 + n.length);
  req.requests.forEach((r, i) => {
    checkU16(r, 'information request');
    b.writeUInt16BE(r, 6 + n.length + 2 * i);
  });
  return b;
}

export interface MetaContextRequest {
  readonly name: string;
  readonly queries: readonly string[];
}

/** Body of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest {
  let at = 0;
  const take = (n: number, what: string): Buffer => {
    if (n > data.length - at) throw new TorusError('PROTOCOL', `meta context ${what} of ${n} bytes overruns the ${data.length}-byte body`);
    const v = data.subarray(at, at + n);
    at += n;
    return v;
  };
  const u32 = (what: string): number => take(4, what).readUInt32BE(0);
  const name = decodeString(take(u32('name length'), 'export name'), 'export name');
  const count = u32('query count');
  // each query takes at least its 4-byte length: a count that cannot fit is refused up front
  if (count > (data.length - at) / 4) throw new TorusError('PROTOCOL', `meta context query count ${count} cannot fit in the body`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(decodeString(take(u32('query length'), 'query'), 'meta context query'));
  if (at !== data.length) throw new TorusError('PROTOCOL', `${data.length - at} stray bytes after the meta context queries`);
  return { name, queries };
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const parts: Buffer[] = [];
  const str = (s: string): void => {
    const b = Buffer.from(s, 'utf8');
    const len = Buffer.allocUnsafe(4);
    len.writeUInt32BE(b.length, 0);
    parts.push(len, b);
  };
  str(req.name);
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(req.queries.length, 0);
  parts.push(count);
  for (const q of req.queries) str(q);
  return Buffer.concat(parts);
}

/** Body of NBD_OPT_EXPORT_NAME: the whole body is the name. */
export function parseExportName(data: Buffer): string {
  return decodeString(data, 'export name');
}

// Client-side encoders (tests, and any future client)

export function encodeClientFlags(flags: number): Buffer {
  checkU32(flags, 'client flags');
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags, 0);
  return b;
}

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  checkU32(option, 'option');
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, OPTION_HEADER_SIZE);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Transmission

export interface RequestHeader {
  readonly flags: number;
  readonly command: number;
  /** Opaque 64-bit cookie echoed in every reply. */
  readonly handle: bigint;
  /** Exact below 2^53; see readU64. */
  readonly offset: number;
  readonly length: number;
}

export interface Request extends RequestHeader {
  /** The WRITE payload (exactly `length` bytes); absent for every other command. */
  readonly payload?: Buffer;
}

/** A client-side request: header plus, for WRITE, the payload as a separate part (never copied). */
export function encodeRequest(req: Request): Buffer[] {
  checkU16(req.flags, 'command flags');
  checkU16(req.command, 'command');
  checkU64(req.offset, 'offset');
  checkU32(req.length, 'length');
  const h = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  h.writeUInt32BE(REQUEST_MAGIC, 0);
  h.writeUInt16BE(req.flags, 4);
  h.writeUInt16BE(req.command, 6);
  h.writeBigUInt64BE(BigInt.asUintN(64, req.handle), 8);
  writeU64(h, req.offset, 16);
  h.writeUInt32BE(req.length, 24);
  if (req.payload === undefined) return [h];
  if (req.payload.length !== req.length) throw new TorusError('INVALID_ARGUMENT', `payload of ${req.payload.length} bytes for a ${req.length}-byte request`);
  return [h, req.payload];
}

/** The payload of a read reply: one buffer, or pieces sent in order without joining them. */
export type ReplyData = Buffer | readonly Buffer[];

/** Bytes in a read reply's payload, pieces summed. */
export function replyDataLength(data: ReplyData): number {
  if (Buffer.isBuffer(data)) return data.length;
  let n = 0;
  for (const b of data) n += b.length;
  return n;
}

function withData(h: Buffer, data: ReplyData): Buffer[] {
  return Buffer.isBuffer(data) ? [h, data] : [h, ...data];
}

/** Simple reply; `data` (READ only, error 0) goes out as its own part(s). */
export function encodeSimpleReply(handle: bigint, error: number, data?: ReplyData): Buffer[] {
  checkU32(error, 'error');
  const h = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  h.writeBigUInt64BE(BigInt.asUintN(64, handle), 8);
  return data === undefined || replyDataLength(data) === 0 ? [h] : withData(h, data);
}

function chunkHeader(flags: number, type: number, handle: bigint, length: number, extra: number): Buffer {
  checkU16(flags, 'reply flags');
  checkU16(type, 'reply type');
  checkU32(length, 'chunk length');
  const h = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + extra);
  h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(BigInt.asUintN(64, handle), 8);
  h.writeUInt32BE(length, 16);
  return h;
}

const doneFlag = (done: boolean): number => (done ? ReplyFlag.DONE : 0);

/** A structured chunk of any type with an opaque payload (tests; unknown types). */
export function encodeChunk(flags: number, type: number, handle: bigint, payload: Buffer = Buffer.alloc(0)): Buffer[] {
  const h = chunkHeader(flags, type, handle, payload.length, 0);
  return payload.length ? [h, payload] : [h];
}

export function encodeNoneChunk(handle: bigint): Buffer[] {
  return [chunkHeader(ReplyFlag.DONE, ReplyType.NONE, handle, 0, 0)];
}

/** OFFSET_DATA: header and offset in one small buffer, the data as its own part(s). */
export function encodeOffsetData(handle: bigint, offset: number, data: ReplyData, done: boolean): Buffer[] {
  checkU64(offset, 'offset');
  const length = replyDataLength(data);
  if (length === 0) throw new TorusError('INVALID_ARGUMENT', 'OFFSET_DATA must carry at least one byte');
  const h = chunkHeader(doneFlag(done), ReplyType.OFFSET_DATA, handle, 8 + length, 8);
  writeU64(h, offset, STRUCTURED_HEADER_SIZE);
  return withData(h, data);
}

export function encodeOffsetHole(handle: bigint, offset: number, size: number, done: boolean): Buffer[] {
  checkU64(offset, 'offset');
  checkU32(size, 'hole size');
  if (size === 0) throw new TorusError('INVALID_ARGUMENT', 'OFFSET_HOLE size must be nonzero');
  const h = chunkHeader(doneFlag(done), ReplyType.OFFSET_HOLE, handle, 12, 12);
  writeU64(h, offset, STRUCTURED_HEADER_SIZE);
  h.writeUInt32BE(size, STRUCTURED_HEADER_SIZE + 8);
  return [h];
}

export interface BlockDescriptor {
  readonly length: number;
  readonly flags: number;
}

export function encodeBlockStatus(handle: bigint, contextId: number, descriptors: readonly BlockDescriptor[], done: boolean): Buffer[] {
  checkU32(contextId, 'context id');
  if (descriptors.length === 0) throw new TorusError('INVALID_ARGUMENT', 'BLOCK_STATUS needs at least one descriptor');
  const len = 4 + 8 * descriptors.length;
  const h = chunkHeader(doneFlag(done), ReplyType.BLOCK_STATUS, handle, len, len);
  let at = STRUCTURED_HEADER_SIZE;
  h.writeUInt32BE(contextId, at);
  at += 4;
  for (const d of descriptors) {
    checkU32(d.length, 'extent length');
    checkU32(d.flags, 'extent flags');
    if (d.length === 0) throw new TorusError('INVALID_ARGUMENT', 'extent lengths must be nonzero');
    h.writeUInt32BE(d.length, at);
    h.writeUInt32BE(d.flags, at + 4);
    at += 8;
  }
  return [h];
}

/** ERROR, or ERROR_OFFSET when `offset` is given. The message is cut to 4096 bytes. */
export function encodeErrorChunk(handle: bigint, error: number, message: string, done: boolean, offset?: number): Buffer[] {
  checkU32(error, 'error');
  if (error === 0) throw new TorusError('INVALID_ARGUMENT', 'an error chunk needs a nonzero error');
  const m = encodeString(message);
  const withOffset = offset !== undefined;
  const len = 6 + m.length + (withOffset ? 8 : 0);
  const h = chunkHeader(doneFlag(done), withOffset ? ReplyType.ERROR_OFFSET : ReplyType.ERROR, handle, len, len);
  const at = STRUCTURED_HEADER_SIZE;
  h.writeUInt32BE(error, at);
  h.writeUInt16BE(m.length, at + 4);
  h.set(m, at + 6);
  if (withOffset) {
    checkU64(offset, 'error offset');
    writeU64(h, offset, at + 6 + m.length);
  }
  return [h];
}

// Structured chunk payload parsers (client side). PROTOCOL when a payload has the wrong shape.

export function parseOffsetData(payload: Buffer): { offset: number; data: Buffer } {
  if (payload.length < 9) throw new TorusError('PROTOCOL', `OFFSET_DATA payload of ${payload.length} bytes is shorter than 9`);
  return { offset: readU64(payload, 0), data: payload.subarray(8) };
}

export function parseOffsetHole(payload: Buffer): { offset: number; size: number } {
  if (payload.length !== 12) throw new TorusError('PROTOCOL', `OFFSET_HOLE payload of ${payload.length} bytes, not 12`);
  const size = payload.readUInt32BE(8);
  if (size === 0) throw new TorusError('PROTOCOL', 'OFFSET_HOLE of size 0');
  return { offset: readU64(payload, 0), size };
}

export function parseBlockStatus(payload: Buffer): { contextId: number; descriptors: BlockDescriptor[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw new TorusError('PROTOCOL', `BLOCK_STATUS payload of ${payload.length} bytes is not 4 + 8n (n >= 1)`);
  const descriptors: BlockDescriptor[] = [];
  for (let at = 4; at < payload.length; at += 8) descriptors.push({ length: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
  return { contextId: payload.readUInt32BE(0), descriptors };
}

/** Any error chunk (type with bit 15): error, message, and the offset for ERROR_OFFSET. */
export function parseErrorChunk(type: number, payload: Buffer): { error: number; message: string; offset?: number } {
  if (payload.length < 6) throw new TorusError('PROTOCOL', `error chunk payload of ${payload.length} bytes is shorter than 6`);
  const error = payload.readUInt32BE(0);
  const mlen = payload.readUInt16BE(4);
  if (mlen > payload.length - 6) throw new TorusError('PROTOCOL', `error message length ${mlen} overruns the chunk`);
  const message = Buffer.from(payload.subarray(6, 6 + mlen)).toString('utf8');
  if (type === ReplyType.ERROR_OFFSET) {
    if (payload.length !== 6 + mlen + 8) throw new TorusError('PROTOCOL', 'ERROR_OFFSET chunk has the wrong length');
    return { error, message, offset: readU64(payload, 6 + mlen) };
  }
  return { error, message };
}

/** An NBD_REP_INFO body, or undefined for information types this codec does not know. */
export function parseInfoReply(data: Buffer): InfoItem | undefined {
  if (data.length < 2) throw new TorusError('PROTOCOL', 'NBD_REP_INFO shorter than its type');
  const type = data.readUInt16BE(0);
  switch (type) {
    case Info.EXPORT:
      if (data.length !== 12) throw new TorusError('PROTOCOL', `NBD_INFO_EXPORT of ${data.length} bytes, not 12`);
      return { type, size: readU64(data, 2), flags: data.readUInt16BE(10) };
    case Info.NAME:
      return { type, name: decodeString(data.subarray(2), 'export name') };
    case Info.DESCRIPTION:
      return { type, description: decodeString(data.subarray(2), 'export description') };
    case Info.BLOCK_SIZE:
      if (data.length !== 14) throw new TorusError('PROTOCOL', `NBD_INFO_BLOCK_SIZE of ${data.length} bytes, not 14`);
      return { type, minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
    default:
      return undefined;
  }
}

export function parseRepServer(data: Buffer): { name: string; description: string } {
  if (data.length < 4) throw new TorusError('PROTOCOL', 'NBD_REP_SERVER shorter than its name length');
  const n = data.readUInt32BE(0);
  if (n > data.length - 4) throw new TorusError('PROTOCOL', `NBD_REP_SERVER name length ${n} overruns the reply`);
  return { name: decodeString(data.subarray(4, 4 + n), 'export name'), description: decodeString(data.subarray(4 + n), 'export description') };
}

export function parseMetaContextReply(data: Buffer): { contextId: number; name: string } {
  if (data.length < 4) throw new TorusError('PROTOCOL', 'NBD_REP_META_CONTEXT shorter than its id');
  return { contextId: data.readUInt32BE(0), name: decodeString(data.subarray(4), 'meta context name') };
}

// ---------------------------------------------------------------------------------------------
// Incremental byte queue shared by both decoders: a list of pushed chunks read in place, so that
// a stream arriving one byte at a time costs O(n), not O(n^2) re-concatenation.

class ByteQueue {
  private chunks: Buffer[] = [];
  private first = 0;
  /** Read position inside chunks[first]. */
  private head = 0;
  private size = 0;

  get length(): number {
    return this.size;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    const b = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.chunks.push(b);
    this.size += b.length;
  }

  /**
   * Pushes a read that landed right behind the last chunk in the same memory (a read buffer
   * filled in steps) as part of that chunk, so the bytes of one read buffer are one chunk.
   */
  extend(chunk: Buffer): void {
    const last = this.chunks.length - 1;
    const c = this.chunks[last];
    if (last >= this.first && c !== undefined && c.buffer === chunk.buffer && c.byteOffset + c.length === chunk.byteOffset) {
      this.chunks[last] = Buffer.from(c.buffer, c.byteOffset, c.length + chunk.length);
      this.size += chunk.length;
    } else this.push(chunk);
  }

  /** The first `n` bytes (n <= length) without consuming them: a view if contiguous, else a copy. */
  peek(n: number): Buffer {
    const c = this.chunks[this.first];
    if (c !== undefined && c.length - this.head >= n) return c.subarray(this.head, this.head + n);
    return this.gather(n, false);
  }

  /** Consumes `n` bytes (n <= length) and returns them as memory nobody else will write. */
  take(n: number): Buffer {
    const c = this.chunks[this.first];
    if (c !== undefined && c.length - this.head >= n) {
      const view = c.subarray(this.head, this.head + n);
      this.skip(n);
      // a small view would pin its whole chunk for as long as someone keeps it
      return n * 2 >= c.length ? view : Buffer.from(view);
    }
    return this.gather(n, true);
  }

  skip(n: number): void {
    this.size -= n;
    while (n > 0) {
      const c = this.chunks[this.first];
      if (c === undefined) break;
      const avail = c.length - this.head;
      if (n < avail) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks[this.first] = EMPTY;
      this.first++;
      this.head = 0;
    }
    this.compact();
  }

  clear(): void {
    this.chunks = [];
    this.first = 0;
    this.head = 0;
    this.size = 0;
  }

  /** Consumes `n` bytes (n <= length) into memory of their own, even when they lie in one chunk. */
  takeCopy(n: number): Buffer {
    return this.gather(n, true);
  }

  /** Consumes `n` bytes (n <= length) into `target` from its start. */
  moveTo(target: Buffer, n: number): void {
    this.copyOut(target, n);
    this.skip(n);
  }

  /**
   * Makes `scratch` free to be read into again, keeping the bytes still queued from it (the
   * last chunk pushed, at most): moved to its front when they are all that is queued and leave
   * room, so the usual leftover (part of a header) costs no allocation; otherwise (a message
   * larger than the scratch) copied out into memory of their own. Returns where in `scratch`
   * the next read may land.
   */
  release(scratch: Buffer): number {
    const last = this.chunks.length - 1;
    const c = this.chunks[last];
    if (last < this.first || c === undefined || c.buffer !== scratch.buffer) return 0;
    const live = last === this.first ? c.subarray(this.head) : c;
    if (last === this.first && live.length < scratch.length) {
      scratch.copyWithin(0, live.byteOffset - scratch.byteOffset, live.byteOffset - scratch.byteOffset + live.length);
      this.chunks = [scratch.subarray(0, live.length)];
      this.first = 0;
      this.head = 0;
      return live.length;
    }
    this.chunks[last] = Buffer.from(live);
    if (last === this.first) this.head = 0;
    return 0;
  }

  private gather(n: number, consume: boolean): Buffer {
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, n);
    if (consume) this.skip(n);
    return out;
  }

  private copyOut(out: Buffer, n: number): void {
    let filled = 0;
    let i = this.first;
    let pos = this.head;
    while (filled < n) {
      const c = this.chunks[i];
      if (c === undefined) throw new TorusError('INTERNAL', 'byte queue underflow');
      const m = Math.min(n - filled, c.length - pos);
      out.set(c.subarray(pos, pos + m), filled);
      filled += m;
      pos += m;
      if (pos === c.length) {
        i++;
        pos = 0;
      }
    }
  }

  private compact(): void {
    if (this.first === this.chunks.length) {
      this.chunks = [];
      this.first = 0;
    } else if (this.first > 1024 && this.first * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.first);
      this.first = 0;
    }
  }
}

const EMPTY = Buffer.alloc(0);

// ---------------------------------------------------------------------------------------------
// Server-side decoder: client flags, then options, then transmission requests.

export type ClientMessage =
  | { readonly type: 'clientFlags'; readonly flags: number }
  | { readonly type: 'option'; readonly option: number; readonly data: Buffer }
  /** An option whose announced length is over the limit; its body is never read. Terminal. */
  | { readonly type: 'optionTooLong'; readonly option: number; readonly length: number }
  | ({ readonly type: 'request' } & Request)
  /** A WRITE whose payload is over the limit; the stream cannot be followed past it. Terminal. */
  | ({ readonly type: 'payloadTooLong' } & RequestHeader);

export type ClientPhase = 'clientFlags' | 'options' | 'transmission' | 'ended';

export interface ClientDecoderOptions {
  readonly maxOptionLength?: number;
  readonly maxPayload?: number;
  /**
   * Bytes of read buffer for a reader that asks the decoder where each read should land
   * (`readTarget()` / `commitRead()`, for net's `onread`) instead of pushing chunks. 0: push only.
   */
  readonly readBuffer?: number;
}

/** Payloads below this come from Buffer's shared pool; a kept one pins at most 16 times its size. */
const POOLED_PAYLOAD = 512;

/**
 * Memory for one WRITE payload, of its exact length and never handed out again: a device may
 * keep it (a volume adopts it into its write cache). Outside Buffer's shared 8 KiB pool but for
 * the smallest, so a kept payload does not keep other allocations alive.
 */
function payloadBuffer(n: number): Buffer {
  return n < POOLED_PAYLOAD ? Buffer.allocUnsafe(n) : Buffer.allocUnsafeSlow(n);
}

/** A WRITE whose header is taken and whose payload is arriving in its own buffer. */
interface Receiving {
  readonly header: RequestHeader;
  readonly payload: Buffer;
  filled: number;
}

/**
 * Decodes what a client sends. `next()` returns one whole message or undefined when more bytes
 * are needed; bad magic throws TorusError('PROTOCOL'), after which the decoder is unusable (the
 * connection must be dropped: there is no way to find the next message boundary). With
 * `readBuffer`, next() on a WRITE whose payload is not all in allocates the payload's buffer
 * (it is where the rest will be read), so a server calls it only once the request may hold
 * that memory; peekRequest() decides that without taking anything.
 */
export class ClientStreamDecoder {
  private readonly q = new ByteQueue();
  private phaseValue: ClientPhase = 'clientFlags';
  readonly maxOptionLength: number;
  readonly maxPayload: number;
  /** Where reads land between payloads (readTarget); null for a decoder that is pushed chunks. */
  private readonly scratch: Buffer | null;
  private receiving: Receiving | null = null;
  /** The last readTarget(), and whether it was the receiving payload's rest. */
  private target: Buffer | null = null;
  private targetIsPayload = false;

  constructor(options: ClientDecoderOptions = {}) {
    this.maxOptionLength = options.maxOptionLength ?? DEFAULT_MAX_OPTION_LENGTH;
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    const rb = options.readBuffer ?? 0;
    this.scratch = rb > 0 ? Buffer.allocUnsafeSlow(Math.max(rb, REQUEST_HEADER_SIZE)) : null;
  }

  get phase(): ClientPhase {
    return this.phaseValue;
  }

  /** Bytes received and not yet handed out. */
  get buffered(): number {
    const r = this.receiving;
    return this.q.length + (r ? REQUEST_HEADER_SIZE + r.filled : 0);
  }

  push(chunk: Uint8Array): void {
    if (this.phaseValue !== 'ended') this.q.push(chunk);
  }

  /**
   * Where the next socket read should land (net's `onread: { buffer }`), for a decoder made with
   * `readBuffer`: the rest of the payload of a WRITE being received (next() started it, once the
   * server admitted the request), so the kernel writes it where the device will find it;
   * otherwise the read buffer, after what is left of the last read there (typically part of a
   * header) moved to its front. Bytes read into the read buffer are only ever looked at or
   * copied, never handed out, since the next read overwrites them.
   */
  readTarget(): Buffer {
    const scratch = this.scratch;
    if (scratch === null) throw new TorusError('INTERNAL', 'readTarget on a decoder without a read buffer');
    const r = this.receiving;
    if (r !== null && r.filled < r.payload.length) {
      this.targetIsPayload = true;
      this.target = r.payload.subarray(r.filled);
      return this.target;
    }
    const from = this.q.release(scratch);
    // so that a view of the last read kept anywhere would read garbage in tests, not stale bytes
    if (BufferPool.poison) scratch.fill(BufferPool.POISON_BYTE, from);
    this.targetIsPayload = false;
    this.target = from === 0 ? scratch : scratch.subarray(from);
    return this.target;
  }

  /** The read into `buf` (the last readTarget()) got `n` bytes. */
  commitRead(buf: Buffer, n: number): void {
    if (buf !== this.target) throw new TorusError('INTERNAL', 'commitRead for a buffer readTarget did not hand out');
    this.target = null;
    if (this.phaseValue === 'ended') return;
    const r = this.receiving;
    if (this.targetIsPayload && r !== null) {
      r.filled += n;
      return;
    }
    let bytes = buf.subarray(0, n);
    if (r !== null) {
      // The target was chosen before this payload began (reading was paused behind a limit in
      // between): the one read that landed in the read buffer is copied over.
      const m = Math.min(n, r.payload.length - r.filled);
      r.payload.set(bytes.subarray(0, m), r.filled);
      r.filled += m;
      bytes = bytes.subarray(m);
    }
    if (bytes.length > 0) this.q.extend(bytes);
  }

  /** Called by the server once NBD_OPT_EXPORT_NAME or a successful NBD_OPT_GO ends the handshake. */
  startTransmission(): void {
    if (this.phaseValue !== 'options') throw new TorusError('INTERNAL', `cannot start transmission from phase ${this.phaseValue}`);
    this.phaseValue = 'transmission';
  }

  next(): ClientMessage | undefined {
    switch (this.phaseValue) {
      case 'clientFlags': {
        if (this.q.length < 4) return undefined;
        const flags = this.q.take(4).readUInt32BE(0);
        this.phaseValue = 'options';
        return { type: 'clientFlags', flags };
      }
      case 'options':
        return this.nextOption();
      case 'transmission':
        return this.nextRequest();
      case 'ended':
        return undefined;
    }
  }

  private fail(message: string): never {
    this.end();
    throw new TorusError('PROTOCOL', message);
  }

  private end(): void {
    this.phaseValue = 'ended';
    this.q.clear();
    this.receiving = null;
  }

  private nextOption(): ClientMessage | undefined {
    if (this.q.length < OPTION_HEADER_SIZE) {
      // bad magic is reported as soon as the bytes that make it bad are here
      if (this.q.length > 0) this.checkPrefix(this.q.peek(Math.min(this.q.length, 8)), IHAVEOPT, 8, 'option');
      return undefined;
    }
    const h = this.q.peek(OPTION_HEADER_SIZE);
    if (h.readBigUInt64BE(0) !== IHAVEOPT) this.fail(`option magic 0x${h.readBigUInt64BE(0).toString(16)} is not IHAVEOPT`);
    const option = h.readUInt32BE(8);
    const length = h.readUInt32BE(12);
    if (length > this.maxOptionLength) {
      this.end();
      return { type: 'optionTooLong', option, length };
    }
    if (this.q.length < OPTION_HEADER_SIZE + length) return undefined;
    this.q.skip(OPTION_HEADER_SIZE);
    // from the read buffer, a view would be overwritten by the next read
    const data = length === 0 ? EMPTY : this.scratch !== null ? this.q.takeCopy(length) : this.q.take(length);
    return { type: 'option', option, data };
  }

  /**
   * The next request's header once its 28 bytes are in, without taking it (transmission only), so
   * a server can decide whether to start the request, or to read its payload, before either
   * costs memory. Bad magic throws as in next().
   */
  peekRequest(): RequestHeader | undefined {
    if (this.phaseValue !== 'transmission') return undefined;
    if (this.receiving !== null) return this.receiving.header;
    if (this.q.length < REQUEST_HEADER_SIZE) {
      if (this.q.length > 0) this.checkPrefix(this.q.peek(Math.min(this.q.length, 4)), BigInt(REQUEST_MAGIC), 4, 'request');
      return undefined;
    }
    const h = this.q.peek(REQUEST_HEADER_SIZE);
    const magic = h.readUInt32BE(0);
    if (magic !== REQUEST_MAGIC) this.fail(`request magic 0x${magic.toString(16)} is not 0x${REQUEST_MAGIC.toString(16)}`);
    return {
      flags: h.readUInt16BE(4),
      command: h.readUInt16BE(6),
      handle: h.readBigUInt64BE(8),
      offset: readU64(h, 16),
      length: h.readUInt32BE(24),
    };
  }

  private nextRequest(): ClientMessage | undefined {
    const r = this.receiving;
    if (r !== null) {
      if (r.filled < r.payload.length) return undefined;
      this.receiving = null;
      return { type: 'request', ...r.header, payload: r.payload };
    }
    const header = this.peekRequest();
    if (!header) return undefined;
    if (header.command !== Cmd.WRITE) {
      this.q.skip(REQUEST_HEADER_SIZE);
      return { type: 'request', ...header };
    }
    if (header.length > this.maxPayload) {
      this.end();
      return { type: 'payloadTooLong', ...header };
    }
    if (this.scratch !== null && header.length > 0) {
      // Reads choose their buffer: the payload gets its own now, with whatever of it came in
      // with the header, and the rest is read straight into it (readTarget).
      this.q.skip(REQUEST_HEADER_SIZE);
      const payload = payloadBuffer(header.length);
      const have = Math.min(this.q.length, header.length);
      this.q.moveTo(payload, have);
      if (have === header.length) return { type: 'request', ...header, payload };
      this.receiving = { header, payload, filled: have };
      return undefined;
    }
    if (this.q.length < REQUEST_HEADER_SIZE + header.length) return undefined;
    this.q.skip(REQUEST_HEADER_SIZE);
    return { type: 'request', ...header, payload: header.length === 0 ? EMPTY : this.q.take(header.length) };
  }

  /** Fails on a partial magic that already differs, so garbage is refused without waiting. */
  private checkPrefix(bytes: Buffer, magic: bigint, width: number, what: string): void {
    for (let i = 0; i < bytes.length; i++) {
      const expected = Number((magic >> BigInt(8 * (width - 1 - i))) & 0xffn);
      if (bytes[i] !== expected) this.fail(`${what} magic does not match (byte ${i} is 0x${(bytes[i] ?? 0).toString(16)})`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Client-side decoder: greeting, option replies, the EXPORT_NAME reply, then replies. Used by the
// tests' in-process client; a real client would use it the same way.

export type ServerMessage =
  | { readonly type: 'greeting'; readonly handshakeFlags: number }
  | { readonly type: 'optionReply'; readonly option: number; readonly replyType: number; readonly data: Buffer }
  | { readonly type: 'exportName'; readonly size: number; readonly flags: number }
  | { readonly type: 'simpleReply'; readonly error: number; readonly handle: bigint; readonly data?: Buffer }
  | { readonly type: 'chunk'; readonly flags: number; readonly replyType: number; readonly handle: bigint; readonly payload: Buffer };

export type ServerPhase = 'greeting' | 'options' | 'exportName' | 'transmission' | 'ended';

export interface ServerDecoderOptions {
  readonly maxReplyLength?: number;
  /**
   * Bytes of data following a simple reply with this handle and error 0: the READ length for a
   * READ, 0 otherwise. Simple replies do not carry their own length, so only the client knows.
   */
  readonly simpleReplyDataLength?: (handle: bigint) => number;
}

export class ServerStreamDecoder {
  private readonly q = new ByteQueue();
  private phaseValue: ServerPhase = 'greeting';
  private exportNameSize = EXPORT_NAME_REPLY_SIZE;
  private readonly maxReplyLength: number;
  private readonly dataLength: (handle: bigint) => number;

  constructor(options: ServerDecoderOptions = {}) {
    this.maxReplyLength = options.maxReplyLength ?? DEFAULT_MAX_REPLY_LENGTH;
    this.dataLength = options.simpleReplyDataLength ?? (() => 0);
  }

  get phase(): ServerPhase {
    return this.phaseValue;
  }

  get buffered(): number {
    return this.q.length;
  }

  push(chunk: Uint8Array): void {
    if (this.phaseValue !== 'ended') this.q.push(chunk);
  }

  /** After sending NBD_OPT_EXPORT_NAME: the next bytes are its fixed-size reply. */
  expectExportName(noZeroes: boolean): void {
    this.phaseValue = 'exportName';
    this.exportNameSize = noZeroes ? EXPORT_NAME_REPLY_SIZE_NO_ZEROES : EXPORT_NAME_REPLY_SIZE;
  }

  /** After NBD_REP_ACK to NBD_OPT_GO. */
  startTransmission(): void {
    this.phaseValue = 'transmission';
  }

  private fail(message: string): never {
    this.phaseValue = 'ended';
    this.q.clear();
    throw new TorusError('PROTOCOL', message);
  }

  next(): ServerMessage | undefined {
    switch (this.phaseValue) {
      case 'greeting': {
        if (this.q.length < GREETING_SIZE) return undefined;
        const b = this.q.take(GREETING_SIZE);
        if (b.readBigUInt64BE(0) !== NBDMAGIC) this.fail('greeting does not start with NBDMAGIC');
        if (b.readBigUInt64BE(8) !== IHAVEOPT) this.fail('server does not speak newstyle negotiation (no IHAVEOPT)');
        this.phaseValue = 'options';
        return { type: 'greeting', handshakeFlags: b.readUInt16BE(16) };
      }
      case 'options': {
        if (this.q.length < OPTION_REPLY_HEADER_SIZE) return undefined;
        const h = this.q.peek(OPTION_REPLY_HEADER_SIZE);
        if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) this.fail('option reply magic mismatch');
        const length = h.readUInt32BE(16);
        if (length > this.maxReplyLength) this.fail(`option reply of ${length} bytes is over the limit`);
        if (this.q.length < OPTION_REPLY_HEADER_SIZE + length) return undefined;
        this.q.skip(OPTION_REPLY_HEADER_SIZE);
        return { type: 'optionReply', option: h.readUInt32BE(8), replyType: h.readUInt32BE(12), data: length ? this.q.take(length) : EMPTY };
      }
      case 'exportName': {
        if (this.q.length < this.exportNameSize) return undefined;
        const b = this.q.take(this.exportNameSize);
        this.phaseValue = 'transmission';
        return { type: 'exportName', size: readU64(b, 0), flags: b.readUInt16BE(8) };
      }
      case 'transmission':
        return this.nextReply();
      case 'ended':
        return undefined;
    }
  }

  private nextReply(): ServerMessage | undefined {
    if (this.q.length < 4) return undefined;
    const magic = this.q.peek(4).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (this.q.length < SIMPLE_REPLY_SIZE) return undefined;
      const h = this.q.peek(SIMPLE_REPLY_SIZE);
      const error = h.readUInt32BE(4);
      const handle = h.readBigUInt64BE(8);
      const n = error === 0 ? this.dataLength(handle) : 0;
      if (n > this.maxReplyLength) this.fail(`simple reply data of ${n} bytes is over the limit`);
      if (this.q.length < SIMPLE_REPLY_SIZE + n) return undefined;
      this.q.skip(SIMPLE_REPLY_SIZE);
      return n > 0 ? { type: 'simpleReply', error, handle, data: this.q.take(n) } : { type: 'simpleReply', error, handle };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      if (this.q.length < STRUCTURED_HEADER_SIZE) return undefined;
      const h = this.q.peek(STRUCTURED_HEADER_SIZE);
      const length = h.readUInt32BE(16);
      if (length > this.maxReplyLength) this.fail(`structured chunk of ${length} bytes is over the limit`);
      if (this.q.length < STRUCTURED_HEADER_SIZE + length) return undefined;
      this.q.skip(STRUCTURED_HEADER_SIZE);
      return {
        type: 'chunk',
        flags: h.readUInt16BE(4),
        replyType: h.readUInt16BE(6),
        handle: h.readBigUInt64BE(8),
        payload: length ? this.q.take(length) : EMPTY,
      };
    }
    this.fail(`reply magic 0x${magic.toString(16)} is neither simple nor structured`);
  }
}
