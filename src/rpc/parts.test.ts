import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { TorusError } from '../core/errors.js';
import { formatPeerAddress, parsePeerAddress } from './address.js';
import { ConsecutiveFailureBreaker, NO_BREAKER, exponentialBackoff } from './breaker.js';
import { createPipe } from './pipe.js';
import { Fifo, FrameWriter } from './writer.js';

describe('ConsecutiveFailureBreaker', () => {
  function clock(): { now: () => number; advance: (ms: number) => void } {
    let t = 1000;
    return { now: () => t, advance: (ms) => (t += ms) };
  }

  it('opens after the threshold, probes once after the cool-down, closes on success', () => {
    const c = clock();
    const b = new ConsecutiveFailureBreaker({ failureThreshold: 3, coolDownMs: 100, now: c.now });
    b.failure();
    b.success(); // success resets the count
    b.failure();
    b.failure();
    assert.equal(b.state, 'closed');
    assert.equal(b.tryAcquire(), 'allow');
    b.failure();
    assert.equal(b.state, 'open');
    assert.equal(b.tryAcquire(), 'reject');
    assert.equal(b.retryInMs(), 100);
    c.advance(100);
    assert.equal(b.tryAcquire(), 'probe');
    assert.equal(b.state, 'half-open');
    assert.equal(b.tryAcquire(), 'reject', 'only one probe at a time');
    b.success();
    assert.equal(b.state, 'closed');
    assert.equal(b.failures, 0);
  });

  it('a failed probe reopens with a doubled cool-down, up to the maximum', () => {
    const c = clock();
    const b = new ConsecutiveFailureBreaker({ failureThreshold: 1, coolDownMs: 100, maxCoolDownMs: 300, now: c.now });
    b.failure();
    for (const expected of [200, 300, 300]) {
      c.advance(1000);
      assert.equal(b.tryAcquire(), 'probe');
      b.failure();
      assert.equal(b.state, 'open');
      assert.equal(b.retryInMs(), expected);
    }
  });

  it('ignores outcomes reported while open, and frees a lost or released probe', () => {
    const c = clock();
    const b = new ConsecutiveFailureBreaker({ failureThreshold: 1, coolDownMs: 100, now: c.now });
    b.failure();
    b.success(); // a late reply from before it opened
    assert.equal(b.state, 'open');
    c.advance(100);
    assert.equal(b.tryAcquire(), 'probe');
    b.release();
    assert.equal(b.tryAcquire(), 'probe', 'released probe lets another through');
    assert.equal(b.tryAcquire(), 'reject');
    c.advance(100);
    assert.equal(b.tryAcquire(), 'probe', 'a probe that never reported does not wedge the breaker');
  });

  it('NO_BREAKER never opens', () => {
    for (let i = 0; i < 100; i++) NO_BREAKER.failure();
    assert.equal(NO_BREAKER.tryAcquire(), 'allow');
  });
});

describe('exponentialBackoff', () => {
  it('doubles with jitter between half and the whole delay, capped', () => {
    const lo = exponentialBackoff({ initialMs: 10, maxMs: 100, random: () => 0 });
    const hi = exponentialBackoff({ initialMs: 10, maxMs: 100, random: () => 0.999999 });
    assert.deepEqual([1, 2, 3, 4, 5, 50].map(lo), [5, 10, 20, 40, 50, 50]);
    assert.deepEqual([1, 2, 3, 4, 5].map((a) => Math.round(hi(a))), [10, 20, 40, 80, 100]);
    assert.equal(lo(0), 0);
  });
});

describe('peer addresses', () => {
  it('parses tdp URLs', () => {
    assert.deepEqual(parsePeerAddress('tdp://10.0.0.1:4000'), { host: '10.0.0.1', port: 4000 });
    assert.deepEqual(parsePeerAddress('tdp://node-a'), { host: 'node-a', port: 40000 });
    assert.deepEqual(parsePeerAddress('tdp://[::1]:4000'), { host: '::1', port: 4000 });
    assert.equal(formatPeerAddress('::1', 4000), 'tdp://[::1]:4000');
    assert.equal(formatPeerAddress('127.0.0.1', 1), 'tdp://127.0.0.1:1');
  });

  it('refuses anything else with INVALID_ARGUMENT', () => {
    for (const bad of ['http://a:1', 'a:1', '', 'tdp://a:1/x', 'tdp://u@a:1', 'tdp://a:99999']) {
      assert.throws(() => parsePeerAddress(bad), (e: unknown) => e instanceof TorusError && e.code === 'INVALID_ARGUMENT', bad);
    }
  });
});

describe('Fifo', () => {
  it('keeps order across growth and wrap-around', () => {
    const q = new Fifo<number>();
    let next = 0;
    let expect = 0;
    for (let round = 0; round < 50; round++) {
      for (let i = 0; i < round; i++) q.push(next++);
      for (let i = 0; i < round / 2; i++) assert.equal(q.shift(), expect++);
    }
    assert.deepEqual(q.drain(), Array.from({ length: next - expect }, (_, i) => expect + i));
    assert.equal(q.length, 0);
    assert.equal(q.shift(), undefined);
  });
});

class CountingSink extends Writable {
  writes: Buffer[][] = [];
  override _writev(chunks: { chunk: Buffer }[], cb: () => void): void {
    this.writes.push(chunks.map((c) => c.chunk));
    cb();
  }
  override _write(chunk: Buffer, _e: BufferEncoding, cb: () => void): void {
    this.writes.push([chunk]);
    cb();
  }
}

describe('FrameWriter', () => {
  it('gathers one tick of frames into one write; big payloads go by reference', async () => {
    const sink = new CountingSink();
    const w = new FrameWriter(sink, { inlineBytes: 1024 });
    const big = Buffer.alloc(100_000, 9);
    for (let i = 0; i < 100; i++) w.write(Buffer.from([i]));
    w.write(big);
    w.write(Buffer.from('tail'));
    assert.equal(sink.writes.length, 0);
    await sleep(0);
    assert.equal(sink.writes.length, 1);
    const parts = sink.writes[0]!;
    assert.equal(parts.length, 3);
    assert.deepEqual([...parts[0]!], Array.from({ length: 100 }, (_, i) => i));
    assert.equal(parts[1], big);
    assert.equal(parts[2]!.toString(), 'tail');
  });

  it('never rewrites memory already handed to the stream', async () => {
    const sink = new CountingSink();
    const w = new FrameWriter(sink);
    w.write(Buffer.from('first'));
    await sleep(0);
    const handed = sink.writes[0]![0]!;
    for (let i = 0; i < 50_000; i++) w.write(Buffer.from('x'));
    await sleep(0);
    assert.equal(handed.toString(), 'first');
  });

  it('reports needDrain past its limit and calls back once writable', async () => {
    const [a, b] = createPipe({ highWaterMark: 1024 });
    let writable = 0;
    const w = new FrameWriter(a, { maxQueuedBytes: 4096, onWritable: () => writable++ });
    for (let i = 0; i < 10; i++) w.write(Buffer.alloc(2048));
    assert.equal(w.needDrain, true);
    await sleep(10);
    assert.equal(w.needDrain, true, 'nobody reads the other end');
    b.resume();
    await sleep(20);
    assert.equal(w.needDrain, false);
    assert.ok(writable >= 1);
    a.destroy();
  });
});

describe('createPipe', () => {
  it('copies bytes, holds writers back, and closes both ends together', async () => {
    const [a, b] = createPipe({ highWaterMark: 16 });
    const src = Buffer.from('hello');
    const got: Buffer[] = [];
    b.on('data', (c: Buffer) => got.push(c));
    a.write(src);
    await sleep(0);
    src.fill(0);
    assert.equal(Buffer.concat(got).toString(), 'hello');
    b.pause();
    let ok = true;
    for (let i = 0; i < 10 && ok; i++) ok = a.write(Buffer.alloc(16));
    assert.equal(ok, false);
    const closed = new Promise((r) => b.once('close', r));
    a.destroy();
    await closed;
  });
});
