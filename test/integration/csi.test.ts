import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, readFileSync, readSync, statfsSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { csiClient, type CsiClient } from '../helpers/csi-client.js';
import { BIN, removeDir, runCli, stopProcess, waitForOutput } from '../helpers/procs.js';

// The CSI driver through its gRPC socket, against a real etcd and three storage nodes, with a
// client that makes the calls kubelet and the external provisioner, attacher, snapshotter and
// resizer make, in their order and each one twice (the spec asks every call to be idempotent).
// Staging is real: `torusblk nbd` per volume, nbdfuse and a loop device on this kernel (which has
// no NBD module), ext4 made on the blank volume and mounted, then bind-mounted at the pod's path.

const MiB = 1024 * 1024;
const haveTools =
  existsSync('/dev/fuse') && spawnSync('sh', ['-c', 'command -v nbdfuse && command -v losetup && command -v mkfs.ext4 && command -v resize2fs && command -v blkid']).status === 0;
const skip = haveTools ? false : 'needs /dev/fuse, nbdfuse, losetup, mkfs.ext4, resize2fs and blkid (libnbd-bin, mount, e2fsprogs)';

let c: TestCluster;
let dir: string;
let driver: ChildProcess;
let driverOut = '';
let csi: CsiClient;

const mountCap = (mode = 'SINGLE_NODE_WRITER'): object => ({ mount: { fs_type: 'ext4', mount_flags: [] }, access_mode: { mode } });
const blockCap = { block: {}, access_mode: { mode: 'SINGLE_NODE_WRITER' } };
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** Each call twice: the second must answer exactly as the first (idempotency). */
async function twice(service: 'Controller' | 'Node', method: string, req: object): Promise<Record<string, unknown>> {
  const a = await csi.call(service, method, req);
  const b = await csi.call(service, method, req);
  assert.deepEqual(b, a, `${method} answered differently when repeated`);
  return a;
}

async function code(service: 'Identity' | 'Controller' | 'Node', method: string, req: object, want: status, match?: RegExp): Promise<void> {
  const e = await csi.fails(service, method, req);
  assert.equal(status[e.code], status[want], `${method} ${JSON.stringify(req)}: ${e.details}`);
  if (match) assert.match(e.details, match);
}

interface Paths {
  staging: string;
  target: string;
}
const pathsFor = (name: string): Paths => ({ staging: join(dir, 'kubelet', 'staging', name), target: join(dir, 'kubelet', 'pods', name, 'mount') });

/** What kubelet does to start a pod with the volume (after the attacher's ControllerPublish). */
async function podStart(volume: string, p: Paths, cap: object = mountCap()): Promise<void> {
  await twice('Controller', 'ControllerPublishVolume', { volume_id: volume, node_id: 'node-a', volume_capability: cap, readonly: false });
  await twice('Node', 'NodeStageVolume', { volume_id: volume, staging_target_path: p.staging, volume_capability: cap });
  await twice('Node', 'NodePublishVolume', { volume_id: volume, staging_target_path: p.staging, target_path: p.target, volume_capability: cap, readonly: false });
}

/** And to stop it, then the attacher's ControllerUnpublish. */
async function podStop(volume: string, p: Paths): Promise<void> {
  await twice('Node', 'NodeUnpublishVolume', { volume_id: volume, target_path: p.target });
  await twice('Node', 'NodeUnstageVolume', { volume_id: volume, staging_target_path: p.staging });
  await twice('Controller', 'ControllerUnpublishVolume', { volume_id: volume, node_id: 'node-a' });
}

async function createVolume(name: string, bytes: number, extra: object = {}): Promise<Record<string, unknown>> {
  const res = await twice('Controller', 'CreateVolume', { name, capacity_range: { required_bytes: bytes }, volume_capabilities: [mountCap()], ...extra });
  return res['volume'] as Record<string, unknown>;
}

before(async () => {
  if (skip) return;
  c = await startCluster({ nodes: 3, replication: 2, size: '1GiB' });
  dir = mkdtempSync(join(tmpdir(), 'torus-csi-'));
  const socket = join(dir, 'csi', 'csi.sock');
  driver = spawn(process.execPath, [BIN('torusblk'), '-C', c.etcd.endpoint, 'csi', '--endpoint', `unix://${socket}`, '--node-id', 'node-a'], { stdio: ['ignore', 'pipe', 'pipe'] });
  driver.stdout!.on('data', (d: Buffer) => (driverOut += d.toString()));
  driver.stderr!.on('data', (d: Buffer) => (driverOut += d.toString()));
  await waitForOutput(driver, /serving CSI driver/, 'torusblk csi');
  csi = csiClient(socket);
});

after(async () => {
  if (skip) return;
  csi?.close();
  if (driver) await stopProcess(driver, 'SIGTERM');
  // Whatever a failed test left: unmount, detach, stop.
  spawnSync('sh', ['-c', `grep -o " ${dir}[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l`]);
  await c?.stop();
  if (dir) removeDir(dir);
});

describe('torusblk csi', { skip }, () => {
  test('identity, capabilities and node info', async () => {
    const info = await csi.call('Identity', 'GetPluginInfo');
    assert.equal(info['name'], 'csi.torus.io');
    assert.ok(info['vendor_version']);
    const caps = JSON.stringify(await csi.call('Identity', 'GetPluginCapabilities'));
    assert.match(caps, /CONTROLLER_SERVICE/);
    assert.match(caps, /"volume_expansion":\{"type":"OFFLINE"\}/, 'expansion is offline: the node holding the volume has its size fixed');
    assert.deepEqual(await csi.call('Identity', 'Probe'), { ready: { value: true } });
    const ctl = JSON.stringify(await csi.call('Controller', 'ControllerGetCapabilities'));
    for (const cap of ['CREATE_DELETE_VOLUME', 'PUBLISH_UNPUBLISH_VOLUME', 'CREATE_DELETE_SNAPSHOT', 'LIST_SNAPSHOTS', 'CLONE_VOLUME', 'EXPAND_VOLUME', 'SINGLE_NODE_MULTI_WRITER'])
      assert.ok(ctl.includes(`"${cap}"`), cap);
    assert.doesNotMatch(ctl, /MULTI_NODE/);
    const node = JSON.stringify(await csi.call('Node', 'NodeGetCapabilities'));
    for (const cap of ['STAGE_UNSTAGE_VOLUME', 'GET_VOLUME_STATS', 'EXPAND_VOLUME', 'VOLUME_CONDITION']) assert.ok(node.includes(`"${cap}"`), cap);
    assert.equal((await csi.call('Node', 'NodeGetInfo'))['node_id'], 'node-a');
    assert.equal(statSync(join(dir, 'csi', 'csi.sock')).mode & 0o777, 0o660, 'only its owner and group may call the driver');
  });

  test('the sanity cases: missing arguments, unknown ids, capabilities a volume does not have', async () => {
    const { INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS, ABORTED } = status;
    await code('Controller', 'CreateVolume', { volume_capabilities: [mountCap()] }, INVALID_ARGUMENT, /name/);
    await code('Controller', 'CreateVolume', { name: 'x' }, INVALID_ARGUMENT, /volume_capabilities/);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [mountCap('MULTI_NODE_MULTI_WRITER')] }, INVALID_ARGUMENT, /one node at a time/);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [{ mount: { fs_type: 'ntfs' }, access_mode: { mode: 'SINGLE_NODE_WRITER' } }] }, INVALID_ARGUMENT, /ntfs/);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [mountCap()], parameters: { replicas: '3' } }, INVALID_ARGUMENT, /unknown parameter replicas/);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [mountCap()], capacity_range: { required_bytes: 2 ** 51 } }, OUT_OF_RANGE);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [mountCap()], capacity_range: { required_bytes: 5000, limit_bytes: 6000 } }, OUT_OF_RANGE);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [mountCap()], volume_content_source: { snapshot: { snapshot_id: 'nope@gone' } } }, NOT_FOUND);
    await code('Controller', 'CreateVolume', { name: 'x', volume_capabilities: [mountCap()], volume_content_source: { volume: { volume_id: 'nope' } } }, NOT_FOUND);
    await code('Controller', 'DeleteVolume', {}, INVALID_ARGUMENT);
    await twice('Controller', 'DeleteVolume', { volume_id: 'never-was' });
    await code('Controller', 'ControllerPublishVolume', { volume_id: 'never-was', node_id: 'node-a', volume_capability: mountCap() }, NOT_FOUND);
    await code('Controller', 'ControllerPublishVolume', { volume_id: 'never-was', volume_capability: mountCap() }, INVALID_ARGUMENT, /node_id/);
    await code('Controller', 'ControllerPublishVolume', { volume_id: 'never-was', node_id: 'node-a' }, INVALID_ARGUMENT, /volume_capability/);
    await twice('Controller', 'ControllerUnpublishVolume', { volume_id: 'never-was', node_id: 'node-a' });
    await code('Controller', 'ValidateVolumeCapabilities', { volume_id: 'never-was', volume_capabilities: [mountCap()] }, NOT_FOUND);
    await code('Controller', 'ValidateVolumeCapabilities', { volume_id: 'never-was' }, INVALID_ARGUMENT);
    await code('Controller', 'CreateSnapshot', { source_volume_id: 'never-was', name: 's' }, NOT_FOUND);
    await code('Controller', 'CreateSnapshot', { source_volume_id: 'never-was' }, INVALID_ARGUMENT, /name/);
    await code('Controller', 'DeleteSnapshot', {}, INVALID_ARGUMENT);
    await twice('Controller', 'DeleteSnapshot', { snapshot_id: 'never-was@s' });
    await twice('Controller', 'DeleteSnapshot', { snapshot_id: 'not an id' });
    await code('Controller', 'ListSnapshots', { starting_token: 'bogus' }, ABORTED);
    await code('Controller', 'ListVolumes', { starting_token: '99999' }, ABORTED);
    await code('Controller', 'ControllerExpandVolume', { volume_id: 'never-was', capacity_range: { required_bytes: MiB } }, NOT_FOUND);
    await code('Controller', 'ControllerExpandVolume', { volume_id: 'never-was' }, INVALID_ARGUMENT);
    const p = pathsFor('sanity');
    await code('Node', 'NodeStageVolume', { volume_id: 'never-was', volume_capability: mountCap() }, INVALID_ARGUMENT, /staging_target_path/);
    await code('Node', 'NodeStageVolume', { volume_id: 'never-was', staging_target_path: p.staging }, INVALID_ARGUMENT, /volume_capability/);
    await code('Node', 'NodeStageVolume', { volume_id: 'never-was', staging_target_path: p.staging, volume_capability: mountCap() }, NOT_FOUND);
    await code('Node', 'NodeStageVolume', { volume_id: 'never-was', staging_target_path: p.staging, volume_capability: mountCap('MULTI_NODE_READER_ONLY') }, FAILED_PRECONDITION);
    await code('Node', 'NodePublishVolume', { volume_id: 'never-was', target_path: p.target, volume_capability: mountCap() }, FAILED_PRECONDITION, /staging_target_path/);
    await code('Node', 'NodePublishVolume', { volume_id: 'never-was', staging_target_path: p.staging, volume_capability: mountCap() }, INVALID_ARGUMENT, /target_path/);
    await twice('Node', 'NodeUnpublishVolume', { volume_id: 'never-was', target_path: p.target });
    await twice('Node', 'NodeUnstageVolume', { volume_id: 'never-was', staging_target_path: p.staging });
    await code('Node', 'NodeGetVolumeStats', { volume_id: 'never-was', volume_path: p.target }, NOT_FOUND);
    await code('Node', 'NodeExpandVolume', { volume_id: 'never-was', volume_path: p.target }, NOT_FOUND);

    // A volume of that name with other properties already exists.
    await createVolume('pvc-sanity', 8 * MiB);
    await code('Controller', 'CreateVolume', { name: 'pvc-sanity', capacity_range: { required_bytes: 16 * MiB }, volume_capabilities: [mountCap()] }, ALREADY_EXISTS);
    const v = await csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: 'pvc-sanity', volume_capabilities: [mountCap('MULTI_NODE_MULTI_WRITER')] });
    assert.equal(v['confirmed'], null, 'a MULTI_NODE mode is not confirmed');
    const ok = await csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: 'pvc-sanity', volume_capabilities: [mountCap(), blockCap] });
    assert.ok(ok['confirmed']);
    // Published on one node: a second is refused, naming the first; read-only is another publication.
    await twice('Controller', 'ControllerPublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-a', volume_capability: mountCap(), readonly: false });
    await code('Controller', 'ControllerPublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-b', volume_capability: mountCap(), readonly: false }, FAILED_PRECONDITION, /published on node node-a/);
    await code('Controller', 'ControllerPublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-a', volume_capability: mountCap(), readonly: true }, ALREADY_EXISTS);
    await code('Controller', 'DeleteVolume', { volume_id: 'pvc-sanity' }, FAILED_PRECONDITION, /published on node node-a/);
    await twice('Controller', 'ControllerUnpublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-b' }); // not there: OK, and node-a keeps it
    await code('Controller', 'ControllerPublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-b', volume_capability: mountCap(), readonly: false }, FAILED_PRECONDITION);
    await twice('Controller', 'ControllerUnpublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-a' });
    await twice('Controller', 'ControllerPublishVolume', { volume_id: 'pvc-sanity', node_id: 'node-b', volume_capability: mountCap(), readonly: false });
    await twice('Controller', 'ControllerUnpublishVolume', { volume_id: 'pvc-sanity' }); // no node: from all
    await twice('Controller', 'DeleteVolume', { volume_id: 'pvc-sanity' });
  });

  test('a volume through its life: create, stage (ext4 on nbdfuse + loop), publish, write, unstage, snapshot, restore, clone, expand, delete', async () => {
    const vol = await createVolume('pvc-life', 64 * MiB, { parameters: { writeCacheSize: '32MiB', 'csi.storage.k8s.io/pvc/name': 'data' } });
    assert.equal(vol['volume_id'], 'pvc-life');
    assert.equal(vol['capacity_bytes'], 64 * MiB);
    assert.deepEqual(vol['volume_context'], { writeCacheSize: '32MiB' });
    const p = pathsFor('life');
    await podStart('pvc-life', p);
    const file = randomBytes(5 * MiB);
    writeFileSync(join(p.target, 'data.bin'), file);
    spawnSync('sync', [join(p.target, 'data.bin')]);
    const stats = await csi.call('Node', 'NodeGetVolumeStats', { volume_id: 'pvc-life', volume_path: p.target });
    const bytes = (stats['usage'] as { unit: string; used: number; total: number }[]).find((u) => u.unit === 'BYTES')!;
    assert.ok(bytes.used >= 5 * MiB && bytes.total > 50 * MiB, JSON.stringify(stats));
    assert.deepEqual(stats['volume_condition'], { abnormal: false, message: 'attached' });
    // In use on this node: not deletable, not expandable (offline expansion), not attachable elsewhere.
    await code('Controller', 'DeleteVolume', { volume_id: 'pvc-life' }, status.FAILED_PRECONDITION);
    await code('Controller', 'ControllerExpandVolume', { volume_id: 'pvc-life', capacity_range: { required_bytes: 96 * MiB } }, status.FAILED_PRECONDITION, /in use/);
    const other = await runCli('torusblk', ['-C', c.etcd.endpoint, 'nbd', 'pvc-life'], { timeoutMs: 60_000 });
    assert.equal(other.code, 7, `a second attachment is refused by the volume lock: ${other.stderr}`);
    assert.match(other.stderr, /already mounted on another host/);
    await podStop('pvc-life', p);

    // Snapshot, as the snapshotter does, twice; the same name on another volume is refused.
    const snap = (await twice('Controller', 'CreateSnapshot', { source_volume_id: 'pvc-life', name: 'snapshot-1' }))['snapshot'] as Record<string, unknown>;
    assert.equal(snap['snapshot_id'], 'pvc-life@snapshot-1');
    assert.equal(snap['ready_to_use'], true);
    assert.equal(snap['size_bytes'], 64 * MiB);
    await createVolume('pvc-other', 8 * MiB);
    await code('Controller', 'CreateSnapshot', { source_volume_id: 'pvc-other', name: 'snapshot-1' }, status.ALREADY_EXISTS);
    const listed = (await csi.call('Controller', 'ListSnapshots', { source_volume_id: 'pvc-life' }))['entries'] as { snapshot: { snapshot_id: string } }[];
    assert.deepEqual(listed.map((e) => e.snapshot.snapshot_id), ['pvc-life@snapshot-1']);
    const byId = (await csi.call('Controller', 'ListSnapshots', { snapshot_id: 'pvc-life@snapshot-1' }))['entries'] as unknown[];
    assert.equal(byId.length, 1);
    // Snapshots live with their volume in Torus: the volume stays while it has one.
    await code('Controller', 'DeleteVolume', { volume_id: 'pvc-life' }, status.FAILED_PRECONDITION, /snapshot/);

    // A larger volume from the snapshot holds the file, and its file system fills the volume.
    await createVolume('pvc-restored', 128 * MiB, { volume_content_source: { snapshot: { snapshot_id: 'pvc-life@snapshot-1' } } });
    await code('Controller', 'CreateVolume', { name: 'pvc-restored', capacity_range: { required_bytes: 128 * MiB }, volume_capabilities: [mountCap()] }, status.ALREADY_EXISTS, /content source/);
    const r = pathsFor('restored');
    await podStart('pvc-restored', r);
    assert.equal(sha(readFileSync(join(r.target, 'data.bin'))), sha(file), 'the restored volume holds the file');
    assert.ok(statfsSync(r.target).blocks * statfsSync(r.target).bsize > 100 * MiB, 'the file system grew to the larger volume');
    await podStop('pvc-restored', r);

    // A clone of the volume itself.
    await createVolume('pvc-clone', 64 * MiB, { volume_content_source: { volume: { volume_id: 'pvc-life' } } });
    const k = pathsFor('clone');
    await podStart('pvc-clone', k);
    assert.equal(sha(readFileSync(join(k.target, 'data.bin'))), sha(file), 'the clone holds the file');
    await podStop('pvc-clone', k);

    // Expand (offline, as the resizer does while no pod uses it), then the node grows the file system.
    const fsBefore = await (async () => {
      await podStart('pvc-life', p);
      const st = statfsSync(p.target);
      await podStop('pvc-life', p);
      return st.blocks * st.bsize;
    })();
    const exp = await twice('Controller', 'ControllerExpandVolume', { volume_id: 'pvc-life', capacity_range: { required_bytes: 192 * MiB }, volume_capability: mountCap() });
    assert.deepEqual(exp, { capacity_bytes: 192 * MiB, node_expansion_required: true });
    await podStart('pvc-life', p);
    const grown = await twice('Node', 'NodeExpandVolume', { volume_id: 'pvc-life', volume_path: p.target, staging_target_path: p.staging, capacity_range: { required_bytes: 192 * MiB } });
    assert.equal(grown['capacity_bytes'], 192 * MiB);
    const fsAfter = statfsSync(p.target).blocks * statfsSync(p.target).bsize;
    assert.ok(fsAfter > fsBefore + 100 * MiB, `the file system grew: ${fsBefore} -> ${fsAfter} bytes`);
    assert.equal(sha(readFileSync(join(p.target, 'data.bin'))), sha(file), 'and still holds the file');
    await podStop('pvc-life', p);

    // Delete: snapshots first, then the volumes; each twice.
    await twice('Controller', 'DeleteSnapshot', { snapshot_id: 'pvc-life@snapshot-1' });
    // A retried create still finds its volume after the snapshot it came from is gone.
    await createVolume('pvc-restored', 128 * MiB, { volume_content_source: { snapshot: { snapshot_id: 'pvc-life@snapshot-1' } } });
    for (const v of ['pvc-life', 'pvc-restored', 'pvc-clone', 'pvc-other']) await twice('Controller', 'DeleteVolume', { volume_id: v });
    const left = (await csi.call('Controller', 'ListVolumes', {}))['entries'] as { volume: { volume_id: string } }[];
    assert.deepEqual(left.filter((e) => e.volume.volume_id.startsWith('pvc-')), []);
    assert.doesNotMatch(spawnSync('losetup', ['-a'], { encoding: 'utf8' }).stdout, new RegExp(dir), 'no loop device left');
  });

  test('a raw block volume: the device itself is published at the pod path', async () => {
    await twice('Controller', 'CreateVolume', { name: 'pvc-raw', capacity_range: { required_bytes: 16 * MiB }, volume_capabilities: [blockCap] });
    const p = pathsFor('raw');
    await podStart('pvc-raw', p, blockCap);
    const data = randomBytes(MiB);
    const fd = openSync(p.target, 'r+');
    try {
      writeSync(fd, data, 0, data.length, 3 * MiB);
      fsyncSync(fd);
      const back = Buffer.alloc(MiB);
      readSync(fd, back, 0, MiB, 3 * MiB);
      assert.ok(back.equals(data));
    } finally {
      closeSync(fd);
    }
    const stats = await csi.call('Node', 'NodeGetVolumeStats', { volume_id: 'pvc-raw', volume_path: p.target });
    assert.deepEqual((stats['usage'] as { total: number }[]).map((u) => u.total), [16 * MiB]);
    await podStop('pvc-raw', p);
    // What was written reached the cluster: read it back through a plain dump.
    const img = join(dir, 'raw.img');
    const dump = await runCli('torusctl', ['-C', c.etcd.endpoint, 'block', 'dump', 'pvc-raw', img], { timeoutMs: 60_000 });
    assert.equal(dump.code, 0, dump.stderr);
    assert.ok(readFileSync(img).subarray(3 * MiB, 4 * MiB).equals(data));
    await twice('Controller', 'DeleteVolume', { volume_id: 'pvc-raw' });
  });

  test('a call on a volume while another on it runs is refused with ABORTED', async () => {
    await createVolume('pvc-busy', 16 * MiB);
    const p = pathsFor('busy');
    const cap = mountCap();
    await csi.call('Controller', 'ControllerPublishVolume', { volume_id: 'pvc-busy', node_id: 'node-a', volume_capability: cap, readonly: false });
    const first = csi.call('Node', 'NodeStageVolume', { volume_id: 'pvc-busy', staging_target_path: p.staging, volume_capability: cap });
    await code('Node', 'NodeStageVolume', { volume_id: 'pvc-busy', staging_target_path: p.staging, volume_capability: cap }, status.ABORTED, /in progress/);
    await first;
    await csi.call('Node', 'NodeUnstageVolume', { volume_id: 'pvc-busy', staging_target_path: p.staging });
    await csi.call('Controller', 'ControllerUnpublishVolume', { volume_id: 'pvc-busy', node_id: 'node-a' });
    await csi.call('Controller', 'DeleteVolume', { volume_id: 'pvc-busy' });
    assert.match(driverOut, /"method":"NodeStageVolume"/, 'calls are logged');
  });
});
