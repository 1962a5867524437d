// Re-replication rate after a node loss, next to raw TCP between two local processes in the same
// run: how close the rebalancer comes to what the machine can move.
//
//   node dist/bench/rereplication.js [--size 512MiB] [--reps 3] [--block-size 512KiB] [--peer-rpc tls|plain]
//
// Each repetition: etcd and four torusd on loopback (R=2, --rebalance-rate 10GiB so the rate
// limit is out of the way), a volume filled with --size of random data, one node killed with
// SIGKILL; once its lease is gone, `torusctl peer remove --force`. From the moment the ring
// changed until every live block (data and inode pages) has 2 copies again, counted by asking
// every node (HAS) every 100 ms. The bytes moved are the live blocks that had one reachable copy
// after the kill, times the block size. Then the same byte count is sent over one TCP connection
// (net.Socket, 1 MiB writes with backpressure) from this process to a child process that discards
// it and answers when it has it all (bench/lib/tcp.ts). Prints both rates and their ratio (medians over
// repetitions, with min and max), and the CPU the surviving torusd used per MiB re-replicated
// (user + system, from /proc): on a shared, noisy machine the rates swing with the neighbours'
// load, the CPU per MiB much less. Writes JSON to bench/results/rereplication-<date>.json.
import { randomFillSync } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/units.js';
import { openVolumeClient } from '../test/helpers/certs.js';
import { startCluster } from '../test/helpers/cluster.js';
import { countCopies } from '../test/helpers/copies.js';
import { REPO, ok } from '../test/helpers/procs.js';
import { cpuTimes, formatSpread, spread } from './lib/probes.js';
import { rawTcp } from './lib/tcp.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '512MiB' },
    reps: { type: 'string', default: '3' },
    'block-size': { type: 'string', default: '512KiB' },
    /** tls (the default, as deployed) or plain (--insecure-peer-network): the raw TCP reference is plaintext either way. */
    'peer-rpc': { type: 'string', default: 'tls' },
  },
});
if (values['peer-rpc'] !== 'tls' && values['peer-rpc'] !== 'plain') throw new Error('--peer-rpc is tls or plain');
const PLAIN = values['peer-rpc'] === 'plain';
// The in-process client and every torusctl follow the nodes.
if (PLAIN) process.env.TORUS_INSECURE_PEER_NETWORK = '1';
const TORUSD = ['--rebalance-rate', '10GiB', '--heartbeat', '1s', '--gc-interval', '0', ...(PLAIN ? ['--insecure-peer-network'] : [])];
const SIZE = parseSize(values.size);
const REPS = Math.max(1, Number(values.reps));
const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Rep {
  liveBlocks: number;
  blocksToCopy: number;
  bytesToCopy: number;
  seconds: number;
  mibPerSec: number;
  tcpSeconds: number;
  tcpMibPerSec: number;
  ratio: number;
  fillMibPerSec: number;
  /** User + system CPU of the surviving torusd while re-replicating, per MiB copied. */
  cpuMsPerMiB: number;
}

async function rep(i: number): Promise<Rep> {
  const c = await startCluster({
    nodes: 4,
    replication: 2,
    blockSize: values['block-size'],
    size: `${Math.max(1, Math.ceil((SIZE * 2) / (1024 * MiB)))}GiB`,
    torusdArgs: TORUSD,
  });
  try {
    const C = ['-C', c.etcd.endpoint];
    await ok('torusctl', [...C, 'volume', 'create-block', 'r', String(SIZE)]);
    const vc = await openVolumeClient(c.meta);
    const vol = await vc.openVolume('r');
    const chunk = Buffer.alloc(4 * MiB);
    const tf = Date.now();
    for (let off = 0; off < SIZE; off += chunk.length) {
      randomFillSync(chunk);
      await vol.write(off, chunk.subarray(0, Math.min(chunk.length, SIZE - off)));
    }
    await vol.close();
    await vc.close();
    const fillMibPerSec = SIZE / MiB / ((Date.now() - tf) / 1000);

    const victim = c.uuidOf(3);
    await c.kill(3);
    // The lease runs out (three 1 s heartbeats): the node is gone for good, as far as etcd knows.
    for (let k = 0; (await c.meta.getPeers()).some((p) => p.uuid === victim); k++) {
      if (k > 100) throw new Error('the killed node never left the registry');
      await sleep(100);
    }
    const before = await countCopies(c.meta, c.client);
    const blocksToCopy = before.histogram['1'] ?? 0;
    if ((before.histogram['0'] ?? 0) > 0) throw new Error(`blocks lost: ${JSON.stringify(before.histogram)}`);
    const survivors = c.nodes.slice(0, 3).map((n) => n.proc.pid!);
    const cpu = (): number => survivors.reduce((a, pid) => a + cpuTimes(pid).user + cpuTimes(pid).sys, 0);
    const cpu0 = cpu();
    await ok('torusctl', [...C, 'peer', 'remove', '--force', victim]);
    const t0 = Date.now();
    let seconds = -1;
    let cpuSeconds = 0;
    // Bounded: two minutes is far beyond any sane rate for the sizes this runs with.
    while (Date.now() - t0 < 120_000) {
      const r = await countCopies(c.meta, c.client);
      if (r.min >= 2) {
        seconds = (Date.now() - t0) / 1000;
        cpuSeconds = cpu() - cpu0;
        break;
      }
      await sleep(100);
    }
    if (seconds < 0) throw new Error('re-replication did not finish within 120 s');
    const bytesToCopy = blocksToCopy * c.blockSize;
    const tcpSeconds = (await rawTcp({ bytes: bytesToCopy })).seconds;
    const out: Rep = {
      liveBlocks: before.live,
      blocksToCopy,
      bytesToCopy,
      seconds,
      mibPerSec: bytesToCopy / MiB / seconds,
      tcpSeconds,
      tcpMibPerSec: bytesToCopy / MiB / tcpSeconds,
      ratio: 0,
      fillMibPerSec,
      cpuMsPerMiB: (cpuSeconds * 1000) / (bytesToCopy / MiB),
    };
    out.ratio = out.mibPerSec / out.tcpMibPerSec;
    console.log(
      `rep ${i + 1}: ${blocksToCopy}/${before.live} blocks (${(bytesToCopy / MiB).toFixed(0)} MiB) re-replicated in ${seconds.toFixed(2)} s = ${out.mibPerSec.toFixed(1)} MiB/s; ` +
        `torusd CPU ${out.cpuMsPerMiB.toFixed(1)} ms/MiB; TCP ${out.tcpMibPerSec.toFixed(0)} MiB/s; ratio ${out.ratio.toFixed(3)}`,
    );
    return out;
  } finally {
    await c.stop();
  }
}

const started = new Date();
console.log(`re-replication after a node loss: 4 nodes, R=2, ${values['block-size']} blocks, ${(SIZE / MiB).toFixed(0)} MiB volume, ${REPS} repetition(s), peer RPC ${values['peer-rpc']}`);
const reps: Rep[] = [];
for (let i = 0; i < REPS; i++) reps.push(await rep(i));

const rr = spread(reps.map((r) => r.mibPerSec));
const tcp = spread(reps.map((r) => r.tcpMibPerSec));
const ratio = spread(reps.map((r) => r.ratio));
const cpuPerMiB = spread(reps.map((r) => r.cpuMsPerMiB));
const f = formatSpread;
console.log('');
console.log(`re-replication      ${f(rr)} MiB/s`);
console.log(`torusd CPU          ${f(cpuPerMiB)} ms per MiB`);
console.log(`raw TCP (1 conn)    ${f(tcp, 0)} MiB/s`);
console.log(`ratio               ${f(ratio, 3)}`);
const dir = join(REPO, 'bench', 'results');
mkdirSync(dir, { recursive: true });
const file = join(dir, `rereplication-${started.toISOString().slice(0, 10)}.json`);
writeFileSync(
  file,
  `${JSON.stringify(
    {
      date: started.toISOString(),
      settings: { nodes: 4, replication: 2, blockSize: values['block-size'], volumeBytes: SIZE, reps: REPS, torusd: TORUSD.join(' '), peerRpc: values['peer-rpc'] },
      machine: { cpus: cpus().length, node: process.version },
      rereplicationMiBps: rr,
      torusdCpuMsPerMiB: cpuPerMiB,
      tcpMiBps: tcp,
      ratio,
      reps,
    },
    null,
    2,
  )}\n`,
);
console.log(`wrote ${file}`);
process.exit(0);
