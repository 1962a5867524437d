import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { describe, it } from 'node:test';
import { pino } from 'pino';
import { TorusError } from '../core/errors.js';
import type { BlockDevice, Extent } from '../core/interfaces.js';
import {
  ClientFlag,
  Cmd,
  CmdFlag,
  Errno,
  IHAVEOPT,
  Info,
  Opt,
  Rep,
  ReplyType,
  TransmissionFlag,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  parseMetaContextReply,
  parseRepServer,
} from './codec.js';
import { MemoryDevice, MemoryDeviceProvider } from './memory-device.js';
import { NbdServer, blockSizeConstraints, toDescriptors, toSegments, type NbdLogger, type NbdServerOptions } from './server.js';
import { TestClient, settled, type PipeOptions } from './testing.js';

const KiB = 1024;
const MiB = 1024 * KiB;

// The server's logger is structurally a subset of pino's.
const _pinoFits: NbdLogger = pino({ enabled: false });
void _pinoFits;

async function eventually(what: string, fn: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Awaits `p`, failing after `ms`; the timer also keeps the event loop alive, which in-process pipes do not. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

function commandNameOf(c: number): string {
  return Object.entries(Cmd).find(([, v]) => v === c)?.[0] ?? String(c);
}


function setup(opts: NbdServerOptions = {}, diskOpts: { size?: number; blockSize?: number } = {}) {
  const provider = new MemoryDeviceProvider();
  const disk = provider.create('disk', { size: diskOpts.size ?? 4 * MiB, blockSize: diskOpts.blockSize ?? 64 * KiB, description: 'the test disk' });
  const ro = provider.create('ro', { size: 1 * MiB, readOnly: true });
  const server = new NbdServer(provider, opts);
  const connect = (pipe: PipeOptions = {}): TestClient => TestClient.connect((s) => server.handle(s), pipe);
  return { provider, disk, ro, server, connect };
}

/** A device whose operations wait until released, so tests control concurrency and completion order. */
class GatedDevice implements BlockDevice {
  readonly waiting: { op: string; offset: number; go: () => void }[] = [];
  active = 0;
  peak = 0;
  auto = false;
  constructor(readonly inner: MemoryDevice) {}
  get size(): number {
    return this.inner.size;
  }
  get blockSize(): number {
    return this.inner.blockSize;
  }
  get readOnly(): boolean {
    return false;
  }
  private async gate<T>(op: string, offset: number, fn: () => Promise<T>): Promise<T> {
    this.active++;
    this.peak = Math.max(this.peak, this.active);
    try {
      if (!this.auto) await new Promise<void>((go) => this.waiting.push({ op, offset, go }));
      return await fn();
    } finally {
      this.active--;
    }
  }
  release(pick: (w: { op: string; offset: number }) => boolean = () => true): number {
    let n = 0;
    for (let i = this.waiting.length - 1; i >= 0; i--) {
      const w = this.waiting[i];
      if (w && pick(w)) {
        this.waiting.splice(i, 1);
        w.go();
        n++;
      }
    }
    return n;
  }
  read(o: number, l: number): Promise<Buffer> {
    return this.gate('read', o, () => this.inner.read(o, l));
  }
  write(o: number, d: Uint8Array, fua?: boolean): Promise<void> {
    return this.gate('write', o, () => this.inner.write(o, d, fua));
  }
  flush(): Promise<void> {
    return this.gate('flush', 0, () => this.inner.flush());
  }
  trim(o: number, l: number): Promise<void> {
    return this.gate('trim', o, () => this.inner.trim(o, l));
  }
  writeZeroes(o: number, l: number, opts?: { noHole?: boolean; fua?: boolean }): Promise<void> {
    return this.gate('zero', o, () => this.inner.writeZeroes(o, l, opts));
  }
  blockStatus(o: number, l: number): Promise<Extent[]> {
    return this.gate('status', o, () => this.inner.blockStatus(o, l));
  }
}

function gatedServer(opts: NbdServerOptions = {}) {
  const inner = new MemoryDevice({ size: 64 * MiB });
  const gated = new GatedDevice(inner);
  const server = new NbdServer(
    {
      list: () => Promise.resolve(['disk']),
      open: () => Promise.resolve({ device: gated, release: () => Promise.resolve() }),
    },
    opts,
  );
  return { inner, gated, server, connect: () => TestClient.connect((s) => server.handle(s)) };
}

describe('nbd server: handshake', () => {
  it('advertises fixed newstyle and, after GO, the export with every flag and info we support', async () => {
    const { connect } = setup();
    const c = connect();
    const go = await c.go('disk');
    assert.equal(go.size, 4 * MiB);
    const F = TransmissionFlag;
    const want = F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES | F.SEND_DF | F.CAN_MULTI_CONN | F.SEND_CACHE | F.SEND_FAST_ZERO;
    assert.equal(go.flags, want);
    assert.deepEqual(go.metaContexts, [{ id: 1, name: 'base:allocation' }]);
    assert.deepEqual(
      go.infos.filter((i) => i.type !== Info.EXPORT),
      [
        { type: Info.NAME, name: 'disk' },
        { type: Info.DESCRIPTION, description: 'the test disk' },
        { type: Info.BLOCK_SIZE, minimum: 1, preferred: 64 * KiB, maximum: 32 * MiB },
      ],
    );
    const r = await c.read(0, 10);
    assert.deepEqual(r.data, Buffer.alloc(10));
  });

  it('read-only exports and a read-only server advertise READ_ONLY and no write features', async () => {
    const { connect } = setup();
    const c = connect();
    const go = await c.go('ro');
    assert.equal(go.flags & TransmissionFlag.READ_ONLY, TransmissionFlag.READ_ONLY);
    assert.equal(go.flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FUA), 0);
    const s2 = setup({ readOnly: true });
    const c2 = s2.connect();
    const g2 = await c2.go('disk');
    assert.ok(g2.flags & TransmissionFlag.READ_ONLY);
    assert.equal((await c2.write(0, Buffer.from('x'))).error, Errno.EPERM);
    assert.equal((await c2.request(Cmd.TRIM, { offset: 0, length: 512 })).error, Errno.EPERM);
    assert.equal((await c2.request(Cmd.WRITE_ZEROES, { offset: 0, length: 512 })).error, Errno.EPERM);
    assert.equal((await c2.request(Cmd.FLUSH)).error, 0);
    assert.equal(s2.disk.stats.writes, 0);
  });

  it('LIST, INFO, STARTTLS, unknown options and bad bodies get the replies proto.md asks for, and the session goes on', async () => {
    const { connect } = setup();
    const c = connect();
    await c.handshake();
    const list = await c.option(Opt.LIST);
    assert.deepEqual(
      list.filter((r) => r.replyType === Rep.SERVER).map((r) => parseRepServer(r.data).name),
      ['disk', 'ro'],
    );
    assert.equal(list.at(-1)?.replyType, Rep.ACK);
    assert.equal((await c.option(Opt.LIST, Buffer.from('x'))).at(-1)?.replyType, Rep.ERR_INVALID);
    assert.equal((await c.option(Opt.STARTTLS)).at(-1)?.replyType, Rep.ERR_UNSUP);
    assert.equal((await c.option(Opt.EXTENDED_HEADERS)).at(-1)?.replyType, Rep.ERR_UNSUP);
    assert.equal((await c.option(0x7777, Buffer.alloc(100))).at(-1)?.replyType, Rep.ERR_UNSUP);
    assert.equal((await c.option(Opt.STRUCTURED_REPLY, Buffer.from('x'))).at(-1)?.replyType, Rep.ERR_INVALID);
    assert.equal((await c.option(Opt.INFO, Buffer.from('zz'))).at(-1)?.replyType, Rep.ERR_INVALID);
    const unknown = await c.option(Opt.INFO, encodeInfoRequest({ name: 'nope', requests: [] }));
    assert.deepEqual(unknown.map((r) => r.replyType), [Rep.ERR_UNKNOWN]);
    assert.equal((await c.option(Opt.GO, encodeInfoRequest({ name: '', requests: [] }))).at(-1)?.replyType, Rep.ERR_UNKNOWN, 'no default export');
    const info = await c.info('disk', []);
    assert.equal(info.size, 4 * MiB);
    const go = await c.info('disk', [], true);
    assert.equal(go.flags & TransmissionFlag.SEND_DF, 0, 'no DF without structured replies');
    const r = await c.write(0, Buffer.from('hello'));
    assert.equal(r.error, 0);
  });

  it('meta contexts: listing, wildcards, unknown namespaces, and refusal before structured replies', async () => {
    const { connect } = setup();
    const c = connect();
    await c.handshake();
    const meta = (q: string[]): Buffer => encodeMetaContextRequest({ name: 'disk', queries: q });
    assert.equal((await c.option(Opt.SET_META_CONTEXT, meta(['base:allocation']))).at(-1)?.replyType, Rep.ERR_INVALID);
    await c.structuredReplies();
    const names = async (option: number, q: string[]): Promise<(string | number)[]> =>
      (await c.option(option, meta(q))).map((r) => (r.replyType === Rep.META_CONTEXT ? parseMetaContextReply(r.data).name : r.replyType));
    assert.deepEqual(await names(Opt.LIST_META_CONTEXT, []), ['base:allocation', Rep.ACK]);
    assert.deepEqual(await names(Opt.LIST_META_CONTEXT, ['base:']), ['base:allocation', Rep.ACK]);
    assert.deepEqual(await names(Opt.LIST_META_CONTEXT, ['qemu:dirty-bitmap:x', 'base:nothing']), [Rep.ACK]);
    assert.deepEqual(await names(Opt.LIST_META_CONTEXT, ['nocolon']), [Rep.ERR_INVALID]);
    assert.deepEqual(await names(Opt.SET_META_CONTEXT, ['base:']), [Rep.ACK], 'base: selects nothing in SET');
    assert.deepEqual(await names(Opt.SET_META_CONTEXT, ['x-foo:bar', 'base:allocation']), ['base:allocation', Rep.ACK]);
    assert.equal((await c.option(Opt.SET_META_CONTEXT, Buffer.from('garbage'))).at(-1)?.replyType, Rep.ERR_INVALID);
    // the failed SET cleared the selection, so BLOCK_STATUS is refused after GO
    await c.info('disk', [], true);
    const r = await c.request(Cmd.BLOCK_STATUS, { offset: 0, length: 4096 });
    assert.equal(r.error, Errno.EINVAL);
  });

  it('contexts selected for another export do not carry over to the one chosen', async () => {
    const { connect } = setup();
    const c = connect();
    await c.handshake();
    await c.structuredReplies();
    await c.setMetaContext('ro', ['base:allocation']);
    await c.info('disk', [], true);
    assert.equal((await c.request(Cmd.BLOCK_STATUS, { offset: 0, length: 4096 })).error, Errno.EINVAL);
  });

  it('EXPORT_NAME enters transmission at once (requests may be pipelined behind it), with or without the zeroes', async () => {
    for (const noZeroes of [true, false]) {
      const { connect } = setup();
      const c = connect();
      await c.handshake(ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0));
      const e = c.exportName('disk', noZeroes);
      const w = c.write(100, Buffer.from('pipelined'));
      const r = c.read(100, 9);
      assert.equal((await e).size, 4 * MiB);
      assert.equal((await w).error, 0);
      assert.equal((await r).data?.toString(), 'pipelined');
    }
  });

  it('a client that sends EXPORT_NAME and its requests and then half-closes is still served in full', async () => {
    const { connect, disk } = setup();
    const c = connect();
    await c.handshake();
    const e = c.exportName('disk');
    const w = c.write(0, Buffer.from('fire and forget'), CmdFlag.FUA);
    c.stream.end();
    assert.equal((await e).size, 4 * MiB);
    assert.equal((await w).error, 0);
    await c.closed;
    assert.equal((await disk.read(0, 15)).toString(), 'fire and forget');
  });

  it('drops clients proto.md says to drop: unknown client flags, EXPORT_NAME of an unknown export', async () => {
    const { connect, server } = setup();
    const a = connect();
    await a.handshake(0x80);
    await a.closed;
    const b = connect();
    await b.handshake();
    await assert.rejects(b.exportName('nope'));
    await b.closed;
    await eventually('connections gone', () => server.stats().connections === 0);
  });

  it('ABORT is acknowledged and the server hangs up', async () => {
    const { connect, server } = setup();
    const c = connect();
    await c.handshake();
    assert.deepEqual((await c.option(Opt.ABORT)).map((r) => r.replyType), [Rep.ACK]);
    await c.closed;
    await eventually('connection gone', () => server.stats().connections === 0);
  });

  it('a 4 GiB option length is refused with ERR_TOO_BIG and the connection closed, nothing buffered', async () => {
    const { connect, server } = setup();
    const c = connect();
    await c.handshake();
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(Opt.GO, 8);
    h.writeUInt32BE(0xffffffff, 12);
    c.raw(h);
    const m = await c.nextMessage();
    assert.ok(m.type === 'optionReply' && m.replyType === Rep.ERR_TOO_BIG);
    await c.closed;
    await eventually('connection gone', () => server.stats().connections === 0);
  });

  it('a client that never finishes the handshake is dropped after the timeout', async () => {
    const { connect } = setup({ handshakeTimeoutMs: 30 });
    const c = connect();
    await c.handshake();
    await c.closed;
  });

  it('a client sending options forever is dropped after maxOptions', async () => {
    const { connect } = setup({ maxOptions: 5 });
    const c = connect();
    await c.handshake();
    for (let i = 0; i < 5; i++) await c.option(Opt.STRUCTURED_REPLY);
    c.raw(encodeOption(Opt.STRUCTURED_REPLY));
    await c.closed;
  });
});

describe('nbd server: commands', () => {
  it('READ and WRITE round trip with simple and with structured replies', async () => {
    for (const structured of [false, true]) {
      const { connect } = setup();
      const c = connect();
      await c.go('disk', { structured });
      const data = randomBytes(300 * KiB);
      assert.equal((await c.write(12345, data)).error, 0);
      const r = await c.read(12345, data.length);
      assert.equal(r.error, 0);
      assert.ok(r.data?.equals(data));
      assert.equal((await c.read(0, 0)).error, 0);
      assert.equal((await c.write(0, Buffer.alloc(0))).error, 0);
    }
  });

  it('a device that reads in pieces (readv) is answered piece by piece, in order, with either reply kind', async () => {
    // Pieces of uneven sizes at odd offsets: a server that sent them out of order, dropped one or
    // miscounted the length would corrupt the reply or the stream.
    class PiecewiseDevice extends MemoryDevice {
      readvCalls = 0;
      async readv(offset: number, length: number): Promise<Buffer[]> {
        this.readvCalls++;
        const out: Buffer[] = [];
        for (let at = 0, i = 1; at < length; i++) {
          const n = Math.min(i * 1000, length - at);
          out.push(await this.read(offset + at, n));
          at += n;
        }
        return out;
      }
    }
    for (const [structured, flags] of [[false, 0], [true, CmdFlag.DF], [true, 0]] as const) {
      const provider = new MemoryDeviceProvider();
      const disk = new PiecewiseDevice({ size: 1 * MiB, blockSize: 64 * KiB });
      provider.add('disk', disk);
      const server = new NbdServer(provider);
      const c = TestClient.connect((s) => server.handle(s));
      await c.go('disk', { structured });
      const data = randomBytes(300 * KiB + 17);
      assert.equal((await c.write(4097, data)).error, 0);
      const r = await c.read(4097, data.length, flags);
      assert.equal(r.error, 0);
      assert.ok(r.data?.equals(data), `structured=${structured} flags=${flags}`);
      assert.equal(disk.readvCalls, 1, 'a read across blocks goes through readv');
      const next = await c.read(4097, 10);
      assert.ok(next.data?.equals(data.subarray(0, 10)), 'the stream is still in step after the pieces');
      assert.equal(disk.readvCalls, 1, 'a read within one block is a plain read');
    }
  });

  it('structured READs send holes as OFFSET_HOLE chunks, and one OFFSET_DATA with DF', async () => {
    const { connect } = setup();
    const c = connect();
    await c.go('disk');
    await c.write(128 * KiB, Buffer.alloc(64 * KiB, 7));
    const r = await c.read(0, 1 * MiB);
    assert.deepEqual(r.chunkTypes, [ReplyType.OFFSET_HOLE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE]);
    const want = Buffer.alloc(1 * MiB);
    want.fill(7, 128 * KiB, 192 * KiB);
    assert.ok(r.data?.equals(want));
    const df = await c.read(0, 1 * MiB, CmdFlag.DF);
    assert.deepEqual(df.chunkTypes, [ReplyType.OFFSET_DATA]);
    assert.ok(df.data?.equals(want));
  });

  it('FUA, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE and BLOCK_STATUS (REQ_ONE) reach the device as asked', async () => {
    const { connect, disk } = setup();
    const c = connect();
    await c.go('disk');
    await c.write(0, Buffer.alloc(256 * KiB, 1));
    assert.equal(disk.stats.unflushed, 1);
    assert.equal((await c.write(0, Buffer.alloc(10, 2), CmdFlag.FUA)).error, 0);
    assert.equal(disk.stats.fuaWrites, 1);
    assert.equal((await c.request(Cmd.FLUSH)).error, 0);
    assert.deepEqual([disk.stats.flushes, disk.stats.unflushed], [1, 0]);

    assert.equal((await c.request(Cmd.TRIM, { offset: 64 * KiB, length: 64 * KiB })).error, 0);
    assert.equal((await c.request(Cmd.WRITE_ZEROES, { offset: 128 * KiB, length: 64 * KiB, flags: CmdFlag.NO_HOLE })).error, 0);
    assert.equal((await c.request(Cmd.WRITE_ZEROES, { offset: 192 * KiB, length: 64 * KiB, flags: CmdFlag.FAST_ZERO })).error, 0);
    const before = disk.stats.zeroes;
    const fast = await c.request(Cmd.WRITE_ZEROES, { offset: 0, length: 64 * KiB, flags: CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE });
    assert.equal(fast.error, Errno.ENOTSUP);
    assert.equal(disk.stats.zeroes, before, 'a refused fast zero leaves the data alone');
    assert.equal((await c.request(Cmd.TRIM, { offset: 0, length: 0, flags: CmdFlag.FUA })).error, 0);
    assert.equal((await c.request(Cmd.CACHE, { offset: 0, length: 1 * MiB })).error, 0);

    const bs = await c.request(Cmd.BLOCK_STATUS, { offset: 0, length: 4 * MiB });
    assert.equal(bs.error, 0);
    assert.equal(bs.contextId, 1);
    assert.deepEqual(bs.extents, [
      { length: 64 * KiB, flags: 0 },
      { length: 64 * KiB, flags: 3 },
      { length: 64 * KiB, flags: 2 },
      { length: 4 * MiB - 192 * KiB, flags: 3 },
    ]);
    const one = await c.request(Cmd.BLOCK_STATUS, { offset: 32 * KiB, length: 200 * KiB, flags: CmdFlag.REQ_ONE });
    assert.deepEqual(one.extents, [{ length: 32 * KiB, flags: 0 }]);
    const clipped = await c.request(Cmd.BLOCK_STATUS, { offset: 4 * MiB - 100, length: 100 });
    assert.deepEqual(clipped.extents, [{ length: 100, flags: 3 }]);
  });

  it('refuses bad requests with the errno proto.md names, and the connection stays usable', async () => {
    const { connect, disk } = setup();
    const c = connect();
    await c.go('disk');
    const size = 4 * MiB;
    assert.equal((await c.read(size - 10, 11)).error, Errno.EINVAL, 'read past the end');
    const [h] = encodeRequest({ flags: 0, command: Cmd.READ, handle: 999n, offset: 0, length: 1 });
    h!.writeBigUInt64BE(2n ** 64n - 1n, 16);
    const farReply = c.expectReply(999n, Cmd.READ, 0, 1);
    c.raw(h!);
    assert.equal((await farReply).error, Errno.EINVAL, 'offset past 2^53');
    const w = await c.write(size - 10, Buffer.alloc(11, 9));
    assert.equal(w.error, Errno.ENOSPC, 'write past the end');
    assert.equal((await c.request(Cmd.WRITE_ZEROES, { offset: size, length: 1 })).error, Errno.ENOSPC);
    assert.equal((await c.request(Cmd.TRIM, { offset: size, length: 1 })).error, Errno.EINVAL);
    assert.equal((await c.request(Cmd.CACHE, { offset: size, length: 1 })).error, Errno.EINVAL);
    assert.equal((await c.request(Cmd.BLOCK_STATUS, { offset: size, length: 1 })).error, Errno.EINVAL);
    assert.equal((await c.request(Cmd.BLOCK_STATUS, { offset: 0, length: 0 })).error, Errno.EINVAL);
    const big = await c.read(0, 32 * MiB + 1);
    assert.equal(big.error, Errno.EINVAL, 'READ over the maximum');
    assert.deepEqual(big.chunkTypes, [ReplyType.ERROR], 'structured error, never a simple reply, for READ');
    assert.equal((await c.request(42, { offset: 0, length: 1 })).error, Errno.EINVAL, 'unknown command');
    assert.equal((await c.request(Cmd.WRITE, { offset: 0, payload: Buffer.alloc(1), flags: CmdFlag.NO_HOLE })).error, Errno.EINVAL, 'bad flag');
    assert.equal((await c.request(Cmd.READ, { offset: 0, length: 1, flags: 0x8000 })).error, Errno.EINVAL, 'unknown flag');
    assert.equal(disk.stats.writes, 0, 'nothing reached the device');
    // payloads of refused writes were consumed: the stream is still in sync
    assert.equal((await c.write(0, Buffer.from('ok'))).error, 0);
    assert.equal((await c.read(0, 2)).data?.toString(), 'ok');
  });

  it('a WRITE over the maximum payload gets EINVAL and the connection is closed', async () => {
    const { connect, server } = setup();
    const c = connect();
    await c.go('disk');
    const p = c.request(Cmd.WRITE, { offset: 0, length: 32 * MiB + 1 });
    // (header only: the client pretends and the server must not wait for 32 MiB)
    const r = await p;
    assert.equal(r.error, Errno.EINVAL);
    await c.closed;
    await eventually('connection gone', () => server.stats().connections === 0);
  });

  it('maps device failures through the one error table', async () => {
    const { connect, disk } = setup();
    const c = connect();
    await c.go('disk', { structured: false });
    const cases: [TorusError, number, number][] = [
      [new TorusError('BLOCK_UNAVAILABLE', 'replicas down'), Cmd.READ, Errno.EIO],
      [new TorusError('CORRUPT', 'bad crc'), Cmd.READ, Errno.EIO],
      [new TorusError('OUT_OF_SPACE', 'full'), Cmd.WRITE, Errno.ENOSPC],
      [new TorusError('LOCKED', 'lock lost'), Cmd.WRITE, Errno.EPERM],
      [new TorusError('LOCKED', 'lock lost'), Cmd.READ, Errno.EIO],
      [new TorusError('INVALID_ARGUMENT', 'no'), Cmd.TRIM, Errno.EINVAL],
      [new TorusError('CLOSED', 'going away'), Cmd.FLUSH, Errno.ESHUTDOWN],
    ];
    for (const [err, cmd, errno] of cases) {
      disk.fault = () => err;
      const r =
        cmd === Cmd.WRITE ? await c.write(0, Buffer.alloc(4)) : await c.request(cmd, { offset: 0, length: cmd === Cmd.FLUSH ? 0 : 4 });
      assert.equal(r.error, errno, `${err.code} on ${cmd}`);
    }
    // a device that throws something other than a TorusError is a bug, reported as EIO
    disk.fault = () => {
      throw new RangeError('boom');
    };
    assert.equal((await c.read(0, 4)).error, Errno.EIO);
  });

  it('a structured READ whose data segment fails reports ERROR_OFFSET for it and still sends the rest', async () => {
    const { connect, disk } = setup();
    const c = connect();
    await c.go('disk');
    await c.write(0, Buffer.alloc(64 * KiB, 1));
    await c.write(256 * KiB, Buffer.alloc(64 * KiB, 2));
    disk.fault = (op, offset) => (op === 'read' && offset === 256 * KiB ? new TorusError('BLOCK_UNAVAILABLE', 'gone') : undefined);
    const r = await c.read(0, 512 * KiB);
    assert.equal(r.error, Errno.EIO);
    assert.deepEqual(r.errorOffsets, [256 * KiB]);
    assert.deepEqual(r.chunkTypes, [ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE, ReplyType.ERROR_OFFSET, ReplyType.OFFSET_HOLE]);
  });

  it('two connections to one export share one device: a FLUSH on either covers writes on both (multi-conn)', async () => {
    const { connect, disk } = setup();
    const a = connect();
    const b = connect();
    await a.go('disk');
    await b.go('disk');
    await a.write(0, Buffer.from('from a'));
    await b.write(100, Buffer.from('from b'));
    assert.equal(disk.stats.unflushed, 2);
    assert.equal((await b.request(Cmd.FLUSH)).error, 0);
    assert.equal(disk.stats.unflushed, 0);
    assert.equal((await b.read(0, 6)).data?.toString(), 'from a');
    assert.equal((await a.read(100, 6)).data?.toString(), 'from b');
  });
});

describe('nbd server: concurrency and flow control', () => {
  it('answers the only request in flight at once; replies finished together leave at the end of the turn', async () => {
    const { gated, server } = gatedServer();
    let serverSide: Duplex | undefined;
    const c = TestClient.connect((s) => {
      serverSide = s;
      return server.handle(s);
    });
    await c.go('disk', { meta: false });
    // What reaches the transport, not what is queued in the stream while it is corked.
    let writes = 0;
    const side = serverSide as Duplex & { _write: Duplex['_write'] };
    const write = side._write.bind(side);
    side._write = (chunk, enc, cb) => {
      writes++;
      write(chunk, enc, cb);
    };
    // Microtasks only: the device's answer reaches send(), setImmediate (the batch) cannot run.
    const settleMicrotasks = async (): Promise<void> => {
      for (let i = 0; i < 100; i++) await Promise.resolve();
    };
    const one = c.write(0, Buffer.alloc(4096, 1));
    await eventually('the write at the device', () => gated.waiting.length === 1);
    let before = writes;
    gated.release();
    await settleMicrotasks();
    assert.equal(writes, before + 1, 'queue depth 1: the reply went out before the turn ended');
    assert.equal((await one).error, 0);
    const two = [c.write(0, Buffer.alloc(4096, 2)), c.write(4096, Buffer.alloc(4096, 3))];
    await eventually('both writes at the device', () => gated.waiting.length === 2);
    before = writes;
    gated.release();
    await settleMicrotasks();
    assert.equal(writes, before, 'replies finished together wait for the end of the turn');
    for (const r of await Promise.all(two)) assert.equal(r.error, 0);
    assert.ok(writes >= before + 1);
  });

  it('answers out of order: replies go out as the device finishes, matched by handle', async () => {
    const { gated, connect } = gatedServer();
    const c = connect();
    await c.go('disk', { meta: false });
    const order: number[] = [];
    const reqs = [0, 1, 2, 3, 4].map((i) => c.write(i * 4096, Buffer.alloc(4096, i + 1)).then((r) => (order.push(i), r)));
    await eventually('all five at the device', () => gated.waiting.length === 5);
    // finish them last first
    for (const i of [4, 3, 2, 1, 0]) {
      gated.release((w) => w.offset === i * 4096);
      await eventually(`reply ${i}`, () => order.includes(i));
    }
    assert.deepEqual(order, [4, 3, 2, 1, 0]);
    for (const r of await Promise.all(reqs)) assert.equal(r.error, 0);
    gated.auto = true;
    for (let i = 0; i < 5; i++) assert.ok((await c.read(i * 4096, 4096)).data?.equals(Buffer.alloc(4096, i + 1)));
  });

  it('keeps data intact with many requests in flight on a device with random delays', async () => {
    const provider = new MemoryDeviceProvider();
    const disk = provider.create('disk', { size: 8 * MiB, blockSize: 4 * KiB, latencyMs: () => Math.random() * 5 });
    const server = new NbdServer(provider);
    const c = TestClient.connect((s) => server.handle(s), { fragments: [1, 7, 100, 4093, 65536] });
    await c.go('disk');
    const blocks = Array.from({ length: 64 }, (_, i) => ({ offset: i * 128 * KiB + (i % 3) * 1000, data: randomBytes(8 * KiB + i * 100) }));
    const writes = await Promise.all(blocks.map((b) => c.write(b.offset, b.data, b.offset % 2 ? CmdFlag.FUA : 0)));
    assert.ok(writes.every((w) => w.error === 0));
    const reads = await Promise.all(blocks.map((b) => c.read(b.offset, b.data.length)));
    reads.forEach((r, i) => assert.ok(r.data?.equals(blocks[i]!.data), `block ${i}`));
    assert.ok(server.stats().peakInFlight > 1, 'requests overlapped');
    assert.ok(disk.stats.writes === 64);
  });

  it('stops reading the socket at maxInFlight and resumes as requests finish', async () => {
    const { gated, server, connect } = gatedServer({ maxInFlight: 4 });
    const c = connect();
    await c.go('disk', { meta: false });
    const all = Array.from({ length: 40 }, (_, i) => c.write(i * 4096, Buffer.alloc(4096, i)));
    await eventually('four at the device', () => gated.waiting.length === 4);
    assert.equal(await settled(() => gated.waiting.length), 4, 'no more than the cap is started');
    assert.equal(server.stats().inFlight, 4);
    gated.auto = true;
    gated.release();
    for (const r of await Promise.all(all)) assert.equal(r.error, 0);
    assert.equal(gated.peak, 4);
    assert.equal(server.stats().peakInFlight, 4);
  });

  it('a client that does not read its replies is held back by TCP-style backpressure, not buffered in memory', async () => {
    const { server, connect } = setup({ maxQueuedWriteBytes: 2 * MiB, maxInFlight: 4 }, { size: 64 * MiB });
    const c = connect();
    await c.go('disk', { structured: false });
    c.stream.pause(); // the client stops reading
    const n = 100;
    const reads = Array.from({ length: n }, (_, i) => c.read((i % 60) * MiB, 1 * MiB));
    const started = await settled(() => server.stats().requests);
    // about 2 MiB queued for the socket plus the in-flight ones, then nothing: far from 100 MiB
    assert.ok(started <= 12, `${started} requests were started while the client was not reading`);
    c.stream.resume();
    const done = await Promise.all(reads);
    assert.ok(done.every((r) => r.error === 0 && r.data?.length === MiB));
    assert.equal(server.stats().requests, n + 0);
  });

  it('DISC: in-flight requests finish and are answered before the server closes', async () => {
    const { gated, server, connect, inner } = gatedServer();
    const c = connect();
    await c.go('disk', { meta: false });
    const w = c.write(0, Buffer.from('last words'));
    await eventually('write at the device', () => gated.waiting.length === 1);
    c.disconnect();
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(c.isClosed, false, 'not closed while a request is in flight');
    gated.release();
    assert.equal((await w).error, 0);
    await c.closed;
    assert.equal((await inner.read(0, 10)).toString(), 'last words');
    await eventually('connection gone', () => server.stats().connections === 0);
  });

  it('a half-close with requests still queued behind the in-flight cap gets every one answered', async () => {
    const { gated, connect, inner } = gatedServer({ maxInFlight: 2 });
    const c = connect();
    await c.go('disk', { meta: false });
    const all = Array.from({ length: 10 }, (_, i) => c.write(i * 4096, Buffer.alloc(4096, i + 1)));
    c.stream.end();
    await eventually('two at the device', () => gated.waiting.length === 2);
    gated.auto = true;
    gated.release();
    for (const r of await Promise.all(all)) assert.equal(r.error, 0);
    await c.closed;
    assert.ok((await inner.read(9 * 4096, 4096)).equals(Buffer.alloc(4096, 10)));
  });

  it('a client that half-closes after its last request still gets every reply', async () => {
    const { connect, server } = setup();
    const c = connect();
    await c.go('disk');
    const rs = [c.write(0, Buffer.from('abc')), c.read(0, 3)];
    c.stream.end();
    const [w, r] = await Promise.all(rs);
    assert.equal(w?.error, 0);
    assert.equal(r?.data?.toString(), 'abc');
    await c.closed;
    await eventually('connection gone', () => server.stats().connections === 0);
  });

  it('close(): requests arriving during shutdown get ESHUTDOWN while in-flight ones finish normally', async () => {
    const { gated, server, connect } = gatedServer();
    const c = connect();
    await c.go('disk', { meta: false });
    const w = c.write(0, Buffer.from('before'));
    await eventually('write at the device', () => gated.waiting.length === 1);
    const closing = server.close();
    const late = await c.read(0, 6);
    assert.equal(late.error, Errno.ESHUTDOWN);
    gated.release();
    assert.equal((await w).error, 0);
    await closing;
    await c.closed;
  });

  it('close() lets in-flight requests finish, closes every connection and releases every device', async () => {
    const provider = new MemoryDeviceProvider();
    provider.create('disk', { size: MiB, latencyMs: 20 });
    const server = new NbdServer(provider);
    const a = TestClient.connect((s) => server.handle(s));
    const b = TestClient.connect((s) => server.handle(s));
    await a.go('disk');
    await b.handshake();
    const w = a.write(0, Buffer.from('x'));
    await eventually('request started', () => server.stats().inFlight === 1);
    await server.close();
    assert.equal((await w).error, 0);
    await a.closed;
    await b.closed;
    assert.equal(provider.openCount.get('disk'), 0);
  });
});

describe('nbd server: hostile clients do not disturb a good one', () => {
  it('bad input matrix alongside a busy well-behaved client', async () => {
    const { connect, server, provider } = setup();
    const good = connect({ fragments: [3, 1000, 65536] });
    await good.go('disk');
    let goodOps = 0;
    let stop = false;
    const goodLoop = (async () => {
      while (!stop) {
        const off = Math.floor(Math.random() * 60) * 64 * KiB;
        const data = randomBytes(64 * KiB);
        assert.equal((await good.write(off, data)).error, 0);
        assert.ok((await good.read(off, data.length)).data?.equals(data));
        goodOps++;
        // the in-process pipe never waits for I/O: let timers (and the bad clients) run
        await new Promise((r) => setImmediate(r));
      }
    })();

    const bad: Promise<void>[] = [];
    const expectClosed = async (name: string, fn: (c: TestClient) => Promise<void>): Promise<void> => {
      const c = connect();
      await fn(c);
      await c.closed;
      assert.ok(c.isClosed, name);
    };
    // garbage instead of client flags and options
    bad.push(expectClosed('garbage in the handshake', async (c) => {
      await c.handshake();
      c.raw(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    }));
    // garbage magic in transmission
    bad.push(expectClosed('garbage in transmission', async (c) => {
      await c.go('disk');
      c.raw(randomBytes(100));
    }));
    // oversized option length
    bad.push(expectClosed('4 GiB option', async (c) => {
      await c.handshake();
      const h = Buffer.alloc(16);
      h.writeBigUInt64BE(IHAVEOPT, 0);
      h.writeUInt32BE(Opt.SET_META_CONTEXT, 8);
      h.writeUInt32BE(0xfffffff0, 12);
      c.raw(h);
    }));
    // WRITE length over the maximum
    bad.push(expectClosed('huge WRITE', async (c) => {
      await c.go('disk');
      c.raw(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 0xffffffff }));
    }));
    // disconnect mid-request (half a WRITE payload, then gone)
    bad.push(
      (async () => {
        const c = connect();
        await c.go('disk');
        const [h] = encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 1000 });
        c.raw([h!, Buffer.alloc(500)]);
        await new Promise((r) => setTimeout(r, 10));
        c.stream.destroy();
        await c.closed;
      })(),
    );
    // disconnect mid-handshake
    bad.push(
      (async () => {
        const c = connect();
        await c.handshake();
        c.raw(Buffer.from('IHAVEOPT'));
        c.stream.destroy();
        await c.closed;
      })(),
    );
    // errors that keep the connection: unknown options, past the end, over max, unknown command
    bad.push(
      (async () => {
        const c = connect();
        await c.handshake();
        for (let i = 0; i < 20; i++) assert.equal((await c.option(1000 + i, randomBytes(i * 10))).at(-1)?.replyType, Rep.ERR_UNSUP);
        await c.structuredReplies();
        await c.info('disk', [], true);
        for (let i = 0; i < 20; i++) {
          assert.equal((await c.read(4 * MiB, 4096)).error, Errno.EINVAL);
          assert.equal((await c.write(4 * MiB - 1, Buffer.alloc(2))).error, Errno.ENOSPC);
          assert.equal((await c.read(0, 0xffffffff)).error, Errno.EINVAL);
          assert.equal((await c.request(99 + i)).error, Errno.EINVAL);
        }
        c.disconnect();
        await c.closed;
      })(),
    );
    await Promise.all(bad);
    const opsDuringAttacks = goodOps;
    stop = true;
    await goodLoop;
    assert.ok(opsDuringAttacks > 0, 'the good client made progress while attacked');
    assert.ok(goodOps >= opsDuringAttacks);
    assert.ok(!good.isClosed);
    // every bad connection is gone and has released the device; only the good one holds it
    await eventually('bad connections gone', () => server.stats().connections === 1);
    await eventually('devices released', () => provider.openCount.get('disk') === 1);
    good.disconnect();
    await good.closed;
    await eventually('all released', () => provider.openCount.get('disk') === 0);
  });
});

describe('nbd server: limits (issue 13)', () => {
  it('every command counts against the bytes in flight, not only READ and WRITE', async () => {
    // Each command's cost, from its header alone: CACHE reads 4 MiB pieces, zeroing and trimming
    // hold at most the two partial blocks at the ends (4 KiB blocks here), BLOCK_STATUS its reply.
    const cases: { command: number; length: number; cost: number; op: string }[] = [
      { command: Cmd.CACHE, length: 32 * MiB, cost: 4 * MiB, op: 'read' },
      { command: Cmd.WRITE_ZEROES, length: 32 * MiB, cost: 8 * KiB, op: 'zero' },
      { command: Cmd.TRIM, length: 32 * MiB, cost: 8 * KiB, op: 'trim' },
      { command: Cmd.BLOCK_STATUS, length: 32 * MiB, cost: 32 + 8 * (8192 + 1), op: 'status' },
    ];
    for (const k of cases) {
      const provider = new MemoryDeviceProvider();
      const gated = new GatedDevice(new MemoryDevice({ size: 64 * MiB, blockSize: 4 * KiB }));
      const server = new NbdServer(
        { list: () => provider.list(), open: () => Promise.resolve({ device: gated, release: () => Promise.resolve() }) },
        { maxInFlightBytes: 2 * k.cost },
      );
      const c = TestClient.connect((st) => server.handle(st));
      await c.go('disk');
      const all = Array.from({ length: 20 }, (_, i) => c.request(k.command, { offset: (i % 2) * MiB, length: k.length }));
      await eventually(`${k.op} at the device`, () => gated.waiting.length === 2);
      assert.equal(await settled(() => gated.waiting.length), 2, `${commandNameOf(k.command)}: two fit in ${2 * k.cost} bytes, not twenty`);
      assert.equal(server.stats().throttled.bytes, 1);
      gated.auto = true;
      gated.release();
      for (const r of await Promise.all(all)) assert.equal(r.error, 0);
      c.disconnect();
      await c.closed;
    }
  });

  it('hostile connections cannot take more than the shared budget, and a good client keeps working among them', async () => {
    const budget = 48 * MiB;
    const provider = new MemoryDeviceProvider();
    provider.create('disk', { size: 8 * MiB, blockSize: 64 * KiB });
    const victim = provider.create('victim', { size: 256 * MiB, blockSize: 64 * KiB });
    await victim.write(0, randomBytes(64 * MiB));
    const server = new NbdServer(provider, { maxBufferedBytes: budget, stallTimeoutMs: 0 });
    const connect = (): TestClient => TestClient.connect((st) => server.handle(st));
    const good = connect();
    await good.go('disk');
    let goodOps = 0;
    let stop = false;
    let peak = 0;
    const goodLoop = (async () => {
      while (!stop) {
        const off = Math.floor(Math.random() * 100) * 64 * KiB;
        const data = randomBytes(64 * KiB);
        assert.equal((await good.write(off, data)).error, 0);
        assert.ok((await good.read(off, data.length)).data?.equals(data));
        goodOps++;
        peak = Math.max(peak, server.stats().bufferedBytes);
        await new Promise((r) => setImmediate(r));
      }
    })();
    const hostile: TestClient[] = [];
    // Eight connections announce 32 MiB WRITEs and send nothing more.
    for (let i = 0; i < 8; i++) {
      const c = connect();
      await c.go('victim');
      c.raw(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 32 * MiB }));
      hostile.push(c);
    }
    // Four ask for 128 MiB of data each and never read a byte of it.
    for (let i = 0; i < 4; i++) {
      const c = connect();
      await c.go('victim', { structured: false });
      c.stream.pause();
      for (let j = 0; j < 16; j++) void c.read((j % 8) * 8 * MiB, 8 * MiB).catch(() => undefined);
      hostile.push(c);
    }
    // One zeroes the whole export, over and over.
    const zc = connect();
    await zc.go('victim');
    for (let j = 0; j < 8; j++) void zc.request(Cmd.WRITE_ZEROES, { offset: 64 * MiB, length: 192 * MiB, flags: CmdFlag.NO_HOLE }).catch(() => undefined);
    hostile.push(zc);
    const before = goodOps;
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 10));
      peak = Math.max(peak, server.stats().bufferedBytes);
    }
    stop = true;
    await goodLoop;
    const st = server.stats();
    for (const c of hostile) c.stream.destroy();
    assert.ok(goodOps - before >= 20, `the good client made ${goodOps - before} round trips while attacked`);
    // The budget holds the total to 1.5 x its limit; one 64 KiB socket read each is the slack.
    const bound = 1.5 * budget + st.connections * 64 * KiB;
    assert.ok(peak <= bound && st.peakBufferedBytes <= bound, `held at most ${st.peakBufferedBytes} bytes (sampled ${peak}) against a budget of ${budget}`);
    assert.ok(st.throttled.budget > 0, 'the budget was what held the hostile clients back');
    good.disconnect();
    await good.closed;
    await eventually('every connection gone', () => server.stats().connections === 0);
    assert.equal(server.stats().bufferedBytes, 0);
  });

  it('a client that leaves a payload half-sent, trickles it, or does not read its replies is dropped after the stall timeout', async () => {
    const { server, connect } = setup({ stallTimeoutMs: 300 }, { size: 64 * MiB });
    const good = connect();
    await good.go('disk');
    const half = connect();
    await half.go('disk');
    half.raw([encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 1 * MiB })[0]!, Buffer.alloc(1000)]);
    const trickle = connect();
    await trickle.go('disk');
    trickle.raw(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 4096 })[0]!);
    const dribble = setInterval(() => trickle.raw(Buffer.alloc(1)), 20);
    const deaf = connect();
    await deaf.go('disk', { structured: false });
    deaf.stream.pause();
    for (let i = 0; i < 40; i++) void deaf.read(i * MiB, MiB).catch(() => undefined);
    const started = Date.now();
    try {
      await within(Promise.all([half.closed, trickle.closed, deaf.closed]), 5000, 'the stalled clients to be dropped');
    } finally {
      clearInterval(dribble);
      for (const c of [half, trickle, deaf]) c.stream.destroy();
    }
    assert.ok(Date.now() - started >= 250, 'not before the timeout');
    assert.equal(server.stats().stallTimeouts, 3);
    // A client that merely waits, with nothing half-sent and everything read, stays.
    await new Promise((r) => setTimeout(r, 400));
    assert.ok(!good.isClosed);
    assert.equal((await good.read(0, 10)).error, 0);
    good.disconnect();
    await good.closed;
  });

  it('the idle timeout is off by default (kernel NBD idles for hours); when set, an idle connection is closed', async () => {
    const quiet = setup({ stallTimeoutMs: 200 });
    const a = quiet.connect();
    await a.go('disk');
    await new Promise((r) => setTimeout(r, 600));
    assert.ok(!a.isClosed, 'an idle connection stays by default');
    assert.equal((await a.read(0, 10)).error, 0);
    a.disconnect();
    await a.closed;
    const strict = setup({ idleTimeoutMs: 300 });
    const b = strict.connect();
    await b.go('disk');
    assert.equal((await b.read(0, 10)).error, 0);
    const t0 = Date.now();
    await within(b.closed, 5000, 'the idle connection to be closed').finally(() => b.stream.destroy());
    assert.ok(Date.now() - t0 >= 250, 'closed only once idle for the timeout');
    assert.equal(strict.server.stats().idleTimeouts, 1);
  });

  it('each listener takes at most maxConnections; the rest are closed at once and counted', async () => {
    const { server } = setup({ listenTcp: { host: '127.0.0.1', port: 0 }, maxConnections: 3 });
    const { tcp } = await server.listen();
    const open = (): Promise<TestClient> =>
      new Promise((resolve, reject) => {
        const s = net.connect(tcp!.port, '127.0.0.1', () => resolve(new TestClient(s)));
        s.once('error', reject);
      });
    const first = await Promise.all([open(), open(), open()]);
    for (const c of first) await c.go('disk');
    const extra = await open();
    await within(extra.closed, 5000, 'the extra connection to be closed').catch(async (err: unknown) => {
      extra.stream.destroy();
      await server.close();
      throw err;
    });
    assert.ok(extra.isClosed);
    await eventually('refusal counted', () => server.stats().refusedConnections === 1);
    for (const c of first) assert.equal((await c.read(0, 10)).error, 0);
    first[0]!.disconnect();
    await first[0]!.closed;
    await eventually('slot freed', () => server.stats().connections === 2);
    const again = await open();
    await again.go('disk');
    assert.equal((await again.read(0, 10)).error, 0);
    await server.close();
  });
});

describe('nbd server: pure helpers', () => {
  it('toSegments clips, merges by zero-ness and treats what the device left out as data', () => {
    assert.deepEqual(
      toSegments(
        [
          { length: 100, hole: true, zero: true },
          { length: 50, hole: false, zero: true },
          { length: 10, hole: false, zero: false },
          { length: 1000, hole: true, zero: false },
        ],
        1000,
        300,
      ),
      [
        { offset: 1000, length: 150, zero: true },
        { offset: 1150, length: 150, zero: false },
      ],
    );
    assert.deepEqual(toSegments([{ length: 10, hole: true, zero: true }], 0, 30), [
      { offset: 0, length: 10, zero: true },
      { offset: 10, length: 20, zero: false },
    ]);
  });

  it('toDescriptors clips to the request, merges equal flags, caps the count, never returns nothing', () => {
    const e = (length: number, hole: boolean, zero: boolean): Extent => ({ length, hole, zero });
    assert.deepEqual(toDescriptors([e(10, true, true), e(10, true, true), e(5, false, false), e(100, true, true)], 20, 100), [{ length: 20, flags: 3 }]);
    assert.deepEqual(toDescriptors([e(10, true, true), e(5, false, false), e(100, true, true)], 50, 2), [
      { length: 10, flags: 3 },
      { length: 5, flags: 0 },
    ]);
    assert.deepEqual(toDescriptors([], 77, 10), [{ length: 77, flags: 0 }]);
    assert.deepEqual(toDescriptors([e(0, true, true)], 5, 10), [{ length: 5, flags: 0 }]);
  });

  it('block size constraints: minimum 1, preferred the device block size within [512, 2 MiB], maximum the payload cap', () => {
    const dev = (blockSize: number): BlockDevice => new MemoryDevice({ size: 1 << 30, blockSize });
    assert.deepEqual(blockSizeConstraints(dev(512 * KiB)), { minimum: 1, preferred: 512 * KiB, maximum: 32 * MiB });
    assert.equal(blockSizeConstraints(dev(4 * KiB)).preferred, 4 * KiB);
    assert.equal(blockSizeConstraints(dev(256)).preferred, 512);
    assert.equal(blockSizeConstraints(dev(64 * MiB)).preferred, 2 * MiB);
    assert.deepEqual(blockSizeConstraints(dev(1 * MiB), 64 * KiB), { minimum: 1, preferred: 64 * KiB, maximum: 64 * KiB });
  });
});
