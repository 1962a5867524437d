import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { rawSocketAvailable } from '../../src/aoe/index.js';
import { createLab, netnsUnavailable, type Lab } from '../helpers/netns.js';
import { startNsCluster, type NsCluster } from '../helpers/ns-cluster.js';
import { BIN, stopProcess, waitForOutput } from '../helpers/procs.js';

// `torusblk aoe` serving a real volume from a real cluster, all inside network namespaces: the
// cluster (etcd + two torusd) and the target in one host namespace, our test initiator in another,
// on a bridge. What is written over AoE is read back through NBD (nbdcopy against `torusblk
// nbdserve`), byte-exact: after FLUSH CACHE from a snapshot while the target runs, and after the
// target is killed with SIGKILL, because by default every acknowledged write is already durable.

const INITIATOR = join(dirname(fileURLToPath(import.meta.url)), '..', 'helpers', 'aoe-initiator.js');
const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

function missing(): string | undefined {
  const ns = netnsUnavailable();
  if (ns) return ns;
  if (!rawSocketAvailable()) return 'the AoE raw socket addon is not built (node-gyp rebuild)';
  for (const tool of ['nbdcopy', 'setpriv']) if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed`;
  return undefined;
}
const skip = missing();
if (skip) console.log(`# skipping torusblk aoe tests: ${skip}`);

describe('torusblk aoe: a cluster volume over AoE, read back through NBD', { skip }, () => {
  let lab: Lab;
  let cluster: NsCluster;
  let dir: string;

  before(async () => {
    lab = createLab({ hosts: ['target', 'init1'] });
    dir = mkdtempSync(join(tmpdir(), 'torusblk-aoe-'));
    cluster = await startNsCluster(lab, lab.hosts.target!.ns);
    cluster.ok('torusctl', ['volume', 'create-block', 'v', String(SIZE)]);
  });

  after(async () => {
    await cluster?.stop();
    lab?.destroy();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function initiator(args: string[]): Record<string, unknown> {
    const r = lab.run(lab.hosts.init1!.ns, process.execPath, [INITIATOR, ...args, '--iface', 'eth0', '--shelf', '7', '--slot', '3'], 150);
    assert.equal(r.code, 0, `aoe-initiator ${args.join(' ')} failed:\n${r.stdout}${r.stderr}`);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as Record<string, unknown>;
  }

  /** Reads `length` bytes at `offset` of an export through NBD, served by torusblk nbdserve. */
  async function readOverNbd(exportName: string, offset: number, length: number): Promise<Buffer> {
    const srv = cluster.start('torusblk', ['nbdserve', '--read-only', '--listen', '127.0.0.1:10809']);
    try {
      await waitForOutput(srv, /serving NBD/, 'torusblk nbdserve');
      const out = join(dir, `nbd-${Date.now()}.img`);
      const r = lab.run(cluster.ns, 'nbdcopy', [`nbd://127.0.0.1:10809/${encodeURIComponent(exportName)}`, out], 60);
      assert.equal(r.code, 0, `nbdcopy: ${r.stdout}${r.stderr}`);
      return readFileSync(out).subarray(offset, offset + length);
    } finally {
      assert.equal(await stopProcess(srv), 0);
    }
  }

  test('bad arguments and no CAP_NET_RAW: one line, no stack trace, nonzero exit', () => {
    const bad = cluster.cli('torusblk', ['aoe', 'v', 'eth0', '65535', '1']);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /^torusblk: invalid AoE shelf "65535"/);
    const noVol = cluster.cli('torusblk', ['aoe', 'nope', 'eth0', '7', '3']);
    assert.equal(noVol.code, 6, noVol.stderr);
    assert.equal(noVol.stderr.trim().split('\n').length, 1, noVol.stderr);
    const r = lab.run(cluster.ns, 'setpriv', ['--bounding-set=-net_raw', process.execPath, BIN('torusblk'), '-C', cluster.endpoint, 'aoe', 'v', 'eth0', '7', '3'], 30);
    assert.equal(r.code, 2, r.stderr);
    assert.equal(r.stderr.trim(), 'torusblk: AoE: opening a raw AF_PACKET socket on eth0 needs CAP_NET_RAW (run as root or grant the capability)');
  });

  test('initiator script on a volume; FLUSH CACHE makes data durable (a snapshot taken while serving holds it); SIGKILL loses no acknowledged write', async () => {
    const target = cluster.start('torusblk', ['aoe', 'v', 'eth0', '7', '3']);
    let output = '';
    target.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    target.stderr?.on('data', (d: Buffer) => (output += d.toString()));
    await waitForOutput(target, /serving v .* as AoE target e7\.3 on eth0 .*write-through/, 'torusblk aoe');

    // A second writer is refused while the target holds the volume.
    const second = cluster.cli('torusblk', ['aoe', 'v', 'eth0', '7', '4']);
    assert.equal(second.code, 7, second.stderr);
    assert.match(second.stderr, /already mounted/);

    const s = initiator(['scenario']);
    assert.equal((s.identify as Record<string, unknown>).sectors48, SIZE / 512, 'IDENTIFY capacity is the volume size');
    assert.deepEqual([s.lba28, s.lba48, s.crossRead], ['match', 'match', 'match']);
    assert.equal(s.flush, 'status-40');
    assert.equal(s.flushExt, 'status-40');
    const id = initiator(['identify']);
    assert.equal(id.writeCacheEnabled, false, 'write-through: IDENTIFY says the write cache is off');

    // 1: written and flushed over AoE, then a snapshot of the synced head while the target runs.
    const a = randomBytes(MiB);
    writeFileSync(join(dir, 'a'), a);
    assert.deepEqual(initiator(['put', '--file', join(dir, 'a'), '--lba', '8192', '--flush']), { sectors: 2048, flushStatus: 0x40 });
    cluster.ok('torusctl', ['block', 'snapshot', 'create', 'v@after-flush']);
    assert.ok((await readOverNbd('v@after-flush', 8192 * 512, MiB)).equals(a), 'the flushed data reads back through NBD from the snapshot');

    // 2: written without a flush, and the target killed at once: write-through acknowledged it,
    // so it is durable.
    const b = randomBytes(MiB);
    writeFileSync(join(dir, 'b'), b);
    assert.deepEqual(initiator(['put', '--file', join(dir, 'b'), '--lba', '20480']), { sectors: 2048 });
    await stopProcess(target, 'SIGKILL');
    assert.ok((await readOverNbd('v', 20480 * 512, MiB)).equals(b), 'acknowledged writes survive SIGKILL of the target');
    assert.ok((await readOverNbd('v', 8192 * 512, MiB)).equals(a));
  });

  test('--write-back: writes are acknowledged before they are durable; FLUSH CACHE and SIGTERM sync them', async () => {
    // The killed target's lock expires with its lease; until then the volume is "mounted".
    let target: ChildProcess | undefined;
    for (let i = 0; i < 60 && !target; i++) {
      const t = cluster.start('torusblk', ['aoe', 'v', 'eth0', '7', '3', '--write-back', '--sync-interval', '1h']);
      try {
        await waitForOutput(t, /serving v .*write-back/, 'torusblk aoe --write-back');
        target = t;
      } catch {
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
    assert.ok(target, 'the target started once the dead one\'s lock expired');
    assert.equal(initiator(['identify']).writeCacheEnabled, true, 'write-back: IDENTIFY says the write cache is on');
    const c = randomBytes(MiB);
    writeFileSync(join(dir, 'c'), c);
    assert.deepEqual(initiator(['put', '--file', join(dir, 'c'), '--lba', '32768', '--flush']), { sectors: 2048, flushStatus: 0x40 });
    cluster.ok('torusctl', ['block', 'snapshot', 'create', 'v@wb']);
    assert.ok((await readOverNbd('v@wb', 32768 * 512, MiB)).equals(c), 'FLUSH CACHE synced the write-back data');
    const d = randomBytes(MiB);
    writeFileSync(join(dir, 'd'), d);
    initiator(['put', '--file', join(dir, 'd'), '--lba', '40960']);
    assert.equal(await stopProcess(target, 'SIGTERM'), 0);
    assert.ok((await readOverNbd('v', 40960 * 512, MiB)).equals(d), 'SIGTERM syncs before the target exits');
  });
});
