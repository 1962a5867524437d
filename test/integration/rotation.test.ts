import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { createCa, issueCertificates, resolvePeerSecurity } from '../../src/cli/shared/certs.js';
import { VolumeClient } from '../../src/volume/client.js';
import { testCerts } from '../helpers/certs.js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { checkJournalState, parseWriterLog } from '../helpers/journal-check.js';
import { REPO, eventually, ok, startTorusd } from '../helpers/procs.js';

// A new cluster CA rolled out node by node under a running write+flush stream (docs/security.md,
// "Rotating the CA"): every node trusts both CAs, then gets a certificate from the new one, then
// the old CA is dropped. The writer never stops; at the end every flush it was told succeeded is
// in the volume, read by a client holding only the new CA's certificate, and the old CA's
// certificates no longer get in.

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const WRITER = join(REPO, 'dist', 'test', 'helpers', 'volume-writer.js');

let c: TestCluster;
let oldCa: string;
let newCa: string;
let work: string;
let bundle: Buffer;

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, size: '256MiB' });
  oldCa = (await testCerts()).caDir;
  work = mkdtempSync(join(oldCa, 'rotation-'));
  newCa = join(work, 'new-ca');
  await createCa(newCa, { name: 'Torus cluster CA 2' });
  bundle = Buffer.concat([readFileSync(join(oldCa, 'ca-cert.pem')), readFileSync(join(newCa, 'ca-cert.pem'))]);
});

after(async () => {
  await c?.stop();
});

/** Certificates for `name` from `ca` (uuid kept), trusting `trust`. */
async function certs(ca: string, name: string, trust: Buffer, uuid?: string): Promise<string> {
  const out = mkdtempSync(join(work, `${name}-`));
  await issueCertificates(ca, name, { out, ...(uuid ? { uuid } : {}) });
  writeFileSync(join(out, 'ca-cert.pem'), trust);
  return out;
}

/** Node i restarted on its data dir and ports with these certificates. */
async function restartWith(i: number, dir: string): Promise<void> {
  const old = c.nodes[i]!;
  await old.kill('SIGTERM');
  c.nodes[i] = await startTorusd(c.etcd.endpoint, { dataDir: old.dataDir, peerPort: old.peerPort, httpPort: old.httpPort, size: '256MiB', extra: ['--tls-certificates', dir] });
}

test('a new CA rolled out node by node under a write+flush stream: no flush lost, the old CA locked out at the end', async () => {
  const C = ['-C', c.etcd.endpoint];
  await ok('torusctl', [...C, 'volume', 'create-block', 'rot', String(SIZE)]);
  // Step 1: clients trust both CAs (their certificate is still the old one).
  const writerDir = await certs(oldCa, 'writer', bundle);
  const proc: ChildProcess = spawn(process.execPath, [WRITER, c.etcd.endpoint, 'rot', '--max-write', '100000'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TORUS_TLS_CERTIFICATES: writerDir },
  });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += `stderr: ${d.toString()}`));
  const flushes = (): number => out.match(/^flushed /gm)?.length ?? 0;
  const progress = async (what: string): Promise<void> => {
    const seen = flushes();
    await eventually(`the writer flushing ${what}`, async () => flushes() >= seen + 3, 60_000);
  };
  const uuids = c.nodes.map((_, i) => c.uuidOf(i));
  try {
    await progress('before the roll');
    // Step 2: each node trusts both CAs, still with its old certificate.
    for (let i = 0; i < 3; i++) {
      await restartWith(i, await certs(oldCa, `node${i}`, bundle, uuids[i]));
      await progress(`after node ${i} trusts both CAs`);
    }
    // Step 3: each node gets its certificate from the new CA.
    for (let i = 0; i < 3; i++) {
      await restartWith(i, await certs(newCa, `node${i}`, bundle, uuids[i]));
      await progress(`after node ${i} has the new CA's certificate`);
    }
  } finally {
    // Step 4 would be the clients' new certificates; this writer simply stops here.
    proc.kill('SIGKILL');
    await new Promise((r) => (proc.exitCode !== null || proc.signalCode !== null ? r(undefined) : proc.once('exit', r)));
  }
  // Step 5: nodes drop the old CA.
  const newTrust = readFileSync(join(newCa, 'ca-cert.pem'));
  for (let i = 0; i < 3; i++) await restartWith(i, await certs(newCa, `node${i}`, newTrust, uuids[i]));
  const log = parseWriterLog(out);
  assert.ok(log.acked >= 20, `only ${log.acked + 1} writes acknowledged:\n${out.slice(-2000)}`);
  const failed = out.match(/^failed \d+ \w+$/gm) ?? [];
  // A client with only the new CA's certificate reads every acknowledged write.
  const open = async (dir: string): Promise<VolumeClient> =>
    VolumeClient.open(c.meta, { rpc: { security: (await resolvePeerSecurity({ tlsCertificates: dir }, false)).security, connectTimeoutMs: 2000, requestTimeoutMs: 3000 } });
  const fresh = await open(await certs(newCa, 'reader', newTrust));
  try {
    // The dead writer's lock outlives it by its lease.
    const vol = await eventually('the dead writer\'s lock to expire', async () => fresh.openVolume('rot').catch(() => undefined), 40_000);
    checkJournalState(await vol.read(0, SIZE), Buffer.alloc(SIZE), log);
    await vol.close();
  } finally {
    await fresh.close();
  }
  // The old CA's certificates are refused now.
  const stale = await open(await certs(oldCa, 'stale', bundle));
  try {
    await assert.rejects(async () => {
      const v = await stale.openVolume('rot', { readOnly: true });
      try {
        await v.read(0, 65536);
      } finally {
        await v.close();
      }
    });
  } finally {
    await stale.close();
  }
  console.log(`# rotation: ${log.acked + 1} writes acknowledged across 9 node restarts; ${failed.length} flushes failed and were retried (${[...new Set(failed.map((f) => f.split(' ')[2]))].join(', ') || 'none'})`);
});
