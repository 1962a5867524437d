import { randomBytes } from 'node:crypto';
import { BlockType, type BlockRef } from '../../src/core/ids.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { VolumeClient } from '../../src/volume/client.js';
import { median } from './probes.js';

// What one 4 KiB write + flush (P5) is made of, measured in-process against the same cluster,
// without NBD: the volume's write (a read-modify-write: the block is loaded first) and flush, and
// next to them the distributor steps a flush performs: storing a data block and an inode page on
// R replicas, the replicas' fsyncs, and loading one block. The client has no block cache, like
// P5's random writes over a 2 GiB volume against a 64 MiB cache.

export interface Anatomy {
  /** volume.write of 4 KiB into an existing block: loads the whole block first. */
  writeMs: number;
  /** volume.flush after it: puts, replicas' fsyncs, etcd transaction. */
  flushMs: number;
  cycleMs: number;
  /** Two whole-block puts at once (data + inode page), each to R replicas. */
  put2Ms: number;
  /** Distributor flush after them: every replica that took a block fsyncs. */
  replicaFlushMs: number;
  /** One whole block from a replica, no cache. */
  getMs: number;
  samples: number;
}

export async function anatomy(etcd: string, volume: string, n = 30): Promise<Anatomy> {
  const meta = new EtcdMetadata({ endpoints: [etcd] });
  const vc = await VolumeClient.open(meta, { readCacheBytes: 0 });
  try {
    const v = await vc.openVolume(volume);
    const bs = v.blockSize;
    const blocks = Math.min(32, Math.floor(v.size / bs));
    try {
      for (let i = 0; i < blocks; i++) await v.write(i * bs, randomBytes(bs));
      await v.flush();
      const w: number[] = [];
      const f: number[] = [];
      const c: number[] = [];
      for (let i = 0; i < n; i++) {
        const off = Math.floor(Math.random() * blocks) * bs + Math.floor(Math.random() * (bs / 4096)) * 4096;
        const t0 = process.hrtime.bigint();
        await v.write(off, randomBytes(4096));
        const t1 = process.hrtime.bigint();
        await v.flush();
        const t2 = process.hrtime.bigint();
        w.push(Number(t1 - t0) / 1e6);
        f.push(Number(t2 - t1) / 1e6);
        c.push(Number(t2 - t0) / 1e6);
      }
      const d = vc.block.distributor;
      const block = randomBytes(bs);
      // Refs no volume reaches: the storage nodes' garbage collection deletes them afterwards.
      const base = Math.floor(Math.random() * 1e9);
      const ref = (i: number): BlockRef => ({ type: BlockType.Data, volume: 0xfffffe, inode: 1, index: base + i });
      const put2: number[] = [];
      const fl: number[] = [];
      const get: number[] = [];
      for (let i = 0; i < n; i++) {
        const t0 = process.hrtime.bigint();
        await Promise.all([d.putBlock(ref(2 * i), block), d.putBlock(ref(2 * i + 1), block)]);
        const t1 = process.hrtime.bigint();
        await d.flush();
        const t2 = process.hrtime.bigint();
        await d.getBlock(ref(2 * i));
        const t3 = process.hrtime.bigint();
        put2.push(Number(t1 - t0) / 1e6);
        fl.push(Number(t2 - t1) / 1e6);
        get.push(Number(t3 - t2) / 1e6);
      }
      const r = (xs: number[]): number => Number(median(xs).toFixed(2));
      return { writeMs: r(w), flushMs: r(f), cycleMs: r(c), put2Ms: r(put2), replicaFlushMs: r(fl), getMs: r(get), samples: n };
    } finally {
      await v.close();
    }
  } finally {
    await vc.close();
    await meta.close();
  }
}
