import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { memoryCluster } from '../volume/testing.js';
import { BlockVolume } from '../volume/volume.js';
import type { PeerTarget, PutItem } from './transport.js';

// Every byte a volume serves is checked against the CRC its writer computed, not only whole
// blocks: a replica that serves the wrong bytes for a partial read (consistent with their own
// sector checksums, so its own checks pass) is caught, skipped and repaired. And a replica
// refuses to store a block whose bytes are not the ones the writer checksummed.

const BS = 64 * 1024;

async function volumeWithBlock() {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 4 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const data = randomBytes(BS);
  await vol.write(BS, data);
  // Folded into a whole data block (a flush alone leaves it in the journal's log blocks).
  await vol.foldAll();
  // The data block and its holders (every store holds some inode pages too).
  const holders = c.stores.filter((s) => s.refs().some((r) => r.type === 0 && r.volume === vol.record.id));
  const ref = holders[0]!.refs().find((r) => r.type === 0 && r.volume === vol.record.id)!;
  return { c, vol, data, ref, holders };
}

test('a partial read is checked end to end: a replica serving another block for it is skipped and repaired', async () => {
  const { c, vol, data, ref, holders } = await volumeWithBlock();
  assert.equal(holders.length, 2);
  // One replica now holds other bytes under the ref, consistent with their own sector checksums:
  // only the writer's CRC, kept in the inode, can tell.
  const bad = holders[0]!;
  bad.replaceBlock(ref, randomBytes(BS));
  const other = holders[1]!;
  // Try reads that start at either replica: whichever is asked first, the right bytes come back.
  for (let i = 0; i < 8; i++) {
    const off = 4096 * i + 100;
    assert.deepEqual(await vol.read(BS + off, 5000), data.subarray(off, off + 5000), `read at ${off}`);
  }
  await c.dist.idle();
  // Now make the good replica's copy the bad one too: no replica can serve the writer's bytes,
  // and the read fails rather than serve wrong ones.
  bad.replaceBlock(ref, randomBytes(BS));
  other.replaceBlock(ref, randomBytes(BS));
  await assert.rejects(vol.read(BS + 8192, 4096), (e) => isTorusError(e, 'BLOCK_UNAVAILABLE') && /checksum/.test(e.message));
  await vol.close();
});

test('the first replica asked serves another block: the read still returns the writer bytes, and the copy is repaired', async () => {
  const { c, vol, data, ref, holders } = await volumeWithBlock();
  // Damage every replica except the last one the distributor would ask.
  const order = c.dist['candidates'](ref, c.dist['servedLocally'](ref)) as string[];
  const byUuid = new Map(['a', 'b', 'c'].map((u, i) => [u, c.stores[i]!]));
  const first = byUuid.get(order[0]!)!;
  assert.ok(holders.includes(first));
  first.replaceBlock(ref, randomBytes(BS));
  assert.deepEqual(await vol.read(BS + 12345, 3000), data.subarray(12345, 15345));
  assert.ok(c.dist.stats.checksumFailures >= 1, 'the bad replica was caught by the end-to-end check');
  await c.dist.idle();
  assert.ok(c.dist.stats.repairs >= 1, 'and repaired');
  // The repaired copy is the writer's block again.
  assert.deepEqual(await first.getBlock(ref), data);
  await vol.close();
});

test('a replica refuses a put whose bytes are not the ones the writer checksummed; the copy goes elsewhere', async () => {
  const c = await memoryCluster(BS);
  // The network to peer "a" flips one bit in every block it carries.
  const put = c.transport.put.bind(c.transport);
  c.transport.put = (peer: PeerTarget, items: readonly PutItem[]) =>
    put(
      peer,
      peer.uuid === 'a'
        ? items.map((it) => {
            const d = Buffer.from(it.data);
            d[777]! ^= 0x10;
            return { ...it, data: d };
          })
        : items,
    );
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const data = randomBytes(4 * BS);
  await vol.write(0, data);
  await vol.foldAll();
  // Nothing damaged was stored on "a"; every block still has its two copies on b and c.
  const a = c.stores[0]!;
  // (Journal appends travel apart from puts and are checked at the seal; only puts are damaged here.)
  for (const r of a.refs().filter((r) => r.type !== 2)) assert.fail(`peer a stored ${JSON.stringify(r)} despite the damage`);
  assert.ok(a.stats().checksumFailures > 0, 'a refused the damaged puts');
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.deepEqual(await again.read(0, 4 * BS), data);
});
