import { crc32c } from '@node-rs/crc32';
import fc from 'fast-check';
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { MAX_VOLUME_ID, type BlockRef } from '../core/ids.js';
import {
  COMPAT_DURABLE_GEN,
  HEADER_AREA_SIZE,
  Layout,
  RECORD_SIZE,
  SECTOR_SIZE,
  checksumArraySize,
  computeChecksums,
  decodeHeader,
  decodeRecord,
  encodeHeader,
  encodeRecord,
  keyToRef,
  refKey,
  refKeyAt,
  type StoreHeader,
} from './format.js';
import { padded, pattern } from './testing.js';

const refArb: fc.Arbitrary<BlockRef> = fc.record({
  type: fc.oneof(fc.constantFrom(0, 1), fc.integer({ min: 0, max: 2 ** 11 - 1 })),
  volume: fc.oneof(fc.integer({ min: 0, max: 1000 }), fc.integer({ min: 0, max: MAX_VOLUME_ID })),
  inode: fc.oneof(fc.nat(1000), fc.maxSafeNat()),
  index: fc.oneof(fc.nat(1000), fc.maxSafeNat()),
}).map((r) => ({ ...r }));

const header: StoreHeader = {
  version: 1,
  sequence: 7,
  blockSize: 512 * 1024,
  sectorSize: SECTOR_SIZE,
  slotCount: 2 ** 21,
  recordSize: RECORD_SIZE,
  checksumArraySize: checksumArraySize(512 * 1024),
  slotsPerGroup: 4096,
  incompatFlags: 0,
  compatFlags: COMPAT_DURABLE_GEN,
  durableGen: 2 ** 40 + 5,
  storeId: '00112233445566778899aabbccddeeff',
  createdAt: 1_700_000_000_000,
};

describe('on-disk format', () => {
  it('round-trips a header and rejects any damaged copy', () => {
    const enc = encodeHeader(header);
    assert.equal(enc.length, 512);
    assert.deepEqual(decodeHeader(enc), header);
    for (let i = 0; i < enc.length; i += 7) {
      const bad = Buffer.from(enc);
      bad[i] = bad[i]! ^ 0x10;
      assert.equal(decodeHeader(bad), undefined, `byte ${i}`);
    }
    assert.equal(decodeHeader(Buffer.alloc(512)), undefined);
  });

  it('round-trips records, and the fast key agrees with refKey', () => {
    fc.assert(
      fc.property(refArb, fc.integer({ min: 1, max: 2 ** 53 - 1 }), fc.nat(2 ** 32 - 1), (ref, gen, sum) => {
        const rec = encodeRecord(ref, gen, sum);
        assert.deepEqual(decodeRecord(rec), { kind: 'used', ref, generation: gen, checksumsCrc: sum });
        assert.equal(refKeyAt(rec, 0), refKey(ref));
        assert.deepEqual(keyToRef(refKey(ref)), ref);
        // The writer's block CRC rides in what version 1 reserved; a record without it says so.
        const withCrc = encodeRecord(ref, gen, sum, undefined, sum ^ 0x5a5a);
        assert.deepEqual(decodeRecord(withCrc), { kind: 'used', ref, generation: gen, checksumsCrc: sum, blockCrc: (sum ^ 0x5a5a) >>> 0 });
        assert.equal(refKeyAt(withCrc, 0), refKey(ref));
      }),
    );
  });

  it('reads a cleared record as free and any damaged one as torn', () => {
    assert.deepEqual(decodeRecord(Buffer.alloc(RECORD_SIZE)), { kind: 'free' });
    const rec = encodeRecord({ type: 0, volume: 1, inode: 2, index: 3 }, 9, 1234);
    for (let i = 0; i < RECORD_SIZE; i++) {
      const bad = Buffer.from(rec);
      bad[i] = bad[i]! ^ 0x01;
      assert.equal(decodeRecord(bad).kind, 'torn', `byte ${i}`);
    }
    // A half-written record: the first 32 bytes new, the rest still zero.
    const half = Buffer.alloc(RECORD_SIZE);
    rec.copy(half, 0, 0, 32);
    assert.equal(decodeRecord(half).kind, 'torn');
  });

  it('lays slots out without overlap, across group boundaries', () => {
    const layout = new Layout(10000, SECTOR_SIZE, 4);
    const seen: Array<[number, number]> = [];
    for (let slot = 0; slot < 13; slot++) {
      seen.push([layout.recordOffset(slot), RECORD_SIZE], [layout.checksumOffset(slot), layout.checksumArraySize]);
      assert.equal(layout.dataOffset(slot), slot * 10000);
    }
    seen.sort((a, b) => a[0] - b[0]);
    assert.ok(seen[0]![0] >= HEADER_AREA_SIZE);
    for (let i = 1; i < seen.length; i++) assert.ok(seen[i - 1]![0] + seen[i - 1]![1] <= seen[i]![0], 'regions overlap');
    const last = seen[seen.length - 1]!;
    assert.ok(last[0] + last[1] <= layout.tableFileSize(13));
    assert.equal(layout.tableFileSize(13), HEADER_AREA_SIZE + 4 * layout.groupSize);
  });

  it('checksums short data exactly as its zero-padded form', () => {
    const blockSize = 3 * 4096 + 1000;
    const zeros = Buffer.alloc(blockSize);
    for (const len of [0, 1, 4095, 4096, 4097, 9000, blockSize - 1, blockSize]) {
      const data = pattern(len, len);
      const a = Buffer.alloc(16);
      const b = Buffer.alloc(16);
      const crcA = computeChecksums(data, blockSize, SECTOR_SIZE, zeros, a);
      const crcB = computeChecksums(padded(data, blockSize), blockSize, SECTOR_SIZE, null, b);
      assert.deepEqual(a, b, `length ${len}`);
      assert.equal(crcA, crcB);
      assert.equal(crcA, crc32c(a));
      assert.equal(a.readUInt32LE(12), crc32c(padded(data, blockSize).subarray(12288)));
    }
  });
});
