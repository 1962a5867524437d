// P6: flush latency with one dirty 4 KiB write: a 1 GiB volume next to a 1 TiB thin volume, same
// cluster, same run. A flush is a journal append (docs/journal.md), so the ratio should be 1:
// nothing it does depends on the volume's size. Checkpoints are off during the measurement (they
// are background work), and the checkpoints' cost is reported apart.
//
//   npm run bench:volume            (etcd + three torusd at R=2 on loopback, 128 KiB blocks)
import { randomBytes } from 'node:crypto';
import { startCluster } from '../test/helpers/cluster.js';
import { clientSecurity } from '../test/helpers/certs.js';
import { ok } from '../test/helpers/procs.js';
import { VolumeClient } from '../src/volume/client.js';

const ROUNDS = Number(process.env['ROUNDS'] ?? 200);

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

const c = await startCluster({ nodes: 3, replication: 2, blockSize: '128KiB', size: '2GiB' });
try {
  const C = ['-C', c.etcd.endpoint];
  await ok('torusctl', [...C, 'volume', 'create-block', 'small', '1GiB']);
  await ok('torusctl', [...C, 'volume', 'create-block', 'thin', '1TiB']);
  const vc = await VolumeClient.open(c.meta, { rpc: { security: await clientSecurity() } });
  const quiet = { checkpointIntervalMs: 0, checkpointBytes: 2 ** 40, foldIdleMs: 0, snapshotPollMs: 0 };
  const vols = { small: await vc.openVolume('small', quiet), thin: await vc.openVolume('thin', quiet) };
  const lat: Record<string, number[]> = { small: [], thin: [] };
  const ckpt: Record<string, number> = { small: 0, thin: 0 };
  // Warm both (first syncs build the tree paths), then interleave so noise hits both alike.
  for (const v of Object.values(vols)) {
    await v.write(0, randomBytes(4096));
    await v.flush();
  }
  for (let i = 0; i < ROUNDS; i++) {
    for (const [name, v] of Object.entries(vols)) {
      const off = Math.floor(Math.random() * (v.size / 4096 - 1)) * 4096;
      await v.write(off, randomBytes(4096));
      const t = process.hrtime.bigint();
      await v.flush();
      lat[name]!.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
  }
  // What the background work costs, once per volume after the rounds: a checkpoint of the tail.
  for (const [name, v] of Object.entries(vols)) {
    const t = process.hrtime.bigint();
    await v.checkpoint();
    ckpt[name] = Number(process.hrtime.bigint() - t) / 1e6;
  }
  for (const v of Object.values(vols)) await v.close();
  await vc.close();
  const rows = Object.entries(lat).map(([name, xs]) => {
    const s = [...xs].sort((a, b) => a - b);
    return { name, median: pct(s, 50), p90: pct(s, 90), p99: pct(s, 99), checkpointMs: ckpt[name]! };
  });
  console.log(`flush latency, one dirty 4 KiB write per flush, ${ROUNDS} rounds, 128 KiB blocks, R=2`);
  console.log(`volume          median ms   p90 ms   p99 ms   checkpoint of the ${ROUNDS}-write tail, ms`);
  for (const r of rows)
    console.log(`${r.name.padEnd(14)}  ${r.median.toFixed(2).padStart(9)}  ${r.p90.toFixed(2).padStart(7)}  ${r.p99.toFixed(2).padStart(7)}   ${r.checkpointMs.toFixed(1)}`);
  console.log(`ratio 1 TiB / 1 GiB (median): ${(rows[1]!.median / rows[0]!.median).toFixed(2)}`);
} finally {
  await c.stop();
}
