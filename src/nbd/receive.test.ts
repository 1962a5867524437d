// The NBD receive path of plaintext connections (issue 15): a listener's sockets are read with
// `onread`, a WRITE's payload straight into the buffer the device is given, everything else into
// one read buffer per connection. That buffer is poisoned before every reuse here, and the device
// keeps every payload it is given (as a volume's write cache does) and compares them at the end:
// a payload that is a view of the read buffer, or of anything else reused, reads garbage by then.

import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { describe, it } from 'node:test';
import { throwawayCertificate } from '../cli/shared/certs.js';
import type { BlockDevice, DeviceProvider } from '../core/interfaces.js';
import { Cmd, Opt, Rep, encodeClientFlags, encodeGreeting, encodeOption, encodeRequest } from './codec.js';
import { MemoryDevice, MemoryDeviceProvider } from './memory-device.js';
import { NbdServer, type NbdServerOptions } from './server.js';
import { TestClient, poisonedSockets, settled, type Reply } from './testing.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const { path: socketPath, cleanups } = poisonedSockets('nbd-receive-');

const pattern = (seed: number, size: number): Buffer => {
  const b = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) b[i] = (seed * 131 + i * 7 + (i >> 9)) & 0xff;
  return b;
};

/** Yields to the event loop until `fn` holds (each turn lets the server read its socket once). */
async function until(what: string, fn: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}


/**
 * Keeps every payload it is adopted with, as a volume's write cache does, and can hold writes
 * until released. `check()` compares what it kept with what was sent.
 */
class KeepingDevice extends MemoryDevice {
  readonly kept: { offset: number; data: Uint8Array }[] = [];
  /** Writes wait for release() while this is set. */
  gated = false;
  private readonly waiting: (() => void)[] = [];

  override async write(offset: number, data: Uint8Array, fua = false, adopt = false): Promise<void> {
    if (adopt) this.kept.push({ offset, data });
    if (this.gated) await new Promise<void>((go) => this.waiting.push(go));
    return super.write(offset, data, fua);
  }

  release(): void {
    this.gated = false;
    for (const go of this.waiting.splice(0)) go();
  }

  /** Every payload kept still holds what was sent for its offset, and the device holds it too. */
  async check(sent: ReadonlyMap<number, Buffer>): Promise<void> {
    for (const { offset, data } of this.kept) {
      const want = sent.get(offset);
      assert.ok(want, `a write at ${offset} that was never sent`);
      assert.ok(Buffer.from(data.buffer, data.byteOffset, data.byteLength).equals(want), `the payload kept for ${offset} still holds what was sent`);
    }
    for (const [offset, want] of sent) assert.ok((await this.read(offset, want.length)).equals(want), `the device holds what was written at ${offset}`);
  }
}

async function listening(provider: DeviceProvider, opts: NbdServerOptions = {}): Promise<{ server: NbdServer; connect: () => TestClient; path: string }> {
  const path = socketPath();
  const server = new NbdServer(provider, { listenUnix: path, ...opts });
  await server.listen();
  cleanups.push(() => server.close());
  const connect = (): TestClient => {
    const c = new TestClient(net.connect(path));
    cleanups.push(() => void c.stream.destroy());
    return c;
  };
  return { server, connect, path };
}

async function keeping(opts: NbdServerOptions = {}, size = 64 * MiB) {
  const disk = new KeepingDevice({ size, blockSize: 64 * KiB });
  const served = await listening(new MemoryDeviceProvider({ disk }), opts);
  // before the server's close(), which waits for the writes in flight (cleanups run last first)
  cleanups.push(() => disk.release());
  return { disk, ...served };
}

/** Sends the WRITEs (and a FLUSH after each) in one writev: many requests per read. */
function pipelined(c: TestClient, writes: readonly { offset: number; data: Buffer }[]): Promise<Reply[]> {
  c.stream.cork();
  const replies = writes.flatMap((w) => [c.write(w.offset, w.data), c.request(Cmd.FLUSH)]);
  c.stream.uncork();
  return Promise.all(replies);
}

describe('nbd receive path (plaintext, onread)', () => {
  it('pipelined WRITEs of every size around the header, buffer and payload cut-offs, many in one read, reach the device exactly', async () => {
    const { disk, server, connect } = await keeping();
    const c = connect();
    await c.go('disk');
    const lengths = [1, 27, 28, 29, 511, 512, 4095, 4096, 65535, 65536, 65537, 1 * MiB + 3, 7, 2 * MiB];
    const sent = new Map<number, Buffer>();
    const writes = lengths.map((n, i) => ({ offset: i * 3 * MiB + i, data: pattern(i, n) }));
    for (const w of writes) sent.set(w.offset, w.data);
    for (const r of await pipelined(c, writes)) assert.equal(r.error, 0);
    // and the same again while the first replies are still going out
    const again = writes.map((w, i) => ({ offset: w.offset + 2 * MiB + 4096, data: pattern(100 + i, Math.min(w.data.length, 512 * KiB)) }));
    for (const w of again) sent.set(w.offset, w.data);
    for (const r of await pipelined(c, again)) assert.equal(r.error, 0);
    await disk.check(sent);
    assert.equal(disk.kept.length, sent.size, 'every payload was adopted by the device');
    const st = server.stats();
    assert.equal(st.directReads, 1, 'the connection was read with onread');
    c.disconnect();
    await c.closed;
  });

  it('a run of pipelined requests split in two at every byte boundary reaches the device exactly', async () => {
    const { disk, server, connect } = await keeping({}, 8 * MiB);
    const c = connect();
    await c.go('disk');
    const sizes = [30, 100, 0, 150];
    const sent = new Map<number, Buffer>();
    const round = (k: number): { bytes: Buffer; replies: Promise<Reply>[] } => {
      const parts: Buffer[] = [];
      const replies: Promise<Reply>[] = [];
      sizes.forEach((n, i) => {
        const handle = BigInt(k * 10 + i + 1000);
        const offset = n === 0 ? 0 : k * 1024 + i * 256;
        const data = n === 0 ? undefined : pattern(k * 4 + i, n);
        if (data) sent.set(offset, data);
        const command = data ? Cmd.WRITE : Cmd.FLUSH;
        parts.push(...encodeRequest({ flags: 0, command, handle, offset, length: n, ...(data ? { payload: data } : {}) }));
        replies.push(c.expectReply(handle, command, offset, n));
      });
      return { bytes: Buffer.concat(parts), replies };
    };
    // 4 headers and the payloads
    const length = 4 * 28 + sizes.reduce((a, b) => a + b, 0);
    for (let k = 1; k < length; k++) {
      const { bytes, replies } = round(k);
      assert.equal(bytes.length, length);
      const before = server.stats().bytesReceived;
      c.raw(bytes.subarray(0, k));
      // the first part is read on its own before the rest is sent
      await until(`the server to read ${k} bytes`, () => server.stats().bytesReceived === before + k);
      c.raw(bytes.subarray(k));
      for (const r of await Promise.all(replies)) assert.equal(r.error, 0, `split at ${k}`);
    }
    await disk.check(sent);
    c.disconnect();
    await c.closed;
  });

  it('a read buffer outgrown by a 64 KiB option, and options and requests pipelined behind EXPORT_NAME', async () => {
    const { disk, connect } = await keeping();
    const c = connect();
    await c.handshake();
    const big = await c.option(0x1234, pattern(1, 64 * KiB));
    assert.equal(big.at(-1)?.replyType, Rep.ERR_UNSUP);
    assert.equal((await c.option(Opt.LIST)).at(-1)?.replyType, Rep.ACK);
    // EXPORT_NAME and two WRITEs in one write: the requests arrive in the read that ends the handshake
    c.decoder.expectExportName(true);
    const a = pattern(2, 3000);
    const b = pattern(3, 100 * KiB);
    c.stream.cork();
    c.raw(encodeOption(Opt.EXPORT_NAME, Buffer.from('disk')));
    const replies = [c.write(0, a), c.write(MiB, b)];
    c.stream.uncork();
    assert.equal((await c.nextMessage()).type, 'exportName');
    for (const r of await Promise.all(replies)) assert.equal(r.error, 0);
    await disk.check(
      new Map([
        [0, a],
        [MiB, b],
      ]),
    );
  });

  it('the shared budget still stops reading: a client sending faster than the device writes is held at the budget', async () => {
    const budget = 4 * MiB;
    const { disk, server, connect } = await keeping({ maxBufferedBytes: budget, maxPayload: 1 * MiB, stallTimeoutMs: 0 });
    disk.gated = true;
    const c = connect();
    await c.go('disk');
    const sent = new Map<number, Buffer>();
    const writes = Array.from({ length: 16 }, (_, i) => ({ offset: i * MiB, data: pattern(i, MiB) }));
    for (const w of writes) sent.set(w.offset, w.data);
    const before = server.stats().bytesReceived;
    const replies = pipelined(c, writes);
    const received = (await settled(() => server.stats().bytesReceived, 150)) - before;
    const st = server.stats();
    // Admitted payloads up to the budget, and at most one read of the next request's beyond it.
    assert.ok(received <= budget + 64 * KiB + 16 * 56, `read ${received} bytes against a ${budget}-byte budget`);
    assert.ok(received >= budget / 2, `read ${received} bytes: the budget, not something else, stopped it`);
    assert.ok(st.peakBufferedBytes <= budget + 64 * KiB, `held at most ${st.peakBufferedBytes} bytes`);
    assert.ok(st.throttled.budget > 0, 'the budget held it back');
    assert.ok(c.stream.writableLength > 0, 'the rest waits on the client side');
    disk.release();
    for (const r of await replies) assert.equal(r.error, 0);
    await disk.check(sent);
    assert.equal(server.stats().bufferedBytes, 0);
    c.disconnect();
    await c.closed;
  });

  it('the in-flight cap stops reading; reading resumed behind it lands every byte where it belongs', async () => {
    const { disk, server, connect } = await keeping({ maxInFlight: 2 });
    disk.gated = true;
    const c = connect();
    await c.go('disk');
    const sent = new Map<number, Buffer>();
    const writes = Array.from({ length: 12 }, (_, i) => ({ offset: i * MiB, data: pattern(i, 200 * KiB + i) }));
    for (const w of writes) sent.set(w.offset, w.data);
    const before = server.stats().bytesReceived;
    const replies = Promise.all(writes.map((w) => c.write(w.offset, w.data)));
    const received = (await settled(() => server.stats().bytesReceived, 150)) - before;
    assert.equal(disk.kept.length, 2, 'two requests started');
    assert.ok(received <= 2 * (200 * KiB + 1) + 64 * KiB + 3 * 28, `the rest wait unread (${received} bytes read)`);
    assert.ok(server.stats().throttled.requests > 0);
    // release one write at a time: each resumes reading for the next
    while (disk.kept.length < writes.length) {
      const n = disk.kept.length;
      disk.release();
      disk.gated = true;
      await until('the next write to start', () => disk.kept.length > n);
    }
    disk.release();
    for (const r of await replies) assert.equal(r.error, 0);
    await disk.check(sent);
  });

  it('a client that hangs up or half-closes mid-payload: what it finished is written, the rest is neither written nor acknowledged', async () => {
    const { disk, server, connect } = await keeping();
    const sent = new Map<number, Buffer>();
    for (const how of ['hang up', 'half-close'] as const) {
      const c = connect();
      await c.go('disk');
      const base = how === 'hang up' ? 0 : 8 * MiB;
      const whole = pattern(1, 4 * KiB);
      const cut = pattern(2, 256 * KiB);
      // read in full before the hang-up, so started whichever way the client goes
      sent.set(base, whole);
      const requestsBefore = server.stats().requests;
      const first = c.write(base, whole);
      first.catch(() => undefined);
      const [header] = encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 99n, offset: base + MiB, length: cut.length, payload: cut });
      const second = c.expectReply(99n, Cmd.WRITE, base + MiB, cut.length);
      second.catch(() => undefined);
      c.raw([header!, cut.subarray(0, cut.length / 2)]);
      await until('the first half to be read', () => server.stats().bytesReceived >= 28 * 2 + whole.length + cut.length / 2);
      if (how === 'hang up') c.stream.destroy();
      else {
        c.stream.end();
        assert.equal((await first).error, 0, 'the finished WRITE is answered');
      }
      await c.closed;
      await until('the connection to go', () => server.stats().connections === 0);
      await assert.rejects(second, /closed/, 'the cut WRITE gets no reply');
      assert.equal(server.stats().requests - requestsBefore, 1, `${how}: only the finished WRITE was started`);
      assert.ok((await disk.read(base + MiB, cut.length)).equals(Buffer.alloc(cut.length)), `${how}: nothing of the cut WRITE was written`);
    }
    await disk.check(sent);
    assert.equal(server.stats().bufferedBytes, 0);
  });

  it('a payload left half-sent is dropped after the stall timeout', async () => {
    const { server, connect } = await keeping({ stallTimeoutMs: 300 });
    const c = connect();
    await c.go('disk');
    c.raw([encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: MiB })[0]!, Buffer.alloc(1000)]);
    const t0 = Date.now();
    await c.closed;
    assert.ok(Date.now() - t0 >= 250);
    assert.equal(server.stats().stallTimeouts, 1);
  });
});

describe('nbd receive path: TLS configured', () => {
  it('connections are read as streams, and STARTTLS then I/O works over the same socket', async () => {
    const { cert, key } = await throwawayCertificate();
    const disk = new KeepingDevice({ size: 16 * MiB, blockSize: 64 * KiB });
    const { server, path } = await listening(new MemoryDeviceProvider({ disk }), { tls: { mode: 'on', cert, key } });
    const raw = net.connect(path);
    cleanups.push(() => void raw.destroy());
    // the plaintext part by hand: client flags and STARTTLS at once, then the greeting and the ACK
    raw.write(Buffer.concat([encodeClientFlags(3), encodeOption(Opt.STARTTLS)]));
    const plaintext = await new Promise<Buffer>((resolve, reject) => {
      let got = Buffer.alloc(0);
      const onData = (b: Buffer): void => {
        got = Buffer.concat([got, b]);
        if (got.length < encodeGreeting().length + 20) return;
        raw.off('data', onData);
        raw.pause();
        resolve(got);
      };
      raw.on('data', onData);
      raw.once('error', reject);
    });
    assert.equal(plaintext.readUInt32BE(plaintext.length - 8), Rep.ACK, 'STARTTLS acknowledged');
    const secure = tls.connect({ socket: raw, rejectUnauthorized: false });
    await new Promise((r) => secure.once('secureConnect', r));
    const c = new TestClient(secure);
    cleanups.push(() => void secure.destroy());
    // the greeting came in plaintext; over TLS the options go on
    c.decoder.push(encodeGreeting());
    c.decoder.next();
    await c.structuredReplies();
    await c.info('disk', [], true);
    const data = pattern(5, 3 * MiB + 5);
    assert.equal((await c.write(4096, data)).error, 0);
    assert.ok((await c.read(4096, data.length)).data?.equals(data));
    await disk.check(new Map([[4096, data]]));
    assert.equal(server.stats().directReads, 0, 'with TLS configured, no connection is read with onread');
    c.disconnect();
    await c.closed;
  });
});

// The device type is what the server is given; a KeepingDevice must stay one.
const _isDevice = (d: KeepingDevice): BlockDevice => d;
void _isDevice;
