// Child process for the crash test (file-store.crash.test.ts): writes blocks forever and prints
// a line per block only once a flush covering it has resolved (and a line before each delete it
// starts), until the parent kills it -9.
//
//   node crash-child.js DIR BLOCK_SIZE SLOTS FIRST_INDEX

import { FileBlockStore } from './file-store.js';
import { crashBlock, crashRef } from './testing.js';

const [dir, blockSizeArg, slotsArg, firstArg] = process.argv.slice(2);
if (!dir || !blockSizeArg || !slotsArg || !firstArg) throw new Error('usage: crash-child DIR BLOCK_SIZE SLOTS FIRST_INDEX');
const blockSize = Number(blockSizeArg);
const slots = Number(slotsArg);
let next = Number(firstArg);

const store = await FileBlockStore.open({ dir, blockSize, sizeBytes: slots * blockSize });
process.stdout.write('ready\n');
const live: number[] = [];
for (;;) {
  const batch = Array.from({ length: 1 + (next % 4) }, () => next++);
  const deletes: number[] = [];
  while (live.length > 0 && live.length + batch.length > slots / 2) deletes.push(live.shift()!);
  // A delete may take effect on disk before the flush that acknowledges it; announcing it first
  // tells the parent which blocks may legitimately be gone.
  if (deletes.length > 0) process.stdout.write(deletes.map((i) => `d ${i}\n`).join(''));
  // Puts and deletes overlap, as they do under a real client.
  await Promise.all([
    ...batch.map((i) => store.putBlock(crashRef(i), crashBlock(i, blockSize))),
    ...deletes.map((i) => store.deleteBlock(crashRef(i))),
  ]);
  await store.flush();
  live.push(...batch);
  // One write per round: a pipe write this small is atomic, so no line arrives half-written.
  process.stdout.write([...batch.map((i) => `P ${i}\n`), ...deletes.map((i) => `D ${i}\n`)].join(''));
}
