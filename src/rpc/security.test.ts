import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { after, afterEach, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { TorusError } from '../core/errors.js';
import { BlockType, type BlockRef } from '../core/ids.js';
import { createCa, issueCertificates, readCertDir, throwawayCertificate } from '../cli/shared/certs.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { PeerClient, type PeerClientOptions } from './client.js';
import { encodeHello, encodePutBatch, MIN_MAX_FRAME_SIZE, PROTOCOL_VERSION } from './codec.js';
import type { PeerSecurity, SecretPeerSecurity, X509PeerSecurity } from './security.js';
import { RpcServer, type RpcServerOptions } from './server.js';

// Peer RPC security (docs/security.md): TLS with certificates from the cluster CA verified both
// ways, or a shared secret proven over TLS; and what a stranger gets from each listener: nothing.

const CLUSTER = 'cluster-secret-id';
const SERVER_UUID = '11111111-2222-4333-8444-555555555555';
const ref = (index: number): BlockRef => ({ type: BlockType.Data, volume: 1, inode: 1, index });
const block = (seed: number): Buffer => Buffer.alloc(4096, seed);

function x509(d: string): X509PeerSecurity {
  const c = readCertDir(d);
  return { mode: 'x509', ca: c.ca, serverCert: c.serverCert, serverKey: c.serverKey, clientCert: c.clientCert, clientKey: c.clientKey };
}

async function secret(...keys: string[]): Promise<SecretPeerSecurity> {
  return { mode: 'secret', secrets: keys.map((k) => Buffer.from(k.padEnd(32, '.'))), ...(await throwawayCertificate()) };
}

// Made once for the file (top-level await: node 20 cancels suites under an async top-level before()).
const dir = mkdtempSync(join(tmpdir(), 'rpc-sec-'));
await createCa(join(dir, 'ca'));
await createCa(join(dir, 'other'));
const node = x509((await issueCertificates(join(dir, 'ca'), 'node1', { uuid: SERVER_UUID })).dir);
const client = x509((await issueCertificates(join(dir, 'ca'), 'client1')).dir);
/** A node certificate from the right CA naming another uuid. */
const impostor = x509((await issueCertificates(join(dir, 'ca'), 'node2')).dir);
/** An NBD client's certificate from the cluster CA: no uuid, no peer RPC. */
const nbdClient = x509((await issueCertificates(join(dir, 'ca'), 'alice', { nbdOnly: true })).dir);
/** Another cluster's CA. */
const foreign = x509((await issueCertificates(join(dir, 'other'), 'node1', { uuid: SERVER_UUID })).dir);
const secretA = await secret('alpha');

after(() => rmSync(dir, { recursive: true, force: true }));

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function serve(security: PeerSecurity, options: Partial<RpcServerOptions> = {}): Promise<{ server: RpcServer; store: MemoryBlockStore; address: string; errors: string[] }> {
  const store = new MemoryBlockStore({ blockSize: 4096, capacityBlocks: 1000 });
  const errors: string[] = [];
  const server = new RpcServer({
    service: store,
    identity: { uuid: SERVER_UUID, clusterId: CLUSTER },
    security,
    handshakeTimeoutMs: 2000,
    onConnectionError: (err) => errors.push(err.message),
    ...options,
  });
  const address = await server.listen(0);
  cleanups.push(() => server.close());
  return { server, store, address, errors };
}

function dial(address: string, security: PeerSecurity | undefined, options: Partial<PeerClientOptions> = {}): PeerClient {
  const c = new PeerClient(address, {
    identity: { uuid: 'c1', clusterId: CLUSTER },
    ...(security ? { security } : {}),
    connectTimeoutMs: 2000,
    requestTimeoutMs: 2000,
    breaker: { failureThreshold: 1000 },
    ...options,
  });
  cleanups.push(() => c.close());
  return c;
}

async function failure(p: Promise<unknown>): Promise<TorusError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof TorusError, String(err));
    return err;
  }
  assert.fail('expected a failure');
}

/** Raw bytes a stranger sends (HELLO with the stolen cluster id, then a PUT), and all it gets back. */
async function probe(socket: net.Socket | tls.TLSSocket, wait: 'connect' | 'secureConnect'): Promise<Buffer> {
  const got: Buffer[] = [];
  socket.on('data', (b: Buffer) => got.push(b));
  socket.on('error', () => {});
  await new Promise<void>((resolve) => {
    socket.once(wait, () => resolve());
    socket.once('close', () => resolve());
  });
  if (!socket.destroyed) {
    socket.write(encodeHello(1, { minVersion: 1, maxVersion: PROTOCOL_VERSION, maxFrameSize: MIN_MAX_FRAME_SIZE, uuid: 'stranger', clusterId: CLUSTER, extensions: [] }));
    for (const part of encodePutBatch(2, [{ ref: ref(99), data: block(9) }])) socket.write(part);
  }
  for (let i = 0; i < 100 && !socket.destroyed; i++) await sleep(20);
  socket.destroy();
  return Buffer.concat(got);
}

function assertNothingServed(store: MemoryBlockStore, answer: Buffer): void {
  assert.equal(store.hasBlock(ref(99)), false, 'the stranger stored a block');
  assert.ok(!answer.includes(Buffer.from(CLUSTER)), 'the answer holds the cluster id');
  assert.ok(!answer.includes(Buffer.from(SERVER_UUID)), 'the answer names the node');
}

describe('peer RPC over TLS with the cluster CA', () => {
  it('serves a client whose certificate the CA signed, and checks the node it dialled is the one it meant', async () => {
    const { address, store } = await serve(node);
    const c = dial(address, client, { expectUuid: SERVER_UUID });
    await c.putBlock(ref(1), block(1), { sync: true });
    assert.deepEqual(await c.getBlock(ref(1)), block(1));
    assert.ok(store.hasBlock(ref(1)));
    // Same address, another node's certificate: refused before HELLO.
    const wrong = dial(address, client, { expectUuid: '99999999-2222-4333-8444-555555555555' });
    assert.match((await failure(wrong.ping())).message, /certificate names node 11111111/);
  });

  it('a node holding another uuid\'s certificate from the same CA cannot pose as the node dialled', async () => {
    const { address } = await serve(impostor);
    const c = dial(address, client, { expectUuid: SERVER_UUID });
    const err = await failure(c.ping());
    assert.match(err.message, /not the expected 11111111/);
  });

  it('strangers get nothing: no certificate, a self-signed one, another cluster\'s, plaintext with the stolen cluster id; the legitimate client goes on', async () => {
    const { address, store, server, errors } = await serve(node);
    const legit = dial(address, client, { expectUuid: SERVER_UUID });
    await legit.putBlock(ref(1), block(1));
    const { port } = new URL(address);
    const self = await throwawayCertificate();
    const attempts: [string, () => net.Socket | tls.TLSSocket, 'connect' | 'secureConnect'][] = [
      ['no certificate', () => tls.connect({ port: Number(port), host: '127.0.0.1', rejectUnauthorized: false }), 'secureConnect'],
      ['self-signed', () => tls.connect({ port: Number(port), host: '127.0.0.1', rejectUnauthorized: false, cert: self.cert, key: self.key }), 'secureConnect'],
      [
        "another cluster's CA",
        () => tls.connect({ port: Number(port), host: '127.0.0.1', rejectUnauthorized: false, cert: foreign.clientCert, key: foreign.clientKey }),
        'secureConnect',
      ],
      ['plaintext with the cluster id', () => net.connect({ port: Number(port), host: '127.0.0.1' }), 'connect'],
    ];
    for (const [what, open, wait] of attempts) {
      const answer = await probe(open(), wait);
      assertNothingServed(store, answer);
      assert.deepEqual(await legit.getBlock(ref(1)), block(1), `after ${what}`);
    }
    // The same through PeerClient: plaintext with the right cluster id, and a foreign cluster's certificates.
    assert.equal((await failure(dial(address, undefined).ping())).code, 'BLOCK_UNAVAILABLE');
    const err = await failure(dial(address, foreign).ping());
    assert.doesNotMatch(err.message, new RegExp(CLUSTER));
    assert.equal(store.hasBlock(ref(99)), false);
    // Each probe and the plaintext client are refused by the server; the foreign client gives up on
    // the server's certificate first.
    assert.ok(server.stats().refusedHandshakes >= 5, `refused ${server.stats().refusedHandshakes}`);
    assert.ok(errors.every((e) => !e.includes(CLUSTER)));
    assert.deepEqual(await legit.getBlock(ref(1)), block(1));
  });

  it("an NBD client's certificate (torusctl cert issue --nbd-only) from the same CA gets no peer RPC", async () => {
    const { address, store, server } = await serve(node);
    const err = await failure(dial(address, nbdClient).putBlock(ref(99), block(9)));
    assert.equal(err.code, 'BLOCK_UNAVAILABLE');
    assert.equal(store.hasBlock(ref(99)), false);
    assert.equal(server.stats().refusedHandshakes, 1);
    await dial(address, client).putBlock(ref(1), block(1));
  });

  it('a client with a certificate from another CA refuses a node whose CA it does not trust', async () => {
    const { address } = await serve(foreign);
    const err = await failure(dial(address, client, { expectUuid: SERVER_UUID }).ping());
    assert.match(err.message, /certificate/i);
  });

  it('CA rotation: a node trusting both CAs serves clients of either, and a client trusting both reaches nodes of either', async () => {
    const bundle = Buffer.concat([readFileSync(join(dir, 'ca', 'ca-cert.pem')), readFileSync(join(dir, 'other', 'ca-cert.pem'))]);
    const { address, store } = await serve({ ...node, ca: bundle });
    await dial(address, client, { expectUuid: SERVER_UUID }).putBlock(ref(1), block(1));
    await dial(address, { ...foreign, ca: bundle }, { expectUuid: SERVER_UUID }).putBlock(ref(2), block(2));
    assert.ok(store.hasBlock(ref(1)) && store.hasBlock(ref(2)));
    const second = await serve({ ...foreign, ca: bundle });
    await dial(second.address, { ...client, ca: bundle }, { expectUuid: SERVER_UUID }).putBlock(ref(3), block(3));
  });
});

describe('peer RPC with a shared secret', () => {
  it('both ends prove the secret over TLS; a wrong secret gets PERMISSION_DENIED and nothing else', async () => {
    const { address, store, errors } = await serve(secretA);
    const c = dial(address, secretA);
    await c.putBlock(ref(1), block(1));
    assert.deepEqual(await c.getBlock(ref(1)), block(1));
    const wrong = await failure(dial(address, await secret('beta')).putBlock(ref(99), block(9)));
    assert.equal(wrong.code, 'PERMISSION_DENIED');
    assert.doesNotMatch(wrong.message, new RegExp(`${CLUSTER}|${SERVER_UUID}`));
    assert.ok(errors.some((e) => /did not prove/.test(e)));
    // TLS without any proof, and plaintext.
    const { port } = new URL(address);
    assertNothingServed(store, await probe(tls.connect({ port: Number(port), host: '127.0.0.1', rejectUnauthorized: false }), 'secureConnect'));
    assertNothingServed(store, await probe(net.connect({ port: Number(port), host: '127.0.0.1' }), 'connect'));
    assert.deepEqual(await c.getBlock(ref(1)), block(1));
  });

  it('a client refuses a server that does not hold the secret', async () => {
    const { address } = await serve(await secret('beta'));
    assert.equal((await failure(dial(address, secretA).ping())).code, 'PERMISSION_DENIED');
  });

  it('rotation: a node holding new and old secrets talks to nodes holding either', async () => {
    const both = await secret('gamma', 'alpha');
    const { address } = await serve(both);
    await dial(address, secretA).ping();
    await dial(address, await secret('gamma')).ping();
    const old = await serve(secretA);
    await dial(old.address, both).ping();
  });
});
