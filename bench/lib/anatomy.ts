import { randomBytes } from 'node:crypto';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { VolumeClient } from '../../src/volume/client.js';
import { peerSecurity } from './procs.js';
import { counterDelta, type NodeCounters } from './node-counters.js';
import { median } from './probes.js';

// What one 4 KiB write + flush (P5) is made of, measured in-process against the same cluster,
// without NBD: the volume's write (into memory) and its flush (one journal append per replica,
// in parallel, each made durable by an fdatasync there), and next to them the replicas' own
// account of the fsyncs they made meanwhile. The client has no block cache, like P5's random
// writes over a 2 GiB volume against a 64 MiB cache.

export interface Anatomy {
  /** volume.write of 4 KiB: staged in memory. */
  writeMs: number;
  /** volume.flush after it: the journal appends and the replicas' fdatasyncs. */
  flushMs: number;
  cycleMs: number;
  /** Mean time of one fsync round on a replica meanwhile (their torus_storage_sync_seconds_total). */
  replicaSyncMs: number;
  /** Fsync rounds on all replicas per flush: R when each flush costs one per replica. */
  syncsPerFlush: number;
  samples: number;
}

export async function anatomy(etcd: string, volume: string, counters: () => Promise<NodeCounters[]>, n = 50): Promise<Anatomy> {
  const meta = new EtcdMetadata({ endpoints: [etcd] });
  const vc = await VolumeClient.open(meta, { readCacheBytes: 0, rpc: { security: await peerSecurity() } });
  try {
    const v = await vc.openVolume(volume);
    const span = Math.floor(v.size / 4096);
    try {
      const w: number[] = [];
      const f: number[] = [];
      const c: number[] = [];
      const before = await counters();
      for (let i = 0; i < n; i++) {
        const off = Math.floor(Math.random() * span) * 4096;
        const t0 = process.hrtime.bigint();
        await v.write(off, randomBytes(4096));
        const t1 = process.hrtime.bigint();
        await v.flush();
        const t2 = process.hrtime.bigint();
        w.push(Number(t1 - t0) / 1e6);
        f.push(Number(t2 - t1) / 1e6);
        c.push(Number(t2 - t0) / 1e6);
      }
      const d = counterDelta(before, await counters());
      const r = (x: number): number => Number(x.toFixed(2));
      return {
        writeMs: r(median(w)),
        flushMs: r(median(f)),
        cycleMs: r(median(c)),
        replicaSyncMs: r((d.syncSeconds * 1000) / Math.max(1, d.flushes)),
        syncsPerFlush: r(d.flushes / n),
        samples: n,
      };
    } finally {
      await v.close();
    }
  } finally {
    await vc.close();
    await meta.close();
  }
}
