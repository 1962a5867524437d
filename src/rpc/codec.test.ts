import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ErrorCodes, TorusError } from '../core/errors.js';
import { BLOCK_REF_SIZE, BlockType, decodeBlockRef, encodeBlockRef, type BlockRef } from '../core/ids.js';
import {
  DEFAULT_MAX_FRAME_SIZE,
  EXT_NONCE,
  EXT_SOFTWARE,
  FrameDecoder,
  HEADER_SIZE,
  MAX_ERROR_MESSAGE_BYTES,
  MIN_MAX_FRAME_SIZE,
  Op,
  WIRE_ERROR_CODES,
  decodeAll,
  encodeData,
  encodeDataSums,
  encodeError,
  encodeGet,
  encodeMessage,
  encodeMessageBytes,
  encodePutBatch,
  errorCodeFromWire,
  readRef,
  writeRef,
  type DecoderOptions,
  type Message,
  type ReplyTarget,
} from './codec.js';

const ref = (index: number, type = BlockType.Data): BlockRef => ({ type, volume: 7, inode: 3, index });

const SAMPLES: Message[] = [
  {
    op: Op.Hello,
    id: 1,
    minVersion: 1,
    maxVersion: 3,
    maxFrameSize: DEFAULT_MAX_FRAME_SIZE,
    uuid: '6f1c0a52-6a0e-4d6b-9e38-2b7d1c0f9a11',
    clusterId: 'c1',
    extensions: [{ type: EXT_NONCE, value: Buffer.from('0123456789abcdef') }],
  },
  {
    op: Op.HelloOk,
    id: 1,
    version: 1,
    maxFrameSize: MIN_MAX_FRAME_SIZE,
    maxInFlight: 64,
    blockSize: 512 * 1024,
    uuid: 'node-β',
    clusterId: 'c1',
    extensions: [{ type: EXT_SOFTWARE, value: Buffer.from('torus-ts') }],
  },
  { op: Op.Error, id: 9, code: 'BLOCK_UNAVAILABLE', message: 'no such block: data v7 i3 #1 ✗' },
  { op: Op.Ping, id: 2 },
  { op: Op.Pong, id: 2 },
  { op: Op.Ok, id: 0xffffffff },
  { op: Op.Flush, id: 5 },
  { op: Op.Get, id: 3, ref: ref(1), offset: 0, length: 0 },
  { op: Op.Get, id: 4, ref: { type: BlockType.INode, volume: 2 ** 40 - 1, inode: 2 ** 53 - 1, index: 12 }, offset: 4096, length: 8192 },
  { op: Op.Data, id: 3, data: Buffer.from('hello block') },
  { op: Op.Data, id: 3, data: Buffer.alloc(0) },
  { op: Op.Data, id: 4, data: Buffer.alloc(3000, 0xab) },
  {
    op: Op.PutBatch,
    id: 6,
    sync: true,
    items: [
      { ref: ref(1), data: Buffer.from('one') },
      { ref: ref(2), data: Buffer.alloc(0) },
      { ref: ref(3), data: Buffer.alloc(1500, 3) },
    ],
  },
  { op: Op.PutBatch, id: 7, sync: false, items: [] },
  // FLAG_CRC: every item carries the writer's CRC.
  { op: Op.PutBatch, id: 9, sync: false, items: [{ ref: ref(4), crc: 0xdeadbeef, data: Buffer.from('four') }, { ref: ref(5), crc: 0, data: Buffer.alloc(0) }] },
  // FLAG_SUMS.
  { op: Op.Get, id: 11, ref: ref(6), offset: 5000, length: 100, sums: true },
  // Journal operations.
  { op: Op.Get, id: 12, ref: ref(7), offset: 0, length: 0, raw: true },
  { op: Op.Append, id: 13, sync: true, ref: ref(8), pieces: [{ offset: 0, data: Buffer.from('rec') }, { offset: 4032, data: Buffer.alloc(64, 1) }] },
  { op: Op.Append, id: 14, sync: false, ref: ref(8), pieces: [] },
  { op: Op.Seal, id: 15, sync: true, ref: ref(8), gapStart: 3, gapEnd: 4032, crc: 0xfeedf00d },
  { op: Op.Fence, id: 16, volume: 2 ** 40 - 1, epoch: 2 ** 53 - 1 },
  { op: Op.FenceResult, id: 16, open: [ref(8), ref(9)] },
  { op: Op.Data, id: 11, data: Buffer.alloc(4096, 6), sums: { sectorSize: 4096, offset: 4096, sums: Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]) } },
  { op: Op.PutResult, id: 6, statuses: [null, 'OUT_OF_SPACE', null] },
  { op: Op.HasBatch, id: 8, refs: [ref(1), ref(2), ref(3)] },
  { op: Op.HasResult, id: 8, has: [true, false, true, true, false, false, false, false, true] },
  { op: Op.HasResult, id: 8, has: [] },
  { op: Op.DeleteBatch, id: 10, refs: [ref(9)] },
];

function decodeChunks(chunks: Buffer[], options?: { maxFrameSize?: number }): Message[] {
  const d = new FrameDecoder(options);
  const out: Message[] = [];
  for (const c of chunks) {
    d.push(c);
    for (let m = d.next(); m !== null; m = d.next()) out.push(m);
  }
  assert.equal(d.bufferedBytes, 0, 'bytes left over');
  return out;
}

function assertProtocol(fn: () => unknown, match?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof TorusError, `expected TorusError, got ${String(err)}`);
    assert.equal(err.code, 'PROTOCOL');
    if (match) assert.match(err.message, match);
    return true;
  });
}

describe('codec: round trips', () => {
  for (const m of SAMPLES) {
    it(`round-trips ${JSON.stringify(m).slice(0, 60)}`, () => {
      assert.deepStrictEqual(decodeAll(encodeMessageBytes(m)), [m]);
    });
  }

  it('pins the frame layouts of PUT_BATCH with FLAG_CRC and DATA with FLAG_SUMS', () => {
    const put = encodeMessageBytes({ op: Op.PutBatch, id: 2, sync: true, items: [{ ref: { type: BlockType.Data, volume: 1, inode: 2, index: 3 }, crc: 0x11223344, data: Buffer.from([0xaa]) }] });
    assert.equal(
      put.toString('hex'),
      '25000000' + '12' + '03' + '0000' + '02000000' + // length 37, PUT_BATCH, SYNC|CRC
        '01000000' + // count 1
        '0100000000000000' + '0200000000000000' + '0300000000000000' + // ref
        '44332211' + '01000000' + 'aa', // crc, length 1, data
    );
    const data = encodeMessageBytes({ op: Op.Data, id: 5, data: Buffer.from([0xbb]), sums: { sectorSize: 4096, offset: 8192, sums: Buffer.from([1, 0, 0, 0]) } });
    assert.equal(data.toString('hex'), '11000000' + '11' + '02' + '0000' + '05000000' + '00100000' + '00200000' + '01000000' + '01000000' + 'bb');
  });

  it('pins the frame layout (GET)', () => {
    const f = encodeGet(0x01020304, { type: BlockType.INode, volume: 5, inode: 6, index: 7 }, 4096, 512);
    assert.equal(
      f.toString('hex'),
      [
        '20000000', // body length 32
        '10', // op GET
        '00', // flags
        '0000', // reserved
        '04030201', // request id
        '0500000000010000', // volume word: volume 5, type 1 at bit 40
        '0600000000000000', // inode
        '0700000000000000', // index
        '00100000', // offset 4096
        '00020000', // length 512
      ].join(''),
    );
  });

  it('pins HELLO magic and the error code table', () => {
    const hello = encodeMessageBytes(SAMPLES[0]!);
    assert.equal(hello.subarray(HEADER_SIZE, HEADER_SIZE + 4).toString('latin1'), 'TDP2');
    // These numbers are on the wire: changing one breaks every mixed-version cluster.
    assert.deepStrictEqual(
      ErrorCodes.map((c) => WIRE_ERROR_CODES[c]),
      ErrorCodes.map((_, i) => i + 1),
    );
    for (const c of ErrorCodes) assert.equal(errorCodeFromWire(WIRE_ERROR_CODES[c]), c);
    assert.equal(errorCodeFromWire(999), 'INTERNAL');
  });

  it('does not copy big payloads when encoding', () => {
    const data = Buffer.alloc(64 * 1024, 1);
    const parts = encodeData(1, data);
    assert.equal(parts.length, 2);
    assert.equal(parts[1], data);
    const put = encodePutBatch(2, [
      { ref: ref(1), data },
      { ref: ref(2), data },
    ]);
    assert.equal(put.filter((p) => p === data).length, 2);
  });

  it('cuts long error messages on a character boundary', () => {
    const msg = '€'.repeat(3000); // 9000 UTF-8 bytes
    const [m] = decodeAll(encodeError(1, 'INTERNAL', msg));
    assert.ok(m && m.op === Op.Error);
    assert.ok(Buffer.byteLength(m.message) <= MAX_ERROR_MESSAGE_BYTES);
    assert.ok(msg.startsWith(m.message));
  });

  it('refuses to encode fields that do not fit', () => {
    assert.throws(() => encodeGet(1, ref(1), -1, 0), (e: unknown) => e instanceof TorusError && e.code === 'INVALID_ARGUMENT');
    assert.throws(
      () => encodeMessage({ ...(SAMPLES[0] as Extract<Message, { op: 1 }>), uuid: 'x'.repeat(256) }),
      (e: unknown) => e instanceof TorusError && e.code === 'INVALID_ARGUMENT',
    );
  });
});

describe('codec: split points', () => {
  const frames = SAMPLES.map(encodeMessageBytes);
  const stream = Buffer.concat(frames);

  it('decodes every frame split at every byte offset', () => {
    SAMPLES.forEach((m, i) => {
      const f = frames[i]!;
      for (let split = 0; split <= f.length; split++) {
        assert.deepStrictEqual(decodeChunks([f.subarray(0, split), f.subarray(split)]), [m], `frame ${i} split at ${split}`);
      }
    });
  });

  it('decodes the concatenation of all frames split at every offset', () => {
    for (let split = 0; split <= stream.length; split++) {
      assert.deepStrictEqual(decodeChunks([stream.subarray(0, split), stream.subarray(split)]), SAMPLES);
    }
  });

  it('decodes the concatenation split in three at many offsets', () => {
    for (let a = 0; a <= stream.length; a += 53) {
      for (let b = a; b <= stream.length; b += 59) {
        const parts = [stream.subarray(0, a), stream.subarray(a, b), stream.subarray(b)];
        assert.deepStrictEqual(decodeChunks(parts), SAMPLES);
      }
    }
  });

  it('decodes the stream delivered one byte at a time', () => {
    const bytes = [...stream].map((b) => Buffer.from([b]));
    assert.deepStrictEqual(decodeChunks(bytes), SAMPLES);
  });

  it('decodes a 512 KiB block split at sampled offsets', () => {
    const data = Buffer.alloc(512 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31) & 0xff;
    const frame = Buffer.concat(encodePutBatch(77, [{ ref: ref(5), data }]));
    for (let split = 0; split <= frame.length; split += split < 64 ? 1 : 4093) {
      const [m] = decodeChunks([frame.subarray(0, split), frame.subarray(split)]);
      assert.ok(m && m.op === Op.PutBatch);
      assert.ok(m.items[0]!.data.equals(data));
    }
  });
});

describe('codec: buffer ownership', () => {
  it('a payload spanning chunks survives later changes to those chunks', () => {
    const frame = Buffer.concat(encodeData(1, Buffer.alloc(4000, 0x5a)));
    const a = Buffer.from(frame.subarray(0, 1000));
    const b = Buffer.from(frame.subarray(1000));
    const [m] = decodeChunks([a, b]);
    a.fill(0);
    b.fill(0);
    assert.ok(m && m.op === Op.Data);
    assert.ok(m.data.equals(Buffer.alloc(4000, 0x5a)));
  });

  it('a small payload in a big chunk is copied out, so it does not pin the chunk', () => {
    const small = Buffer.concat(encodeData(1, Buffer.alloc(2000, 1)));
    const chunk = Buffer.concat([small, Buffer.concat(encodeData(2, Buffer.alloc(60_000, 2)))]);
    const [m1, m2] = decodeChunks([chunk]);
    assert.ok(m1 && m1.op === Op.Data && m2 && m2.op === Op.Data);
    assert.notEqual(m1.data.buffer, chunk.buffer);
    assert.equal(m1.data.length, 2000);
    // The big one is most of the chunk: a view is fine and saves a 60 KB copy.
    assert.equal(m2.data.buffer, chunk.buffer);
  });
});

describe('codec: invalid input', () => {
  it('refuses an oversized length prefix as soon as the header is in', () => {
    const d = new FrameDecoder({ maxFrameSize: 1 << 20 });
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32LE(0xfffffff0, 0);
    header[4] = Op.Data;
    assertProtocol(() => d.push(header), /exceeds the limit/);
    // The decoder stays failed.
    assertProtocol(() => d.next());
    assertProtocol(() => d.push(Buffer.alloc(1)));
  });

  it('allocates a body as its bytes arrive: a header announcing 16 MiB costs 16 KiB, and room stays within 4x what came (issue 13)', () => {
    const d = new FrameDecoder();
    const big = Buffer.alloc(16 * 1024 * 1024 - 64, 7);
    const frame = Buffer.concat(encodeData(1, big));
    d.push(frame.subarray(0, HEADER_SIZE + 1));
    assert.ok(d.heldBytes <= HEADER_SIZE + 16 * 1024, `held ${d.heldBytes} after one byte of body`);
    let at = HEADER_SIZE + 1;
    for (const step of [1000, 60_000, 500_000, 3_000_000]) {
      d.push(frame.subarray(at, at + step));
      at += step;
      assert.ok(d.heldBytes <= HEADER_SIZE + Math.max(16 * 1024, 4 * (at - HEADER_SIZE)), `held ${d.heldBytes} with ${at - HEADER_SIZE} bytes in`);
      assert.equal(d.next(), null);
    }
    d.push(frame.subarray(at));
    const m = d.next();
    assert.ok(m && m.op === Op.Data && m.data.equals(big));
    // A client trusting its replies' lengths takes the whole body at once.
    const eager = new FrameDecoder({ allocateOnHeader: true });
    eager.push(frame.subarray(0, HEADER_SIZE + 1));
    assert.ok(eager.heldBytes >= big.length);
  });

  it('refuses an oversized frame whose header arrives in pieces', () => {
    const d = new FrameDecoder({ maxFrameSize: 4096 });
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32LE(5000, 0);
    header[4] = Op.Data;
    d.push(header.subarray(0, 5));
    assertProtocol(() => d.push(header.subarray(5)), /exceeds/);
  });

  it('refuses unknown ops, undefined flags, reserved bits', () => {
    const good = encodeGet(1, ref(1), 0, 0);
    const op = Buffer.from(good);
    op[4] = 0x7f;
    assertProtocol(() => decodeAll(op), /unknown op/);
    const flags = Buffer.from(good);
    flags[5] = 1;
    assertProtocol(() => decodeAll(flags), /flags/);
    const reserved = Buffer.from(good);
    reserved[7] = 1;
    assertProtocol(() => decodeAll(reserved), /reserved/);
  });

  it('refuses truncated and padded bodies of every message', () => {
    for (const m of SAMPLES) {
      const f = encodeMessageBytes(m);
      const body = f.length - HEADER_SIZE;
      if (body > 0) {
        const short = Buffer.from(f.subarray(0, f.length - 1));
        short.writeUInt32LE(body - 1, 0);
        if (m.op !== Op.Data) assertProtocol(() => decodeAll(short));
      }
      const long = Buffer.concat([f, Buffer.from([0])]);
      long.writeUInt32LE(body + 1, 0);
      // DATA's body is all payload, and HELLO's trailing bytes are extensions (a 1-byte tail is
      // a truncated extension, which is still an error).
      if (m.op !== Op.Data) assertProtocol(() => decodeAll(long));
    }
  });

  it('refuses bad magic, invalid UTF-8, reversed version ranges, forged counts', () => {
    const hello = encodeMessageBytes(SAMPLES[0]!);
    const magic = Buffer.from(hello);
    magic[HEADER_SIZE] = 0x41;
    assertProtocol(() => decodeAll(magic), /magic/);
    const utf = Buffer.from(hello);
    utf[HEADER_SIZE + 13] = 0xff; // first uuid byte
    assertProtocol(() => decodeAll(utf), /UTF-8/);
    const versions = Buffer.from(hello);
    versions.writeUInt16LE(9, HEADER_SIZE + 4);
    assertProtocol(() => decodeAll(versions), /min version/);
    const has = encodeMessageBytes({ op: Op.HasBatch, id: 1, refs: [ref(1)] });
    has.writeUInt32LE(0xffffffff, HEADER_SIZE);
    assertProtocol(() => decodeAll(has), /count/);
    const bits = encodeMessageBytes({ op: Op.HasResult, id: 1, has: [true, false, true] });
    bits[HEADER_SIZE + 4] = 0xff;
    assertProtocol(() => decodeAll(bits), /past the count/);
  });
});

// ---------------------------------------------------------------------------------------------
// Properties

const arbRef: fc.Arbitrary<BlockRef> = fc
  .record({
    type: fc.integer({ min: 0, max: 2047 }),
    volume: fc.integer({ min: 0, max: 2 ** 40 - 1 }),
    inode: fc.maxSafeNat(),
    index: fc.maxSafeNat(),
  })
  .map((o) => ({ ...o }));
const arbId = fc.integer({ min: 0, max: 0xffffffff });
// fast-check builds records without a prototype; the decoder returns plain objects.
const plain = <T extends object>(a: fc.Arbitrary<T>): fc.Arbitrary<T> => a.map((o) => ({ ...o }));
const arbBytes = (max: number): fc.Arbitrary<Buffer> => fc.uint8Array({ maxLength: max }).map((u) => Buffer.from(u));
const arbStr = fc.string({ unit: 'grapheme', maxLength: 30 });
const arbExt = fc.array(plain(fc.record({ type: fc.integer({ min: 0, max: 0xffff }), value: arbBytes(40) })), { maxLength: 3 });
const arbCode = fc.constantFrom(...ErrorCodes);

const arbMessage: fc.Arbitrary<Message> = fc.oneof(
  fc.record({
    op: fc.constant(Op.Hello),
    id: arbId,
    minVersion: fc.integer({ min: 0, max: 10 }),
    maxVersion: fc.integer({ min: 10, max: 0xffff }),
    maxFrameSize: fc.integer({ min: MIN_MAX_FRAME_SIZE, max: 0xffffffff }),
    uuid: arbStr,
    clusterId: arbStr,
    extensions: arbExt,
  }),
  fc.record({
    op: fc.constant(Op.HelloOk),
    id: arbId,
    version: fc.integer({ min: 0, max: 0xffff }),
    maxFrameSize: fc.integer({ min: MIN_MAX_FRAME_SIZE, max: 0xffffffff }),
    maxInFlight: fc.integer({ min: 1, max: 0xffffffff }),
    blockSize: fc.integer({ min: 0, max: 0xffffffff }),
    uuid: arbStr,
    clusterId: arbStr,
    extensions: arbExt,
  }),
  fc.record({ op: fc.constant(Op.Error), id: arbId, code: arbCode, message: fc.string({ unit: 'grapheme', maxLength: 80 }) }),
  fc.record({ op: fc.constantFrom(Op.Ping, Op.Pong, Op.Ok, Op.Flush), id: arbId }),
  fc.record({
    op: fc.constant(Op.Get),
    id: arbId,
    ref: arbRef,
    offset: fc.integer({ min: 0, max: 0xffffffff }),
    length: fc.integer({ min: 0, max: 0xffffffff }),
  }),
  fc.record({
    op: fc.constant(Op.Get),
    id: arbId,
    ref: arbRef,
    offset: fc.integer({ min: 0, max: 0xffffffff }),
    length: fc.integer({ min: 0, max: 0xffffffff }),
    sums: fc.constant(true),
  }),
  fc.record({ op: fc.constant(Op.Get), id: arbId, ref: arbRef, offset: fc.constant(0), length: fc.constant(0), raw: fc.constant(true) }),
  fc.record({
    op: fc.constant(Op.Append),
    id: arbId,
    sync: fc.boolean(),
    ref: arbRef,
    pieces: fc.array(plain(fc.record({ offset: fc.integer({ min: 0, max: 0xffffffff }), data: arbBytes(300) })), { maxLength: 4 }),
  }),
  fc.record({
    op: fc.constant(Op.Seal),
    id: arbId,
    sync: fc.boolean(),
    ref: arbRef,
    gapStart: fc.integer({ min: 0, max: 0xffffffff }),
    gapEnd: fc.integer({ min: 0, max: 0xffffffff }),
    crc: fc.integer({ min: 0, max: 0xffffffff }),
  }),
  fc.record({ op: fc.constant(Op.Fence), id: arbId, volume: fc.integer({ min: 0, max: 2 ** 40 - 1 }), epoch: fc.maxSafeNat() }),
  fc.record({ op: fc.constant(Op.FenceResult), id: arbId, open: fc.array(arbRef, { maxLength: 10 }) }),
  fc.record({ op: fc.constant(Op.Data), id: arbId, data: arbBytes(2000) }),
  fc.record({
    op: fc.constant(Op.Data),
    id: arbId,
    data: arbBytes(2000),
    sums: plain(fc.record({ sectorSize: fc.integer({ min: 1, max: 0xffffffff }), offset: fc.integer({ min: 0, max: 0xffffffff }), sums: fc.integer({ min: 0, max: 40 }).chain((n) => arbBytes(4 * n).filter((b) => b.length % 4 === 0)) })),
  }),
  fc.record({
    op: fc.constant(Op.PutBatch),
    id: arbId,
    sync: fc.boolean(),
    items: fc.array(plain(fc.record({ ref: arbRef, data: arbBytes(300) })), { maxLength: 5 }),
  }),
  fc.record({
    op: fc.constant(Op.PutBatch),
    id: arbId,
    sync: fc.boolean(),
    items: fc.array(plain(fc.record({ ref: arbRef, crc: fc.integer({ min: 0, max: 0xffffffff }), data: arbBytes(300) })), { minLength: 1, maxLength: 5 }),
  }),
  fc.record({ op: fc.constant(Op.PutResult), id: arbId, statuses: fc.array(fc.option(arbCode, { nil: null }), { maxLength: 20 }) }),
  fc.record({ op: fc.constantFrom(Op.HasBatch, Op.DeleteBatch), id: arbId, refs: fc.array(arbRef, { maxLength: 10 }) }),
  fc.record({ op: fc.constant(Op.HasResult), id: arbId, has: fc.array(fc.boolean(), { maxLength: 40 }) }),
).map((m) => ({ ...m })) as fc.Arbitrary<Message>;

/** Feeds bytes in the given pieces; returns messages, or the error thrown. */
function feed(bytes: Buffer, cuts: number[], maxFrameSize = 1 << 20): { messages: Message[]; error: unknown } {
  const d = new FrameDecoder({ maxFrameSize });
  const messages: Message[] = [];
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  let prev = 0;
  try {
    for (const p of [...points, bytes.length]) {
      d.push(bytes.subarray(prev, p));
      prev = p;
      // Each next() either consumes a whole frame or returns null, so this loop is bounded
      // by the number of frames; the guard turns a bug into a failure instead of a hang.
      for (let guard = 0; ; guard++) {
        assert.ok(guard <= bytes.length, 'decoder made no progress');
        const m = d.next();
        if (m === null) break;
        messages.push(m);
      }
    }
  } catch (error) {
    return { messages, error };
  }
  return { messages, error: null };
}

function onlyProtocolErrors(error: unknown): void {
  if (error === null) return;
  assert.ok(error instanceof TorusError, `non-Torus error: ${String(error)}`);
  assert.equal(error.code, 'PROTOCOL', error.message);
}

describe('codec: properties', () => {
  it('round-trips arbitrary messages, split anywhere', () => {
    fc.assert(
      fc.property(fc.array(arbMessage, { minLength: 1, maxLength: 4 }), fc.array(fc.nat(), { maxLength: 4 }), (msgs, cuts) => {
        const bytes = Buffer.concat(msgs.map(encodeMessageBytes));
        const { messages, error } = feed(bytes, cuts, DEFAULT_MAX_FRAME_SIZE);
        assert.equal(error, null);
        assert.deepStrictEqual(messages, msgs);
      }),
      { numRuns: 500 },
    );
  });

  it('random bytes yield only PROTOCOL errors', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), fc.array(fc.nat(), { maxLength: 5 }), (u, cuts) => {
        onlyProtocolErrors(feed(Buffer.from(u), cuts).error);
      }),
      { numRuns: 3000 },
    );
  });

  it('random bytes behind a plausible header yield only PROTOCOL errors', () => {
    // Pure random bytes rarely pass the header check; this reaches every body decoder.
    const arbOp = fc.constantFrom(...Object.values(Op));
    fc.assert(
      fc.property(arbOp, fc.integer({ min: 0, max: 1 }), arbId, fc.uint8Array({ maxLength: 300 }), fc.array(fc.nat(), { maxLength: 3 }), (op, flags, id, body, cuts) => {
        const f = Buffer.alloc(HEADER_SIZE + body.length);
        f.writeUInt32LE(body.length, 0);
        f[4] = op;
        f[5] = flags;
        f.writeUInt32LE(id, 8);
        f.set(body, HEADER_SIZE);
        onlyProtocolErrors(feed(f, cuts).error);
      }),
      { numRuns: 5000 },
    );
  });

  it('mutated valid frames yield only PROTOCOL errors', () => {
    const arbMutation = fc.record({ at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) });
    fc.assert(
      fc.property(
        fc.array(arbMessage, { minLength: 1, maxLength: 3 }),
        fc.array(arbMutation, { minLength: 1, maxLength: 4 }),
        fc.option(fc.nat(), { nil: undefined }),
        fc.array(fc.nat(), { maxLength: 3 }),
        (msgs, mutations, truncate, cuts) => {
          let bytes = Buffer.concat(msgs.map(encodeMessageBytes));
          for (const { at, value } of mutations) bytes[at % bytes.length] = value;
          if (truncate !== undefined) bytes = bytes.subarray(0, truncate % (bytes.length + 1));
          onlyProtocolErrors(feed(bytes, cuts).error);
        },
      ),
      { numRuns: 3000 },
    );
  });
});

describe('codec: properties of the onread path', () => {
  it('mutated frames read into decoder-chosen buffers yield only PROTOCOL errors', () => {
    fc.assert(
      fc.property(
        fc.array(arbMessage, { minLength: 1, maxLength: 3 }),
        fc.array(fc.record({ at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }), { maxLength: 3 }),
        fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 5 }),
        (msgs, mutations, sizes) => {
          const bytes = Buffer.concat(msgs.map(encodeMessageBytes));
          for (const { at, value } of mutations) bytes[at % bytes.length] = value;
          const d = new FrameDecoder({ maxFrameSize: 1 << 20 });
          const out: Message[] = [];
          let pos = 0;
          let k = 0;
          try {
            while (pos < bytes.length) {
              const t = d.readTarget();
              const n = Math.min(t.length, bytes.length - pos, sizes[k++ % sizes.length]!);
              bytes.copy(t, 0, pos, pos + n);
              pos += n;
              d.commitRead(t, n);
              for (let m = d.next(); m !== null; m = d.next()) out.push(m);
            }
          } catch (err) {
            onlyProtocolErrors(err);
            return;
          }
          if (mutations.length === 0) assert.deepStrictEqual(out, msgs);
        },
      ),
      { numRuns: 2000 },
    );
  });
});

describe('codec: block refs', () => {
  it('writes and reads exactly the bytes of ids.ts', () => {
    fc.assert(
      fc.property(arbRef, (r) => {
        const a = Buffer.alloc(BLOCK_REF_SIZE + 3);
        const b = Buffer.alloc(BLOCK_REF_SIZE + 3);
        writeRef(a, 3, r);
        encodeBlockRef(r, b, 3);
        assert.ok(a.equals(b));
        assert.deepStrictEqual(readRef(a, 3), decodeBlockRef(b, 3));
      }),
      { numRuns: 2000 },
    );
  });

  it('accepts on the wire only what ids.ts accepts', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: BLOCK_REF_SIZE, maxLength: BLOCK_REF_SIZE }), (u) => {
        const buf = Buffer.from(u);
        let theirs: BlockRef | null = null;
        try {
          theirs = decodeBlockRef(buf);
        } catch {
          // refused by ids.ts
        }
        if (theirs !== null && theirs.type < 2 ** 11) assert.deepStrictEqual(readRef(buf, 0), theirs);
        else assertProtocol(() => readRef(buf, 0));
      }),
      { numRuns: 3000 },
    );
  });

  it('refuses to encode what ids.ts refuses', () => {
    for (const bad of [{ ...ref(1), volume: 2 ** 40 }, { ...ref(1), index: -1 }, { ...ref(1), type: 2 ** 11 }, { ...ref(1), inode: 1.5 }]) {
      assert.throws(() => writeRef(Buffer.alloc(BLOCK_REF_SIZE), 0, bad), (e: unknown) => e instanceof TorusError && e.code === 'INVALID_ARGUMENT');
    }
  });
});

describe('codec: reads into decoder-chosen buffers (net onread)', () => {
  /** Plays a socket that reads `bytes` into readTarget() in pieces of the sizes given. */
  function readAll(bytes: Buffer, sizes: number[], options: DecoderOptions = {}): { messages: Message[]; targets: Buffer[] } {
    const d = new FrameDecoder(options);
    const messages: Message[] = [];
    const targets: Buffer[] = [];
    let pos = 0;
    let k = 0;
    while (pos < bytes.length) {
      const t = d.readTarget();
      targets.push(t);
      const n = Math.min(t.length, bytes.length - pos, Math.max(1, sizes[k++ % sizes.length]!));
      bytes.copy(t, 0, pos, pos + n);
      pos += n;
      d.commitRead(t, n);
      for (let m = d.next(); m !== null; m = d.next()) messages.push(m);
    }
    assert.equal(d.bufferedBytes, 0);
    return { messages, targets };
  }

  it('decodes the same messages whatever the read sizes', () => {
    const stream = Buffer.concat(SAMPLES.map(encodeMessageBytes));
    for (const sizes of [[1], [7, 3, 100], [65536], [12, 12, 5000], [4096]]) {
      assert.deepStrictEqual(readAll(stream, sizes).messages, SAMPLES);
      assert.deepStrictEqual(readAll(stream, sizes, { allocateOnHeader: true }).messages, SAMPLES);
    }
  });

  it('lets the kernel write a large payload straight into the buffer handed out', () => {
    const big = Buffer.alloc(512 * 1024);
    for (let i = 0; i < big.length; i++) big[i] = i % 251;
    const stream = Buffer.concat([
      encodeMessageBytes(SAMPLES[9]!),
      ...encodeData(1, big),
      ...encodeData(2, big),
      encodeMessageBytes(SAMPLES[3]!),
    ]);
    const { messages, targets } = readAll(stream, [65536], { allocateOnHeader: true });
    assert.equal(messages.length, 4);
    for (const m of messages.slice(1, 3)) {
      assert.ok(m.op === Op.Data && m.data.equals(big));
      // Most reads landed in the payload's own memory: no copy for the bulk of the block.
      const direct = targets.filter((t) => t.buffer === m.data.buffer).length;
      assert.ok(direct >= 7, `only ${direct} reads went straight into the payload`);
    }
  });

  describe("a DATA reply read into its caller's buffer (replyInto)", () => {
    const BLOCK = 256 * 1024;
    const big = Buffer.alloc(BLOCK);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7) % 253;
    const sums = Buffer.alloc(4 * (BLOCK / 4096), 0x5c);
    const reply = (id: number, data: Buffer, s = sums): Buffer => Buffer.concat(encodeDataSums(id, { sectorSize: 4096, offset: 0, sums: s }, data));
    const stream = Buffer.concat([reply(5, big), encodeMessageBytes(SAMPLES[3]!), reply(6, big.subarray(0, 8192), sums.subarray(0, 8)), reply(7, big)]);
    const targets = (): { into: Map<number, Buffer>; live: Set<number>; options: DecoderOptions } => {
      const into = new Map([[5, Buffer.alloc(BLOCK)], [7, Buffer.alloc(BLOCK)], [6, Buffer.alloc(8192)]]);
      const live = new Set([5, 6, 7]);
      const target = (id: number): ReplyTarget | null => {
        const b = into.get(id);
        return b ? { into: b, live: () => live.has(id) } : null;
      };
      return { into, live, options: { allocateOnHeader: true, replyInto: (id) => target(id) } };
    };

    it('pushed chunks: the bytes land in the buffer, which is the message data; the frames after it decode as before', () => {
      for (const size of [1000, 16384, 65536]) {
        const { into, options } = targets();
        const d = new FrameDecoder(options);
        const out: Message[] = [];
        for (let pos = 0; pos < stream.length; pos += size) {
          d.push(stream.subarray(pos, pos + size));
          for (let m = d.next(); m !== null; m = d.next()) out.push(m);
        }
        assert.equal(out.length, 4);
        for (const [i, id] of [[0, 5], [3, 7]] as const) {
          const m = out[i]!;
          assert.ok(m.op === Op.Data && m.id === id && m.sums !== undefined);
          assert.equal(m.data, into.get(id), 'the data is the caller buffer itself');
          assert.ok(m.data.equals(big));
          assert.ok(m.sums.sums.equals(sums));
          assert.equal(m.sums.sectorSize, 4096);
        }
        assert.deepStrictEqual(out[1], SAMPLES[3]);
        const small = out[2]!;
        assert.ok(small.op === Op.Data && small.data.equals(big.subarray(0, 8192)));
      }
    });

    it('reads: copied into the buffer from each read, never handed to the socket to read into', () => {
      const { into, options } = targets();
      const { messages, targets: reads } = readAll(stream, [65536], options);
      assert.equal(messages.length, 4);
      // net asks for the next read's memory right after a read, and the kernel fills it later:
      // by then the call may have given the buffer up.
      assert.ok(reads.every((t) => t.buffer !== into.get(5)!.buffer && t.buffer !== into.get(7)!.buffer));
      for (const [i, id] of [[0, 5], [3, 7]] as const) {
        const m = messages[i]!;
        assert.ok(m.op === Op.Data && m.data === into.get(id) && m.data.equals(big));
      }
    });

    it('nothing is written into a buffer its caller gave up, and the stream stays in step', () => {
      for (const mode of ['push', 'read'] as const) {
        const { into, live, options } = targets();
        const d = new FrameDecoder(options);
        const out: Message[] = [];
        const half = HEADER_SIZE + 12 + sums.length + BLOCK / 2;
        const feed = (bytes: Buffer): void => {
          if (mode === 'push') d.push(bytes);
          else
            for (let pos = 0; pos < bytes.length; ) {
              const t = d.readTarget();
              const n = Math.min(t.length, bytes.length - pos, 65536);
              bytes.copy(t, 0, pos, pos + n);
              pos += n;
              d.commitRead(t, n);
            }
          for (let m = d.next(); m !== null; m = d.next()) out.push(m);
        };
        feed(stream.subarray(0, half));
        // The call timed out: its caller may hand the buffer to another read at once.
        live.delete(5);
        into.get(5)!.fill(0xee);
        feed(stream.subarray(half));
        assert.ok(into.get(5)!.every((b) => b === 0xee), `${mode}: bytes written after the call gave up`);
        assert.equal(out.length, 4);
        assert.ok(out[3]!.op === Op.Data && out[3]!.data.equals(big), `${mode}: the next reply is whole`);
      }
    });

    it('a reply whose length does not fit the buffer fails that call only', () => {
      // 8 checksums where the buffer's length implies 64: the bytes before the data are wrong.
      const bad = reply(5, Buffer.concat([big, Buffer.alloc(224)]), sums.subarray(0, 8));
      const { options } = targets();
      const d = new FrameDecoder(options);
      d.push(bad.subarray(0, 1000));
      d.push(bad.subarray(1000));
      d.push(encodeMessageBytes(SAMPLES[3]!));
      const m = d.next();
      assert.ok(m !== null && m.op === Op.Error && m.id === 5 && m.code === 'PROTOCOL', JSON.stringify(m));
      assert.deepStrictEqual(d.next(), SAMPLES[3]);
    });
  });

  it('refuses a commit for memory it did not hand out', () => {
    const d = new FrameDecoder();
    d.readTarget();
    assert.throws(() => d.commitRead(Buffer.alloc(10), 5), (e: unknown) => e instanceof TorusError && e.code === 'INTERNAL');
  });
});
