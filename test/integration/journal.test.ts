import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Etcd3 } from 'etcd3';
import { VolumeMeta } from '../../src/volume/meta.js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { checkJournalState, parseWriterLog } from '../helpers/journal-check.js';
import { eventually, ok, REPO } from '../helpers/procs.js';
import { openVolumeClient } from '../helpers/certs.js';

// The journal (docs/journal.md) against real processes: three torusd under the power-cut harness
// and a writer process (test/helpers/volume-writer.ts) that writes and flushes with small
// checkpoint thresholds and eager folds, so appends, seals, checkpoints, etcd commits and folds
// all happen all the time. The writer is killed, replicas lose power, both at once, at random
// moments; every time, the next opener finds every acknowledged flush and, of the rest, a
// prefix. Bounded: a fixed number of rounds, each with its own deadline.

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const ROUNDS = 6;
const WRITER = join(REPO, 'dist', 'test', 'helpers', 'volume-writer.js');

let c: TestCluster;
let C: string[];

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, blockSize: '64KiB', size: '512MiB', powercut: true });
  C = ['-C', c.etcd.endpoint];
});
after(async () => {
  await c?.stop();
});

interface Writer {
  readonly proc: ChildProcess;
  out: string;
  flushes(): number;
}

function startWriter(volume: string): Writer {
  const proc = spawn(process.execPath, [WRITER, c.etcd.endpoint, volume, '--max-write', '100000', '--checkpoint-bytes', '262144', '--segments-per-block', '4', '--fold-idle-ms', '500'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const w: Writer = { proc, out: '', flushes: () => w.out.match(/^flushed /gm)?.length ?? 0 };
  proc.stdout!.on('data', (d: Buffer) => (w.out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (w.out += `stderr: ${d.toString()}`));
  return w;
}

async function kill(w: Writer): Promise<void> {
  if (w.proc.exitCode === null && w.proc.signalCode === null) {
    w.proc.kill('SIGKILL');
    await new Promise((r) => w.proc.once('exit', r));
  }
}

/** The dead writer's lock, released without waiting out its lease. */
async function releaseLock(volume: string): Promise<void> {
  const id = (await new VolumeMeta(c.meta.kv()).get(volume)).id;
  const e = await c.meta.kv().get(`/torus/volumemeta/${id}/lock`);
  if (!e?.lease) return;
  const raw = new Etcd3({ hosts: `http://${c.etcd.endpoint}` });
  await raw.leaseClient.leaseRevoke({ ID: e.lease }).catch(() => undefined);
  raw.close();
}

test('writers killed and replicas losing power at random moments of a write+flush stream: every acknowledged flush survives', async () => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'j', '8MiB']);
  let image: Buffer = Buffer.alloc(SIZE);
  const vc = await openVolumeClient(c.meta);
  const faults: string[] = [];
  let undone = 0;
  let replayed = 0;
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const w = startWriter('j');
      await eventually(`round ${round}: flushes`, async () => w.flushes() >= 3 || (w.proc.exitCode !== null ? Promise.reject(new Error(w.out)) : false), 60_000);
      const fault = round % 3;
      const victim = Math.floor(Math.random() * c.nodes.length);
      const mode = Math.random() < 0.5 ? 'none' : 'random';
      if (fault === 0) {
        // The writer alone, at a random point of its stream.
        await new Promise((r) => setTimeout(r, Math.random() * 300));
        await kill(w);
        faults.push(`writer@${round}`);
      } else if (fault === 1) {
        // A replica loses power under the writer, which carries on (its journal moves if the
        // replica was one of its own), then the writer dies too.
        const report = await c.powerCut(victim, mode);
        undone += Object.values(report.undone).reduce((a, b) => a + b, 0);
        const before = w.flushes();
        await eventually(`round ${round}: flushes after the cut`, async () => w.flushes() >= before + 2 || (w.proc.exitCode !== null ? Promise.reject(new Error(w.out)) : false), 60_000);
        await kill(w);
        faults.push(`node${victim}:${mode} then writer@${round}`);
      } else {
        // Writer and a replica at the same instant.
        await Promise.all([kill(w), c.powerCut(victim, mode).then((r) => (undone += Object.values(r.undone).reduce((a, b) => a + b, 0)))]);
        faults.push(`writer+node${victim}:${mode}@${round}`);
      }
      await releaseLock('j');
      // The next writer fences the journal, replays its tail and checkpoints at close.
      const vol = await vc.openVolume('j');
      const got = await vol.read(0, SIZE);
      replayed += checkJournalState(got, image, parseWriterLog(w.out));
      image = got;
      await vol.close();
    }
    // And the whole cluster loses power: what the last close committed is there.
    for (const r of await c.powerCutAll('none')) undone += Object.values(r.undone).reduce((a, b) => a + b, 0);
    const vol = await vc.openVolume('j', { readOnly: true });
    assert.ok((await vol.read(0, SIZE)).equals(image), 'after a power cut of every node');
    console.log(`journal crash test: ${ROUNDS} rounds (${faults.join(', ')}), ${undone} unsynced changes undone, ${replayed} unacknowledged writes found replayed`);
  } finally {
    await vc.close();
  }
});

test('two writers race: once the second has fenced the journal, the first gets no flush acknowledged', async () => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'race', '8MiB']);
  const a = startWriter('race');
  await eventually('A flushes', async () => a.flushes() >= 3, 60_000);
  // A loses its lock without knowing (its lease revoked behind its back) and keeps writing; B
  // opens the volume: it fences A's journal and replays it.
  await releaseLock('race');
  const vc = await openVolumeClient(c.meta);
  try {
    const b = await vc.openVolume('race');
    const seen = await b.read(0, SIZE);
    // A goes on for a while: whatever it prints now, no flush of its may be acknowledged that B
    // did not see at its open.
    await new Promise((r) => setTimeout(r, 2000));
    await kill(a);
    checkJournalState(seen, Buffer.alloc(SIZE), parseWriterLog(a.out));
    assert.match(a.out, /^failed \d+ LOCKED$/m, 'A was told');
    await b.close();
  } finally {
    await kill(a);
    await vc.close();
  }
});

test('a snapshot taken during a write+flush stream holds every write flushed before it was asked for', async () => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'snaps', '8MiB']);
  const w = startWriter('snaps');
  const taken: { name: string; acked: number }[] = [];
  try {
    for (let k = 0; k < 4; k++) {
      await eventually('flushes', async () => w.flushes() >= 3 * (k + 1), 60_000);
      // What the writer had acknowledged when the snapshot was asked for.
      const acked = parseWriterLog(w.out).acked;
      const name = `s${k}`;
      await ok('torusctl', [...C, 'block', 'snapshot', 'create', `snaps@${name}`]);
      taken.push({ name, acked });
    }
  } finally {
    await kill(w);
  }
  const log = parseWriterLog(w.out);
  const vc = await openVolumeClient(c.meta);
  try {
    for (const s of taken) {
      const v = await vc.openVolume('snaps', { snapshot: s.name });
      checkJournalState(await v.read(0, SIZE), Buffer.alloc(SIZE), { writes: log.writes, acked: s.acked });
      await v.close();
    }
  } finally {
    await vc.close();
  }
});
