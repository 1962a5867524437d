// Random operation sequences against a Map model, for both stores. The file store also gets
// reopened mid-sequence, which must change nothing a caller can see.

import fc from 'fast-check';
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isTorusError } from '../core/errors.js';
import type { LocalBlockStore } from './common.js';
import { FileBlockStore } from './file-store.js';
import { MemoryBlockStore } from './memory-store.js';
import { dataRef, makeTmpDir, padded, pattern, removeDir } from './testing.js';

const BS = 5000; // two sectors, the second partial
const CAPACITY = 5;
const REFS = 8;

type Op =
  | { k: 'put'; r: number; seed: number; len: number }
  | { k: 'del'; r: number }
  | { k: 'get'; r: number }
  | { k: 'range'; r: number; off: number; len: number }
  | { k: 'flush' }
  | { k: 'reopen' };

const ref = fc.integer({ min: 0, max: REFS - 1 });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ k: fc.constant('put' as const), r: ref, seed: fc.nat(1000), len: fc.oneof(fc.constant(BS), fc.integer({ min: 0, max: BS })) }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('del' as const), r: ref }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('get' as const), r: ref }) },
  {
    weight: 2,
    arbitrary: fc
      .tuple(ref, fc.integer({ min: 0, max: BS }), fc.integer({ min: 0, max: BS }))
      .map(([r, a, b]): Op => ({ k: 'range', r, off: Math.min(a, b), len: Math.abs(a - b) })),
  },
  { weight: 1, arbitrary: fc.constant({ k: 'flush' as const }) },
  { weight: 1, arbitrary: fc.constant({ k: 'reopen' as const }) },
);

interface Harness {
  store(): LocalBlockStore;
  reopen(): Promise<void>;
  dispose(): Promise<void>;
}

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => isTorusError(e) && e.code === code);
}

async function runModel(h: Harness, ops: Op[]): Promise<void> {
  const model = new Map<number, Buffer>();
  try {
    for (const op of ops) {
      const s = h.store();
      switch (op.k) {
        case 'put': {
          const data = pattern(op.seed, op.len);
          if (!model.has(op.r) && model.size >= CAPACITY) {
            await expectCode(s.putBlock(dataRef(1, 1, op.r), data), 'OUT_OF_SPACE');
          } else {
            await s.putBlock(dataRef(1, 1, op.r), data);
            if (!model.has(op.r)) model.set(op.r, padded(data, BS));
          }
          break;
        }
        case 'del':
          await s.deleteBlock(dataRef(1, 1, op.r));
          model.delete(op.r);
          break;
        case 'get': {
          const want = model.get(op.r);
          if (want) assert.deepEqual(await s.getBlock(dataRef(1, 1, op.r)), want);
          else await expectCode(s.getBlock(dataRef(1, 1, op.r)), 'BLOCK_UNAVAILABLE');
          break;
        }
        case 'range': {
          const want = model.get(op.r);
          if (want) assert.deepEqual(await s.readRange(dataRef(1, 1, op.r), op.off, op.len), want.subarray(op.off, op.off + op.len));
          else await expectCode(s.readRange(dataRef(1, 1, op.r), op.off, op.len), 'BLOCK_UNAVAILABLE');
          break;
        }
        case 'flush':
          await s.flush();
          break;
        case 'reopen':
          await h.reopen();
          break;
      }
      const now = h.store();
      assert.equal(now.usedBlocks(), model.size);
      for (let r = 0; r < REFS; r++) assert.equal(now.hasBlock(dataRef(1, 1, r)), model.has(r), `ref ${r} after ${op.k}`);
    }
    assert.equal(h.store().stats().checksumFailures, 0);
  } finally {
    await h.dispose();
  }
}

describe('BlockStore against a Map model', () => {
  it('FileBlockStore', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { maxLength: 30 }), async (ops) => {
        const dir = await makeTmpDir();
        const open = (): Promise<FileBlockStore> => FileBlockStore.open({ dir, blockSize: BS, sizeBytes: CAPACITY * BS });
        let store = await open();
        await runModel(
          {
            store: () => store,
            async reopen() {
              await store.close();
              store = await open();
            },
            async dispose() {
              await store.close().catch(() => undefined);
              await removeDir(dir);
            },
          },
          ops,
        );
      }),
      { numRuns: 40 },
    );
  });

  it('MemoryBlockStore', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { maxLength: 40 }), async (ops) => {
        const store = new MemoryBlockStore({ blockSize: BS, capacityBlocks: CAPACITY });
        await runModel({ store: () => store, reopen: async () => undefined, dispose: () => store.close() }, ops);
      }),
      { numRuns: 200 },
    );
  });
});
