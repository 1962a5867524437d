import { randomBytes } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isTorusError } from '../../src/core/errors.js';
import { BlockType, formatBlockRef, type BlockRef } from '../../src/core/ids.js';
import { parseSize } from '../../src/core/units.js';
import { rpcAddress } from '../../src/distributor/cluster-view.js';
import { openBlockClient, type BlockClient } from '../../src/distributor/open.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { FileBlockStore } from '../../src/storage/file-store.js';
import { applyPowerCut, POWERCUT_ENV, type CutReport } from '../../src/storage/powercut.js';
import { startEtcd, type EtcdHandle } from './etcd.js';
import { clientSecurity } from './certs.js';
import { eventually, ok, removeDir, startTorusd, type Torusd } from './procs.js';

const POWERCUT_PRELOAD = fileURLToPath(new URL('../../src/storage/powercut-preload.js', import.meta.url));

// A whole cluster for data-plane tests: a real etcd, N torusd processes in the ring, and a block
// client in the test process talking to them over peer RPC like any other client would.

export interface TestCluster {
  readonly etcd: EtcdHandle;
  readonly nodes: Torusd[];
  readonly meta: EtcdMetadata;
  readonly client: BlockClient;
  readonly blockSize: number;
  /** Kills a node with SIGKILL (the process, not its data). */
  kill(i: number): Promise<void>;
  /** Starts node i again on its data dir and port. */
  restart(i: number): Promise<void>;
  uuidOf(i: number): string;
  /** How many running nodes hold a good copy of each ref (asked of each directly; killed nodes are skipped). */
  copies(refs: readonly BlockRef[]): Promise<number[]>;
  /**
   * How many nodes hold a good copy of each ref on disk (byte-exact against `data` when given),
   * counted with every node stopped by SIGKILL; the nodes that were running are started again.
   * Unlike `copies`, which asks running nodes one after another, no rebalancer can move a block
   * from a node not yet asked to one already asked while this counts.
   */
  copiesAtRest(refs: readonly BlockRef[], data?: readonly Buffer[]): Promise<number[]>;
  /** What each node held of the j-th ref at the last copiesAtRest (for failure messages). */
  copiesReport(j: number): string;
  newClient(): Promise<BlockClient>;
  /**
   * With `powercut`: node i loses power (SIGKILL, then every change no fsync covered is undone,
   * or a random part of them with 'random'; src/storage/powercut.ts) and starts again.
   */
  powerCut(i: number, keep?: 'none' | 'random'): Promise<CutReport>;
  /** Every node loses power at once (the whole rack), then all start again. */
  powerCutAll(keep?: 'none' | 'random'): Promise<CutReport[]>;
  stop(): Promise<void>;
}

export async function startCluster(
  opts: { nodes?: number; replication?: number; blockSize?: string; size?: string; torusdArgs?: string[]; powercut?: boolean } = {},
): Promise<TestCluster> {
  const etcd = await startEtcd();
  const C = ['-C', etcd.endpoint];
  await ok('torusctl', [...C, 'init', '--block-size', opts.blockSize ?? '64KiB', '--replication', String(opts.replication ?? 2)]);
  const nodes: Torusd[] = [];
  const cutLogs: string[] = [];
  /** The power-cut preload and its log dir for node i (none without `powercut`). */
  const preload = (i: number): { nodeArgs?: string[]; env?: NodeJS.ProcessEnv } => {
    if (!opts.powercut) return {};
    cutLogs[i] ??= mkdtempSync(join(tmpdir(), 'torus-powercut-'));
    return { nodeArgs: ['--import', POWERCUT_PRELOAD], env: { [POWERCUT_ENV]: cutLogs[i] } };
  };
  for (let i = 0; i < (opts.nodes ?? 3); i++) nodes.push(await startTorusd(etcd.endpoint, { size: opts.size ?? '256MiB', extra: opts.torusdArgs ?? [], ...preload(i) }));
  await ok('torusctl', [...C, 'peer', 'add', '--all-peers']);
  const meta = new EtcdMetadata({ endpoints: [etcd.endpoint] });
  const clients: BlockClient[] = [];
  const newClient = async (): Promise<BlockClient> => {
    const c = await openBlockClient({ meta, rpc: { requestTimeoutMs: 3000, connectTimeoutMs: 1000, security: await clientSecurity() } });
    clients.push(c);
    return c;
  };
  const client = await newClient();
  const uuids = new Map<number, string>();
  for (const [i, n] of nodes.entries()) {
    const p = (await meta.getPeers()).find((x) => x.address === n.address);
    if (!p) throw new Error(`node ${n.address} not registered`);
    uuids.set(i, p.uuid);
  }
  const blockSize = client.global.blockSize;
  const down = new Set<number>();
  let lastCopies: string[] = [];
  const kill = async (i: number): Promise<void> => {
    down.add(i);
    await nodes[i]!.kill('SIGKILL');
  };
  const restart = async (i: number): Promise<void> => {
    const old = nodes[i]!;
    nodes[i] = await startTorusd(etcd.endpoint, {
      dataDir: old.dataDir,
      peerPort: old.peerPort,
      httpPort: old.httpPort,
      size: opts.size ?? '256MiB',
      extra: opts.torusdArgs ?? [],
      ...preload(i),
    });
    down.delete(i);
  };
  return {
    etcd,
    nodes,
    meta,
    client,
    blockSize,
    kill,
    restart,
    uuidOf: (i) => uuids.get(i)!,
    async copies(refs) {
      const counts = refs.map(() => 0);
      for (const [i, n] of nodes.entries()) {
        if (down.has(i)) continue;
        // A node restarted a moment ago may still be behind its breaker's cool-down: retry.
        const peer = client.pool.client({ uuid: uuids.get(i)!, address: rpcAddress(n.address) });
        const has = await eventually(`node ${i} answers`, () => peer.hasBlocks(refs), 15_000);
        has.forEach((h, j) => {
          if (h) counts[j]!++;
        });
      }
      return counts;
    },
    async copiesAtRest(refs, data) {
      const wasUp = nodes.map((_, i) => !down.has(i));
      for (const [i, up] of wasUp.entries()) if (up) await kill(i);
      const counts = refs.map(() => 0);
      // Per ref, what each node holds: for the message of a test that finds too few copies.
      const seen = refs.map(() => [] as string[]);
      for (const [i, n] of nodes.entries()) {
        const store = await FileBlockStore.open({ dir: join(n.dataDir, 'block'), blockSize, sizeBytes: parseSize(opts.size ?? '256MiB') });
        try {
          for (const [j, ref] of refs.entries()) {
            if (!store.hasBlock(ref)) {
              seen[j]!.push(`node${i}:${store.isOpenLog(ref) ? 'open' : 'absent'}`);
              continue;
            }
            // getBlock checks the copy's sector CRCs: a copy a power cut left without all of its
            // bytes (its record persisted, its data not: legitimate for a copy never flushed, such
            // as a move or spill in progress) is refused as CORRUPT, and does not count.
            let got: Buffer;
            try {
              got = await store.getBlock(ref);
            } catch (err) {
              if (isTorusError(err, 'CORRUPT')) {
                seen[j]!.push(`node${i}:corrupt`);
                continue;
              }
              throw err;
            }
            if (data && !got.equals(data[j]!)) throw new Error(`the copy of ${formatBlockRef(ref)} in ${n.dataDir} differs from what was written`);
            counts[j]!++;
            seen[j]!.push(`node${i}:ok`);
          }
        } finally {
          await store.close();
        }
      }
      for (const [i, up] of wasUp.entries()) if (up) await restart(i);
      lastCopies = refs.map((r, j) => `${formatBlockRef(r)} owners ${client.distributor.journalOwners(r).peers.slice(0, 2).map((u) => `node${[...uuids.values()].indexOf(u)}`).join(',')}: ${seen[j]!.join(' ')}`);
      return counts;
    },
    copiesReport(j: number): string {
      return lastCopies[j] ?? '';
    },
    newClient,
    async powerCut(i, keep = 'none') {
      if (!opts.powercut) throw new Error('powerCut needs a cluster started with powercut: true');
      await kill(i);
      const report = applyPowerCut(cutLogs[i]!, { keep });
      await restart(i);
      return report;
    },
    async powerCutAll(keep = 'none') {
      if (!opts.powercut) throw new Error('powerCutAll needs a cluster started with powercut: true');
      await Promise.all(nodes.map((_, i) => kill(i)));
      const reports = nodes.map((_, i) => applyPowerCut(cutLogs[i]!, { keep }));
      for (const i of nodes.keys()) await restart(i);
      return reports;
    },
    async stop() {
      for (const c of clients) await c.close().catch(() => undefined);
      await meta.close();
      await Promise.all(nodes.map((n) => n.kill()));
      for (const n of nodes) removeDir(n.dataDir);
      for (const l of cutLogs) if (l) removeDir(l);
      await etcd.stop();
    },
  };
}

export function dataRef(volume: number, index: number): BlockRef {
  return { type: BlockType.Data, volume, inode: 1, index };
}

export function randomBlock(size: number): Buffer {
  return randomBytes(size);
}
