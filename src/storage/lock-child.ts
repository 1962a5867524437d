// Child process for the data-dir lock tests (file-store.test.ts): waits for a line on stdin, then
// opens the store in DIR (16 KiB blocks, as file-store.test.ts makes them) and says whether it got it; a store it got stays open until the parent
// kills it.
//
//   node lock-child.js DIR

import { FileBlockStore } from './file-store.js';

const [dir] = process.argv.slice(2);
if (!dir) throw new Error('usage: lock-child DIR');
process.stdin.once('data', () => {
  FileBlockStore.open({ dir, blockSize: 16384, sizeBytes: 4 * 16384 }).then(
    () => process.stdout.write(`locked ${process.pid}\n`),
    (err: Error) => process.stdout.write(`refused ${err.message}\n`),
  );
});
process.stdout.write('ready\n');
