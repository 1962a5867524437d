import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCa, issueCertificates, resolvePeerSecurity } from '../../src/cli/shared/certs.js';
import type { MetadataService } from '../../src/core/interfaces.js';
import type { OpenOptions } from '../../src/distributor/open.js';
import type { PeerSecurity } from '../../src/rpc/security.js';
import { VolumeClient } from '../../src/volume/client.js';

// Test clusters run peer RPC over TLS like a real deployment: one CA per test process (made on
// first use, EC P-256, milliseconds), a certificate per torusd naming its uuid, and one client
// directory for every torusctl and torusblk, passed through TORUS_TLS_CERTIFICATES.

let ca: Promise<{ caDir: string; clientDir: string }> | undefined;

/** The test process's CA and client certificate directory; sets TORUS_TLS_CERTIFICATES for the CLIs it runs. */
export function testCerts(): Promise<{ caDir: string; clientDir: string }> {
  ca ??= (async () => {
    const caDir = mkdtempSync(join(tmpdir(), 'torus-ca-'));
    await createCa(caDir, { name: 'Torus test CA' });
    const { dir: clientDir } = await issueCertificates(caDir, 'test-client');
    process.env.TORUS_TLS_CERTIFICATES = clientDir;
    return { caDir, clientDir };
  })();
  return ca;
}

/** A certificate directory for a torusd: for the node the data dir already holds, or a new one. */
export async function nodeCertDir(dataDir: string, name = 'node'): Promise<string> {
  const { caDir } = await testCerts();
  const id = join(dataDir, 'node.json');
  const uuid = existsSync(id) ? (JSON.parse(readFileSync(id, 'utf8')) as { uuid: string }).uuid : undefined;
  const out = mkdtempSync(join(caDir, `${name}-`));
  await issueCertificates(caDir, name, { out, ...(uuid ? { uuid } : {}) });
  return out;
}

/** The peer security of an in-process client talking to spawned nodes (as torusblk would, from its environment). */
export async function clientSecurity(): Promise<PeerSecurity> {
  // A run whose nodes are plaintext (bench --peer-rpc plain) says so, even once the test CA exists.
  if (process.env.TORUS_INSECURE_PEER_NETWORK === '1') return { mode: 'insecure' };
  if (process.env.TORUS_TLS_CERTIFICATES === undefined && process.env.TORUS_INSECURE_PEER_NETWORK === undefined) await testCerts();
  const dir = process.env.TORUS_TLS_CERTIFICATES;
  return (await resolvePeerSecurity(dir !== undefined ? { tlsCertificates: dir } : { insecurePeerNetwork: true }, false)).security;
}

/** VolumeClient.open for tests: with the credential of the test's client certificates. */
export async function openVolumeClient(meta: MetadataService, opts: Omit<OpenOptions, 'meta'> = {}): Promise<VolumeClient> {
  return VolumeClient.open(meta, { ...opts, rpc: { ...opts.rpc, security: await clientSecurity() } });
}
