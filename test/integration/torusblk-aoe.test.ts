import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { rawSocketAvailable } from '../../src/aoe/index.js';
import { mib, resetPeakRss, rss } from '../helpers/hostile.js';
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
    lab = createLab({ hosts: ['target', 'init1', 'init2'] });
    dir = mkdtempSync(join(tmpdir(), 'torusblk-aoe-'));
    cluster = await startNsCluster(lab, lab.hosts.target!.ns);
    cluster.ok('torusctl', ['volume', 'create-block', 'v', String(SIZE)]);
  });

  after(async () => {
    await cluster?.stop();
    lab?.destroy();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function initiator(args: string[], host = 'init1'): Record<string, unknown> {
    const r = lab.run(lab.hosts[host]!.ns, process.execPath, [INITIATOR, ...args, '--iface', 'eth0', '--shelf', '7', '--slot', '3'], 150);
    assert.equal(r.code, 0, `aoe-initiator ${args.join(' ')} failed:\n${r.stdout}${r.stderr}`);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as Record<string, unknown>;
  }

  /** Starts `torusblk aoe v eth0 7 3`; a target killed earlier holds the volume until its lease expires. */
  async function startTarget(extra: string[]): Promise<ChildProcess> {
    for (let i = 0; i < 60; i++) {
      const t = cluster.start('torusblk', ['aoe', 'v', 'eth0', '7', '3', ...extra]);
      try {
        await waitForOutput(t, /serving v .* as AoE target e7\.3/, 'torusblk aoe');
        return t;
      } catch {
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
    throw new Error('the target did not start, even once the dead one\'s lock had expired');
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

  test('an initiator flooding the target beside one writing and reading: the writer is served byte-exact, the target stays within its memory (issue 13)', async () => {
    const target = await startTarget([]);
    let said = '';
    target.stderr?.on('data', (d: Buffer) => (said += d.toString()));
    const pid = target.pid!;
    const e = randomBytes(2 * MiB);
    writeFileSync(join(dir, 'e'), e);
    const work = (): void => {
      assert.deepEqual(initiator(['put', '--file', join(dir, 'e'), '--lba', '49152', '--flush']), { sectors: 4096, flushStatus: 0x40 });
      assert.deepEqual(initiator(['get', '--file', join(dir, 'e2'), '--lba', '49152', '--count', '4096']), { sectors: 4096 });
      assert.ok(readFileSync(join(dir, 'e2')).equals(e), 'the working initiator reads back what it wrote');
    };
    // Once alone, so that what the work itself costs (caches, connections) is in the baseline.
    work();
    const before = rss(pid).now;
    resetPeakRss(pid);
    // 64 one-sector READs every millisecond for 8 s from init2, never waiting for an answer.
    const flooder = lab.start(lab.hosts.init2!.ns, process.execPath, [INITIATOR, 'flood', '--seconds', '8', '--depth', '64', '--iface', 'eth0', '--shelf', '7', '--slot', '3']);
    let flooded = '';
    flooder.stdout?.on('data', (d: Buffer) => (flooded += d.toString()));
    const floodDone = new Promise((r) => flooder.once('exit', r));
    try {
      await new Promise((r) => setTimeout(r, 1000));
      work();
      await floodDone;
    } finally {
      await stopProcess(flooder, 'SIGTERM');
    }
    const peak = rss(pid).peak;
    console.log(`torusblk aoe: resident ${mib(before)} before the flood, peak ${mib(peak)} during it; the flood: ${flooded.trim()}`);
    // Commands are bounded (4 x 64 of at most one jumbo frame each, a few MiB); what the peak
    // adds is allocator slack under 30,000 frames a second, which does not grow with the flood's
    // length (the target's own heap is the same after 5 s and 20 s of it): glibc keeps up to
    // 64 MiB of freed heap resident by our own setting (src/core/malloc.ts), V8 its young space.
    assert.ok(peak <= before + 96 * MiB, `the target peaked at ${mib(peak)}, ${mib(peak - before)} above its ${mib(before)} before`);
    assert.match(said, /AoE buffers full: dropping commands beyond the buffer count/);
    assert.equal(await stopProcess(target, 'SIGTERM'), 0);
  });

  test('--allow: an initiator not on the list gets nothing and changes nothing; remote mask and reservation edits are refused; the listed initiator is served (issue 16)', async () => {
    const mac1 = lab.hosts.init1!.mac;
    const target = await startTarget(['--allow', mac1]);
    const f = randomBytes(MiB);
    writeFileSync(join(dir, 'f'), f);
    assert.deepEqual(initiator(['put', '--file', join(dir, 'f'), '--lba', '57344', '--flush']), { sectors: 2048, flushStatus: 0x40 });
    // init2 is not on the list: no discovery, no write, no reservation, no mask edit.
    const stranger = (args: string[]): number => lab.run(lab.hosts.init2!.ns, process.execPath, [INITIATOR, ...args, '--iface', 'eth0', '--shelf', '7', '--slot', '3'], 60).code;
    writeFileSync(join(dir, 'g'), Buffer.alloc(MiB, 0x66));
    assert.notEqual(stranger(['put', '--file', join(dir, 'g'), '--lba', '57344', '--flush']), 0);
    assert.notEqual(stranger(['identify']), 0);
    assert.notEqual(stranger(['reserve', 'force', '--macs', 'self']), 0);
    // init1 may use the target but not lock others out: edits from the network are off.
    assert.equal(initiator(['reserve', 'force', '--macs', 'self']).error, 1);
    assert.deepEqual(initiator(['reserve', 'read']), { error: 0, macs: [] });
    assert.equal(initiator(['mask', 'add', '--macs', 'self']).error, 1);
    assert.deepEqual(initiator(['get', '--file', join(dir, 'f2'), '--lba', '57344', '--count', '2048']), { sectors: 2048 });
    assert.ok(readFileSync(join(dir, 'f2')).equals(f), 'what init1 wrote is intact');
    assert.equal(await stopProcess(target, 'SIGTERM'), 0);
  });

  test('--write-back: writes are acknowledged before they are durable; FLUSH CACHE and SIGTERM sync them', async () => {
    const target = await startTarget(['--write-back', '--sync-interval', '1h']);
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
