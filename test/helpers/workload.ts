// A client workload for failure tests and benchmarks: opens a volume for writing and, round after
// round, writes a few random pieces, syncs, and reads back a random range, checking it against
// an in-memory model of the volume. Each outcome is one JSON line on stdout with its wall-clock
// time, so a caller in another process can split latencies by the phase of a failure. Failures
// are reported and the loop goes on (a failed sync keeps its changes dirty; the next one retries).
//
//   node workload.js ETCD VOLUME [--writes N] [--max-write BYTES] [--read BYTES] [--interval MS]
//                                [--fill] [--max-ms MS]
//
// Lines: {ev:"opened"}, {ev:"filled"}, {ev:"sync", n, t, ms, writeMs, ok, code?, msg?},
// {ev:"read", t, ms, ok, code?, msg?, mismatch?}. On SIGTERM (or after --max-ms) it stops, tries
// one last sync, reads the whole volume back against the model, and prints {ev:"closed"} with
// `synced` (sha256 of the state its last successful sync committed), `inflight` (sha256 of the
// state of the first failed sync after it, which may have committed although its caller saw an
// error, or null), `finalSyncOk`, `verified` (the whole volume read back equals the model) and
// `verifyError` (that read failed), then exits 0.
import { createHash, randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { toTorusError } from '../../src/core/errors.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { openVolumeClient } from './certs.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    writes: { type: 'string', default: '4' },
    'max-write': { type: 'string', default: '65536' },
    read: { type: 'string', default: '65536' },
    interval: { type: 'string', default: '50' },
    fill: { type: 'boolean', default: false },
    'max-ms': { type: 'string', default: '600000' },
  },
});
const [etcd, name] = positionals;
if (!etcd || !name) {
  process.stderr.write('usage: workload.js ETCD VOLUME [options]\n');
  process.exit(2);
}
const WRITES = Number(values.writes);
const MAX_WRITE = Number(values['max-write']);
const READ = Number(values.read);
const INTERVAL = Number(values.interval);
const deadline = Date.now() + Number(values['max-ms']);

const emit = (o: Record<string, unknown>): void => void process.stdout.write(`${JSON.stringify(o)}\n`);
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const errInfo = (err: unknown): { code: string; msg: string } => {
  const e = toTorusError(err);
  return { code: e.code, msg: e.message };
};
/**
 * How the client routed around failures: spills (a block put on the next peer instead of a failed
 * owner), read fallbacks (a read served by another replica) and journal moves (the journal taken
 * to replicas that work, docs/journal.md).
 */
const dist = (): { spills: number; fallbacks: number; journalMoves: number } => ({
  spills: vc.block.distributor.stats.spills,
  fallbacks: vc.block.distributor.stats.replicaFallbacks,
  journalMoves: vol.stats.journalMoves,
});
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let stopping = false;
/** What the loop is doing, for SIGUSR2 (diagnosing a hang). */
let doing = 'starting';
process.on('SIGUSR2', () => {
  try {
    const d = vc.block.distributor;
    emit({ ev: 'state', t: Date.now(), doing, unflushedBytes: d.unflushedBytes, stats: d.stats });
  } catch {
    emit({ ev: 'state', t: Date.now(), doing });
  }
});
process.on('SIGTERM', () => {
  stopping = true;
  // Whatever happens in the last sync (an unreachable etcd costs a few deadlines), the caller
  // gets its answer or an exit within bounded time.
  setTimeout(() => {
    process.stderr.write('workload: forced exit 30 s after SIGTERM\n');
    process.exit(4);
  }, 30_000).unref();
});

const meta = new EtcdMetadata({ endpoints: etcd.split(',') });
const vc = await openVolumeClient(meta);
const vol = await vc.openVolume(name);
const size = vol.size;
let model = await vol.read(0, size);
emit({ ev: 'opened', t: Date.now(), pid: process.pid, size });

/** The volume as the last successful sync left it, and as the first failed one since would have. */
let synced = Buffer.from(model);
let inflight: Buffer | null = null;

if (values.fill) {
  const t = Date.now();
  model = randomBytes(size);
  await vol.write(0, model);
  await vol.flush();
  synced = Buffer.from(model);
  emit({ ev: 'filled', t, ms: Date.now() - t });
}

let n = 0;
while (!stopping && Date.now() < deadline) {
  n++;
  const t = Date.now();
  let writeMs = 0;
  try {
    doing = `write ${n}`;
    for (let i = 0; i < WRITES; i++) {
      const off = Math.floor(Math.random() * (size - 1));
      const d = randomBytes(Math.min(size - off, 1 + Math.floor(Math.random() * MAX_WRITE)));
      await vol.write(off, d);
      d.copy(model, off);
    }
    writeMs = Date.now() - t;
  } catch (err) {
    emit({ ev: 'sync', n, t, ms: Date.now() - t, writeMs: Date.now() - t, ok: false, phase: 'write', ...errInfo(err) });
    await sleep(Math.max(INTERVAL, 500));
    continue;
  }
  const attempt = Buffer.from(model);
  try {
    doing = `sync ${n}`;
    await vol.flush();
    synced = attempt;
    inflight = null;
    emit({ ev: 'sync', n, t, ms: Date.now() - t, writeMs, ok: true, ...dist() });
  } catch (err) {
    inflight ??= attempt;
    emit({ ev: 'sync', n, t, ms: Date.now() - t, writeMs, ok: false, phase: 'flush', ...errInfo(err), ...dist() });
  }
  const off = Math.floor(Math.random() * Math.max(1, size - READ));
  const rt = Date.now();
  doing = `read ${n}`;
  try {
    const got = await vol.read(off, Math.min(READ, size - off));
    const mismatch = !got.equals(model.subarray(off, off + got.length));
    emit({ ev: 'read', t: rt, ms: Date.now() - rt, ok: !mismatch, ...(mismatch ? { mismatch: true, off } : {}) });
  } catch (err) {
    emit({ ev: 'read', t: rt, ms: Date.now() - rt, ok: false, ...errInfo(err) });
  }
  doing = `sleep ${n}`;
  await sleep(INTERVAL);
}
doing = 'stopping';

let finalSyncOk = false;
let finalError: { code: string; msg: string } | undefined;
try {
  const attempt = Buffer.from(model);
  await vol.flush();
  synced = attempt;
  inflight = null;
  finalSyncOk = true;
} catch (err) {
  finalError = errInfo(err);
}
let verified = false;
let verifyError: { code: string; msg: string } | undefined;
try {
  verified = (await vol.read(0, size)).equals(model);
} catch (err) {
  verifyError = errInfo(err);
}
await vol.close().catch(() => undefined);
await vc.close().catch(() => undefined);
await meta.close().catch(() => undefined);
const stats = dist();
emit({ ev: 'closed', t: Date.now(), rounds: n, ...stats, synced: sha(synced), inflight: inflight ? sha(inflight) : null, model: sha(model), finalSyncOk, verified, ...(finalError ? { finalError } : {}), ...(verifyError ? { verifyError } : {}) });
process.exit(0);
