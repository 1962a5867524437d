// Child process for the crash test (file-store.crash.test.ts): writes blocks forever and prints
// a line per block only once a flush covering it has resolved (and a line before each delete it
// starts), until the parent kills it -9. Alongside, it appends to journal log blocks (a line per
// append once flushed, or once it resolves for an append synced on its own) and seals each when
// full (a line once the seal is flushed).
//
//   node crash-child.js DIR BLOCK_SIZE SLOTS FIRST_INDEX

import { crc32c } from '@node-rs/crc32';
import { FileBlockStore } from './file-store.js';
import { CRASH_LOG_PIECE, crashBlock, crashLogPiece, crashLogRef, crashRef } from './testing.js';

const [dir, blockSizeArg, slotsArg, firstArg] = process.argv.slice(2);
if (!dir || !blockSizeArg || !slotsArg || !firstArg) throw new Error('usage: crash-child DIR BLOCK_SIZE SLOTS FIRST_INDEX');
const blockSize = Number(blockSizeArg);
const slots = Number(slotsArg);
let next = Number(firstArg);

const store = await FileBlockStore.open({ dir, blockSize, sizeBytes: slots * blockSize });
// The write path the test means to cover: the native batches (what production runs) unless
// TORUS_NATIVE_WRITES=0 asks for fs, the fallback without the addon.
const native = store.batchedWrites() !== undefined;
if (native !== (process.env.TORUS_NATIVE_WRITES !== '0')) throw new Error(`expected ${native ? 'writes through fs' : 'batched native writes'} (is the block_write addon built?)`);
process.stdout.write('ready\n');
const live: number[] = [];
// The journal side: log block `log` gets one piece per round, sealed when the next would not fit.
let log = Number(firstArg);
let at = 0;
const sealed: number[] = [];
let round = 0;
for (;;) {
  const batch = Array.from({ length: 1 + (next % 4) }, () => next++);
  const deletes: number[] = [];
  while (live.length > 0 && live.length + batch.length > slots / 2) deletes.push(live.shift()!);
  // A delete may take effect on disk before the flush that acknowledges it; announcing it first
  // tells the parent which blocks may legitimately be gone.
  if (deletes.length > 0) process.stdout.write(deletes.map((i) => `d ${i}\n`).join(''));
  // Puts and deletes overlap, as they do under a real client.
  const piece = crashLogPiece(log, at);
  const lines: string[] = [];
  // Every other append is synced on its own, as a volume's flush appends to its journal (written
  // and synced in one job once the block's open record is durable), and counts as soon as it
  // resolves, before the flush of the rest.
  const syncAppend = round++ % 2 === 1;
  const appended = `A ${log} ${at}\n`;
  await Promise.all([
    ...batch.map((i) => store.putBlock(crashRef(i), crashBlock(i, blockSize))),
    ...deletes.map((i) => store.deleteBlock(crashRef(i))),
    store.appendLog(crashLogRef(log), [{ offset: at, data: piece }], syncAppend).then(() => {
      if (syncAppend) process.stdout.write(appended);
    }),
  ]);
  // A pause before the flush, so that kills often land while that append's own sync is all that
  // covers it.
  if (syncAppend) await new Promise((r) => setTimeout(r, 10));
  await store.flush();
  live.push(...batch);
  if (!syncAppend) lines.push(appended);
  at += CRASH_LOG_PIECE;
  if (at + CRASH_LOG_PIECE > blockSize) {
    const whole = await store.readRaw(crashLogRef(log));
    await store.sealLog(crashLogRef(log), at, blockSize, crc32c(Buffer.concat([whole.subarray(0, at), Buffer.alloc(blockSize - at)])) >>> 0);
    await store.flush();
    lines.push(`S ${log}\n`);
    sealed.push(log);
    // Two sealed log blocks at most, so the slots last: announced first, as deletes are.
    while (sealed.length > 2) {
      const old = sealed.shift()!;
      process.stdout.write(`l ${old}\n`);
      await store.deleteBlock(crashLogRef(old));
    }
    log++;
    at = 0;
  }
  // One write per round: a pipe write this small is atomic, so no line arrives half-written.
  process.stdout.write([...batch.map((i) => `P ${i}\n`), ...deletes.map((i) => `D ${i}\n`), ...lines].join(''));
}
