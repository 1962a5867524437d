// The background scrub on a real node: how fast one pass reads and checks a node's data with the
// rate limit out of the way (page cache cold, then warm), what CPU that costs, and how long after
// the pass reaches a flipped byte the bad copy is replaced.
//
//   node dist/bench/scrub.js [--size 1GiB] [--block-size 128KiB] [--reps 3]
//
// Each repetition: etcd and three torusd on loopback (R=2, scrubbing off), a volume filled with
// --size of random data. Node 0 is killed; one byte is flipped in the block in its middle slot;
// its files are evicted from the page cache; it is restarted with `--scrub-interval 24h
// --scrub-rate 10GiB`, so a pass starts at once, unthrottled. Timed from the pass's own start and
// end (its published status), CPU from /proc/PID/stat over the pass; the flipped block's "bad
// copy found" and "replaced" log lines give the find and repair times. Then scrub.json is removed
// and the node restarted again for a pass over a warm page cache. Writes JSON to
// bench/results/scrub-<date>.json.
import { randomFillSync } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { blockRefKey, formatBlockRef } from '../src/core/ids.js';
import type { ScrubInfo } from '../src/core/models.js';
import { parseSize } from '../src/core/units.js';
import { FileBlockStore } from '../src/storage/file-store.js';
import { DATA_FILE, TABLE_FILE } from '../src/storage/format.js';
import { dropCache } from '../src/storage/page-cache.js';
import { VolumeClient } from '../src/volume/client.js';
import { startCluster, type TestCluster } from '../test/helpers/cluster.js';
import { clientSecurity } from '../test/helpers/certs.js';
import { REPO, ok, startTorusd } from '../test/helpers/procs.js';
import { cpuTimes, formatSpread, spread } from './lib/probes.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1GiB' },
    reps: { type: 'string', default: '3' },
    'block-size': { type: 'string', default: '128KiB' },
  },
});
const SIZE = parseSize(values.size);
const REPS = Math.max(1, Number(values.reps));
const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const STORE_SIZE = `${Math.max(1, Math.ceil((SIZE * 1.5) / (1024 * MiB)))}GiB`;

interface Pass {
  bytes: number;
  seconds: number;
  mibPerSec: number;
  cpuSeconds: number;
  cpuSecondsPerGiB: number;
  /** CPU time over wall time during the pass (1 = one core busy). */
  cpuShare: number;
}

interface Rep {
  cold: Pass;
  warm: Pass;
  /** The flipped block: where in the pass, when found, and how long the repair took after that. */
  flippedAtShare: number;
  foundAfterSeconds: number;
  repairMs: number;
}

function cpuSeconds(pid: number): number {
  const t = cpuTimes(pid);
  return t.user + t.sys;
}

function evict(dataDir: string): void {
  for (const name of [DATA_FILE, TABLE_FILE]) {
    const fd = openSync(join(dataDir, 'block', name), 'r');
    try {
      dropCache(fd);
    } finally {
      closeSync(fd);
    }
  }
}

async function scrubOf(c: TestCluster, address: string): Promise<ScrubInfo | undefined> {
  return (await c.meta.getPeers()).find((p) => p.address === address)?.scrub;
}

/** Restarts node 0 scrubbing unthrottled, and times the pass it starts at once (without saved progress). */
async function timedPass(c: TestCluster, cold: boolean): Promise<{ pass: Pass; log: () => string }> {
  const old = c.nodes[0]!;
  await old.kill('SIGKILL');
  rmSync(join(old.dataDir, 'scrub.json'), { force: true });
  if (cold) evict(old.dataDir);
  const node = await startTorusd(c.etcd.endpoint, {
    dataDir: old.dataDir,
    peerPort: old.peerPort,
    httpPort: old.httpPort,
    size: STORE_SIZE,
    extra: ['--scrub-interval', '24h', '--scrub-rate', '10GiB', '--gc-interval', '0'],
  });
  c.nodes[0] = node;
  const pid = node.proc.pid!;
  let startCpu = cpuSeconds(pid);
  let started = false;
  const deadline = Date.now() + 600_000;
  for (;;) {
    if (Date.now() > deadline) throw new Error('the scrub pass did not finish within 10 minutes');
    const s = await scrubOf(c, node.address);
    if (s && !started && s.passStartedAt) {
      started = true;
      startCpu = cpuSeconds(pid);
    }
    if (s && s.lastFinishedAt) {
      const cpu = cpuSeconds(pid) - startCpu;
      const seconds = (s.lastFinishedAt - s.lastStartedAt) / 1000;
      const gib = s.lastBytes / (1024 * MiB);
      return {
        pass: { bytes: s.lastBytes, seconds, mibPerSec: s.lastBytes / MiB / seconds, cpuSeconds: cpu, cpuSecondsPerGiB: cpu / gib, cpuShare: cpu / seconds },
        log: node.log,
      };
    }
    await sleep(50);
  }
}

function logTime(log: string, msg: string, ref: string): number {
  for (const line of log.split('\n')) {
    if (!line.includes(msg) || !line.includes(ref)) continue;
    return (JSON.parse(line) as { time: number }).time;
  }
  throw new Error(`no "${msg}" line for ${ref} in the node's log`);
}

async function rep(i: number): Promise<Rep> {
  const c = await startCluster({ nodes: 3, replication: 2, blockSize: values['block-size'], size: STORE_SIZE, torusdArgs: ['--scrub-interval', '0', '--gc-interval', '0'] });
  try {
    const C = ['-C', c.etcd.endpoint];
    await ok('torusctl', [...C, 'volume', 'create-block', 's', String(SIZE)]);
    const vc = await VolumeClient.open(c.meta, { rpc: { security: await clientSecurity() } });
    const vol = await vc.openVolume('s');
    const chunk = Buffer.alloc(4 * MiB);
    for (let off = 0; off < SIZE; off += chunk.length) {
      randomFillSync(chunk);
      await vol.write(off, chunk.subarray(0, Math.min(chunk.length, SIZE - off)));
    }
    await vol.close();
    await vc.close();

    // The block in node 0's middle slot gets one flipped byte, while the node is down.
    const dir = c.nodes[0]!.dataDir;
    await c.nodes[0]!.kill('SIGKILL'); // the store is opened here to find the block
    const store = await FileBlockStore.open({ dir: join(dir, 'block'), blockSize: c.blockSize, sizeBytes: parseSize(STORE_SIZE) });
    const bySlot = await store.refsInSlots(0, store.numBlocks());
    const victim = bySlot[Math.floor(bySlot.length / 2)]!;
    const loc = store.locate(victim)!;
    await store.close();
    const fd = openSync(join(dir, 'block', DATA_FILE), 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, loc.dataOffset + 1000);
    b[0] = b[0]! ^ 0x01;
    writeSync(fd, b, 0, 1, loc.dataOffset + 1000);
    closeSync(fd);

    const cold = await timedPass(c, true);
    const s = (await scrubOf(c, c.nodes[0]!.address))!;
    if (s.errors !== 1 || s.repaired !== 1) throw new Error(`expected 1 bad copy found and repaired, got ${s.errors} and ${s.repaired}`);
    const ref = formatBlockRef(victim);
    const found = logTime(cold.log(), 'scrub: bad copy found', ref);
    const replaced = logTime(cold.log(), 'scrub: bad copy replaced', ref);

    // Warm: the pass just read everything through the page cache, which is not evicted this time.
    const { pass: warm } = await timedPass(c, false);

    const out: Rep = {
      cold: cold.pass,
      warm,
      flippedAtShare: bySlot.findIndex((r) => blockRefKey(r) === blockRefKey(victim)) / bySlot.length,
      foundAfterSeconds: (found - s.lastStartedAt) / 1000,
      repairMs: replaced - found,
    };
    console.log(
      `rep ${i + 1}: cold ${(cold.pass.bytes / MiB).toFixed(0)} MiB in ${cold.pass.seconds.toFixed(2)} s = ${cold.pass.mibPerSec.toFixed(0)} MiB/s, ` +
        `${cold.pass.cpuSecondsPerGiB.toFixed(2)} CPU s/GiB; warm ${warm.mibPerSec.toFixed(0)} MiB/s, ${warm.cpuSecondsPerGiB.toFixed(2)} CPU s/GiB; ` +
        `flipped byte found ${out.foundAfterSeconds.toFixed(2)} s into the pass, repaired ${out.repairMs} ms later`,
    );
    return out;
  } finally {
    await c.stop();
  }
}

const started = new Date();
console.log(`scrub: 3 nodes, R=2, ${values['block-size']} blocks, ${(SIZE / MiB).toFixed(0)} MiB volume, ${REPS} repetition(s)`);
const reps: Rep[] = [];
for (let i = 0; i < REPS; i++) reps.push(await rep(i));

const summary = {
  coldMiBps: spread(reps.map((r) => r.cold.mibPerSec)),
  coldCpuSecondsPerGiB: spread(reps.map((r) => r.cold.cpuSecondsPerGiB)),
  coldCpuShare: spread(reps.map((r) => r.cold.cpuShare)),
  warmMiBps: spread(reps.map((r) => r.warm.mibPerSec)),
  warmCpuSecondsPerGiB: spread(reps.map((r) => r.warm.cpuSecondsPerGiB)),
  warmCpuShare: spread(reps.map((r) => r.warm.cpuShare)),
  foundAfterSeconds: spread(reps.map((r) => r.foundAfterSeconds)),
  repairMs: spread(reps.map((r) => r.repairMs)),
};
const f = formatSpread;
console.log('');
console.log(`pass, cold cache    ${f(summary.coldMiBps, 0)} MiB/s, ${f(summary.coldCpuSecondsPerGiB, 2)} CPU s/GiB, ${f(summary.coldCpuShare, 2)} of a core`);
console.log(`pass, warm cache    ${f(summary.warmMiBps, 0)} MiB/s, ${f(summary.warmCpuSecondsPerGiB, 2)} CPU s/GiB, ${f(summary.warmCpuShare, 2)} of a core`);
console.log(`flipped byte        found ${f(summary.foundAfterSeconds, 2)} s into the pass (block in the middle slot), repaired ${f(summary.repairMs, 0)} ms later`);
const dir = join(REPO, 'bench', 'results');
mkdirSync(dir, { recursive: true });
const file = join(dir, `scrub-${started.toISOString().slice(0, 10)}.json`);
writeFileSync(
  file,
  `${JSON.stringify(
    {
      date: started.toISOString(),
      settings: { nodes: 3, replication: 2, blockSize: values['block-size'], volumeBytes: SIZE, reps: REPS, torusd: '--scrub-interval 24h --scrub-rate 10GiB --gc-interval 0' },
      machine: { cpus: cpus().length, node: process.version },
      ...summary,
      reps,
    },
    null,
    2,
  )}\n`,
);
console.log(`wrote ${file}`);
process.exit(0);
