import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { Etcd3 } from 'etcd3';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { checkJournalState, parseWriterLog } from '../helpers/journal-check.js';
import { eventually, ok, REPO } from '../helpers/procs.js';
import { join } from 'node:path';
import { openVolumeClient } from '../helpers/certs.js';

// Garbage collection on real storage nodes (GC every second here): what a deleted volume or a
// superseded write held comes back, and GC racing a stream of flushes never loses a flushed byte.

let c: TestCluster;
let C: string[];
const MiB = 1024 * 1024;

async function used(): Promise<number> {
  return (await c.meta.getPeers()).reduce((s, p) => s + p.usedBlocks, 0);
}

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, blockSize: '64KiB', size: '256MiB', torusdArgs: ['--gc-interval', '1s'] });
  C = ['-C', c.etcd.endpoint];
});
after(async () => {
  await c?.stop();
});

test('superseded blocks are collected, and a deleted volume gives all its space back', async () => {
  const baseline = await used();
  await ok('torusctl', [...C, 'volume', 'create-block', 'g', '16MiB']);
  const vc = await openVolumeClient(c.meta);
  const vol = await vc.openVolume('g');
  await vol.write(0, randomBytes(8 * MiB));
  await vol.flush();
  const data = randomBytes(8 * MiB);
  await vol.write(0, data); // supersedes all 128 blocks of the first write
  // Folded into whole blocks and the run chain compacted: the journal's log blocks, which held
  // both writes, are named by nothing any more (docs/journal.md).
  await vol.foldAll();
  await vol.close();
  // 128 live data blocks + a page, at R=2; the log blocks and run pages go.
  await eventually('superseded blocks collected', async () => (await used()) === baseline + 2 * 129, 30_000);
  const ro = await vc.openVolume('g', { readOnly: true });
  assert.ok((await ro.read(0, 8 * MiB)).equals(data));
  await vc.close();
  await ok('torusctl', [...C, 'volume', 'delete', 'g']);
  await eventually('space returned', async () => (await used()) === baseline, 30_000);
  const metrics = await (await fetch(`http://127.0.0.1:${c.nodes[0]!.httpPort}/metrics`)).text();
  assert.match(metrics, /^torus_gc_deleted_blocks_total [1-9]/m);
});

test('GC racing a stream of flushes (and the checkpoints and folds they bring) from another process never loses a flushed byte', async () => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'race', '4MiB']);
  const script = join(REPO, 'dist', 'test', 'helpers', 'volume-writer.js');
  // Small checkpoints and eager folds, so GC meets runs, sealed and open log blocks and folded blocks.
  const child = spawn(process.execPath, [script, c.etcd.endpoint, 'race', '--checkpoint-bytes', '262144', '--segments-per-block', '4'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  // Several GC passes (one a second on every node) run while it flushes.
  await eventually('flushes across several GC passes', async () => (out.match(/^flushed /gm)?.length ?? 0) >= 30, 90_000);
  await new Promise((r) => setTimeout(r, 3000));
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  // Release the dead writer's lock without waiting for its lease, then let GC run some more.
  const lock = (await c.meta.kv().list('/torus/volumemeta/')).entries.find((e) => e.key.endsWith('/lock'));
  if (lock) {
    const raw = new Etcd3({ hosts: `http://${c.etcd.endpoint}` });
    await raw.leaseClient.leaseRevoke({ ID: lock.lease });
    raw.close();
  }
  await new Promise((r) => setTimeout(r, 2500));
  const vc = await openVolumeClient(c.meta);
  const vol = await vc.openVolume('race');
  checkJournalState(await vol.read(0, 4 * MiB), Buffer.alloc(4 * MiB), parseWriterLog(out));
  await vol.close();
  await vc.close();
});

test('an idle node skips GC passes whose outcome cannot differ; a change to volume metadata brings one back', async () => {
  const gc = async (): Promise<{ runs: number; skipped: number }> => {
    const m = await (await fetch(`http://127.0.0.1:${c.nodes[0]!.httpPort}/metrics`)).text();
    const n = (name: string): number => Number(new RegExp(`^${name} (\\d+)`, 'm').exec(m)?.[1] ?? NaN);
    return { runs: n('torus_gc_runs_total'), skipped: n('torus_gc_skipped_total') };
  };
  // Once the earlier tests' deletions and drains are done, passes (one a second) are skipped.
  let quiet = await gc();
  await eventually(
    'two GC passes in a row skipped, none run',
    async () => {
      const a = await gc();
      for (let i = 0; i < 100 && (await gc()).skipped < a.skipped + 2; i++) await new Promise((r) => setTimeout(r, 100));
      quiet = await gc();
      return quiet.skipped >= a.skipped + 2 && quiet.runs === a.runs;
    },
    60_000,
  );
  await ok('torusctl', [...C, 'volume', 'create-block', 'idle-change', '1MiB']);
  await eventually('a pass ran after the new volume', async () => (await gc()).runs > quiet.runs, 30_000);
});
