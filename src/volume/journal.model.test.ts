import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { TorusError } from '../core/errors.js';
import type { KVSession, MetaKV } from '../core/interfaces.js';
import { Distributor } from '../distributor/distributor.js';
import { MemoryTransport } from '../distributor/memory-transport.js';
import type { PeerTarget } from '../distributor/transport.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { createRing, newRingModel } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { collectLocal, buildLiveSet } from './gc.js';
import { VolumeMeta } from './meta.js';
import { BlockVolume } from './volume.js';

// A model-based test of the journal (docs/journal.md): random writes, flushes, checkpoints,
// folds, snapshots, storage nodes going down and losing power, and writers killed after any
// number of their network calls, against an in-memory model. Whatever happens:
//
// - the volume reads what the model says (acknowledged writes, then pending ones, in order);
// - after a writer dies, the next one sees every acknowledged flush, and of what followed some
//   prefix, in order (writes are journaled in order; a replay takes a prefix), the last write of
//   which may be torn: its first bytes applied and not the rest, as a disk may tear a write that
//   was never acknowledged;
// - a snapshot holds what was flushed when it was taken, whatever happens after.

const BS = 4096;
const SIZE = 24 * BS;
const PEERS = ['a', 'b', 'c', 'd'];

/** The network as one writer process sees it: killed, every call fails, and never reaches a store. */
class WriterTransport extends MemoryTransport {
  killAfter = Infinity;
  private made = 0;
  constructor(
    private readonly net: MemoryTransport,
  ) {
    super();
  }
  get killed(): boolean {
    return this.made >= this.killAfter;
  }
  private gate<T>(fn: () => Promise<T>): Promise<T> {
    if (this.made++ >= this.killAfter) return Promise.reject(new TorusError('TIMEOUT', 'the writer process is dead'));
    return fn();
  }
  override get(p: PeerTarget, ...a: [Parameters<MemoryTransport['get']>[1], number, number]) {
    return this.gate(() => this.net.get(p, ...a));
  }
  override getSectors(p: PeerTarget, ...a: [Parameters<MemoryTransport['getSectors']>[1], number, number]) {
    return this.gate(() => this.net.getSectors(p, ...a));
  }
  override put(...a: Parameters<MemoryTransport['put']>) {
    return this.gate(() => this.net.put(...a));
  }
  override has(...a: Parameters<MemoryTransport['has']>) {
    return this.gate(() => this.net.has(...a));
  }
  override delete(...a: Parameters<MemoryTransport['delete']>) {
    return this.gate(() => this.net.delete(...a));
  }
  override flush(...a: Parameters<MemoryTransport['flush']>) {
    return this.gate(() => this.net.flush(...a));
  }
  override hasJournal(...a: Parameters<MemoryTransport['hasJournal']>) {
    return this.gate(() => this.net.hasJournal(...a));
  }
  override appendLog(...a: Parameters<MemoryTransport['appendLog']>) {
    return this.gate(() => this.net.appendLog(...a));
  }
  override sealLog(...a: Parameters<MemoryTransport['sealLog']>) {
    return this.gate(() => this.net.sealLog(...a));
  }
  override fenceVolume(...a: Parameters<MemoryTransport['fenceVolume']>) {
    return this.gate(() => this.net.fenceVolume(...a));
  }
  override readRaw(...a: Parameters<MemoryTransport['readRaw']>) {
    return this.gate(() => this.net.readRaw(...a));
  }
  override instance(p: PeerTarget) {
    return this.net.instance(p);
  }
}

/** A writer's etcd client: dead with its process. */
function mortalKv(kv: MetaKV, dead: () => boolean): MetaKV {
  const check = (): void => {
    if (dead()) throw new TorusError('ETCD_UNAVAILABLE', 'the writer process is dead');
  };
  return {
    get: async (k) => (check(), kv.get(k)),
    list: async (p) => (check(), kv.list(p)),
    txn: async (c, s, f, o) => (check(), kv.txn(c, s, f, o)),
    session: (t) => kv.session(t),
    status: () => kv.status(),
    compact: (r) => kv.compact(r),
  };
}

type Op =
  | { kind: 'write'; off: number; len: number; seed: number }
  | { kind: 'flush' }
  | { kind: 'checkpoint' }
  | { kind: 'fold' }
  | { kind: 'snapshot' }
  | { kind: 'read'; off: number; len: number }
  | { kind: 'down'; peer: number }
  | { kind: 'up'; peer: number }
  | { kind: 'powercut'; peer: number }
  | { kind: 'crash'; afterCalls: number }
  | { kind: 'reopen' }
  | { kind: 'gc' };

const arbOp: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('write' as const), off: fc.nat(SIZE - 1), len: fc.integer({ min: 1, max: 3 * BS }), seed: fc.nat(250) }) },
  // Whole blocks, which the journal names as blocks of their own (Block records), not as bytes.
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('write' as const), off: fc.nat(SIZE / BS - 1).map((i) => i * BS), len: fc.integer({ min: 1, max: 3 }).map((n) => n * BS), seed: fc.nat(250) }) },
  { weight: 4, arbitrary: fc.constant({ kind: 'flush' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'checkpoint' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'fold' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'snapshot' as const }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('read' as const), off: fc.nat(SIZE - 1), len: fc.integer({ min: 1, max: 2 * BS }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('down' as const), peer: fc.nat(3) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('up' as const), peer: fc.nat(3) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('powercut' as const), peer: fc.nat(3) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('crash' as const), afterCalls: fc.nat(12) }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reopen' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'gc' as const }) },
);

/** `got` is `base` with the first bytes of write `w` applied (some, in offset order), nothing else. */
function tornOver(got: Buffer, base: Buffer, w: { off: number; data: Buffer }): boolean {
  const end = w.off + w.data.length;
  if (!got.subarray(0, w.off).equals(base.subarray(0, w.off)) || !got.subarray(end).equals(base.subarray(end))) return false;
  let cut = 0;
  while (cut < w.data.length && got[w.off + cut] === w.data[cut]) cut++;
  return got.subarray(w.off + cut, end).equals(base.subarray(w.off + cut, end));
}

function fill(seed: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + i * 7 + 1) & 0xff;
  return b;
}

export async function run(ops: Op[]): Promise<void> {
  const md = new MemoryMetadataStore();
  const kv = md.client().kv();
  const net = new MemoryTransport();
  const stores = PEERS.map((u) => {
    const s = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 100_000, volatile: true });
    net.add(u, s);
    return s;
  });
  const ring = createRing(newRingModel('ketama', 2, PEERS.map((uuid) => ({ uuid, totalBlocks: 100_000 })), 2));
  const dist = (t: MemoryTransport | WriterTransport) => new Distributor({ blockSize: BS, ring: () => ring, target: (uuid) => ({ uuid, address: `mem://${uuid}` }), transport: t, readTimeoutMs: 5 });
  await new VolumeMeta(kv).create('v', SIZE);
  const opts = { checkpointIntervalMs: 0, snapshotPollMs: 0, foldIdleMs: 0, maxRunChain: 6 };

  interface Writer {
    t: WriterTransport;
    session: KVSession;
    vol: BlockVolume;
  }
  const openWriter = async (): Promise<Writer> => {
    const t = new WriterTransport(net);
    const meta = new VolumeMeta(mortalKv(kv, () => t.killed));
    const session = await kv.session(10_000);
    const vol = await BlockVolume.open({ meta, store: dist(t), session }, 'v', opts);
    return { t, session, vol };
  };

  // The model: what the last acknowledged flush made durable, and the writes since, in order.
  let acked: Buffer = Buffer.alloc(SIZE);
  let since: { off: number; data: Buffer }[] = [];
  const image = (upto = since.length): Buffer => {
    const img = Buffer.from(acked);
    for (const w of since.slice(0, upto)) w.data.copy(img, w.off);
    return img;
  };
  const snaps = new Map<string, Buffer>();
  let w = await openWriter();
  const down = new Set<string>();

  const reopenAfterCrash = async (): Promise<void> => {
    // The dead writer's lease runs out; the next one fences and replays its journal.
    (w.session as unknown as { expire(): void }).expire();
    net.down.clear();
    down.clear();
    const next = await openWriter();
    const got = await next.vol.read(0, SIZE);
    let k = -1;
    for (let i = 0; i <= since.length && k < 0; i++) if (got.equals(image(i)) || (i < since.length && tornOver(got, image(i), since[i]!))) k = i;
    assert.ok(k >= 0, `after a crash the volume is not the acknowledged state plus a prefix of the ${since.length} writes since`);
    acked = got;
    since = [];
    w = next;
  };

  for (const op of ops) {
    switch (op.kind) {
      case 'write': {
        const len = Math.min(op.len, SIZE - op.off);
        const data = fill(op.seed, len);
        try {
          await w.vol.write(op.off, data);
          since.push({ off: op.off, data });
        } catch {
          // A dead or fenced writer: nothing it writes counts.
          if (!w.t.killed) throw new Error('a write failed on a live writer');
        }
        break;
      }
      case 'flush':
        try {
          await w.vol.flush();
          acked = image();
          since = [];
        } catch (err) {
          // A flush may fail (too few live peers, a dead writer); its writes stay pending.
          if (!w.t.killed && down.size < 3) throw err;
        }
        break;
      case 'checkpoint':
      case 'fold':
        try {
          if (op.kind === 'checkpoint') await w.vol.checkpoint();
          else await w.vol.foldAll();
          if (op.kind === 'fold') {
            acked = image();
            since = [];
          }
        } catch (err) {
          if (!w.t.killed && down.size === 0) throw err;
        }
        break;
      case 'snapshot': {
        if (w.t.killed || down.size > 0) break;
        const name = `s${snaps.size}`;
        await w.vol.flush();
        acked = image();
        since = [];
        // Mounted: the request is taken by the writer on its next look for requests.
        const taken = new VolumeMeta(kv).createSnapshot('v', name, { timeoutMs: 5000 });
        await new Promise((r) => setTimeout(r, 2));
        await (w.vol as unknown as { takeRequestedSnapshots(): Promise<void> }).takeRequestedSnapshots();
        await taken;
        snaps.set(name, Buffer.from(acked));
        break;
      }
      case 'read': {
        if (w.t.killed) break;
        const len = Math.min(op.len, SIZE - op.off);
        try {
          const got = await w.vol.read(op.off, len);
          assert.ok(got.equals(image().subarray(op.off, op.off + len)), `read ${op.off}+${len}`);
        } catch (err) {
          if (down.size < 2) throw err;
        }
        break;
      }
      case 'down':
        down.add(PEERS[op.peer]!);
        net.down.add(PEERS[op.peer]!);
        break;
      case 'up':
        down.delete(PEERS[op.peer]!);
        net.down.delete(PEERS[op.peer]!);
        break;
      case 'powercut':
        // The node loses what it had not synced, and comes back as a new process.
        stores[op.peer]!.powerCut();
        net.instances.set(PEERS[op.peer]!, `after-cut-${Math.random()}`);
        break;
      case 'crash':
        w.t.killAfter = op.afterCalls;
        // Keep it working until it dies: a flush gives the calls to die in.
        await w.vol.write(0, fill(7, 10)).then(
          () => since.push({ off: 0, data: fill(7, 10) }),
          () => undefined,
        );
        await w.vol.flush().then(
          () => {
            acked = image();
            since = [];
          },
          () => undefined,
        );
        await reopenAfterCrash();
        break;
      case 'reopen':
        if (w.t.killed) break;
        try {
          await w.vol.close();
          acked = image();
          since = [];
          w = await openWriter();
          assert.ok((await w.vol.read(0, SIZE)).equals(image()), 'a clean close and reopen reads the same');
        } catch (err) {
          if (down.size === 0) throw err;
          await reopenAfterCrash();
        }
        break;
      case 'gc': {
        // With both replicas of some page down, GC cannot see the whole view and aborts (deleting
        // nothing), as it must.
        let live;
        try {
          live = await buildLiveSet(new VolumeMeta(kv), dist(net));
        } catch (err) {
          if (down.size < 2) throw err;
          break;
        }
        for (const s of stores) await collectLocal(live, s);
        break;
      }
    }
  }
  // The end: a writer dies at a random point of its last flush, or closes cleanly; either way.
  await reopenAfterCrash();
  assert.ok((await w.vol.read(0, SIZE)).equals(image()));
  for (const [name, want] of snaps) {
    const s = await BlockVolume.open({ meta: new VolumeMeta(kv), store: dist(net), session: w.session }, 'v', { snapshot: name });
    assert.ok((await s.read(0, SIZE)).equals(want), `snapshot ${name}`);
    await s.close();
  }
  await w.vol.close();
}

test('journal model: writes, flushes, checkpoints, folds, snapshots, node failures and power cuts, writers killed at any call', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(arbOp, { minLength: 5, maxLength: 40 }), async (ops) => run(ops).catch((e) => { if (process.env.DEBUG_MODEL) console.error(JSON.stringify(ops), e); throw e; })),
    { numRuns: Number(process.env.MODEL_RUNS ?? 60) },
  );
});
