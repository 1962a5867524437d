import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { isTorusError } from '../core/errors.js';
import { blockRefBytes, MAX_VOLUME_ID, placementRef, ZERO_REF, type BlockRef } from '../core/ids.js';
import { compareBytes, hashBlockRef, hashBlockRefBytes, hashVnodeLabels, uuidBytes, xxh32 } from './hash.js';

const ascii = (s: string): Uint8Array => new TextEncoder().encode(s);

describe('xxh32', () => {
  // Published XXH32 values (seed 0) for the prefixes of this string; they cover the short path
  // (< 16 bytes), one and two stripes, and every tail length. 24 bytes is a block ref's size.
  const data = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
  const vectors: [number, number][] = [
    [0, 0x02cc5d05], [1, 0x48454cb2], [2, 0x034d0471], [3, 0x48009497], [4, 0x0a0b4c93],
    [5, 0x8aa3b71c], [7, 0x1907ad24], [8, 0x189bbfbf], [11, 0xd6509106], [15, 0x1dbdfa0f],
    [16, 0xc2c45b69], [17, 0xcc79b217], [19, 0xa16e1f9f], [20, 0x35600916], [23, 0x191f4dc6],
    [24, 0x5f247a24], [31, 0xa3944879], [32, 0xefb1272d], [33, 0x93234478], [38, 0xadd588b6],
    [40, 0xf1a0f865], [44, 0x84f01304],
  ];
  for (const [len, want] of vectors) {
    it(`matches the reference for ${len} bytes`, () => {
      assert.equal(xxh32(ascii(data.slice(0, len))), want);
    });
  }

  it('matches other published values, with seeds and partial lengths', () => {
    assert.equal(xxh32(ascii('abc')), 0x32d153ff);
    assert.equal(xxh32(new Uint8Array(0), 0x12345678), 0xbd209070);
    assert.equal(xxh32(ascii('0'), 0x12345678), 0xf53c91ba);
    assert.equal(xxh32(ascii('0123456789abcdefXYZ'), 0, 16), 0xc2c45b69);
  });
});

describe('hashBlockRef', () => {
  const anyRef = fc.record({
    type: fc.integer({ min: 0, max: 2 ** 11 - 1 }),
    volume: fc.oneof(fc.integer({ min: 0, max: 1000 }), fc.integer({ min: 0, max: MAX_VOLUME_ID })),
    inode: fc.oneof(fc.integer({ min: 0, max: 1000 }), fc.maxSafeNat()),
    index: fc.oneof(fc.integer({ min: 0, max: 1000 }), fc.maxSafeNat()),
  });

  it('is XXH32 of the 24-byte encoded placement ref (the ref itself but for log blocks)', () => {
    fc.assert(
      fc.property(anyRef, (ref) => {
        const want = xxh32(blockRefBytes(placementRef(ref)));
        assert.equal(hashBlockRef(ref), want);
        assert.equal(hashBlockRefBytes(ref), want);
      }),
      { numRuns: 2000 },
    );
  });

  it('pins a few values (changing them relocates every block of every cluster)', () => {
    const golden: [BlockRef, number][] = [
      [ZERO_REF, 0x417a81cb],
      [{ type: 0, volume: 1, inode: 1, index: 0 }, 0x2af6a54e],
      [{ type: 0, volume: 1, inode: 1, index: 1 }, 0x86e6962f],
      [{ type: 1, volume: 7, inode: 42, index: 3 }, 0xc171f404],
      [{ type: 0, volume: MAX_VOLUME_ID, inode: Number.MAX_SAFE_INTEGER, index: 2 ** 32 + 5 }, 0xc059c537],
    ];
    for (const [ref, want] of golden) assert.equal(hashBlockRef(ref).toString(16), want.toString(16), JSON.stringify(ref));
  });

  it('rejects refs that cannot be encoded, like encodeBlockRef does', () => {
    const bad: BlockRef[] = [
      { type: 0, volume: -1, inode: 0, index: 0 },
      { type: 0, volume: MAX_VOLUME_ID + 1, inode: 0, index: 0 },
      { type: 0, volume: 1, inode: 1.5, index: 0 },
      { type: 0, volume: 1, inode: 0, index: 2 ** 53 },
      { type: 2 ** 11, volume: 1, inode: 0, index: 0 },
    ];
    for (const ref of bad) assert.throws(() => hashBlockRef(ref), (e) => isTorusError(e, 'INVALID_ARGUMENT'), JSON.stringify(ref));
  });
});

describe('virtual node labels', () => {
  it('hashes "<uuid>-<i>" in decimal', () => {
    const uuid = 'b529f87e-2370-11e6-97ca-5ce0c5527cf4';
    const out = new Uint32Array(1002);
    hashVnodeLabels(uuidBytes(uuid), 1001, out, 1);
    assert.equal(out[0], 0);
    for (const i of [0, 1, 9, 10, 99, 100, 1000]) assert.equal(out[i + 1], xxh32(ascii(`${uuid}-${i}`)), `label ${i}`);
    assert.equal(out[1001], xxh32(ascii(`${uuid}-1000`)));
  });

  it('orders uuids by unsigned UTF-8 bytes', () => {
    assert.ok(compareBytes(uuidBytes('a'), uuidBytes('b')) < 0);
    assert.ok(compareBytes(uuidBytes('ab'), uuidBytes('a')) > 0);
    assert.equal(compareBytes(uuidBytes('abc'), uuidBytes('abc')), 0);
    // UTF-16 code-unit order would put U+1F600 (surrogates 0xD83D...) before U+FF01; UTF-8 does not.
    assert.ok(compareBytes(uuidBytes('\u{ff01}'), uuidBytes('\u{1f600}')) < 0);
  });
});
