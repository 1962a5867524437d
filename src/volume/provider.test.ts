import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { MetaKV } from '../core/interfaces.js';
import { Info, Opt, Rep, encodeInfoRequest } from '../nbd/codec.js';
import { NbdServer } from '../nbd/server.js';
import { TestClient } from '../nbd/testing.js';
import type { VolumeClient } from './client.js';
import { MeasuredProvider, VolumeIo } from './io-stats.js';
import { VKEYS, VolumeMeta } from './meta.js';
import { VolumeProvider } from './provider.js';
import { memoryCluster } from './testing.js';
import { BlockVolume } from './volume.js';

const BS = 4096;

/** A VolumeProvider over the in-memory cluster whose etcd transactions are counted. */
async function countedProvider() {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let txns = 0;
  const counted: MetaKV = {
    get: (k) => kv.get(k),
    list: (p) => kv.list(p),
    txn: (cmp, ok, fail, opts) => {
      txns++;
      return kv.txn(cmp, ok, fail, opts);
    },
    session: (ttl) => kv.session(ttl),
    status: () => kv.status(),
    compact: (revision) => kv.compact(revision),
  };
  const vmeta = new VolumeMeta(counted);
  const vc = {
    vmeta,
    block: { distributor: c.dist },
    openVolume: (name: string, opts = {}) => BlockVolume.open({ meta: vmeta, store: c.dist, session: c.session }, name, opts),
  } as unknown as VolumeClient;
  return { c, vmeta, provider: new VolumeProvider(vc), txns: () => txns };
}

test('NBD INFO on a writable volume costs no etcd transaction: no lock, no epoch bump (issue 13)', async () => {
  const { c, vmeta, provider, txns } = await countedProvider();
  const rec = await vmeta.create('v', 64 * BS);
  await c.vmeta.create('other', 8 * BS);
  const epoch = async (): Promise<string | undefined> => (await c.meta.kv().get(VKEYS.epoch(rec.id)))?.value;
  const epochBefore = await epoch();
  const before = txns();
  // As nbdserve serves it: measured.
  const server = new NbdServer(new MeasuredProvider(provider, new VolumeIo()));
  const client = TestClient.connect((s) => server.handle(s));
  await client.handshake();
  for (let i = 0; i < 20; i++) {
    const r = await client.info('v', [Info.NAME, Info.BLOCK_SIZE]);
    assert.equal(r.size, 64 * BS);
  }
  assert.equal(txns() - before, 0, 'INFO took no lock');
  assert.equal(await epoch(), epochBefore);
  // A volume another process holds: INFO refuses it as GO would, still without a transaction.
  const other = await BlockVolume.open({ ...c.ctx, session: await c.newSession() }, 'other');
  const t = txns();
  const replies = await client.option(Opt.INFO, encodeInfoRequest({ name: 'other', requests: [] }));
  assert.equal(replies.at(-1)?.replyType, Rep.ERR_POLICY);
  assert.match(replies.at(-1)!.data.toString(), /already mounted/);
  assert.equal(txns() - t, 0);
  await other.close();
  // GO opens (and locks) once; INFO while it is open reports the open volume.
  await client.info('v', [Info.NAME], true);
  const locked = txns();
  const second = TestClient.connect((s) => server.handle(s));
  await second.handshake();
  assert.equal((await second.info('v')).size, 64 * BS);
  await second.info('v', [Info.NAME], true);
  assert.equal(txns(), locked, 'a second connection shares the open volume');
  client.disconnect();
  second.disconnect();
  await Promise.all([client.closed, second.closed]);
  await server.close();
});
