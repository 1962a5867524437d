import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { isTorusError, TorusError } from '../core/errors.js';
import type { BlockDevice } from '../core/interfaces.js';
import { MemoryDevice, MemoryDeviceProvider } from './memory-device.js';

const KiB = 1024;

describe('MemoryDevice', () => {
  it('is sparse: never-written and trimmed whole blocks are holes, partial trims read as zeros', async () => {
    const d = new MemoryDevice({ size: 64 * KiB, blockSize: 4 * KiB });
    assert.deepEqual(await d.blockStatus(0, 64 * KiB), [{ length: 64 * KiB, hole: true, zero: true }]);
    await d.write(4 * KiB + 10, Buffer.alloc(8 * KiB, 0xaa));
    assert.equal(d.allocatedBlocks, 3);
    assert.deepEqual(await d.blockStatus(0, 64 * KiB), [
      { length: 4 * KiB, hole: true, zero: true },
      { length: 12 * KiB, hole: false, zero: false },
      { length: 48 * KiB, hole: true, zero: true },
    ]);
    await d.trim(6 * KiB, 8 * KiB); // frees block 2, zeroes the tail of block 1 and the head of block 3
    assert.equal(d.allocatedBlocks, 2);
    const r = await d.read(4 * KiB, 12 * KiB);
    assert.ok(r.subarray(0, 10).equals(Buffer.alloc(10)));
    assert.ok(r.subarray(10, 2 * KiB).equals(Buffer.alloc(2 * KiB - 10, 0xaa)));
    assert.ok(r.subarray(2 * KiB).equals(Buffer.alloc(10 * KiB)));
    assert.deepEqual(await d.blockStatus(8 * KiB, 4 * KiB), [{ length: 4 * KiB, hole: true, zero: true }]);
  });

  it('writeZeroes punches holes, or with noHole keeps blocks allocated as zeros without memory', async () => {
    const d = new MemoryDevice({ size: 1 << 30, blockSize: 64 * KiB });
    await d.write(0, Buffer.alloc(128 * KiB, 1));
    await d.writeZeroes(0, 64 * KiB);
    await d.writeZeroes(64 * KiB, (1 << 30) - 64 * KiB, { noHole: true });
    const st = await d.blockStatus(0, 1 << 30);
    assert.deepEqual(st, [
      { length: 64 * KiB, hole: true, zero: true },
      { length: (1 << 30) - 64 * KiB, hole: false, zero: true },
    ]);
    assert.ok((await d.read(0, 192 * KiB)).equals(Buffer.alloc(192 * KiB)));
    await d.write(64 * KiB + 1, Buffer.from([9]));
    assert.equal((await d.read(64 * KiB, 2))[1], 9);
  });

  it('writes are copied in, reads are fresh buffers', async () => {
    const d = new MemoryDevice({ size: 8 * KiB, blockSize: 4 * KiB });
    const src = Buffer.alloc(100, 5);
    await d.write(0, src);
    src.fill(6);
    const a = await d.read(0, 100);
    assert.ok(a.equals(Buffer.alloc(100, 5)));
    a.fill(7);
    assert.ok((await d.read(0, 100)).equals(Buffer.alloc(100, 5)));
  });

  it('refuses ranges past the end and writes when read-only, with INVALID_ARGUMENT', async () => {
    const d = new MemoryDevice({ size: 4096, blockSize: 512 });
    await assert.rejects(d.read(4000, 100), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    await assert.rejects(d.write(4096, Buffer.alloc(1)), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    const ro = new MemoryDevice({ size: 4096, readOnly: true });
    await assert.rejects(ro.write(0, Buffer.alloc(1)), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    await assert.rejects(ro.trim(0, 1), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => new MemoryDevice({ size: 1, blockSize: 3000 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  });

  it('counts flushes and what they covered; injected faults surface as thrown TorusErrors', async () => {
    const d = new MemoryDevice({ size: 8192 });
    await d.write(0, Buffer.alloc(1));
    await d.write(1, Buffer.alloc(1), true);
    assert.equal(d.stats.unflushed, 1);
    assert.equal(d.stats.fuaWrites, 1);
    await d.flush();
    assert.deepEqual([d.stats.flushes, d.stats.unflushed], [1, 0]);
    d.fault = (op) => (op === 'read' ? new TorusError('BLOCK_UNAVAILABLE', 'no replica') : undefined);
    await assert.rejects(d.read(0, 1), (e) => isTorusError(e, 'BLOCK_UNAVAILABLE'));
    await d.write(0, Buffer.alloc(1));
  });

  it('matches a flat buffer under any sequence of operations (model check)', async () => {
    const size = 40 * KiB;
    const op = fc.oneof(
      fc.record({ t: fc.constant('write' as const), off: fc.nat(size - 1), len: fc.integer({ min: 1, max: 9000 }), v: fc.integer({ min: 1, max: 255 }) }),
      fc.record({ t: fc.constant('trim' as const), off: fc.nat(size - 1), len: fc.integer({ min: 1, max: 20000 }) }),
      fc.record({ t: fc.constant('zero' as const), off: fc.nat(size - 1), len: fc.integer({ min: 1, max: 20000 }), noHole: fc.boolean() }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 25 }), async (ops) => {
        const d = new MemoryDevice({ size, blockSize: 4 * KiB });
        const model = Buffer.alloc(size);
        for (const o of ops) {
          const len = Math.min(o.len, size - o.off);
          if (o.t === 'write') {
            await d.write(o.off, Buffer.alloc(len, o.v));
            model.fill(o.v, o.off, o.off + len);
          } else if (o.t === 'trim') {
            await d.trim(o.off, len);
            model.fill(0, o.off, o.off + len);
          } else {
            await d.writeZeroes(o.off, len, { noHole: o.noHole });
            model.fill(0, o.off, o.off + len);
          }
        }
        assert.ok((await d.read(0, size)).equals(model));
        // every extent claimed to read as zeros really does
        let at = 0;
        for (const e of await d.blockStatus(0, size)) {
          if (e.zero) assert.ok(model.subarray(at, at + e.length).equals(Buffer.alloc(e.length)));
          at += e.length;
        }
        assert.equal(at, size);
      }),
      { numRuns: 200 },
    );
  });
});

describe('MemoryDeviceProvider', () => {
  it('hands every opener of a name the same device, read-only openers a read-only view of it', async () => {
    const p = new MemoryDeviceProvider();
    const disk = p.create('disk', { size: 8192 });
    assert.deepEqual(await p.list(), ['disk']);
    const a = await p.open('disk', { readOnly: false });
    const b = await p.open('disk', { readOnly: true });
    assert.equal(a.device, disk);
    assert.equal(b.device.readOnly, true);
    await a.device.write(0, Buffer.from('x'));
    assert.equal((await b.device.read(0, 1)).toString(), 'x');
    await assert.rejects(b.device.write(0, Buffer.from('y')), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.equal(p.openCount.get('disk'), 2);
    await a.release();
    await a.release();
    await b.release();
    assert.equal(p.openCount.get('disk'), 0);
  });

  it('unknown names are NOT_EXIST; the empty name maps to the default export if one is set', async () => {
    const p = new MemoryDeviceProvider({ disk: new MemoryDevice({ size: 512 }) });
    await assert.rejects(p.open('nope', { readOnly: false }), (e) => isTorusError(e, 'NOT_EXIST'));
    await assert.rejects(p.open('', { readOnly: false }), (e) => isTorusError(e, 'NOT_EXIST'));
    const q = new MemoryDeviceProvider({ disk: new MemoryDevice({ size: 512 }) }, { defaultExport: 'disk' });
    const o = await q.open('', { readOnly: false });
    const dev: BlockDevice = o.device;
    assert.equal(dev.size, 512);
  });
});
