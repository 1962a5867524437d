// The peer RPC wire format ("TDP2"): pure functions and one incremental decoder, no sockets.
// docs/protocols/peer-rpc.md is the normative description; this file must match it byte for byte.
//
// Every frame is a 12-byte header followed by `length` body bytes, all integers little-endian
// (the same byte order as BlockRef's wire form, so a ref is copied, never swapped):
//
//   [0:4)   u32 length     body bytes after the header
//   [4]     u8  op         message type (Op)
//   [5]     u8  flags      per-op flags; bits an op does not define must be zero
//   [6:8)   u16 reserved   zero in version 1 (a later negotiated version may use it)
//   [8:12)  u32 id         request id, echoed by the reply; 0 for connection-level errors
//
// Buffer ownership, decided once here (STYLE habit 2):
// - Encoders never copy a block payload: they return the payload itself as one of the parts,
//   so the socket writes it straight from the caller's buffer (writev). The caller must not
//   change a payload until the write has completed; blocks are immutable, so nobody does.
// - The decoder never writes into a pushed chunk and assumes nobody else does either
//   (net.Socket hands out a fresh buffer per read; pipe.ts copies for the same reason).
//   A frame lying inside one chunk is decoded from a view of that chunk; a frame spanning
//   chunks is first copied into a fresh allocation that holds exactly that frame's body.
// - Payloads handed out (DATA bytes, PUT_BATCH item data) are therefore views of memory that
//   nothing will ever rewrite. A payload that would pin a read buffer more than PIN_RATIO times
//   its own size is copied out instead; so a 4 KiB range read is a view (the copy cost ~15% of
//   a small read's CPU) and can pin at most a 64 KiB read buffer. A consumer that keeps small
//   payloads for long (a cache) should copy them, as hypercore's maybeUnslab does.
//   Items of one PUT_BATCH that spanned chunks share their frame's allocation.
// - A client may have a DATA reply's bytes land in memory of its own (`DecoderOptions.replyInto`,
//   a buffer its caller passed down): then that memory is the message's `data`, and it is
//   written only while the caller still wants it (`ReplyTarget.live`).

import type { BufferLease } from '../core/buffer-pool.js';
import { ErrorCodes, TorusError, type ErrorCode } from '../core/errors.js';
import { BLOCK_REF_SIZE, MAX_VOLUME_ID, encodeBlockRef, type BlockRef } from '../core/ids.js';

/** A payload view may keep alive at most this many times its size of read buffer. */
const PIN_RATIO = 16;

/** "TDP2" in ASCII: the first body bytes of HELLO and HELLO_OK. */
export const MAGIC = 0x32504454;
export const PROTOCOL_VERSION = 1;
export const MIN_PROTOCOL_VERSION = 1;

export const HEADER_SIZE = 12;
/** Largest frame a node accepts once the handshake is done, unless configured otherwise. */
export const DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024 + 64 * 1024;
/** Until HELLO has been accepted an unauthenticated peer may not make us buffer more than this. */
export const HANDSHAKE_MAX_FRAME_SIZE = 64 * 1024;
/** Smallest max frame size a peer may announce: one 1 MiB block plus framing must always fit. */
export const MIN_MAX_FRAME_SIZE = 1024 * 1024 + 4096;
const MAX_U32 = 0xffffffff;
const MAX_STR8 = 255;
/** Error messages are cut (on a character boundary) to this many UTF-8 bytes. */
export const MAX_ERROR_MESSAGE_BYTES = 4096;

export const Op = {
  Hello: 0x01,
  HelloOk: 0x02,
  Error: 0x03,
  Ping: 0x04,
  Pong: 0x05,
  Ok: 0x06,
  Get: 0x10,
  Data: 0x11,
  PutBatch: 0x12,
  PutResult: 0x13,
  HasBatch: 0x14,
  HasResult: 0x15,
  DeleteBatch: 0x16,
  Flush: 0x17,
  /** Journal (docs/journal.md): write pieces into an open log block. */
  Append: 0x18,
  /** Journal: seal an open log block. */
  Seal: 0x19,
  /** Journal: fence a volume at an epoch; answered by FENCE_RESULT. */
  Fence: 0x1a,
  FenceResult: 0x1b,
} as const;
export type Op = (typeof Op)[keyof typeof Op];

/** GET, PUT_BATCH...: the names the protocol document uses. */
const OP_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(Op).map(([k, v]) => [v, k.replace(/(?<=[a-z])(?=[A-Z])/g, '_').toUpperCase()]),
);

export function opName(op: number): string {
  return OP_NAMES[op] ?? `0x${op.toString(16).padStart(2, '0')}`;
}

/** PUT_BATCH: the receiver flushes (fsyncs) the batch before replying, saving a FLUSH round trip. */
export const FLAG_SYNC = 0x01;
/**
 * PUT_BATCH: every item carries the writer's CRC32C of the whole block (zero-padded), which the
 * receiver checks before storing. Sent only to a server that announced EXT_CHECKSUMS.
 */
export const FLAG_CRC = 0x02;
/**
 * GET: answer with DATA carrying the block's sector checksums and whole sectors, so the client
 * checks the bytes against the writer's CRC itself. DATA: the body has that layout.
 */
export const FLAG_SUMS = 0x02;

/**
 * GET: the block's bytes as stored, an open log block's included (journal replay); offset and
 * length must be 0. Sent only to a server that announced EXT_JOURNAL.
 */
export const FLAG_RAW = 0x04;

const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [Op.PutBatch]: FLAG_SYNC | FLAG_CRC,
  [Op.Get]: FLAG_SUMS | FLAG_RAW,
  [Op.Data]: FLAG_SUMS,
  [Op.Append]: FLAG_SYNC,
  [Op.Seal]: FLAG_SYNC,
};

// Handshake extensions: TLVs after the fixed HELLO / HELLO_OK fields. A receiver ignores types it
// does not know unless the type has the CRITICAL bit, in which case it must refuse the handshake:
// that is how a node that requires authentication or TLS keeps old nodes out instead of being
// silently downgraded.
export const EXT_CRITICAL = 0x8000;
/** Random bytes chosen by the sender; the challenge for a future cluster-secret HMAC. */
export const EXT_NONCE = 0x0001;
/** Free-form software version string, informational. */
export const EXT_SOFTWARE = 0x0002;
/**
 * In HELLO_OK: 8 random bytes the server chose when its process started. A client that sees it
 * change between a PUT and the FLUSH meant to make it durable knows the process restarted in
 * between, and that the PUT may have been lost with the machine's page cache.
 */
export const EXT_INSTANCE = 0x0005;
/**
 * In HELLO_OK, empty: the server understands FLAG_CRC on PUT_BATCH and FLAG_SUMS on GET. Not
 * critical: a client talking to a server without it sends neither and checks less.
 */
export const EXT_CHECKSUMS = 0x0006;
/**
 * In HELLO_OK, empty: the server keeps volume journals (APPEND, SEAL, FENCE, GET with FLAG_RAW).
 * Not critical: a writer does not choose a node that lacks it for a journal.
 */
export const EXT_JOURNAL = 0x0007;
/** Reserved: HMAC-SHA256 over both nonces with the cluster secret. */
export const EXT_AUTH_HMAC = EXT_CRITICAL | 0x0003;
/** Reserved: switch the connection to TLS after HELLO_OK. */
export const EXT_STARTTLS = EXT_CRITICAL | 0x0004;

/**
 * Error codes on the wire. Numbers are stable forever; a new ErrorCode gets the next free number
 * (the Record type makes the compiler insist). 0 is "OK" in status lists and never an error.
 */
export const WIRE_ERROR_CODES: Readonly<Record<ErrorCode, number>> = {
  AGAIN: 1,
  EXISTS: 2,
  NOT_EXIST: 3,
  LOCKED: 4,
  NOT_INITIALIZED: 5,
  INVALID_ARGUMENT: 6,
  OUT_OF_SPACE: 7,
  BLOCK_UNAVAILABLE: 8,
  NO_PEER: 9,
  NON_SEQUENTIAL_RING: 10,
  ETCD_UNAVAILABLE: 11,
  TIMEOUT: 12,
  PROTOCOL: 13,
  CORRUPT: 14,
  CLOSED: 15,
  WRONG_CLUSTER: 16,
  IO: 17,
  INTERNAL: 18,
  PERMISSION_DENIED: 19,
};

const CODE_BY_WIRE: ReadonlyMap<number, ErrorCode> = new Map(ErrorCodes.map((c) => [WIRE_ERROR_CODES[c], c]));

export function errorCodeToWire(code: ErrorCode): number {
  return WIRE_ERROR_CODES[code];
}

/** A code number this build does not know (sent by a newer peer) reads as INTERNAL. */
export function errorCodeFromWire(n: number): ErrorCode {
  return CODE_BY_WIRE.get(n) ?? 'INTERNAL';
}

// ---------------------------------------------------------------------------------------------
// Messages

export interface Extension {
  readonly type: number;
  readonly value: Buffer;
}

export interface HelloMessage {
  readonly op: typeof Op.Hello;
  readonly id: number;
  readonly minVersion: number;
  readonly maxVersion: number;
  /** Largest frame the sender will accept from now on. */
  readonly maxFrameSize: number;
  readonly uuid: string;
  readonly clusterId: string;
  readonly extensions: readonly Extension[];
}

export interface HelloOkMessage {
  readonly op: typeof Op.HelloOk;
  readonly id: number;
  /** The version chosen for this connection. */
  readonly version: number;
  readonly maxFrameSize: number;
  /** Requests the server works on at once per connection; more are left unread in the socket. */
  readonly maxInFlight: number;
  readonly blockSize: number;
  readonly uuid: string;
  readonly clusterId: string;
  readonly extensions: readonly Extension[];
}

export interface ErrorMessage {
  readonly op: typeof Op.Error;
  readonly id: number;
  readonly code: ErrorCode;
  readonly message: string;
}

export interface EmptyMessage {
  readonly op: typeof Op.Ping | typeof Op.Pong | typeof Op.Ok | typeof Op.Flush;
  readonly id: number;
}

export interface GetMessage {
  readonly op: typeof Op.Get;
  readonly id: number;
  readonly ref: BlockRef;
  /** offset 0 and length 0 ask for the whole block. */
  readonly offset: number;
  readonly length: number;
  /** FLAG_SUMS: answer with the block's sector checksums and whole sectors. */
  readonly sums?: boolean;
  /** FLAG_RAW: the whole block as stored, open log blocks included. */
  readonly raw?: boolean;
}

export interface AppendMessage {
  readonly op: typeof Op.Append;
  readonly id: number;
  /** Flush before replying. */
  readonly sync: boolean;
  readonly ref: BlockRef;
  readonly pieces: readonly { readonly offset: number; readonly data: Buffer }[];
  /** When the pieces are views of a pooled buffer: released once they are no longer read. */
  readonly lease?: BufferLease;
}

export interface SealMessage {
  readonly op: typeof Op.Seal;
  readonly id: number;
  readonly sync: boolean;
  readonly ref: BlockRef;
  readonly gapStart: number;
  readonly gapEnd: number;
  readonly crc: number;
}

export interface FenceMessage {
  readonly op: typeof Op.Fence;
  readonly id: number;
  readonly volume: number;
  readonly epoch: number;
}

export interface FenceResultMessage {
  readonly op: typeof Op.FenceResult;
  readonly id: number;
  /** The volume's open log blocks on the node. */
  readonly open: readonly BlockRef[];
}

/** What a DATA with FLAG_SUMS carries besides the bytes (see SectorRead in core). */
export interface DataSums {
  readonly sectorSize: number;
  /** Where the data starts in the block. */
  readonly offset: number;
  /** u32 LE per sector of the whole block. */
  readonly sums: Buffer;
}

export interface DataMessage {
  readonly op: typeof Op.Data;
  readonly id: number;
  readonly data: Buffer;
  readonly sums?: DataSums;
}

export interface PutItem {
  readonly ref: BlockRef;
  readonly data: Uint8Array;
  /** The writer's CRC32C of the whole block; sent when every item of the batch has one. */
  readonly crc?: number;
}

export interface PutBatchMessage {
  readonly op: typeof Op.PutBatch;
  readonly id: number;
  readonly sync: boolean;
  readonly items: readonly { readonly ref: BlockRef; readonly data: Buffer; readonly crc?: number }[];
  /** When the items' data are views of a pooled buffer: released once they are no longer read. */
  readonly lease?: BufferLease;
}

export interface PutResultMessage {
  readonly op: typeof Op.PutResult;
  readonly id: number;
  /** One entry per item in request order: null when stored, else why not. */
  readonly statuses: readonly (ErrorCode | null)[];
}

export interface RefsMessage {
  readonly op: typeof Op.HasBatch | typeof Op.DeleteBatch;
  readonly id: number;
  readonly refs: readonly BlockRef[];
}

export interface HasResultMessage {
  readonly op: typeof Op.HasResult;
  readonly id: number;
  readonly has: readonly boolean[];
}

export type Message =
  | HelloMessage
  | HelloOkMessage
  | ErrorMessage
  | EmptyMessage
  | GetMessage
  | DataMessage
  | PutBatchMessage
  | PutResultMessage
  | RefsMessage
  | AppendMessage
  | SealMessage
  | FenceMessage
  | FenceResultMessage
  | HasResultMessage;

// ---------------------------------------------------------------------------------------------
// Encoding. Each encoder sizes the frame first and allocates once; payloads are never copied.

const EMPTY = Buffer.alloc(0);
const utf8Decoder = new TextDecoder('utf-8', { fatal: true });
const utf8Encoder = new TextEncoder();

function invalid(message: string): TorusError {
  return new TorusError('INVALID_ARGUMENT', message);
}

function protocol(message: string): TorusError {
  return new TorusError('PROTOCOL', message);
}

// BlockRefs on the wire are ids.ts's 24-byte form. These two produce and accept exactly the same
// bytes as encodeBlockRef/decodeBlockRef (a property test holds them to it) but without the
// DataView those build per call, which showed up at ~4% of CPU per side on small requests.
const TWO32 = 2 ** 32;
const TWO40 = 2 ** 40;
/** ids.ts refuses to encode types >= 2^11; refusing them on decode keeps a ref re-encodable. */
const REF_TYPE_LIMIT = 2 ** 11;

export function isEncodableRef(ref: BlockRef): boolean {
  const { type, volume, inode, index } = ref;
  return (
    Number.isSafeInteger(volume) &&
    volume >= 0 &&
    volume <= MAX_VOLUME_ID &&
    Number.isSafeInteger(inode) &&
    inode >= 0 &&
    Number.isSafeInteger(index) &&
    index >= 0 &&
    Number.isInteger(type) &&
    type >= 0 &&
    type < REF_TYPE_LIMIT
  );
}

export function writeRef(buf: Buffer, p: number, ref: BlockRef): void {
  // ids.ts owns the error message for a bad ref.
  if (!isEncodableRef(ref)) return encodeBlockRef(ref, buf, p);
  const word = ref.type * TWO40 + ref.volume;
  buf.writeUInt32LE(word % TWO32, p);
  buf.writeUInt32LE(Math.floor(word / TWO32), p + 4);
  buf.writeUInt32LE(ref.inode % TWO32, p + 8);
  buf.writeUInt32LE(Math.floor(ref.inode / TWO32), p + 12);
  buf.writeUInt32LE(ref.index % TWO32, p + 16);
  buf.writeUInt32LE(Math.floor(ref.index / TWO32), p + 20);
}

/** The caller has checked that 24 bytes are there. */
export function readRef(buf: Buffer, p: number): BlockRef {
  const wordHi = buf.readUInt32LE(p + 4);
  const inodeHi = buf.readUInt32LE(p + 12);
  const indexHi = buf.readUInt32LE(p + 20);
  if (wordHi >= 2 ** 21 || inodeHi >= 2 ** 21 || indexHi >= 2 ** 21) throw protocol('block ref field exceeds 2^53');
  const word = wordHi * TWO32 + buf.readUInt32LE(p);
  const type = Math.floor(word / TWO40);
  if (type >= REF_TYPE_LIMIT) throw protocol(`block ref has type ${type}`);
  return {
    type,
    volume: word % TWO40,
    inode: inodeHi * TWO32 + buf.readUInt32LE(p + 8),
    index: indexHi * TWO32 + buf.readUInt32LE(p + 16),
  };
}

function writeHeader(buf: Buffer, bodyLength: number, op: Op, flags: number, id: number): void {
  if (bodyLength > MAX_U32 - HEADER_SIZE) throw invalid(`frame body of ${bodyLength} bytes is too large`);
  buf.writeUInt32LE(bodyLength, 0);
  buf[4] = op;
  buf[5] = flags;
  buf[6] = 0;
  buf[7] = 0;
  buf.writeUInt32LE(id >>> 0, 8);
}

function writeU64(buf: Buffer, value: number, at: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new TorusError('INVALID_ARGUMENT', `${value} is not a u64 below 2^53`);
  buf.writeUInt32LE(value % 2 ** 32, at);
  buf.writeUInt32LE(Math.floor(value / 2 ** 32), at + 4);
}

function checkU32(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > MAX_U32) throw invalid(`${what} ${value} is not a u32`);
}

function checkU16(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw invalid(`${what} ${value} is not a u16`);
}

/** Sets the request id of an encoded frame; the client encodes before it knows the id. */
export function setFrameId(frame: Buffer, id: number): void {
  frame.writeUInt32LE(id >>> 0, 8);
}

export function readFrameId(frame: Buffer): number {
  return frame.readUInt32LE(8);
}

function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

function str8Bytes(value: string, what: string): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  if (bytes.length > MAX_STR8) throw invalid(`${what} is ${bytes.length} bytes, at most ${MAX_STR8} fit`);
  return bytes;
}

function extensionsSize(exts: readonly Extension[]): number {
  let n = 0;
  for (const e of exts) {
    checkU16(e.type, 'extension type');
    if (e.value.length > 0xffff) throw invalid(`extension 0x${e.type.toString(16)} is longer than 65535 bytes`);
    n += 4 + e.value.length;
  }
  return n;
}

function writeExtensions(buf: Buffer, pos: number, exts: readonly Extension[]): number {
  for (const e of exts) {
    buf.writeUInt16LE(e.type, pos);
    buf.writeUInt16LE(e.value.length, pos + 2);
    e.value.copy(buf, pos + 4);
    pos += 4 + e.value.length;
  }
  return pos;
}

function checkMaxFrame(n: number): void {
  checkU32(n, 'max frame size');
  if (n < MIN_MAX_FRAME_SIZE) throw invalid(`max frame size ${n} is below the protocol minimum ${MIN_MAX_FRAME_SIZE}`);
}

export function encodeHello(id: number, m: Omit<HelloMessage, 'op' | 'id'>): Buffer {
  checkU16(m.minVersion, 'min version');
  checkU16(m.maxVersion, 'max version');
  checkMaxFrame(m.maxFrameSize);
  const uuid = str8Bytes(m.uuid, 'node uuid');
  const cluster = str8Bytes(m.clusterId, 'cluster id');
  const body = 4 + 2 + 2 + 4 + 1 + uuid.length + 1 + cluster.length + extensionsSize(m.extensions);
  const buf = Buffer.allocUnsafe(HEADER_SIZE + body);
  writeHeader(buf, body, Op.Hello, 0, id);
  let p = HEADER_SIZE;
  p = buf.writeUInt32LE(MAGIC, p);
  p = buf.writeUInt16LE(m.minVersion, p);
  p = buf.writeUInt16LE(m.maxVersion, p);
  p = buf.writeUInt32LE(m.maxFrameSize, p);
  buf[p++] = uuid.length;
  p += uuid.copy(buf, p);
  buf[p++] = cluster.length;
  p += cluster.copy(buf, p);
  writeExtensions(buf, p, m.extensions);
  return buf;
}

export function encodeHelloOk(id: number, m: Omit<HelloOkMessage, 'op' | 'id'>): Buffer {
  checkU16(m.version, 'version');
  checkMaxFrame(m.maxFrameSize);
  checkU32(m.maxInFlight, 'max in flight');
  checkU32(m.blockSize, 'block size');
  if (m.maxInFlight < 1) throw invalid('max in flight must be at least 1');
  const uuid = str8Bytes(m.uuid, 'node uuid');
  const cluster = str8Bytes(m.clusterId, 'cluster id');
  const body = 4 + 2 + 4 + 4 + 4 + 1 + uuid.length + 1 + cluster.length + extensionsSize(m.extensions);
  const buf = Buffer.allocUnsafe(HEADER_SIZE + body);
  writeHeader(buf, body, Op.HelloOk, 0, id);
  let p = HEADER_SIZE;
  p = buf.writeUInt32LE(MAGIC, p);
  p = buf.writeUInt16LE(m.version, p);
  p = buf.writeUInt32LE(m.maxFrameSize, p);
  p = buf.writeUInt32LE(m.maxInFlight, p);
  p = buf.writeUInt32LE(m.blockSize, p);
  buf[p++] = uuid.length;
  p += uuid.copy(buf, p);
  buf[p++] = cluster.length;
  p += cluster.copy(buf, p);
  writeExtensions(buf, p, m.extensions);
  return buf;
}

export function encodeError(id: number, code: ErrorCode, message: string): Buffer {
  // encodeInto stops before a character that would not fit, so the cut never splits a UTF-8
  // sequence (a split one would make the receiver reject the whole frame).
  const scratch = Buffer.allocUnsafe(HEADER_SIZE + 4 + MAX_ERROR_MESSAGE_BYTES);
  const { written } = utf8Encoder.encodeInto(message, scratch.subarray(HEADER_SIZE + 4));
  const body = 4 + written;
  const buf = scratch.subarray(0, HEADER_SIZE + body);
  writeHeader(buf, body, Op.Error, 0, id);
  buf.writeUInt16LE(WIRE_ERROR_CODES[code], HEADER_SIZE);
  buf.writeUInt16LE(written, HEADER_SIZE + 2);
  return Buffer.from(buf); // do not keep the 4 KiB scratch alive for a short message
}

export function encodeEmpty(op: EmptyMessage['op'], id: number): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE);
  writeHeader(buf, 0, op, 0, id);
  return buf;
}

export const GET_SIZE = HEADER_SIZE + BLOCK_REF_SIZE + 8;

/** Throws INVALID_ARGUMENT unless encodeGetInto can encode these fields. */
export function checkGet(ref: BlockRef, offset: number, length: number): void {
  checkU32(offset, 'offset');
  checkU32(length, 'length');
  if (!isEncodableRef(ref)) encodeBlockRef(ref, Buffer.alloc(BLOCK_REF_SIZE));
}

/** Writes a GET frame at `buf[at..at+GET_SIZE)`; fields must have passed checkGet. */
export function encodeGetInto(buf: Buffer, at: number, id: number, ref: BlockRef, offset: number, length: number, flags = 0): void {
  buf.writeUInt32LE(GET_SIZE - HEADER_SIZE, at);
  buf[at + 4] = Op.Get;
  buf[at + 5] = flags;
  buf[at + 6] = 0;
  buf[at + 7] = 0;
  buf.writeUInt32LE(id >>> 0, at + 8);
  writeRef(buf, at + HEADER_SIZE, ref);
  buf.writeUInt32LE(offset, at + HEADER_SIZE + BLOCK_REF_SIZE);
  buf.writeUInt32LE(length, at + HEADER_SIZE + BLOCK_REF_SIZE + 4);
}

/** `flags`: FLAG_SUMS, FLAG_RAW or 0. */
export function encodeGet(id: number, ref: BlockRef, offset: number, length: number, flags = 0): Buffer {
  checkGet(ref, offset, length);
  const buf = Buffer.allocUnsafe(GET_SIZE);
  encodeGetInto(buf, 0, id, ref, offset, length, flags);
  return buf;
}

/** APPEND: `ref[24]`, `u32 count`, count × (`u32 offset`, `u32 n`, n bytes). */
export function encodeAppend(id: number, ref: BlockRef, pieces: readonly { readonly offset: number; readonly data: Uint8Array }[], sync: boolean): Buffer[] {
  const meta = Buffer.allocUnsafe(HEADER_SIZE + BLOCK_REF_SIZE + 4 + 8 * pieces.length);
  let body = BLOCK_REF_SIZE + 4;
  for (const p of pieces) body += 8 + p.data.byteLength;
  writeHeader(meta, body, Op.Append, sync ? FLAG_SYNC : 0, id);
  writeRef(meta, HEADER_SIZE, ref);
  meta.writeUInt32LE(pieces.length, HEADER_SIZE + BLOCK_REF_SIZE);
  const parts: Buffer[] = [];
  let start = 0;
  let p = HEADER_SIZE + BLOCK_REF_SIZE + 4;
  for (const piece of pieces) {
    checkU32(piece.offset, 'offset');
    meta.writeUInt32LE(piece.offset, p);
    meta.writeUInt32LE(piece.data.byteLength, p + 4);
    p += 8;
    if (piece.data.byteLength > 0) {
      parts.push(meta.subarray(start, p), asBuffer(piece.data));
      start = p;
    }
  }
  if (start < p || parts.length === 0) parts.push(meta.subarray(start, p));
  return parts;
}

export function encodeSeal(id: number, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Buffer {
  const body = BLOCK_REF_SIZE + 12;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + body);
  writeHeader(buf, body, Op.Seal, sync ? FLAG_SYNC : 0, id);
  writeRef(buf, HEADER_SIZE, ref);
  checkU32(gapStart, 'gap start');
  checkU32(gapEnd, 'gap end');
  buf.writeUInt32LE(gapStart, HEADER_SIZE + BLOCK_REF_SIZE);
  buf.writeUInt32LE(gapEnd, HEADER_SIZE + BLOCK_REF_SIZE + 4);
  buf.writeUInt32LE(crc >>> 0, HEADER_SIZE + BLOCK_REF_SIZE + 8);
  return buf;
}

/** FENCE: `u64 volume`, `u64 epoch`. */
export function encodeFence(id: number, volume: number, epoch: number): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + 16);
  writeHeader(buf, 16, Op.Fence, 0, id);
  writeU64(buf, volume, HEADER_SIZE);
  writeU64(buf, epoch, HEADER_SIZE + 8);
  return buf;
}

/** FENCE_RESULT: `u32 count`, count × `ref[24]`. */
export function encodeFenceResult(id: number, open: readonly BlockRef[]): Buffer {
  const body = 4 + BLOCK_REF_SIZE * open.length;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + body);
  writeHeader(buf, body, Op.FenceResult, 0, id);
  buf.writeUInt32LE(open.length, HEADER_SIZE);
  open.forEach((r, i) => writeRef(buf, HEADER_SIZE + 4 + i * BLOCK_REF_SIZE, r));
  return buf;
}

/** Payloads up to this size are copied next to their header: one small write beats two. */
const INLINE_PAYLOAD = 1024;

/** DATA with FLAG_SUMS: `u32 sector size`, `u32 offset`, `u32 count`, count × `u32` sums, then the bytes. */
export function encodeDataSums(id: number, sums: DataSums, data: Uint8Array): Buffer[] {
  const head = Buffer.allocUnsafe(HEADER_SIZE + 12 + sums.sums.length);
  writeHeader(head, 12 + sums.sums.length + data.byteLength, Op.Data, FLAG_SUMS, id);
  head.writeUInt32LE(sums.sectorSize, HEADER_SIZE);
  head.writeUInt32LE(sums.offset, HEADER_SIZE + 4);
  head.writeUInt32LE(sums.sums.length / 4, HEADER_SIZE + 8);
  sums.sums.copy(head, HEADER_SIZE + 12);
  return [head, asBuffer(data)];
}

export function encodeData(id: number, data: Uint8Array): Buffer[] {
  if (data.byteLength <= INLINE_PAYLOAD) {
    const buf = Buffer.allocUnsafe(HEADER_SIZE + data.byteLength);
    writeHeader(buf, data.byteLength, Op.Data, 0, id);
    buf.set(data, HEADER_SIZE);
    return [buf];
  }
  const head = Buffer.allocUnsafe(HEADER_SIZE);
  writeHeader(head, data.byteLength, Op.Data, 0, id);
  return [head, asBuffer(data)];
}

const PUT_ITEM_HEAD = BLOCK_REF_SIZE + 4;
/** An item of a FLAG_CRC batch: ref, u32 crc, u32 length. */
const PUT_ITEM_HEAD_CRC = PUT_ITEM_HEAD + 4;

/** Bytes an item adds to a batch (the CRC's 4 counted always: a batch sends it for all or none). */
export function putItemFrameCost(item: PutItem): number {
  return PUT_ITEM_HEAD_CRC + item.data.byteLength;
}

/** With `crc`, every item must have one (FLAG_CRC); without, any item's crc is left out. */
export function encodePutBatch(id: number, items: readonly PutItem[], sync = false, crc = false): Buffer[] {
  // All the small parts (frame header, count, per-item ref+length) share one allocation and
  // alternate with the untouched payloads in the returned list.
  const itemHead = crc ? PUT_ITEM_HEAD_CRC : PUT_ITEM_HEAD;
  const meta = Buffer.allocUnsafe(HEADER_SIZE + 4 + items.length * itemHead);
  let body = 4;
  for (const it of items) body += itemHead + it.data.byteLength;
  writeHeader(meta, body, Op.PutBatch, (sync ? FLAG_SYNC : 0) | (crc ? FLAG_CRC : 0), id);
  meta.writeUInt32LE(items.length, HEADER_SIZE);
  const parts: Buffer[] = [];
  let start = 0;
  let p = HEADER_SIZE + 4;
  for (const it of items) {
    writeRef(meta, p, it.ref);
    if (crc) {
      if (it.crc === undefined) throw new TorusError('INTERNAL', 'a PUT_BATCH with FLAG_CRC needs a CRC for every item');
      meta.writeUInt32LE(it.crc >>> 0, p + BLOCK_REF_SIZE);
      meta.writeUInt32LE(it.data.byteLength, p + BLOCK_REF_SIZE + 4);
    } else meta.writeUInt32LE(it.data.byteLength, p + BLOCK_REF_SIZE);
    p += itemHead;
    if (it.data.byteLength > 0) {
      parts.push(meta.subarray(start, p), asBuffer(it.data));
      start = p;
    }
  }
  if (start < p || parts.length === 0) parts.push(meta.subarray(start, p));
  return parts;
}

export function encodePutResult(id: number, statuses: readonly (ErrorCode | null)[]): Buffer {
  const body = 4 + 2 * statuses.length;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + body);
  writeHeader(buf, body, Op.PutResult, 0, id);
  buf.writeUInt32LE(statuses.length, HEADER_SIZE);
  let p = HEADER_SIZE + 4;
  for (const s of statuses) p = buf.writeUInt16LE(s === null ? 0 : WIRE_ERROR_CODES[s], p);
  return buf;
}

function encodeRefs(op: RefsMessage['op'], id: number, refs: readonly BlockRef[]): Buffer {
  const body = 4 + refs.length * BLOCK_REF_SIZE;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + body);
  writeHeader(buf, body, op, 0, id);
  buf.writeUInt32LE(refs.length, HEADER_SIZE);
  let p = HEADER_SIZE + 4;
  for (const ref of refs) {
    writeRef(buf, p, ref);
    p += BLOCK_REF_SIZE;
  }
  return buf;
}

/** Refs that fit in one HAS_BATCH / DELETE_BATCH frame of at most `maxFrame` bytes. */
export function maxRefsPerFrame(maxFrame: number): number {
  return Math.floor((maxFrame - HEADER_SIZE - 4) / BLOCK_REF_SIZE);
}

export function encodeHasBatch(id: number, refs: readonly BlockRef[]): Buffer {
  return encodeRefs(Op.HasBatch, id, refs);
}

export function encodeDeleteBatch(id: number, refs: readonly BlockRef[]): Buffer {
  return encodeRefs(Op.DeleteBatch, id, refs);
}

export function encodeHasResult(id: number, has: readonly boolean[]): Buffer {
  // Same bitmap as the original TDP RebalanceCheck reply: bit i is byte i>>3, LSB first.
  const bytes = (has.length + 7) >>> 3;
  const body = 4 + bytes;
  const buf = Buffer.alloc(HEADER_SIZE + body);
  writeHeader(buf, body, Op.HasResult, 0, id);
  buf.writeUInt32LE(has.length, HEADER_SIZE);
  for (let i = 0; i < has.length; i++) {
    if (has[i]) buf[HEADER_SIZE + 4 + (i >>> 3)]! |= 1 << (i & 7);
  }
  return buf;
}

/** Encodes any message; the hot paths call the specific encoders directly. */
export function encodeMessage(m: Message): Buffer[] {
  switch (m.op) {
    case Op.Hello:
      return [encodeHello(m.id, m)];
    case Op.HelloOk:
      return [encodeHelloOk(m.id, m)];
    case Op.Error:
      return [encodeError(m.id, m.code, m.message)];
    case Op.Ping:
    case Op.Pong:
    case Op.Ok:
    case Op.Flush:
      return [encodeEmpty(m.op, m.id)];
    case Op.Get:
      return [encodeGet(m.id, m.ref, m.offset, m.length, (m.sums ? FLAG_SUMS : 0) | (m.raw ? FLAG_RAW : 0))];
    case Op.Append:
      return encodeAppend(m.id, m.ref, m.pieces, m.sync);
    case Op.Seal:
      return [encodeSeal(m.id, m.ref, m.gapStart, m.gapEnd, m.crc, m.sync)];
    case Op.Fence:
      return [encodeFence(m.id, m.volume, m.epoch)];
    case Op.FenceResult:
      return [encodeFenceResult(m.id, m.open)];
    case Op.Data:
      return m.sums ? encodeDataSums(m.id, m.sums, m.data) : encodeData(m.id, m.data);
    case Op.PutBatch:
      return encodePutBatch(m.id, m.items, m.sync, m.items.length > 0 && m.items.every((it) => it.crc !== undefined));
    case Op.PutResult:
      return [encodePutResult(m.id, m.statuses)];
    case Op.HasBatch:
    case Op.DeleteBatch:
      return [encodeRefs(m.op, m.id, m.refs)];
    case Op.HasResult:
      return [encodeHasResult(m.id, m.has)];
  }
}

/** Concatenation of encodeMessage's parts; for tests and rare paths. */
export function encodeMessageBytes(m: Message): Buffer {
  const parts = encodeMessage(m);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------------
// Decoding

/**
 * Reads one body: `buf[start..end)`, decoded in place (no view of the body is made). Every read
 * is bounds-checked so that short bodies are PROTOCOL errors.
 */
class BodyReader {
  private pos: number;

  constructor(
    private readonly buf: Buffer,
    start: number,
    private readonly end: number,
    private readonly what: string,
    /** True when `buf` is a socket chunk that may be much larger than the frame. */
    private readonly shared: boolean,
  ) {
    this.pos = start;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  private need(n: number, field: string): void {
    if (this.end - this.pos < n) throw protocol(`${this.what}: truncated at ${field}`);
  }

  u8(field: string): number {
    this.need(1, field);
    return this.buf[this.pos++]!;
  }

  u16(field: string): number {
    this.need(2, field);
    const v = this.buf.readUInt16LE(this.pos);
    this.pos += 2;
    return v;
  }

  u32(field: string): number {
    this.need(4, field);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }

  /** A u64 that must be below 2^53 (ids and epochs). */
  u64(field: string): number {
    this.need(8, field);
    const lo = this.buf.readUInt32LE(this.pos);
    const hi = this.buf.readUInt32LE(this.pos + 4);
    if (hi >= 2 ** 21) throw protocol(`${this.what}: ${field} is above 2^53`);
    this.pos += 8;
    return hi * 2 ** 32 + lo;
  }

  ref(field: string): BlockRef {
    this.need(BLOCK_REF_SIZE, field);
    let ref: BlockRef;
    try {
      ref = readRef(this.buf, this.pos);
    } catch (err) {
      throw protocol(`${this.what}: ${field}: ${(err as Error).message}`);
    }
    this.pos += BLOCK_REF_SIZE;
    return ref;
  }

  /** A view for bytes consumed right away (strings, extension values are copied by callers). */
  view(n: number, field: string): Buffer {
    this.need(n, field);
    const v = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }

  /** A payload handed to the application: see the ownership notes at the top of the file. */
  payload(n: number, field: string): Buffer {
    this.need(n, field);
    const start = this.pos;
    this.pos += n;
    if (this.shared && n * PIN_RATIO < this.buf.buffer.byteLength) {
      const copy = Buffer.allocUnsafe(n);
      this.buf.copy(copy, 0, start, start + n);
      return copy;
    }
    return this.buf.subarray(start, start + n);
  }

  str(lengthBytes: 1 | 2, field: string): string {
    const n = lengthBytes === 1 ? this.u8(field) : this.u16(field);
    const bytes = this.view(n, field);
    try {
      return utf8Decoder.decode(bytes);
    } catch {
      throw protocol(`${this.what}: ${field} is not valid UTF-8`);
    }
  }

  extensions(): Extension[] {
    const out: Extension[] = [];
    while (this.remaining > 0) {
      const type = this.u16('extension type');
      const len = this.u16('extension length');
      out.push({ type, value: Buffer.from(this.view(len, 'extension value')) });
    }
    return out;
  }

  done(): void {
    if (this.pos !== this.end) throw protocol(`${this.what}: ${this.end - this.pos} unexpected trailing bytes`);
  }
}

function checkMagic(r: BodyReader, what: string): void {
  const magic = r.u32('magic');
  if (magic !== MAGIC) throw protocol(`${what}: bad magic 0x${magic.toString(16)}, the peer does not speak Torus peer RPC`);
}

function readCount(r: BodyReader, itemMin: number): number {
  const count = r.u32('count');
  // Checked before any array is sized from it, so a forged count cannot allocate gigabytes.
  if (count * itemMin > r.remaining) throw protocol(`count ${count} does not fit in ${r.remaining} body bytes`);
  return count;
}

function readMaxFrame(r: BodyReader): number {
  const n = r.u32('max frame size');
  if (n < MIN_MAX_FRAME_SIZE) throw protocol(`announced max frame size ${n} is below the protocol minimum ${MIN_MAX_FRAME_SIZE}`);
  return n;
}

/**
 * A DATA with FLAG_SUMS whose bytes were read into `into` (a split body): `head` holds what came
 * before them, which must be exactly the checksums' part.
 */
function decodeDataInto(id: number, head: Buffer, into: Buffer): DataMessage {
  const r = new BodyReader(head, 0, head.length, 'DATA', false);
  const sectorSize = r.u32('sector size');
  const offset = r.u32('offset');
  const count = readCount(r, 4);
  if (sectorSize === 0) throw protocol('DATA: sector size 0');
  if (count * 4 !== r.remaining) throw protocol(`DATA: ${count} sector checksums where ${r.remaining} bytes come before the data`);
  // `head` is this message's own memory: its checksums need no copy.
  return { op: Op.Data, id, data: into, sums: { sectorSize, offset, sums: r.view(count * 4, 'sums') } };
}

/** Decodes one frame body (`buf[start..end)`) whose header has already been validated. */
function decodeBody(op: number, flags: number, id: number, buf: Buffer, start: number, end: number, shared: boolean): Message {
  const r = new BodyReader(buf, start, end, opName(op), shared);
  let m: Message;
  switch (op) {
    case Op.Hello: {
      checkMagic(r, 'HELLO');
      const minVersion = r.u16('min version');
      const maxVersion = r.u16('max version');
      if (minVersion > maxVersion) throw protocol(`HELLO: min version ${minVersion} above max version ${maxVersion}`);
      const maxFrameSize = readMaxFrame(r);
      const uuid = r.str(1, 'uuid');
      const clusterId = r.str(1, 'cluster id');
      m = { op, id, minVersion, maxVersion, maxFrameSize, uuid, clusterId, extensions: r.extensions() };
      break;
    }
    case Op.HelloOk: {
      checkMagic(r, 'HELLO_OK');
      const version = r.u16('version');
      const maxFrameSize = readMaxFrame(r);
      const maxInFlight = r.u32('max in flight');
      if (maxInFlight < 1) throw protocol('HELLO_OK: max in flight is 0');
      const blockSize = r.u32('block size');
      const uuid = r.str(1, 'uuid');
      const clusterId = r.str(1, 'cluster id');
      m = { op, id, version, maxFrameSize, maxInFlight, blockSize, uuid, clusterId, extensions: r.extensions() };
      break;
    }
    case Op.Error: {
      const wire = r.u16('code');
      if (wire === 0) throw protocol('ERROR frame with status 0 (OK)');
      m = { op, id, code: errorCodeFromWire(wire), message: r.str(2, 'message') };
      break;
    }
    case Op.Ping:
    case Op.Pong:
    case Op.Ok:
    case Op.Flush:
      m = { op, id };
      break;
    case Op.Get:
      m = {
        op,
        id,
        ref: r.ref('ref'),
        offset: r.u32('offset'),
        length: r.u32('length'),
        ...((flags & FLAG_SUMS) !== 0 ? { sums: true } : {}),
        ...((flags & FLAG_RAW) !== 0 ? { raw: true } : {}),
      };
      break;
    case Op.Append: {
      const ref = r.ref('ref');
      const count = readCount(r, 8);
      const pieces: { offset: number; data: Buffer }[] = new Array(count);
      for (let i = 0; i < count; i++) {
        const offset = r.u32('piece offset');
        const n = r.u32('piece length');
        pieces[i] = { offset, data: r.payload(n, 'piece data') };
      }
      m = { op, id, sync: (flags & FLAG_SYNC) !== 0, ref, pieces };
      break;
    }
    case Op.Seal:
      m = { op, id, sync: (flags & FLAG_SYNC) !== 0, ref: r.ref('ref'), gapStart: r.u32('gap start'), gapEnd: r.u32('gap end'), crc: r.u32('crc') };
      break;
    case Op.Fence:
      m = { op, id, volume: r.u64('volume'), epoch: r.u64('epoch') };
      break;
    case Op.FenceResult: {
      const count = readCount(r, BLOCK_REF_SIZE);
      const open: BlockRef[] = new Array(count);
      for (let i = 0; i < count; i++) open[i] = r.ref('ref');
      m = { op, id, open };
      break;
    }
    case Op.Data:
      if ((flags & FLAG_SUMS) !== 0) {
        const sectorSize = r.u32('sector size');
        const offset = r.u32('offset');
        const count = readCount(r, 4);
        if (sectorSize === 0) throw protocol('DATA: sector size 0');
        const sums = Buffer.from(r.view(count * 4, 'sums'));
        m = { op, id, data: r.payload(r.remaining, 'data'), sums: { sectorSize, offset, sums } };
      } else m = { op, id, data: r.payload(r.remaining, 'data') };
      break;
    case Op.PutBatch: {
      const withCrc = (flags & FLAG_CRC) !== 0;
      const count = readCount(r, withCrc ? PUT_ITEM_HEAD_CRC : PUT_ITEM_HEAD);
      const items: { ref: BlockRef; data: Buffer; crc?: number }[] = new Array(count);
      for (let i = 0; i < count; i++) {
        const ref = r.ref('item ref');
        const crc = withCrc ? r.u32('item crc') : undefined;
        const len = r.u32('item length');
        items[i] = crc === undefined ? { ref, data: r.payload(len, 'item data') } : { ref, crc, data: r.payload(len, 'item data') };
      }
      m = { op, id, sync: (flags & FLAG_SYNC) !== 0, items };
      break;
    }
    case Op.PutResult: {
      const count = readCount(r, 2);
      const statuses: (ErrorCode | null)[] = new Array(count);
      for (let i = 0; i < count; i++) {
        const s = r.u16('status');
        statuses[i] = s === 0 ? null : errorCodeFromWire(s);
      }
      m = { op, id, statuses };
      break;
    }
    case Op.HasBatch:
    case Op.DeleteBatch: {
      const count = readCount(r, BLOCK_REF_SIZE);
      const refs: BlockRef[] = new Array(count);
      for (let i = 0; i < count; i++) refs[i] = r.ref('ref');
      m = { op, id, refs };
      break;
    }
    case Op.HasResult: {
      const count = r.u32('count');
      const bytes = Math.ceil(count / 8);
      if (bytes !== r.remaining) throw protocol(`HAS_RESULT: ${count} bits need ${bytes} bytes, body has ${r.remaining}`);
      const bits = r.view(bytes, 'bitmap');
      if (count & 7 && bits[bytes - 1]! >>> (count & 7)) throw protocol('HAS_RESULT: bits set past the count');
      const has: boolean[] = new Array(count);
      for (let i = 0; i < count; i++) has[i] = (bits[i >>> 3]! & (1 << (i & 7))) !== 0;
      m = { op, id, has };
      break;
    }
    default:
      // The header check already refused unknown ops; this keeps the switch honest.
      throw protocol(`unknown op ${opName(op)}`);
  }
  r.done();
  return m;
}

export interface DecoderOptions {
  /** Largest whole frame (header included) accepted; checked as soon as a header is seen. */
  readonly maxFrameSize?: number;
  /**
   * Allocate a body whole as soon as its header is in, rather than as its bytes arrive: for a
   * client reading replies to its own requests, whose lengths it asked for, so that the kernel
   * writes each payload straight into its final buffer. A server must not: a peer can announce
   * 16 MiB in a 12-byte header.
   */
  readonly allocateOnHeader?: boolean;
  /**
   * Asked, once the header of a body that spans reads is in, for pooled memory to assemble it in
   * (the whole body at once); null: allocate as usual. Only PUT_BATCH and APPEND bodies
   * keep their lease (in the message); the holder releases it when done with the payloads.
   */
  readonly pooledBody?: (op: number, length: number) => BufferLease | null;
  /**
   * Asked, once the header of a DATA reply with FLAG_SUMS that spans reads is in, whether its
   * bytes have a place of their own (a client reading into its caller's buffer). The body's last
   * `into.length` bytes are then copied there from each read as it arrives, the sector checksums
   * before them into a small buffer, and the message's `data` is `into` itself: no allocation
   * per block, and no second copy. (They are never read into `into` by the kernel: net asks
   * for a read's memory before the read, and the call may give `into` up in between.)
   */
  readonly replyInto?: (id: number) => ReplyTarget | null;
}

/** Where a DATA reply's bytes go (DecoderOptions.replyInto). */
export interface ReplyTarget {
  readonly into: Buffer;
  /**
   * False once the caller has given `into` up (its call timed out or failed): bytes still
   * arriving for it are dropped, since the memory may already hold another read's.
   */
  live(): boolean;
}

interface PendingHeader {
  readonly length: number;
  readonly op: number;
  readonly flags: number;
  readonly id: number;
}

/** Reads offered by readTarget() when no body is being assembled. */
const READ_SLAB = 64 * 1024;
/**
 * A body assembled as its bytes arrive gets room for at most BODY_GROWTH times what has arrived
 * (at least BODY_MIN_ROOM), and all of it once a BODY_GROWTH-th is in: a 12-byte header
 * announcing 16 MiB costs 16 KiB, while a block whose first read brings a quarter of it is still
 * assembled in its final buffer, each byte copied once.
 */
const BODY_GROWTH = 4;
const BODY_MIN_ROOM = 16 * 1024;
/** After a large frame, the next read is kept small so the next large body lands in place. */
const SMALL_READ = 4096;
const LARGE_FRAME = 128 * 1024;

/**
 * Incremental frame decoder. `push` takes a chunk and validates the next frame's header as soon
 * as its 12 bytes are in, so an oversized or nonsensical frame is refused before its body is
 * buffered. `next` returns one whole message or null ("wait for more").
 *
 * A body that lies inside one chunk is decoded from a view of it. A body that spans chunks is
 * assembled in its own allocation as the chunks arrive (the chunks released at once), so the
 * cost is linear however TCP splits the stream. That allocation grows with the bytes received
 * (BODY_GROWTH), unless `allocateOnHeader` trusts the header's length. A socket created with
 * net's `onread` option can skip even the copy: `readTarget()` hands out the unfilled rest of
 * the body being assembled, so the kernel writes the payload straight into the buffer the
 * application will receive; `commitRead()` reports the bytes read.
 *
 * After a protocol error the decoder stays failed and every call throws the same
 * TorusError('PROTOCOL').
 */
export class FrameDecoder {
  maxFrameSize: number;
  private chunks: Buffer[] = [];
  /** Read offset inside chunks[0]. */
  private offset = 0;
  private buffered = 0;
  private header: PendingHeader | null = null;
  /** The body being assembled when it spans chunks (room for part or all of it); `filled` bytes of it are in. */
  private body: Buffer | null = null;
  private filled = 0;
  private readonly allocateOnHeader: boolean;
  private failure: TorusError | null = null;
  private readonly scratch = Buffer.allocUnsafe(HEADER_SIZE);
  private slab: Buffer = EMPTY;
  private slabPos = 0;
  private lastTarget: Buffer | null = null;
  private lastWasLarge = false;
  private readonly pooledBody: DecoderOptions['pooledBody'];
  /** The lease of `body` when it is pooled memory. */
  private lease: BufferLease | null = null;
  private readonly replyInto: DecoderOptions['replyInto'];
  /**
   * Set while a DATA body is split (replyInto): `body` then holds only its first `body.length`
   * bytes (up to the sector checksums), and the rest goes to the target's `into`.
   */
  private tail: ReplyTarget | null = null;

  constructor(options: DecoderOptions = {}) {
    this.maxFrameSize = options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE;
    this.allocateOnHeader = options.allocateOnHeader ?? false;
    this.pooledBody = options.pooledBody;
    this.replyInto = options.replyInto;
  }

  /** Gives back pooled memory held for a frame that will never complete (the connection closed). */
  dispose(): void {
    this.body = null;
    this.tail = null;
    this.filled = 0;
    this.dropLease();
  }

  private dropLease(): void {
    const l = this.lease;
    this.lease = null;
    l?.release();
  }

  /** Bytes received and not yet returned as messages. */
  get bufferedBytes(): number {
    return this.buffered + (this.header ? HEADER_SIZE : 0) + this.filled;
  }

  /** Memory the decoder holds: chunks received and the room allocated for a body. */
  get heldBytes(): number {
    return this.buffered + (this.header ? HEADER_SIZE : 0) + (this.body?.length ?? 0);
  }

  /** Writes `n` bytes of `src` from `at` into the body being assembled, at `filled`. */
  private fillBody(src: Buffer, at: number, n: number): void {
    const tail = this.tail;
    if (tail === null) {
      this.room(this.filled + n);
      src.copy(this.body!, this.filled, at, at + n);
    } else {
      const head = this.body!;
      let pos = this.filled;
      if (pos < head.length) {
        const k = Math.min(n, head.length - pos);
        src.copy(head, pos, at, at + k);
        pos += k;
        at += k;
      }
      const rest = this.filled + n - pos;
      if (rest > 0 && tail.live()) src.copy(tail.into, pos - head.length, at, at + rest);
    }
    this.filled += n;
  }

  /** The op of the frame whose header is in and whose body is not yet complete, or null. */
  get pendingOp(): number | null {
    return this.header?.op ?? null;
  }

  /** Size of the frame being waited for, or 0 if its header has not arrived. */
  get pendingFrameSize(): number {
    return this.header ? HEADER_SIZE + this.header.length : 0;
  }

  push(chunk: Buffer): void {
    if (this.failure) throw this.failure;
    if (this.body !== null) {
      const take = Math.min(chunk.length, this.header!.length - this.filled);
      this.fillBody(chunk, 0, take);
      if (take === chunk.length) return;
      chunk = chunk.subarray(take);
    }
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.header === null && this.buffered >= HEADER_SIZE) this.readHeader();
    this.startBody();
  }

  /**
   * Where the next socket read should land (for net's `onread: { buffer: () => ... }`): the
   * unfilled part of a body being assembled, else fresh read-buffer memory. Memory handed out
   * here is never handed out again, so views of it stay valid.
   */
  readTarget(): Buffer {
    let t: Buffer;
    // Never a caller's buffer (replyInto): net asks for the next read's memory as soon as the last
    // read is handled, and the kernel fills it later, maybe after the call has given it up.
    if (this.tail === null && this.body !== null && this.filled < this.header!.length && this.failure === null) {
      this.room(this.filled + 1);
      t = this.body.subarray(this.filled);
    } else {
      if (this.slab.length - this.slabPos < SMALL_READ) {
        this.slab = Buffer.allocUnsafeSlow(READ_SLAB);
        this.slabPos = 0;
      }
      const size = this.lastWasLarge ? SMALL_READ : this.slab.length - this.slabPos;
      t = this.slab.subarray(this.slabPos, this.slabPos + size);
    }
    this.lastTarget = t;
    return t;
  }

  /** The read into `buf` (the last readTarget()) got `n` bytes. */
  commitRead(buf: Buffer, n: number): void {
    if (this.failure) throw this.failure;
    if (buf !== this.lastTarget) throw new TorusError('INTERNAL', 'commitRead for a buffer readTarget did not hand out');
    this.lastTarget = null;
    if (this.tail === null && this.body !== null && buf.buffer === this.body.buffer && buf.byteOffset === this.body.byteOffset + this.filled) {
      this.filled += n;
      return;
    }
    this.slabPos += n;
    this.push(buf.subarray(0, n));
  }

  next(): Message | null {
    if (this.failure) throw this.failure;
    if (this.header === null) {
      if (this.buffered < HEADER_SIZE) return null;
      this.readHeader();
      this.startBody();
    }
    const h = this.header!;
    let buf: Buffer;
    let start = 0;
    let shared = false;
    let lease: BufferLease | null = null;
    if (this.tail !== null) {
      if (this.filled < h.length) return null;
      const head = this.body!;
      const into = this.tail.into;
      this.body = null;
      this.tail = null;
      this.filled = 0;
      this.header = null;
      this.lastWasLarge = h.length >= LARGE_FRAME;
      let m: Message;
      try {
        m = decodeDataInto(h.id, head, into);
      } catch (err) {
        // The frame's length was right, so the stream is still in step: only this reply is
        // unusable (the bytes before the data were not the checksums the caller's length implies).
        m = { op: Op.Error, id: h.id, code: 'PROTOCOL', message: (err as Error).message };
      }
      this.lookAhead();
      return m;
    }
    if (this.body !== null) {
      if (this.filled < h.length) return null;
      // Complete: room() made the last allocation exactly the body's length.
      buf = this.body;
      this.body = null;
      this.filled = 0;
      lease = this.lease;
      this.lease = null;
    } else if (h.length === 0) buf = EMPTY;
    else {
      // startBody() began assembling unless the whole body sits in the first chunk.
      buf = this.chunks[0]!;
      start = this.offset;
      shared = true;
    }
    this.header = null;
    this.lastWasLarge = h.length >= LARGE_FRAME;
    let m: Message;
    try {
      m = decodeBody(h.op, h.flags, h.id, buf, start, start + h.length, shared);
    } catch (err) {
      lease?.release();
      throw this.fail(err);
    }
    if (lease !== null) {
      if (m.op === Op.PutBatch || m.op === Op.Append) m = { ...m, lease };
      else lease.release();
    }
    if (shared) this.consume(h.length);
    this.lookAhead();
    return m;
  }

  /**
   * Looks at the following header now, so a giant frame is refused before it is buffered; if
   * it is bad, the message just decoded is still returned and the next call throws.
   */
  private lookAhead(): void {
    if (this.buffered < HEADER_SIZE) return;
    try {
      this.readHeader();
      this.startBody();
    } catch {
      // recorded in this.failure
    }
  }

  /** Once a header is known: if its body is not wholly inside the first chunk, assemble it. */
  private startBody(): void {
    const h = this.header;
    if (h === null || this.body !== null || h.length === 0) return;
    const first = this.chunks[0];
    if (first !== undefined && first.length - this.offset >= h.length) return;
    const n = Math.min(this.buffered, h.length);
    if (!this.splitBody(h)) this.room(this.allocateOnHeader ? h.length : n);
    this.filled = 0;
    while (this.filled < n) {
      const c = this.chunks[0]!;
      const take = Math.min(n - this.filled, c.length - this.offset);
      const at = this.offset;
      this.consume(take);
      this.fillBody(c, at, take);
    }
  }

  /** Sets up a split body when the reply has a place of its own (replyInto). */
  private splitBody(h: PendingHeader): boolean {
    if (this.replyInto === undefined || h.op !== Op.Data || (h.flags & FLAG_SUMS) === 0) return false;
    const target = this.replyInto(h.id);
    // The sector checksums' header (12 bytes) at least must come before the bytes.
    if (target === null || target.into.length === 0 || h.length - target.into.length < 12) return false;
    this.tail = target;
    this.body = Buffer.allocUnsafe(h.length - target.into.length);
    return true;
  }

  /** Makes the body's allocation hold at least `need` bytes (never more than the body). */
  private room(need: number): void {
    const length = this.header!.length;
    const have = this.body?.length ?? 0;
    if (have >= need && have > 0) return;
    if (this.body === null && this.pooledBody !== undefined) {
      const lease = this.pooledBody(this.header!.op, length);
      if (lease !== null) {
        if (lease.buffer.length !== length) {
          lease.release();
          throw new TorusError('INTERNAL', `pooled body of ${lease.buffer.length} bytes for a ${length}-byte frame`);
        }
        this.lease = lease;
        this.body = lease.buffer;
        return;
      }
    }
    const size = need * BODY_GROWTH >= length ? length : Math.max(need * BODY_GROWTH, Math.min(BODY_MIN_ROOM, length));
    const next = Buffer.allocUnsafeSlow(size);
    if (this.body !== null) this.body.copy(next, 0, 0, this.filled);
    this.body = next;
  }

  private fail(err: unknown): TorusError {
    this.failure = err instanceof TorusError ? err : new TorusError('PROTOCOL', String(err), { cause: err });
    this.chunks = [];
    this.buffered = 0;
    this.body = null;
    this.tail = null;
    this.filled = 0;
    this.dropLease();
    return this.failure;
  }

  private readHeader(): void {
    const first = this.chunks[0]!;
    let h: Buffer;
    let at: number;
    if (first.length - this.offset >= HEADER_SIZE) {
      h = first;
      at = this.offset;
      this.consume(HEADER_SIZE);
    } else {
      h = this.scratch;
      at = 0;
      this.copyOut(h, HEADER_SIZE);
    }
    const length = h.readUInt32LE(at);
    const op = h[at + 4]!;
    const flags = h[at + 5]!;
    const reserved = h.readUInt16LE(at + 6);
    const id = h.readUInt32LE(at + 8);
    let problem: string | null = null;
    if (OP_NAMES[op] === undefined) problem = `unknown op 0x${op.toString(16).padStart(2, '0')}`;
    else if (length > this.maxFrameSize - HEADER_SIZE)
      problem = `${opName(op)} frame of ${length + HEADER_SIZE} bytes exceeds the limit of ${this.maxFrameSize}`;
    else if (flags & ~(ALLOWED_FLAGS[op] ?? 0)) problem = `${opName(op)}: undefined flags 0x${flags.toString(16)}`;
    else if (reserved !== 0) problem = `${opName(op)}: reserved header field is ${reserved}, not 0`;
    if (problem !== null) throw this.fail(protocol(problem));
    this.header = { length, op, flags, id };
  }

  private consume(n: number): void {
    this.buffered -= n;
    while (n > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.offset;
      if (n < avail) {
        this.offset += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.offset = 0;
    }
  }

  private copyOut(target: Buffer, n: number): void {
    let pos = 0;
    while (pos < n) {
      const c = this.chunks[0]!;
      const take = Math.min(n - pos, c.length - this.offset);
      c.copy(target, pos, this.offset, this.offset + take);
      pos += take;
      this.consume(take);
    }
  }
}

/** Decodes a buffer holding whole frames; throws PROTOCOL on a partial trailing frame. */
export function decodeAll(bytes: Buffer, options: DecoderOptions = {}): Message[] {
  const d = new FrameDecoder(options);
  d.push(bytes);
  const out: Message[] = [];
  for (let m = d.next(); m !== null; m = d.next()) out.push(m);
  if (d.bufferedBytes > 0) throw protocol(`${d.bufferedBytes} bytes of an incomplete frame`);
  return out;
}

/** True for ops a client sends (requests), false for replies. */
export function isRequestOp(op: number): boolean {
  return op === Op.Hello || op === Op.Ping || op === Op.Get || op === Op.PutBatch || op === Op.HasBatch || op === Op.DeleteBatch || op === Op.Flush;
}
