import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { isTorusError } from './errors.js';
import { BLOCK_REF_SIZE, BlockType, MAX_VOLUME_ID, blockRefBytes, decodeBlockRef, encodeBlockRef, isZeroRef, ZERO_REF } from './ids.js';

test('block ref layout is the documented 24-byte little-endian form', () => {
  const buf = blockRefBytes({ type: BlockType.INode, volume: 0x0102030405, inode: 7, index: 2 ** 40 + 3 });
  assert.equal(buf.length, BLOCK_REF_SIZE);
  assert.equal(buf.toString('hex'), '0504030201010000' + '0700000000000000' + '0300000000010000');
  assert.ok(isZeroRef(decodeBlockRef(Buffer.alloc(24))));
  assert.ok(isZeroRef(ZERO_REF));
});

test('encode/decode round-trips every valid ref', () => {
  fc.assert(
    fc.property(
      fc.constantFrom(BlockType.Data, BlockType.INode),
      fc.integer({ min: 0, max: MAX_VOLUME_ID }),
      fc.maxSafeNat(),
      fc.maxSafeNat(),
      (type, volume, inode, index) => {
        const buf = Buffer.alloc(30);
        encodeBlockRef({ type, volume, inode, index }, buf, 3);
        assert.deepEqual(decodeBlockRef(buf, 3), { type, volume, inode, index });
      },
    ),
  );
});

test('out-of-range refs are refused, short buffers are protocol errors', () => {
  assert.throws(() => blockRefBytes({ type: 0, volume: MAX_VOLUME_ID + 1, inode: 0, index: 0 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  assert.throws(() => blockRefBytes({ type: 0, volume: 1, inode: -1, index: 0 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  assert.throws(() => decodeBlockRef(Buffer.alloc(23)), (e) => isTorusError(e, 'PROTOCOL'));
  const huge = Buffer.alloc(24, 0xff);
  assert.throws(() => decodeBlockRef(huge), (e) => isTorusError(e, 'PROTOCOL'));
});
