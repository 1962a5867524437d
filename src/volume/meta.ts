import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { TorusError, isTorusError } from '../core/errors.js';
import { MAX_VOLUME_ID } from '../core/ids.js';
import type { KVCompare, KVEntry, KVOp, KVSession, MetaKV } from '../core/interfaces.js';
import {
  checkSnapshotName,
  checkVolumeName,
  checkVolumeSize,
  decodeHead,
  decodeSnapshot,
  encodeHead,
  encodeSnapshot,
  type Head,
  type LockRecord,
  type SnapshotRecord,
  type VolumeRecord,
} from './records.js';

// Volume metadata in etcd, every change a transaction:
//
//   /torus/meta/volumeminter               next volume id
//   /torus/volumes/<name>                  VolumeRecord
//   /torus/volumemeta/<id>/head2           Head: what the last checkpoint committed (tree, runs, journal)
//   /torus/volumemeta/<id>/head            the same, as written before the journal (read, then replaced by head2)
//   /torus/volumemeta/<id>/snapreq/<s>     a request to the writer to checkpoint and take snapshot <s>
//   /torus/volumemeta/<id>/epoch           next unused epoch (the inode number new blocks get)
//   /torus/volumemeta/<id>/lock            LockRecord, bound to the holder's lease
//   /torus/volumemeta/<id>/snapshots/<s>   SnapshotRecord
//   /torus/volumemeta/<id>/readers/<token> Head a read-only opener holds, bound to its lease
//
// The head only moves through a transaction that also checks the lock record is still the
// writer's own (token included): a writer whose lease expired, or whose lock was taken over,
// can never advance it again, even after it reconnects (original issue #230).

const P = '/torus/';
export const VKEYS = {
  minter: `${P}meta/volumeminter`,
  volumesPrefix: `${P}volumes/`,
  volume: (name: string) => `${P}volumes/${name}`,
  metaPrefix: `${P}volumemeta/`,
  meta: (id: number) => `${P}volumemeta/${id}/`,
  head: (id: number) => `${P}volumemeta/${id}/head`,
  /**
   * Heads written since the journal live under a new key: a client from before the journal
   * finds no `head` for such a volume and refuses it instead of reading it without its overlays.
   */
  head2: (id: number) => `${P}volumemeta/${id}/head2`,
  snapRequests: (id: number) => `${P}volumemeta/${id}/snapreq/`,
  snapRequest: (id: number, s: string) => `${P}volumemeta/${id}/snapreq/${s}`,
  epoch: (id: number) => `${P}volumemeta/${id}/epoch`,
  lock: (id: number) => `${P}volumemeta/${id}/lock`,
  snapshots: (id: number) => `${P}volumemeta/${id}/snapshots/`,
  snapshot: (id: number, s: string) => `${P}volumemeta/${id}/snapshots/${s}`,
  readers: (id: number) => `${P}volumemeta/${id}/readers/`,
  reader: (id: number, token: string) => `${P}volumemeta/${id}/readers/${token}`,
};

export interface VolumeInfo {
  readonly record: VolumeRecord;
  readonly head: Head;
  readonly lock?: LockRecord;
  readonly snapshots: number;
}

/** A held volume lock: proof for fenced commits. */
export interface VolumeLock {
  readonly volume: VolumeRecord;
  readonly record: LockRecord;
  readonly session: KVSession;
  /** The epoch new blocks of this session get; advanced by each commit. */
  epoch: number;
}

/** Operations a commit adds to its transaction, made from the head it commits. */
export type ExtraOps = (head: Head) => KVOp[];

/**
 * A volume whose last writer stopped without closing has a journal tail that only a writer can
 * make part of its head: snapshots, clones and restores of it wait for a replay (opening it for
 * writing once does that).
 */
export function replayNeeded(name: string): TorusError {
  return new TorusError('AGAIN', `volume ${name} has journal records its last writer did not checkpoint (it stopped without closing): open it for writing once (torusctl's snapshot, clone and restore do this themselves), then try again`);
}

export function isReplayNeeded(err: unknown): boolean {
  return isTorusError(err, 'AGAIN') && /did not checkpoint/.test(err.message);
}

/**
 * A commit's wait for etcd's answer. An etcd write takes milliseconds; one unanswered for this
 * long was most likely dropped with a dying leader (etcd never answers those), and the commit
 * is checked and sent again rather than waiting out the whole --etcd-timeout.
 */
const COMMIT_ATTEMPT_MS = 2000;

export function lockedError(name: string, l: LockRecord | undefined): TorusError {
  const who = l ? ` (held by ${l.host} pid ${l.pid}, process ${l.holder}, since ${l.since})` : '';
  return new TorusError('LOCKED', `volume ${name} is already mounted on another host${who}`);
}

export class VolumeMeta {
  constructor(
    private readonly kv: MetaKV,
    /** This process's identity, written into lock records. */
    private readonly processId: string = randomUUID(),
  ) {}

  private async nextVolumeId(): Promise<number> {
    for (let i = 0; i < 50; i++) {
      const cur = await this.kv.get(VKEYS.minter);
      const id = cur ? Number(cur.value) : 1;
      if (id > MAX_VOLUME_ID) throw new TorusError('OUT_OF_SPACE', 'volume ids exhausted');
      const res = await this.kv.txn(
        [{ key: VKEYS.minter, target: 'mod', cmp: '==', value: cur?.modRevision ?? 0 }],
        [{ op: 'put', key: VKEYS.minter, value: String(id + 1) }],
      );
      if (res.succeeded) return id;
    }
    throw new TorusError('AGAIN', 'could not allocate a volume id: too much contention');
  }

  /** Creates a volume whose first head is `head` (a fresh volume: no root). */
  async create(name: string, size: number, opts: { head?: Head; parent?: VolumeRecord['parent'] } = {}): Promise<VolumeRecord> {
    checkVolumeName(name);
    checkVolumeSize(size);
    if (await this.kv.get(VKEYS.volume(name))) throw new TorusError('EXISTS', `volume ${name} already exists`);
    const head: Head = opts.head ? { ...opts.head, size, epoch: 0, journal: null } : { root: null, depth: 1, size, epoch: 0 };
    const record = await this.insert(name, head, opts.parent, []);
    if (!record) throw new TorusError('EXISTS', `volume ${name} already exists`);
    return record;
  }

  /**
   * Creates volume `name` from a snapshot, or from a volume as of its last sync, sharing its
   * blocks; `size` (default the source's) may be larger. The transaction also checks that the
   * source key is unchanged since it was read: a GC pass that reads metadata in between then still
   * sees the source holding the blocks, where a snapshot deleted (or a head moved) between our read
   * and the create would leave the new volume pointing at blocks GC may take.
   */
  async clone(name: string, source: { volume: string; snapshot?: string }, size?: number): Promise<VolumeRecord> {
    checkVolumeName(name);
    for (let i = 0; i < 20; i++) {
      const v = await this.get(source.volume);
      if (source.snapshot !== undefined) checkSnapshotName(source.snapshot);
      const e = source.snapshot !== undefined ? await this.kv.get(VKEYS.snapshot(v.id, source.snapshot)) : (await this.head(v.id).catch(() => undefined))?.entry;
      const key = e?.key ?? VKEYS.head2(v.id);
      if (!e) throw new TorusError('NOT_EXIST', source.snapshot !== undefined ? `no snapshot ${source.volume}@${source.snapshot}` : `volume ${source.volume} has no head`);
      const from = source.snapshot !== undefined ? decodeSnapshot(e.value).head : decodeHead(e.value);
      // A mounted source is cloned as of its last checkpoint; one whose writer died with a
      // journal tail first needs that tail replayed.
      if (source.snapshot === undefined && from.journal && !(await this.lockHolder(v.id))) throw replayNeeded(source.volume);
      const bytes = size ?? from.size;
      checkVolumeSize(bytes);
      if (bytes < from.size) throw new TorusError('INVALID_ARGUMENT', `a clone of ${bytes} bytes is smaller than its source (${from.size} bytes)`);
      if (await this.kv.get(VKEYS.volume(name))) throw new TorusError('EXISTS', `volume ${name} already exists`);
      const parent = source.snapshot !== undefined ? { volume: source.volume, snapshot: source.snapshot } : { volume: source.volume };
      // The source's tree and overlay runs, without its journal: a clone of a mounted volume is as
      // of its last checkpoint.
      const record = await this.insert(name, { root: from.root, depth: from.depth, size: bytes, epoch: 0, runs: from.runs ?? null, lsn: from.lsn ?? 1 }, parent, [
        { key, target: 'mod', cmp: '==', value: e.modRevision },
      ]);
      if (record) return record;
      if (await this.kv.get(VKEYS.volume(name))) throw new TorusError('EXISTS', `volume ${name} already exists`);
    }
    throw new TorusError('AGAIN', `volume ${source.volume} kept changing; try the clone again`);
  }

  /** The new volume's record, head and epoch in one transaction; undefined if `compares` fail. */
  private async insert(name: string, head: Head, parent: VolumeRecord['parent'], compares: KVCompare[]): Promise<VolumeRecord | undefined> {
    const id = await this.nextVolumeId();
    const record: VolumeRecord = { id, name, type: 'block', createdAt: new Date().toISOString(), ...(parent ? { parent } : {}) };
    const res = await this.kv.txn(
      [{ key: VKEYS.volume(name), target: 'version', cmp: '==', value: 0 }, ...compares],
      [
        { op: 'put', key: VKEYS.volume(name), value: JSON.stringify(record) },
        { op: 'put', key: VKEYS.head2(id), value: encodeHead(head) },
        { op: 'put', key: VKEYS.epoch(id), value: '1' },
      ],
    );
    return res.succeeded ? record : undefined;
  }

  async get(name: string): Promise<VolumeRecord> {
    checkVolumeName(name);
    const e = await this.kv.get(VKEYS.volume(name));
    if (!e) throw new TorusError('NOT_EXIST', `no volume named ${name}`);
    return JSON.parse(e.value) as VolumeRecord;
  }

  async list(): Promise<VolumeInfo[]> {
    const [vols, metas] = await Promise.all([this.kv.list(VKEYS.volumesPrefix), this.kv.list(VKEYS.metaPrefix)]);
    const byId = groupMeta(metas.entries);
    return vols.entries
      .map((e) => JSON.parse(e.value) as VolumeRecord)
      .map((record) => {
        const m = byId.get(record.id);
        return {
          record,
          head: m?.head ? decodeHead(m.head) : { root: null, depth: 1, size: 0, epoch: 0 },
          ...(m?.lock ? { lock: JSON.parse(m.lock) as LockRecord } : {}),
          snapshots: m?.snapshots.length ?? 0,
        };
      })
      .sort((a, b) => a.record.name.localeCompare(b.record.name));
  }

  /** The volume's head: `head2`, or a head from before the journal. `entry` is the key read. */
  async head(id: number): Promise<{ head: Head; entry: KVEntry }> {
    const e = (await this.kv.get(VKEYS.head2(id))) ?? (await this.kv.get(VKEYS.head(id)));
    if (!e) throw new TorusError('NOT_EXIST', `volume ${id} has no head`);
    return { head: decodeHead(e.value), entry: e };
  }

  async lockHolder(id: number): Promise<LockRecord | undefined> {
    const e = await this.kv.get(VKEYS.lock(id));
    return e ? (JSON.parse(e.value) as LockRecord) : undefined;
  }

  /**
   * Takes the volume's exclusive lock under `session` and a fresh epoch for its writes.
   * LOCKED, naming the holder, if anyone holds it.
   */
  async lock(name: string, session: KVSession): Promise<VolumeLock> {
    const volume = await this.get(name);
    const record: LockRecord = { holder: this.processId, host: hostname(), pid: process.pid, since: new Date().toISOString(), token: randomUUID() };
    const lockValue = JSON.stringify(record);
    const res = await this.kv.txn(
      [{ key: VKEYS.lock(volume.id), target: 'version', cmp: '==', value: 0 }],
      [{ op: 'put', key: VKEYS.lock(volume.id), value: lockValue, session }, { op: 'get', key: VKEYS.epoch(volume.id) }],
      [{ op: 'get', key: VKEYS.lock(volume.id) }],
    );
    if (!res.succeeded) {
      const held = res.gets[0]?.[0];
      throw lockedError(name, held ? (JSON.parse(held.value) as LockRecord) : undefined);
    }
    const epochEntry = res.gets[0]?.[0];
    const lock: VolumeLock = { volume, record, session, epoch: epochEntry ? Number(epochEntry.value) : 1 };
    // Claim the epoch: a writer that crashed may have written blocks under the old value, and
    // refs must never be reused with other bytes.
    await this.bumpEpoch(lock);
    return lock;
  }

  private fenced(lock: VolumeLock): { key: string; target: 'value'; cmp: '=='; value: string } {
    return { key: VKEYS.lock(lock.volume.id), target: 'value', cmp: '==', value: JSON.stringify(lock.record) };
  }

  private lostLock(lock: VolumeLock): TorusError {
    return new TorusError('LOCKED', `lost the lock on volume ${lock.volume.name} (lease expired or taken over): refusing to change it`);
  }

  private async bumpEpoch(lock: VolumeLock): Promise<void> {
    const id = lock.volume.id;
    const res = await this.kv.txn(
      [this.fenced(lock), { key: VKEYS.epoch(id), target: 'value', cmp: '==', value: String(lock.epoch) }],
      [{ op: 'put', key: VKEYS.epoch(id), value: String(lock.epoch + 1) }],
    );
    if (!res.succeeded) throw this.lostLock(lock);
  }

  /**
   * Commits a new head, fenced by the lock, and moves the session to the next epoch.
   * LOCKED if the lock is no longer ours; the head is then untouched.
   *
   * When etcd's answer is lost (its member died, a deadline passed), the transaction may or may
   * not have been applied, and may still be applied later. It is then sent again until etcd
   * answers, for as long as the lock can be ours: its compares (our lock record, the epoch it
   * moves from e+1 to e+2) let at most one copy ever apply. A copy whose compare failed means
   * another copy applied if the epoch is e+2 with our head; else the lock is gone.
   */
  async commit(lock: VolumeLock, head: Omit<Head, 'epoch'>, extra?: ExtraOps): Promise<void> {
    if (!lock.session.alive) throw this.lostLock(lock);
    const id = lock.volume.id;
    const full: Head = { ...head, epoch: lock.epoch };
    const value = encodeHead(full);
    const deadline = Date.now() + 2 * 15_000;
    let uncertain = false;
    for (;;) {
      let res;
      try {
        res = await this.kv.txn(
          [this.fenced(lock), { key: VKEYS.epoch(id), target: 'value', cmp: '==', value: String(lock.epoch + 1) }],
          [
            { op: 'put', key: VKEYS.head2(id), value },
            // A head from before the journal is replaced, not kept beside: one head per volume.
            { op: 'delete', key: VKEYS.head(id) },
            { op: 'put', key: VKEYS.epoch(id), value: String(lock.epoch + 2) },
            ...(extra?.(full) ?? []),
          ],
          [],
          { timeoutMs: COMMIT_ATTEMPT_MS },
        );
      } catch (err) {
        if (!isTorusError(err) || !err.retryable || (err.code !== 'ETCD_UNAVAILABLE' && err.code !== 'TIMEOUT')) throw err;
        uncertain = true;
        // Carrying on as if it had not been applied would leave the writer on a tree that is no
        // longer the head (GC then takes its pages): ask, and send it again only if it was not.
        if (await this.commitApplied(lock, value, deadline)) break;
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      if (res.succeeded || (uncertain && (await this.commitApplied(lock, value, deadline)))) break;
      throw this.lostLock(lock);
    }
    lock.epoch++;
  }

  /**
   * After a commit whose outcome is unknown: asks etcd, until `deadline` and while the lock can
   * still be ours, whether it was applied. Only the lock holder moves the epoch, so epoch + 2 with
   * our head means it was. If the lock is lost before etcd answers, the writer is fenced either
   * way: LOCKED.
   */
  private async commitApplied(lock: VolumeLock, value: string, deadline: number): Promise<boolean> {
    const id = lock.volume.id;
    for (;;) {
      if (!lock.session.alive || Date.now() > deadline) throw this.lostLock(lock);
      try {
        const [epoch, head] = await Promise.all([this.kv.get(VKEYS.epoch(id)), this.kv.get(VKEYS.head2(id))]);
        if (epoch?.value === String(lock.epoch + 2) && head?.value === value) return true;
        if (epoch?.value === String(lock.epoch + 1)) return false;
        // Someone else moved the epoch: we no longer hold the lock.
        throw this.lostLock(lock);
      } catch (e) {
        if (isTorusError(e, 'LOCKED')) throw e;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }

  async unlock(lock: VolumeLock): Promise<void> {
    await this.kv.txn([this.fenced(lock)], [{ op: 'delete', key: VKEYS.lock(lock.volume.id) }]);
  }

  async delete(name: string): Promise<void> {
    const v = await this.get(name);
    const res = await this.kv.txn(
      [{ key: VKEYS.lock(v.id), target: 'version', cmp: '==', value: 0 }, { key: VKEYS.volume(name), target: 'version', cmp: '>', value: 0 }],
      [
        { op: 'delete', key: VKEYS.volume(name) },
        { op: 'delete', key: VKEYS.meta(v.id), prefix: true },
      ],
    );
    if (!res.succeeded) {
      const holder = await this.lockHolder(v.id);
      if (holder) throw new TorusError('LOCKED', `volume ${name} is mounted (${holder.host} pid ${holder.pid}); unmount it first`);
      throw new TorusError('NOT_EXIST', `no volume named ${name}`);
    }
  }

  // ---- snapshots of mounted volumes: requests to the writer ----

  /** Snapshot names requested of the volume's writer and not yet taken. */
  async pendingSnapshotRequests(id: number): Promise<string[]> {
    const { entries } = await this.kv.list(VKEYS.snapRequests(id));
    return entries.map((e) => e.key.slice(VKEYS.snapRequests(id).length));
  }

  /** What a writer's checkpoint adds to take the requested snapshots of the head it commits. */
  snapshotOps(id: number, names: readonly string[], head: Head): KVOp[] {
    const when = new Date().toISOString();
    // A snapshot holds the checkpoint's tree and runs; the journal is the writer's, and empty
    // up to the checkpoint anyway.
    const snapHead: Head = { ...head, journal: null };
    return names.flatMap((name) => [
      { op: 'put' as const, key: VKEYS.snapshot(id, name), value: encodeSnapshot({ name, when, head: snapHead }) },
      { op: 'delete' as const, key: VKEYS.snapRequest(id, name) },
    ]);
  }

  // ---- snapshots ----

  /**
   * Snapshot of a volume nobody has mounted: its head. Of a mounted one: the writer is asked (a
   * request key it watches for) to checkpoint and commit the snapshot with its head in one
   * transaction, so the snapshot holds every write flushed before the request. A volume whose
   * last writer died with a journal tail must be replayed first (REPLAY_NEEDED: open it once).
   */
  async createSnapshot(name: string, snap: string, opts: { timeoutMs?: number } = {}): Promise<SnapshotRecord> {
    checkSnapshotName(snap);
    const v = await this.get(name);
    for (let i = 0; i < 20; i++) {
      const { head, entry } = await this.head(v.id);
      const rec: SnapshotRecord = { name: snap, when: new Date().toISOString(), head: { ...head, journal: null } };
      const res = await this.kv.txn(
        [
          { key: VKEYS.snapshot(v.id, snap), target: 'version', cmp: '==', value: 0 },
          { key: VKEYS.lock(v.id), target: 'version', cmp: '==', value: 0 },
          { key: entry.key, target: 'mod', cmp: '==', value: entry.modRevision },
        ],
        head.journal ? [] : [{ op: 'put', key: VKEYS.snapshot(v.id, snap), value: encodeSnapshot(rec) }],
        [
          { op: 'get', key: VKEYS.snapshot(v.id, snap) },
          { op: 'get', key: VKEYS.lock(v.id) },
        ],
      );
      if (res.succeeded && head.journal) throw replayNeeded(name);
      if (res.succeeded) return rec;
      if (res.gets[0]?.length) throw new TorusError('EXISTS', `snapshot ${name}@${snap} already exists`);
      if (res.gets[1]?.length) {
        const taken = await this.requestSnapshot(v, snap, opts.timeoutMs ?? 30_000);
        if (taken) return taken;
      }
    }
    throw new TorusError('AGAIN', `volume ${name} kept changing; try the snapshot again`);
  }

  /** Asks the volume's writer for a snapshot and waits for it; undefined if the volume was unmounted meanwhile. */
  private async requestSnapshot(v: VolumeRecord, snap: string, timeoutMs: number): Promise<SnapshotRecord | undefined> {
    await this.kv.txn([{ key: VKEYS.snapRequest(v.id, snap), target: 'version', cmp: '==', value: 0 }], [
      { op: 'put', key: VKEYS.snapRequest(v.id, snap), value: JSON.stringify({ requestedAt: new Date().toISOString() }) },
    ]);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const [s, lock] = await Promise.all([this.kv.get(VKEYS.snapshot(v.id, snap)), this.kv.get(VKEYS.lock(v.id))]);
      if (s) return decodeSnapshot(s.value);
      if (!lock || Date.now() > deadline) {
        await this.kv.txn([], [{ op: 'delete', key: VKEYS.snapRequest(v.id, snap) }]);
        if (!lock) return undefined;
        const holder = JSON.parse(lock.value) as LockRecord;
        throw new TorusError(
          'TIMEOUT',
          `the writer of volume ${v.name} (${holder.host} pid ${holder.pid}) did not take snapshot ${snap} within ${Math.round(timeoutMs / 1000)} s: it may be a client from before snapshots of mounted volumes; unmount the volume and try again`,
        );
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async listSnapshots(name: string): Promise<SnapshotRecord[]> {
    const v = await this.get(name);
    const { entries } = await this.kv.list(VKEYS.snapshots(v.id));
    return entries.map((e) => decodeSnapshot(e.value)).sort((a, b) => a.when.localeCompare(b.when) || a.name.localeCompare(b.name));
  }

  /** Every snapshot of every volume, read at one revision, with its volume. */
  async listAllSnapshots(): Promise<{ volume: VolumeRecord; snapshot: SnapshotRecord }[]> {
    const all = await this.kv.list(P);
    const byId = new Map<number, VolumeRecord>();
    for (const e of all.entries)
      if (e.key.startsWith(VKEYS.volumesPrefix)) {
        const r = JSON.parse(e.value) as VolumeRecord;
        byId.set(r.id, r);
      }
    const out: { volume: VolumeRecord; snapshot: SnapshotRecord }[] = [];
    for (const e of all.entries) {
      const m = /^\/torus\/volumemeta\/(\d+)\/snapshots\//.exec(e.key);
      const volume = m ? byId.get(Number(m[1])) : undefined;
      if (volume) out.push({ volume, snapshot: decodeSnapshot(e.value) });
    }
    return out;
  }

  async getSnapshot(name: string, snap: string): Promise<{ volume: VolumeRecord; snapshot: SnapshotRecord; entry: KVEntry }> {
    checkSnapshotName(snap);
    const volume = await this.get(name);
    const e = await this.kv.get(VKEYS.snapshot(volume.id, snap));
    if (!e) throw new TorusError('NOT_EXIST', `no snapshot ${name}@${snap}`);
    return { volume, snapshot: decodeSnapshot(e.value), entry: e };
  }

  // ---- read-only opens: what a reader holds ----

  /**
   * A read-only opener's hold on `head`, the head (or snapshot) it read from `entry`: GC keeps
   * everything that head names (tree, runs and journal tail) as it keeps a snapshot's, until the
   * reader lets go or its lease runs out. Taken only if `entry` is unchanged since it was read,
   * so no GC pass in between can have judged by a newer head alone; undefined if it changed
   * (read it again).
   */
  async hold(id: number, session: KVSession, entry: KVEntry, head: Head): Promise<string | undefined> {
    const token = randomUUID();
    const res = await this.kv.txn(
      [{ key: entry.key, target: 'mod', cmp: '==', value: entry.modRevision }],
      [{ op: 'put', key: VKEYS.reader(id, token), value: encodeHead(head), session }],
    );
    return res.succeeded ? token : undefined;
  }

  /** How many read-only opens hold a view of the volume now. */
  async readers(id: number): Promise<number> {
    return (await this.kv.list(VKEYS.readers(id))).entries.length;
  }

  async letGo(id: number, token: string): Promise<void> {
    await this.kv.txn([], [{ op: 'delete', key: VKEYS.reader(id, token) }]);
  }

  async deleteSnapshot(name: string, snap: string): Promise<void> {
    const { volume } = await this.getSnapshot(name, snap);
    await this.kv.txn([], [{ op: 'delete', key: VKEYS.snapshot(volume.id, snap) }]);
  }

  /** All volume metadata at one revision: what GC needs to decide what is live. */
  async gcView(): Promise<GcView> {
    const all = await this.kv.list(P);
    let minter = 1;
    const vols: VolumeRecord[] = [];
    const metaEntries: KVEntry[] = [];
    // Every key the view is made of, with the revision it last changed at (a deleted key is gone).
    const seen: string[] = [];
    for (const e of all.entries) {
      if (e.key === VKEYS.minter) minter = Number(e.value);
      else if (e.key.startsWith(VKEYS.volumesPrefix)) vols.push(JSON.parse(e.value) as VolumeRecord);
      else if (e.key.startsWith(VKEYS.metaPrefix)) metaEntries.push(e);
      else continue;
      seen.push(`${e.key}@${e.modRevision}`);
    }
    const byId = groupMeta(metaEntries);
    return {
      revision: all.revision,
      fingerprint: seen.join('\n'),
      minter,
      volumes: vols.map((record) => {
        const m = byId.get(record.id);
        return {
          record,
          head: m?.head ? decodeHead(m.head) : undefined,
          snapshots: (m?.snapshots ?? []).map((s) => decodeSnapshot(s).head),
          held: (m?.readers ?? []).map(decodeHead),
        };
      }),
    };
  }
}

export interface GcView {
  readonly revision: number;
  /** Equal for two views only if no key of volume metadata changed between them. */
  readonly fingerprint: string;
  /** Volume ids at or above this did not exist when the view was read. */
  readonly minter: number;
  /** `held`: the heads read-only openers hold (meta.hold). */
  readonly volumes: readonly { record: VolumeRecord; head: Head | undefined; snapshots: Head[]; held: Head[] }[];
}

function groupMeta(entries: readonly KVEntry[]): Map<number, { head?: string; lock?: string; snapshots: string[]; readers: string[] }> {
  const out = new Map<number, { head?: string; lock?: string; snapshots: string[]; readers: string[] }>();
  for (const e of entries) {
    const rest = e.key.slice(VKEYS.metaPrefix.length);
    const slash = rest.indexOf('/');
    const id = Number(rest.slice(0, slash));
    const sub = rest.slice(slash + 1);
    let m = out.get(id);
    if (!m) out.set(id, (m = { snapshots: [], readers: [] }));
    // head2 wins over a head from before the journal (a commit replaces one with the other).
    if (sub === 'head2') m.head = e.value;
    else if (sub === 'head') m.head ??= e.value;
    else if (sub === 'lock') m.lock = e.value;
    else if (sub.startsWith('snapshots/')) m.snapshots.push(e.value);
    else if (sub.startsWith('readers/')) m.readers.push(e.value);
  }
  return out;
}
