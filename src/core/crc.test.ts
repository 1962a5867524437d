import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import fc from 'fast-check';
import { isTorusError } from './errors.js';
import { blockCrcFromSectors, crc32cCombine, firstBadSector, verifySectorRead } from './crc.js';

test('crc32c is the Castagnoli CRC (check value of "123456789")', () => {
  assert.equal(crc32c(Buffer.from('123456789')) >>> 0, 0xe3069283);
});

test('combining the CRCs of two parts gives the CRC of their concatenation', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.uint8Array({ maxLength: 9000 }), (a, b) => {
      const whole = Buffer.concat([a, b]);
      assert.equal(crc32cCombine(crc32c(Buffer.from(a)), crc32c(Buffer.from(b)), b.length), crc32c(whole) >>> 0);
    }),
    { numRuns: 300 },
  );
});

function sectorSums(block: Buffer, sectorSize: number): Buffer {
  const n = Math.ceil(block.length / sectorSize);
  const sums = Buffer.alloc(n * 4);
  for (let s = 0; s < n; s++) sums.writeUInt32LE(crc32c(block.subarray(s * sectorSize, Math.min((s + 1) * sectorSize, block.length))) >>> 0, s * 4);
  return sums;
}

test('a block CRC from its sector checksums equals the CRC of the block, short last sector included', () => {
  for (const size of [4096, 128 * 1024, 128 * 1024 + 100, 512 * 1024, 1000]) {
    const block = randomBytes(size);
    assert.equal(blockCrcFromSectors(sectorSums(block, 4096), size, 4096), crc32c(block) >>> 0, `block of ${size}`);
  }
});

test('verifySectorRead serves the bytes asked for and refuses another block, a damaged sector, a short answer', () => {
  const bs = 64 * 1024;
  const block = randomBytes(bs);
  const crc = crc32c(block) >>> 0;
  const sums = sectorSums(block, 4096);
  const read = { sectorSize: 4096, sums, offset: 8192, data: Buffer.from(block.subarray(8192, 16384)) };
  assert.deepEqual(verifySectorRead(read, bs, crc, 9000, 5000, true, 'b'), block.subarray(9000, 14000));
  const corrupt = (e: unknown) => isTorusError(e, 'CORRUPT');
  // Another block whose sectors are self-consistent: only the combination exposes it.
  const other = randomBytes(bs);
  assert.throws(() => verifySectorRead({ ...read, sums: sectorSums(other, 4096), data: other.subarray(8192, 16384) }, bs, crc, 9000, 5000, true, 'b'), corrupt);
  const flipped = Buffer.from(read.data);
  flipped[100]! ^= 1;
  assert.throws(() => verifySectorRead({ ...read, data: flipped }, bs, crc, 9000, 5000, true, 'b'), corrupt);
  // A local store checked the sectors itself; the combination is still checked.
  assert.doesNotThrow(() => verifySectorRead({ ...read, data: flipped }, bs, crc, 9000, 5000, false, 'b'));
  assert.throws(() => verifySectorRead(read, bs, crc, 4096, 5000, true, 'b'), corrupt);
});

test('firstBadSector: -1 for sectors that match their checksums, else the first that does not, from any starting sector and with a short last one', () => {
  const sector = 4096;
  const block = randomBytes(16 * sector);
  const sums = Buffer.alloc(16 * 4);
  for (let s = 0; s < 16; s++) sums.writeUInt32LE(crc32c(block.subarray(s * sector, (s + 1) * sector)) >>> 0, s * 4);
  assert.equal(firstBadSector(block, sector, sums, 0), -1);
  // Sectors 5..9 and 5..8 plus 100 bytes of 9 (its checksum covers all of 9: a short read of a
  // short last sector is what a block's tail looks like, so here only whole-block tails are).
  assert.equal(firstBadSector(block.subarray(5 * sector, 10 * sector), sector, sums, 5), -1);
  assert.equal(firstBadSector(block.subarray(15 * sector), sector, sums, 15), -1, 'one sector');
  for (const flip of [0, 5 * sector + 17, 12 * sector - 1, 16 * sector - 1]) {
    const bad = Buffer.from(block);
    bad[flip]! ^= 0x40;
    const s = Math.floor(flip / sector);
    assert.equal(firstBadSector(bad, sector, sums, 0), s, `byte ${flip}`);
    if (s >= 3) assert.equal(firstBadSector(bad.subarray(3 * sector), sector, sums, 3), s, `byte ${flip}, from sector 3`);
  }
  // One sector alone (a random 4 KiB read), after a longer check left other sums in the scratch.
  const one = Buffer.from(block.subarray(7 * sector, 8 * sector));
  assert.equal(firstBadSector(one, sector, sums, 7), -1);
  one[100]! ^= 1;
  assert.equal(firstBadSector(one, sector, sums, 7), 7);
  // Two bad sectors: the first is named.
  const two = Buffer.from(block);
  two[9 * sector]! ^= 1;
  two[4 * sector]! ^= 1;
  assert.equal(firstBadSector(two, sector, sums, 0), 4);
  // A short last sector (a block that is not a whole number of sectors).
  const odd = randomBytes(2 * sector + 300);
  const oddSums = Buffer.alloc(12);
  for (let s = 0; s < 3; s++) oddSums.writeUInt32LE(crc32c(odd.subarray(s * sector, Math.min((s + 1) * sector, odd.length))) >>> 0, s * 4);
  assert.equal(firstBadSector(odd, sector, oddSums, 0), -1);
  odd[odd.length - 1]! ^= 1;
  assert.equal(firstBadSector(odd, sector, oddSums, 0), 2);
});
