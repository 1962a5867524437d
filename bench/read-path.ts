// The CPU a random 4 KiB read costs a storage node on its own replica, layer by layer, in one
// process: FileBlockStore.readSectors, then the distributor's readRange (the node's own disk,
// the writer's CRC checked through the sector checksums), then BlockVolume.read and readInto.
// No network, no NBD, no other process: what the serving node spends between the NBD request
// and its reply.
// P3 (`npm run bench`) is bound by that node's CPU per read, and its profile cannot tell a
// syscall's cost from the time the process waited for a core there; this can.
//
//   npm run bench:read-path [-- --reads N --block-size SIZE --read-size SIZE --data-dir DIR]
//
// --read-size (default 4 KiB, P3's) up to the block size; a whole block (P2's reads) goes through
// the distributor's getBlock.
//
// Each layer is timed twice with 32 reads in flight; CPU is user + system of this process.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { usageExits } from '../scripts/lib/cli.js';
import type { BlockRef } from '../src/core/ids.js';
import { parseSize } from '../src/core/units.js';
import { Distributor } from '../src/distributor/distributor.js';
import { MemoryTransport } from '../src/distributor/memory-transport.js';
import { MemoryMetadataStore } from '../src/metadata/memory/memory.js';
import { createRing, newRingModel } from '../src/ring/index.js';
import { FileBlockStore } from '../src/storage/file-store.js';
import { VolumeMeta } from '../src/volume/meta.js';
import { BlockVolume } from '../src/volume/volume.js';

const { usage, orUsage } = usageExits('read-path');
const { values: argv } = orUsage(() =>
  parseArgs({
    options: {
      reads: { type: 'string', default: '200000' },
      'block-size': { type: 'string', default: '64KiB' },
      'read-size': { type: 'string', default: '4KiB' },
      'data-dir': { type: 'string' },
    },
  }),
);
const N = Number(argv.reads);
if (!Number.isInteger(N) || N < 1) usage(`--reads ${argv.reads}: expected a positive integer`);
const BS = orUsage(() => parseSize(argv['block-size']));
const SIZE = 256 * 1024 * 1024;
if (BS % 4096 !== 0 || SIZE % BS !== 0) usage(`--block-size ${argv['block-size']}: expected a multiple of 4 KiB that divides ${SIZE / 1048576} MiB`);
const READ = orUsage(() => parseSize(argv['read-size']));
if (READ % 4096 !== 0 || READ > BS || BS % READ !== 0) usage(`--read-size ${argv['read-size']}: expected a multiple of 4 KiB that divides the block size`);
const QD = 32;

const dir = mkdtempSync(join(argv['data-dir'] ?? tmpdir(), 'torus-read-path-'));
const store = await FileBlockStore.open({ dir, blockSize: BS, sizeBytes: 2 * SIZE });
try {
  const ring = createRing(newRingModel('ketama', 1, [{ uuid: 'self', totalBlocks: (2 * SIZE) / BS }], 1));
  const dist = new Distributor({
    blockSize: BS,
    ring: () => ring,
    target: (uuid) => ({ uuid, address: `mem://${uuid}` }),
    transport: new MemoryTransport(),
    self: { uuid: 'self', store },
    readCacheBytes: 64 * 1024 * 1024,
  });
  const meta = new MemoryMetadataStore().client();
  const vmeta = new VolumeMeta(meta.kv());
  await vmeta.create('v', SIZE);
  const session = await meta.kv().session(60_000);
  const writer = await BlockVolume.open({ meta: vmeta, store: dist, session }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const chunk = randomBytes(1024 * 1024);
  for (let off = 0; off < SIZE; off += chunk.length) await writer.write(off, chunk);
  await writer.flush();
  await writer.foldAll();
  await writer.close();
  const vol = await BlockVolume.open({ meta: vmeta, store: dist, session }, 'v', { readOnly: true });
  // The blocks' pointers as the volume's tree holds them: the lower layers are asked for the same
  // blocks and CRCs a volume read asks them for.
  const tree = (vol as unknown as { tree: { get(i: number): Promise<{ ref: BlockRef; crc: number } | null> } }).tree;
  const ptrs: { ref: BlockRef; crc: number }[] = [];
  for (let i = 0; i < SIZE / BS; i++) {
    const p = await tree.get(i);
    if (!p) throw new Error(`block ${i} of the volume has no data block after the fold`);
    ptrs.push(p);
  }
  const perBlock = BS / READ;
  const layers: [string, (p: { ref: BlockRef; crc: number }, within: number, at: number, into: Buffer) => Promise<unknown>][] = [
    ['store.readSectors', (p, within) => store.readSectors(p.ref, within, READ)],
    READ === BS ? ['distributor.getBlock', (p) => dist.getBlock(p.ref, p.crc)] : ['distributor.readRange', (p, within) => dist.readRange(p.ref, within, READ, p.crc)],
    ['volume.read', (_p, _within, at) => vol.read(at, READ)],
    // What the NBD server does now: each of the 32 requests in flight reads into a buffer of its
    // own that is reused (the server's reply buffers), not a fresh one per read.
    ['volume.readInto', (_p, _within, at, into) => vol.readInto!(at, into)],
  ];
  console.log(`random ${READ}-byte reads (CPU per read, and per MiB read), ${QD} in flight, ${N} per repetition, block size ${BS}, ${SIZE / 1048576} MiB volume (page cache warm)`);
  for (const [name, op] of layers) {
    const runs: string[] = [];
    for (let rep = 0; rep < 2; rep++) {
      let issued = 0;
      const c0 = process.cpuUsage();
      const worker = async (): Promise<void> => {
        // Each worker's own: a buffer handed out round-robin could still be in another's read.
        const into = Buffer.allocUnsafeSlow(READ);
        while (issued < N) {
          issued++;
          const k = Math.floor(Math.random() * (SIZE / READ));
          await op(ptrs[Math.floor(k / perBlock)]!, (k % perBlock) * READ, k * READ, into);
        }
      };
      await Promise.all(Array.from({ length: QD }, worker));
      const c = process.cpuUsage(c0);
      const us = (c.user + c.system) / N;
      runs.push(`${us.toFixed(2)} µs (system ${(c.system / N).toFixed(2)}), ${((us * 1024) / (READ / 1024) / 1000).toFixed(2)} ms/MiB`);
    }
    console.log(`${name.padEnd(24)} ${runs.join('   ')}`);
  }
  await vol.close();
} finally {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
}
