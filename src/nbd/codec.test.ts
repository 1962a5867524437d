import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { BufferPool } from '../core/buffer-pool.js';
import { isTorusError } from '../core/errors.js';
import {
  ClientStreamDecoder,
  Cmd,
  CmdFlag,
  DEFAULT_MAX_PAYLOAD,
  EXPORT_NAME_REPLY_SIZE,
  Errno,
  IHAVEOPT,
  Info,
  MAX_STRING_BYTES,
  NBDMAGIC,
  Opt,
  REQUEST_MAGIC,
  Rep,
  ReplyFlag,
  ReplyType,
  ServerStreamDecoder,
  State,
  encodeBlockStatus,
  encodeChunk,
  encodeClientFlags,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoReply,
  encodeInfoRequest,
  encodeMetaContextReply,
  encodeMetaContextRequest,
  encodeNoneChunk,
  encodeOffsetData,
  encodeOffsetHole,
  encodeOption,
  encodeOptionError,
  encodeOptionReply,
  encodeRepServer,
  encodeRequest,
  encodeSimpleReply,
  encodeString,
  parseBlockStatus,
  parseErrorChunk,
  parseExportName,
  parseInfoReply,
  parseInfoRequest,
  parseMetaContextReply,
  parseMetaContextRequest,
  parseOffsetData,
  parseOffsetHole,
  parseRepServer,
  type ClientMessage,
  type InfoItem,
  type Request,
  type ServerMessage,
} from './codec.js';

const isProtocol = (e: unknown): boolean => isTorusError(e, 'PROTOCOL');
const cat = (parts: Buffer[][]): Buffer => Buffer.concat(parts.flat());
/** Decoded messages compared as plain data (Buffers by content). */
const plain = (m: unknown): unknown => JSON.parse(JSON.stringify(m, (_k, v: unknown) => (typeof v === 'bigint' ? `${v}n` : v)));

// ---- the client's side of a session: flags, options, then requests after GO

const OPTIONS: { option: number; data: Buffer }[] = [
  { option: Opt.STRUCTURED_REPLY, data: Buffer.alloc(0) },
  { option: Opt.LIST, data: Buffer.alloc(0) },
  { option: Opt.SET_META_CONTEXT, data: encodeMetaContextRequest({ name: 'disk', queries: ['base:allocation', 'qemu:dirty-bitmap:x'] }) },
  { option: Opt.INFO, data: encodeInfoRequest({ name: 'dïsk', requests: [Info.NAME, Info.BLOCK_SIZE] }) },
  { option: 0xdeadbeef, data: Buffer.from('some unknown option body') },
  { option: Opt.GO, data: encodeInfoRequest({ name: 'disk', requests: [] }) },
];

const REQUESTS: Request[] = [
  { flags: 0, command: Cmd.READ, handle: 1n, offset: 0, length: 4096 },
  { flags: CmdFlag.FUA, command: Cmd.WRITE, handle: 0xffffffffffffffffn, offset: 2 ** 40, length: 5, payload: Buffer.from('hello') },
  { flags: 0, command: Cmd.WRITE, handle: 3n, offset: 7, length: 0, payload: Buffer.alloc(0) },
  { flags: 0, command: Cmd.WRITE, handle: 4n, offset: 4096, length: 3000, payload: Buffer.alloc(3000, 0x5a) },
  { flags: 0, command: Cmd.FLUSH, handle: 5n, offset: 0, length: 0 },
  { flags: CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, command: Cmd.WRITE_ZEROES, handle: 6n, offset: 512, length: 0xffffffff },
  { flags: CmdFlag.REQ_ONE, command: Cmd.BLOCK_STATUS, handle: 7n, offset: Number.MAX_SAFE_INTEGER, length: 1 },
  { flags: 0xffff, command: 0xffff, handle: 8n, offset: 0, length: 0xffffffff },
  { flags: 0, command: Cmd.DISC, handle: 9n, offset: 0, length: 0 },
];

const clientStream = (): Buffer =>
  Buffer.concat([encodeClientFlags(3), ...OPTIONS.map((o) => encodeOption(o.option, o.data)), ...REQUESTS.flatMap((r) => encodeRequest(r))]);

const expectedClient = (): ClientMessage[] => [
  { type: 'clientFlags', flags: 3 },
  ...OPTIONS.map((o) => ({ type: 'option' as const, option: o.option, data: o.data })),
  ...REQUESTS.map((r) => ({ type: 'request' as const, ...r })),
];

/** Feeds chunks, switching to transmission after GO as the server does. */
function decodeClient(chunks: Buffer[], decoder = new ClientStreamDecoder()): ClientMessage[] {
  const out: ClientMessage[] = [];
  const drain = (): void => {
    for (let m = decoder.next(); m; m = decoder.next()) {
      out.push(m);
      if (m.type === 'option' && m.option === Opt.GO) decoder.startTransmission();
    }
  };
  for (const c of chunks) {
    decoder.push(c);
    drain();
  }
  return out;
}

// ---- the server's side: greeting, option replies, then replies

const OPTION_REPLIES: Buffer[] = [
  encodeOptionReply(Opt.STRUCTURED_REPLY, Rep.ACK),
  encodeRepServer(Opt.LIST, 'disk', 'a memory disk'),
  encodeRepServer(Opt.LIST, ''),
  encodeMetaContextReply(Opt.SET_META_CONTEXT, 1, 'base:allocation'),
  encodeInfoReply(Opt.INFO, { type: Info.EXPORT, size: 2 ** 50, flags: 0xffff }),
  encodeInfoReply(Opt.INFO, { type: Info.NAME, name: 'dïsk' }),
  encodeInfoReply(Opt.INFO, { type: Info.DESCRIPTION, description: 'desc ✓' }),
  encodeInfoReply(Opt.INFO, { type: Info.BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD }),
  encodeOptionError(0xdeadbeef, Rep.ERR_UNSUP, 'no such option'),
  encodeOptionReply(Opt.GO, Rep.ACK),
];

const READ_LENGTHS = new Map<bigint, number>([[10n, 5]]);
const REPLIES: Buffer[][] = [
  encodeSimpleReply(10n, 0, Buffer.from('abcde')),
  encodeSimpleReply(11n, Errno.EINVAL),
  encodeSimpleReply(12n, 0),
  encodeOffsetData(13n, 4096, Buffer.from('data!'), false),
  encodeOffsetHole(13n, 0, 4096, false),
  encodeNoneChunk(13n),
  encodeBlockStatus(14n, 1, [{ length: 65536, flags: State.HOLE | State.ZERO }, { length: 0xffffffff, flags: 0 }], true),
  encodeErrorChunk(15n, Errno.EIO, 'replica gone ✗', true),
  encodeErrorChunk(16n, Errno.ENOSPC, '', false, 2 ** 33),
  encodeChunk(ReplyFlag.DONE, 0x1234, 17n, Buffer.from('unknown type')),
];

function decodeServer(chunks: Buffer[]): ServerMessage[] {
  const d = new ServerStreamDecoder({ simpleReplyDataLength: (h) => READ_LENGTHS.get(h) ?? 0 });
  const out: ServerMessage[] = [];
  for (const c of chunks) {
    d.push(c);
    for (let m = d.next(); m; m = d.next()) {
      out.push(m);
      if (m.type === 'optionReply' && m.option === Opt.GO && m.replyType === Rep.ACK) d.startTransmission();
    }
  }
  return out;
}

const serverStream = (): Buffer => Buffer.concat([encodeGreeting(), ...OPTION_REPLIES, cat(REPLIES)]);

describe('codec: layouts', () => {
  it('greeting, client flags and option header match proto.md byte for byte', () => {
    const g = encodeGreeting();
    assert.equal(g.toString('hex'), Buffer.from('NBDMAGICIHAVEOPT').toString('hex') + '0003');
    assert.equal(g.readBigUInt64BE(0), NBDMAGIC);
    assert.equal(encodeClientFlags(3).toString('hex'), '00000003');
    assert.equal(encodeOption(Opt.GO, Buffer.from('x')).toString('hex'), Buffer.from('IHAVEOPT').toString('hex') + '00000007' + '00000001' + '78');
    assert.equal(encodeOptionReply(Opt.LIST, Rep.ACK).toString('hex'), '0003e889045565a9' + '00000003' + '00000001' + '00000000');
  });

  it('requests and replies match proto.md byte for byte', () => {
    const [h, p] = encodeRequest({ flags: CmdFlag.FUA, command: Cmd.WRITE, handle: 0x0102030405060708n, offset: 0x1122334455, length: 2, payload: Buffer.from('hi') });
    assert.equal(h?.toString('hex'), '25609513' + '0001' + '0001' + '0102030405060708' + '0000001122334455' + '00000002');
    assert.equal(p?.toString(), 'hi');
    assert.equal(encodeSimpleReply(7n, Errno.EPERM)[0]?.toString('hex'), '67446698' + '00000001' + '0000000000000007');
    assert.equal(cat([encodeNoneChunk(7n)]).toString('hex'), '668e33ef' + '0001' + '0000' + '0000000000000007' + '00000000');
    assert.equal(cat([encodeOffsetHole(1n, 512, 1024, true)]).toString('hex'), '668e33ef00010002' + '0000000000000001' + '0000000c' + '0000000000000200' + '00000400');
    assert.equal(encodeExportNameReply(1024, 0x1234, false).length, EXPORT_NAME_REPLY_SIZE);
    assert.equal(encodeExportNameReply(1024, 0x1234, true).toString('hex'), '0000000000000400' + '1234');
  });

  it('READ payloads are passed through, never copied', () => {
    const data = Buffer.alloc(1 << 20, 1);
    assert.equal(encodeOffsetData(1n, 0, data, true)[1], data);
    assert.equal(encodeSimpleReply(1n, 0, data)[1], data);
    const [, p] = encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: data.length, payload: data });
    assert.equal(p, data);
  });

  it('encoders refuse values the wire cannot carry', () => {
    assert.throws(() => encodeRequest({ flags: 0, command: 0, handle: 1n, offset: -1, length: 0 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeRequest({ flags: 0, command: 0, handle: 1n, offset: 0, length: 2 ** 32 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeOffsetHole(1n, 0, 0, true), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeErrorChunk(1n, 0, 'x', true), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeBlockStatus(1n, 1, [], true), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeOptionError(1, Rep.ACK, 'x'), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  });

  it('strings are cut to 4096 bytes on a character boundary', () => {
    const long = 'é'.repeat(3000); // 6000 bytes
    const b = encodeString(long);
    assert.ok(b.length <= MAX_STRING_BYTES);
    assert.equal(b.toString('utf8'), 'é'.repeat(2048));
    const [h] = encodeErrorChunk(1n, Errno.EIO, long, true);
    assert.equal(parseErrorChunk(ReplyType.ERROR, h!.subarray(20)).message, 'é'.repeat(2048));
  });
});

describe('codec: round trips', () => {
  it('every client message decodes to what was encoded', () => {
    assert.deepEqual(plain(decodeClient([clientStream()])), plain(expectedClient()));
  });

  it('every server message decodes to what was encoded', () => {
    const msgs = decodeServer([serverStream()]);
    assert.equal(msgs.length, 1 + OPTION_REPLIES.length + REPLIES.length);
    assert.deepEqual(msgs[0], { type: 'greeting', handshakeFlags: 3 });
    const infos = msgs.filter((m) => m.type === 'optionReply' && m.replyType === Rep.INFO).map((m) => (m.type === 'optionReply' ? parseInfoReply(m.data) : undefined));
    const expected: InfoItem[] = [
      { type: Info.EXPORT, size: 2 ** 50, flags: 0xffff },
      { type: Info.NAME, name: 'dïsk' },
      { type: Info.DESCRIPTION, description: 'desc ✓' },
      { type: Info.BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD },
    ];
    assert.deepEqual(infos, expected);
    const servers = msgs.filter((m) => m.type === 'optionReply' && m.replyType === Rep.SERVER).map((m) => (m.type === 'optionReply' ? parseRepServer(m.data) : undefined));
    assert.deepEqual(servers, [
      { name: 'disk', description: 'a memory disk' },
      { name: '', description: '' },
    ]);
    const meta = msgs.find((m) => m.type === 'optionReply' && m.replyType === Rep.META_CONTEXT);
    assert.deepEqual(meta?.type === 'optionReply' && parseMetaContextReply(meta.data), { contextId: 1, name: 'base:allocation' });
    const err = msgs.find((m) => m.type === 'optionReply' && m.replyType === Rep.ERR_UNSUP);
    assert.equal(err?.type === 'optionReply' && err.data.toString(), 'no such option');

    const replies = msgs.slice(1 + OPTION_REPLIES.length);
    assert.deepEqual(plain(replies[0]), plain({ type: 'simpleReply', error: 0, handle: 10n, data: Buffer.from('abcde') }));
    assert.deepEqual(replies[1], { type: 'simpleReply', error: Errno.EINVAL, handle: 11n });
    assert.deepEqual(replies[2], { type: 'simpleReply', error: 0, handle: 12n });
    const chunk = (i: number): Extract<ServerMessage, { type: 'chunk' }> => {
      const m = replies[i];
      assert.equal(m?.type, 'chunk');
      return m as Extract<ServerMessage, { type: 'chunk' }>;
    };
    assert.deepEqual(plain(parseOffsetData(chunk(3).payload)), plain({ offset: 4096, data: Buffer.from('data!') }));
    assert.equal(chunk(3).flags, 0);
    assert.deepEqual(parseOffsetHole(chunk(4).payload), { offset: 0, size: 4096 });
    assert.deepEqual([chunk(5).replyType, chunk(5).flags, chunk(5).payload.length], [ReplyType.NONE, ReplyFlag.DONE, 0]);
    assert.deepEqual(parseBlockStatus(chunk(6).payload), {
      contextId: 1,
      descriptors: [
        { length: 65536, flags: 3 },
        { length: 0xffffffff, flags: 0 },
      ],
    });
    assert.deepEqual(parseErrorChunk(chunk(7).replyType, chunk(7).payload), { error: Errno.EIO, message: 'replica gone ✗' });
    assert.deepEqual(parseErrorChunk(chunk(8).replyType, chunk(8).payload), { error: Errno.ENOSPC, message: '', offset: 2 ** 33 });
    assert.deepEqual([chunk(9).replyType, chunk(9).payload.toString()], [0x1234, 'unknown type']);
  });

  it('the EXPORT_NAME reply decodes with and without the 124 zero bytes', () => {
    for (const noZeroes of [false, true]) {
      const d = new ServerStreamDecoder();
      d.push(encodeGreeting());
      assert.equal(d.next()?.type, 'greeting');
      d.expectExportName(noZeroes);
      d.push(encodeExportNameReply(2 ** 40, 0x14d, noZeroes));
      d.push(cat([encodeSimpleReply(1n, 0)]));
      assert.deepEqual(d.next(), { type: 'exportName', size: 2 ** 40, flags: 0x14d });
      assert.deepEqual(d.next(), { type: 'simpleReply', error: 0, handle: 1n });
    }
  });

  it('option bodies round trip', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'grapheme', maxLength: 40 }), fc.array(fc.integer({ min: 0, max: 0xffff }), { maxLength: 10 }), (name, requests) => {
        fc.pre(!name.includes('\0'));
        assert.deepEqual(parseInfoRequest(encodeInfoRequest({ name, requests })), { name, requests });
      }),
    );
    fc.assert(
      fc.property(fc.string({ unit: 'grapheme', maxLength: 40 }), fc.array(fc.string({ unit: 'grapheme', maxLength: 30 }), { maxLength: 5 }), (name, queries) => {
        fc.pre(!name.includes('\0') && queries.every((q) => !q.includes('\0')));
        assert.deepEqual(parseMetaContextRequest(encodeMetaContextRequest({ name, queries })), { name, queries });
      }),
    );
  });

  it('malformed option bodies are PROTOCOL errors', () => {
    const info = encodeInfoRequest({ name: 'disk', requests: [1, 3] });
    assert.throws(() => parseInfoRequest(info.subarray(0, info.length - 1)), isProtocol);
    assert.throws(() => parseInfoRequest(Buffer.concat([info, Buffer.alloc(1)])), isProtocol);
    assert.throws(() => parseInfoRequest(Buffer.from('0000ffff0000', 'hex')), isProtocol);
    const meta = encodeMetaContextRequest({ name: 'disk', queries: ['base:allocation'] });
    assert.throws(() => parseMetaContextRequest(meta.subarray(0, meta.length - 1)), isProtocol);
    assert.throws(() => parseMetaContextRequest(Buffer.concat([meta, Buffer.alloc(1)])), isProtocol);
    assert.throws(() => parseMetaContextRequest(Buffer.from('00000000ffffffff', 'hex')), isProtocol);
    assert.throws(() => parseExportName(Buffer.from([0x61, 0, 0x62])), isProtocol);
    assert.throws(() => parseExportName(Buffer.from([0xff, 0xfe])), isProtocol);
    assert.throws(() => parseExportName(Buffer.alloc(MAX_STRING_BYTES + 1, 0x61)), isProtocol);
    assert.equal(parseExportName(Buffer.alloc(MAX_STRING_BYTES, 0x61)).length, MAX_STRING_BYTES);
  });
});

describe('codec: split points (every TCP fragmentation)', () => {
  it('decodes the client stream split in two at every offset', () => {
    const s = clientStream();
    const want = plain(expectedClient());
    for (let at = 0; at <= s.length; at++) assert.deepEqual(plain(decodeClient([s.subarray(0, at), s.subarray(at)])), want, `split at ${at}`);
  });

  it('decodes the client stream split in three at sampled offsets', () => {
    const s = clientStream();
    const want = plain(expectedClient());
    for (let a = 0; a <= s.length; a += 61)
      for (let b = a; b <= s.length; b += 67) assert.deepEqual(plain(decodeClient([s.subarray(0, a), s.subarray(a, b), s.subarray(b)])), want, `split at ${a}, ${b}`);
  });

  it('decodes the client stream one byte at a time', () => {
    const s = clientStream();
    const bytes = [...s].map((b) => Buffer.from([b]));
    assert.deepEqual(plain(decodeClient(bytes)), plain(expectedClient()));
  });

  it('decodes the server stream split at every offset and byte at a time', () => {
    const s = serverStream();
    const want = plain(decodeServer([s]));
    for (let at = 0; at <= s.length; at++) assert.deepEqual(plain(decodeServer([s.subarray(0, at), s.subarray(at)])), want, `split at ${at}`);
    assert.deepEqual(plain(decodeServer([...s].map((b) => Buffer.from([b])))), want);
  });

  it('decodes a 1 MiB WRITE split at sampled offsets, payload intact', () => {
    const payload = Buffer.alloc(1 << 20);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 31) & 0xff;
    const s = Buffer.concat(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: payload.length, payload }));
    for (let at = 0; at <= s.length; at += at < 64 ? 1 : 65521) {
      const d = new ClientStreamDecoder();
      d.push(encodeClientFlags(0));
      d.next();
      d.push(encodeOption(Opt.GO));
      d.next();
      d.startTransmission();
      const msgs = decodeClient([s.subarray(0, at), s.subarray(at)], d);
      assert.equal(msgs.length, 1);
      const m = msgs[0];
      assert.ok(m?.type === 'request' && m.payload?.equals(payload), `split at ${at}`);
    }
  });
});

describe('codec: buffer ownership', () => {
  it('a payload inside one chunk is a view; a small one or one spanning chunks is a fresh copy', () => {
    const start = (): ClientStreamDecoder => {
      const d = new ClientStreamDecoder();
      d.push(encodeClientFlags(0));
      d.next();
      d.push(encodeOption(Opt.GO));
      d.next();
      d.startTransmission();
      return d;
    };
    const big = Buffer.concat(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 8192, payload: Buffer.alloc(8192, 7) }));
    let d = start();
    d.push(big);
    let m = d.next();
    assert.ok(m?.type === 'request' && m.payload);
    assert.equal(m.payload.buffer, big.buffer, 'a large payload in one chunk is a view');
    // a 10-byte write inside a 64 KiB chunk must not pin the chunk
    const small = Buffer.concat([...encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 2n, offset: 0, length: 10, payload: Buffer.alloc(10, 1) }), Buffer.alloc(65536)]);
    d = start();
    d.push(small);
    m = d.next();
    assert.ok(m?.type === 'request' && m.payload);
    assert.notEqual(m.payload.buffer, small.buffer);
    // spanning two chunks: copied into its own memory
    d = start();
    d.push(big.subarray(0, 100));
    d.push(big.subarray(100));
    m = d.next();
    assert.ok(m?.type === 'request' && m.payload);
    assert.notEqual(m.payload.buffer, big.buffer);
    assert.ok(m.payload.equals(Buffer.alloc(8192, 7)));
  });
});

describe('codec: hostile input', () => {
  const inOptions = (): ClientStreamDecoder => {
    const d = new ClientStreamDecoder();
    d.push(encodeClientFlags(1));
    assert.equal(d.next()?.type, 'clientFlags');
    return d;
  };
  const inTransmission = (): ClientStreamDecoder => {
    const d = inOptions();
    d.push(encodeOption(Opt.GO));
    d.next();
    d.startTransmission();
    return d;
  };

  it('bad option magic is a PROTOCOL error as soon as the first wrong byte arrives', () => {
    const d = inOptions();
    d.push(Buffer.from('IHX'));
    assert.throws(() => d.next(), isProtocol);
    assert.equal(d.next(), undefined, 'a failed decoder stays failed');
  });

  it('bad request magic is a PROTOCOL error', () => {
    const d = inTransmission();
    d.push(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    assert.throws(() => d.next(), isProtocol);
    const d2 = inTransmission();
    const r = encodeRequest({ flags: 0, command: Cmd.READ, handle: 1n, offset: 0, length: 1 })[0]!;
    r.writeUInt32BE(REQUEST_MAGIC + 1, 0);
    d2.push(r);
    assert.throws(() => d2.next(), isProtocol);
  });

  it('a 4 GiB option is refused from its header, without buffering its body', () => {
    const d = inOptions();
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(Opt.GO, 8);
    h.writeUInt32BE(0xffffffff, 12);
    d.push(h);
    assert.deepEqual(d.next(), { type: 'optionTooLong', option: Opt.GO, length: 0xffffffff });
    d.push(Buffer.alloc(1 << 20));
    assert.equal(d.buffered, 0);
    assert.equal(d.next(), undefined);
  });

  it('a WRITE over the payload limit is reported without reading its payload; other commands carry no payload', () => {
    const d = inTransmission();
    d.push(encodeRequest({ flags: 0, command: Cmd.READ, handle: 1n, offset: 0, length: 0xffffffff })[0]!);
    assert.equal(d.next()?.type, 'request');
    d.push(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 2n, offset: 0, length: DEFAULT_MAX_PAYLOAD + 1 })[0]!);
    assert.deepEqual(d.next(), { type: 'payloadTooLong', flags: 0, command: Cmd.WRITE, handle: 2n, offset: 0, length: DEFAULT_MAX_PAYLOAD + 1 });
    assert.equal(d.buffered, 0);
  });

  it('huge offsets decode as out-of-range numbers, never as small ones', () => {
    const d = inTransmission();
    const h = encodeRequest({ flags: 0, command: Cmd.READ, handle: 1n, offset: 0, length: 1 })[0]!;
    h.writeBigUInt64BE(0xffffffffffffffffn, 16);
    d.push(h);
    const m = d.next();
    assert.ok(m?.type === 'request' && m.offset > Number.MAX_SAFE_INTEGER);
  });

  // Arbitrary bytes in arbitrary pieces, from each phase: the only failure allowed is a
  // TorusError('PROTOCOL'), and next() must always stop (each call consumes bytes or waits).
  const pieces = fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 12 });
  const fuzzClient = (phase: 'clientFlags' | 'options' | 'transmission', prefix: Buffer) =>
    fc.property(pieces, (chunks) => {
      const d = phase === 'clientFlags' ? new ClientStreamDecoder({ maxOptionLength: 256, maxPayload: 512 }) : phase === 'options' ? inOptions() : inTransmission();
      if (prefix.length) d.push(prefix);
      let total = prefix.length;
      try {
        for (const c of chunks) {
          d.push(c);
          total += c.length;
          let guard = 0;
          for (let m = d.next(); m; m = d.next()) {
            assert.ok(++guard <= total + 2, 'decoder keeps returning messages without consuming bytes');
            if (m.type === 'option' && (m.option === Opt.GO || m.option === Opt.EXPORT_NAME) && d.phase === 'options') d.startTransmission();
          }
        }
      } catch (err) {
        assert.ok(isProtocol(err), `unexpected ${String(err)}`);
      }
    });

  it('fuzz: arbitrary bytes from the first byte', () => fc.assert(fuzzClient('clientFlags', Buffer.alloc(0)), { numRuns: 2000 }));
  it('fuzz: arbitrary bytes after a valid option header prefix', () => fc.assert(fuzzClient('options', Buffer.from('IHAVEOPT')), { numRuns: 2000 }));
  it('fuzz: arbitrary bytes in transmission after a valid magic', () => fc.assert(fuzzClient('transmission', Buffer.from('25609513', 'hex')), { numRuns: 2000 }));

  it('fuzz: the client-side decoder and every body parser only throw PROTOCOL', () => {
    fc.assert(
      fc.property(pieces, fc.constantFrom('greeting', 'options', 'transmission'), (chunks, phase) => {
        const d = new ServerStreamDecoder({ maxReplyLength: 1024, simpleReplyDataLength: (h) => Number(h % 7n) });
        if (phase !== 'greeting') {
          d.push(encodeGreeting());
          d.next();
        }
        if (phase === 'transmission') d.startTransmission();
        try {
          for (const c of chunks) {
            d.push(c);
            for (let m = d.next(), guard = 0; m; m = d.next()) assert.ok(++guard < 10_000);
          }
        } catch (err) {
          assert.ok(isProtocol(err), `unexpected ${String(err)}`);
        }
      }),
      { numRuns: 2000 },
    );
    const parsers: ((b: Buffer) => unknown)[] = [
      parseInfoRequest,
      parseMetaContextRequest,
      parseExportName,
      parseInfoReply,
      parseRepServer,
      parseMetaContextReply,
      parseOffsetData,
      parseOffsetHole,
      parseBlockStatus,
      (b) => parseErrorChunk(ReplyType.ERROR, b),
      (b) => parseErrorChunk(ReplyType.ERROR_OFFSET, b),
    ];
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 80 }), fc.integer({ min: 0, max: parsers.length - 1 }), (bytes, i) => {
        try {
          parsers[i]?.(Buffer.from(bytes));
        } catch (err) {
          assert.ok(isProtocol(err), `parser ${i}: unexpected ${String(err)}`);
        }
      }),
      { numRuns: 5000 },
    );
  });

  it('fuzz: any sequence of valid requests survives any fragmentation', () => {
    const arbReq: fc.Arbitrary<Request> = fc
      .record({
        flags: fc.integer({ min: 0, max: 0xffff }),
        command: fc.integer({ min: 0, max: 9 }),
        handle: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        offset: fc.maxSafeNat(),
        length: fc.integer({ min: 0, max: 300 }),
      })
      .map((r) => (r.command === Cmd.WRITE ? { ...r, payload: Buffer.alloc(r.length, r.length & 0xff) } : r));
    fc.assert(
      fc.property(fc.array(arbReq, { maxLength: 8 }), fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 8 }), (reqs, cuts) => {
        const s = Buffer.concat([encodeClientFlags(1), encodeOption(Opt.GO), ...reqs.flatMap((r) => encodeRequest(r))]);
        const chunks: Buffer[] = [];
        for (let at = 0, i = 0; at < s.length; i++) {
          const n = cuts[i % cuts.length] ?? 1;
          chunks.push(s.subarray(at, at + n));
          at += n;
        }
        const got = decodeClient(chunks).filter((m) => m.type === 'request');
        assert.deepEqual(plain(got), plain(reqs.map((r) => ({ type: 'request', ...r }))));
      }),
      { numRuns: 500 },
    );
  });
});

// ---- reads into buffers the decoder chooses (net's onread; NbdServer.accept)

/**
 * Delivers `s` as a socket with onread would: each read lands in `readTarget()` (at most the
 * target's length, and the next cut's), and everything a read completes is decoded before the
 * next read, as the server does. The read buffer is poisoned before each reuse, so a message
 * that kept a view of it holds garbage by the end.
 */
function decodeDirect(s: Buffer, cuts: readonly number[], d = new ClientStreamDecoder({ readBuffer: 64 * 1024 })): ClientMessage[] {
  const out: ClientMessage[] = [];
  let at = 0;
  let i = 0;
  const poisoned = BufferPool.poison;
  BufferPool.poison = true;
  try {
    while (at < s.length) {
      const t = d.readTarget();
      const n = Math.min(t.length, cuts[i++ % cuts.length] ?? 1, s.length - at);
      s.copy(t, 0, at, at + n);
      d.commitRead(t, n);
      at += n;
      for (let m = d.next(); m; m = d.next()) {
        out.push(m);
        if (m.type === 'option' && m.option === Opt.GO) d.startTransmission();
      }
    }
    // net asks for the next target right after each read: the last read's buffer is reused
    d.readTarget();
  } finally {
    BufferPool.poison = poisoned;
  }
  return out;
}

describe('codec: reads into decoder-chosen buffers (onread)', () => {
  // GO last: what follows it is requests
  const options = [...OPTIONS.slice(0, -1), { option: 0xdeadbeef, data: Buffer.alloc(300, 0x42) }, ...OPTIONS.slice(-1)];
  const stream = (): Buffer => Buffer.concat([encodeClientFlags(3), ...options.map((o) => encodeOption(o.option, o.data)), ...REQUESTS.flatMap((r) => encodeRequest(r))]);
  const want = (): unknown =>
    plain([
      { type: 'clientFlags', flags: 3 },
      ...options.map((o) => ({ type: 'option' as const, option: o.option, data: o.data })),
      ...REQUESTS.map((r) => ({ type: 'request' as const, ...r })),
    ]);
  // Read buffers of 64 KiB (the server's), and of 100 bytes: smaller than the 300-byte option,
  // so a message outgrows the buffer, and leftovers are moved to its front at every read.
  const sizes = [64 * 1024, 100];

  it('the client stream split in two at every offset, in three at sampled ones, and byte at a time', () => {
    const s = stream();
    for (const readBuffer of sizes) {
      const d = (): ClientStreamDecoder => new ClientStreamDecoder({ readBuffer });
      for (let at = 0; at <= s.length; at++) assert.deepEqual(plain(decodeDirect(s, [at || s.length, s.length], d())), want(), `buffer ${readBuffer}, split at ${at}`);
      for (let a = 1; a <= s.length; a += 61)
        for (let b = 1; b <= s.length; b += 67) assert.deepEqual(plain(decodeDirect(s, [a, b, s.length], d())), want(), `buffer ${readBuffer}, cuts ${a}, ${b}`);
      assert.deepEqual(plain(decodeDirect(s, [1], d())), want(), `buffer ${readBuffer}, byte at a time`);
    }
  });

  it('many requests in one read; pipelined WRITEs of every size around the buffer and header sizes, cut anywhere', () => {
    const lengths = [1, 27, 28, 29, 511, 512, 4096, 65535, 65536, 65537, 200_000];
    const reqs: Request[] = lengths.map((length, i) => {
      const payload = Buffer.allocUnsafe(length);
      for (let j = 0; j < length; j++) payload[j] = (j * 7 + i * 13) & 0xff;
      return { flags: 0, command: Cmd.WRITE, handle: BigInt(i), offset: i * 1_000_000, length, payload };
    });
    const s = Buffer.concat([encodeClientFlags(1), encodeOption(Opt.GO), ...reqs.flatMap((r) => [...encodeRequest(r), ...encodeRequest({ flags: 0, command: Cmd.FLUSH, handle: 1000n + r.handle, offset: 0, length: 0 })])]);
    const expected = plain([{ type: 'clientFlags', flags: 1 }, { type: 'option', option: Opt.GO, data: Buffer.alloc(0) }, ...reqs.flatMap((r) => [{ type: 'request', ...r }, { type: 'request', flags: 0, command: Cmd.FLUSH, handle: 1000n + r.handle, offset: 0, length: 0 }])]);
    for (const cuts of [[s.length], [65536], [1], [3, 29, 4093], [100_000, 7], [28, 1, 65535]]) assert.deepEqual(plain(decodeDirect(s, cuts)), expected, `cuts ${cuts.join(',')}`);
  });

  it('a payload gets a buffer of its own, of its length, and the reads after its header land in it', () => {
    const d = new ClientStreamDecoder({ readBuffer: 64 * 1024 });
    decodeDirect(Buffer.concat([encodeClientFlags(1), encodeOption(Opt.GO)]), [1000], d);
    const payload = Buffer.alloc(1 << 20, 9);
    const s = Buffer.concat(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: payload.length, payload }));
    // the header and the start of the payload in one read, as TCP delivers them
    let t = d.readTarget();
    s.copy(t, 0, 0, 1000);
    d.commitRead(t, 1000);
    assert.equal(d.next(), undefined);
    let at = 1000;
    t = d.readTarget();
    const first = t;
    assert.equal(t.length, s.length - at, 'the next read may fill the rest of the payload');
    while (at < s.length) {
      t = d.readTarget();
      assert.equal(t.buffer, first.buffer, 'every read of the payload lands in its buffer');
      const n = Math.min(t.length, 70_000);
      s.copy(t, 0, at, at + n);
      d.commitRead(t, n);
      at += n;
    }
    const m = d.next();
    const got = m?.type === 'request' ? m.payload : undefined;
    assert.ok(got !== undefined && got.equals(payload));
    assert.equal(got.buffer, first.buffer, 'the device is given the buffer the kernel wrote into');
    assert.equal(got.byteOffset, 0);
    assert.equal(got.buffer.byteLength, payload.length, 'exactly its length: nothing else shares or pins it');
  });

  it('a read that lands in the read buffer after the payload began (reading resumed behind a limit) is copied into it', () => {
    const d = new ClientStreamDecoder({ readBuffer: 64 * 1024 });
    decodeDirect(Buffer.concat([encodeClientFlags(1), encodeOption(Opt.GO)]), [1000], d);
    const payload = Buffer.alloc(5000, 3);
    const s = Buffer.concat([...encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 5000, payload }), ...encodeRequest({ flags: 0, command: Cmd.FLUSH, handle: 2n, offset: 0, length: 0 })]);
    let t = d.readTarget();
    s.copy(t, 0, 0, 100);
    d.commitRead(t, 100);
    // The server leaves the request unstarted (not admitted); net asks for the next target now.
    t = d.readTarget();
    assert.ok(d.peekRequest()?.command === Cmd.WRITE);
    assert.equal(d.next(), undefined, 'admitted later: the payload begins, its rest not here');
    s.copy(t, 0, 100);
    d.commitRead(t, s.length - 100);
    const m = d.next();
    assert.ok(m?.type === 'request' && m.payload?.equals(payload));
    assert.equal(d.next()?.type, 'request', 'what followed the payload in that read is decoded');
    assert.equal(d.buffered, 0);
  });

  it('commitRead refuses a buffer it did not hand out; a push-only decoder has no read target', () => {
    const d = new ClientStreamDecoder({ readBuffer: 1024 });
    d.readTarget();
    assert.throws(() => d.commitRead(Buffer.alloc(10), 10), /did not hand out/);
    assert.throws(() => new ClientStreamDecoder().readTarget(), /without a read buffer/);
  });
});
