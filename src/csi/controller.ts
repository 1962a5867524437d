import { isTorusError } from '../core/errors.js';
import type { MetaKV } from '../core/interfaces.js';
import type { VolumeMeta } from '../volume/meta.js';
import type { SnapshotRecord, VolumeRecord } from '../volume/records.js';
import type { BlockVolume } from '../volume/volume.js';
import { checkParams, fits, parseSnapshotId, required, sizeFor, snapshotId, torusName, unsupported } from './common.js';
import { aborted, alreadyExists, invalid, notFound, precondition } from './errors.js';
import type { CapacityRange, ContentSource, CsiSnapshot, CsiVolume, Params, VolumeCapability } from './proto.js';

// The CSI controller service: volumes, snapshots and clones are Torus's own (src/volume/meta.ts),
// named after the CO's names so a retried call finds what the first one made. The only state of
// its own is which node a volume is published to:
//
//   /torus/csi/attachments/<volume>   {node, readonly, volumeId}
//
// written with compare-and-swap, so a second node is refused (FAILED_PRECONDITION, naming the
// node that has it) until the first is unpublished. The volume lock, taken by the node that stages
// the volume, is what actually keeps a second writer out; this record lets the CO say so before
// it gets that far, and Kubernetes then reports a Multi-Attach error instead of a stage that fails.

export const ATTACHMENTS_PREFIX = '/torus/csi/attachments/';

interface Attachment {
  node: string;
  readonly: boolean;
  volumeId: number;
}

export interface ControllerBackend {
  readonly kv: MetaKV;
  readonly vmeta: VolumeMeta;
  /** Opens a volume for writing: takes its lock (LOCKED while a node has it staged). */
  openVolume(name: string): Promise<BlockVolume>;
  /** A snapshot of everything flushed (the writer takes it while the volume is staged). */
  snapshot(name: string, snap: string): Promise<SnapshotRecord>;
  /** A clone of a snapshot or a volume. */
  clone(name: string, source: { volume: string; snapshot?: string }, size?: number): Promise<unknown>;
}

interface CreateVolumeRequest {
  name?: string;
  capacity_range?: CapacityRange | null;
  volume_capabilities?: VolumeCapability[];
  parameters?: Params;
  mutable_parameters?: Params;
  volume_content_source?: ContentSource | null;
}

function checkCaps(caps: VolumeCapability[] | undefined): void {
  if (!caps || caps.length === 0) throw invalid('volume_capabilities is required');
  for (const c of caps) {
    const why = unsupported(c);
    if (why) throw invalid(why);
  }
}

function checkCap(cap: VolumeCapability | null | undefined): VolumeCapability {
  if (!cap) throw invalid('volume_capability is required');
  const why = unsupported(cap);
  if (why) throw invalid(why);
  return cap;
}

function toSnapshot(volume: VolumeRecord, s: SnapshotRecord): CsiSnapshot {
  const ms = Date.parse(s.when);
  return {
    size_bytes: s.head.size,
    snapshot_id: snapshotId(volume.name, s.name),
    source_volume_id: volume.name,
    creation_time: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 },
    ready_to_use: true,
  };
}

/** A page of a sorted list (ListVolumes, ListSnapshots): the token is the index to start at. */
function page<T>(all: T[], maxEntries: number | undefined, token: string | undefined): { items: T[]; next: string } {
  let start = 0;
  if (token) {
    if (!/^\d+$/.test(token) || Number(token) > all.length) throw aborted(`invalid starting_token "${token}": start again without one`);
    start = Number(token);
  }
  const n = maxEntries && maxEntries > 0 ? maxEntries : all.length;
  const items = all.slice(start, start + n);
  return { items, next: start + n < all.length ? String(start + n) : '' };
}

export class ControllerService {
  constructor(private readonly b: ControllerBackend) {}

  private async attachment(volume: string): Promise<{ a: Attachment; mod: number } | undefined> {
    const e = await this.b.kv.get(ATTACHMENTS_PREFIX + volume);
    return e ? { a: JSON.parse(e.value) as Attachment, mod: e.modRevision } : undefined;
  }

  private async volumeInfo(name: string): Promise<{ record: VolumeRecord; size: number } | undefined> {
    try {
      const record = await this.b.vmeta.get(name);
      return { record, size: (await this.b.vmeta.head(record.id)).head.size };
    } catch (err) {
      if (isTorusError(err, 'NOT_EXIST')) return undefined;
      throw err;
    }
  }

  private toVolume(name: string, size: number, context: Params, source: ContentSource | null | undefined): CsiVolume {
    return { capacity_bytes: size, volume_id: name, volume_context: context, ...(source?.type ? { content_source: source } : {}) };
  }

  async createVolume(req: CreateVolumeRequest): Promise<{ volume: CsiVolume }> {
    const csiName = required(req.name, 'name');
    checkCaps(req.volume_capabilities);
    const context = checkParams({ ...req.parameters, ...req.mutable_parameters });
    const name = torusName(csiName);
    const src = req.volume_content_source?.type ? req.volume_content_source : undefined;
    // The source as {volume, snapshot?}.
    let source: { volume: string; snapshot?: string } | undefined;
    if (src?.type === 'snapshot') {
      const id = required(src.snapshot?.snapshot_id, 'volume_content_source.snapshot.snapshot_id');
      source = parseSnapshotId(id);
      if (!source) throw notFound(`no snapshot ${id}`);
    } else if (src?.type === 'volume') {
      source = { volume: required(src.volume?.volume_id, 'volume_content_source.volume.volume_id') };
    }
    for (let attempt = 0; attempt < 2; attempt++) {
      // A retried call finds what the first made, even if its source has gone since.
      const existing = await this.volumeInfo(name);
      if (existing) {
        const p = existing.record.parent;
        const same = source ? p?.volume === source.volume && p.snapshot === source.snapshot : !p;
        if (!same) throw alreadyExists(`volume ${name} exists with another content source`);
        if (!fits(existing.size, req.capacity_range)) throw alreadyExists(`volume ${name} exists with ${existing.size} bytes, outside the requested range`);
        return { volume: this.toVolume(name, existing.size, context, src) };
      }
      const size = sizeFor(req.capacity_range, source ? await this.sourceBytes(source) : 0);
      try {
        if (source) await this.b.clone(name, source, size);
        else await this.b.vmeta.create(name, size);
        return { volume: this.toVolume(name, size, context, src) };
      } catch (err) {
        // Made meanwhile by a call running alongside: judge it like any existing volume.
        if (!isTorusError(err, 'EXISTS')) throw err;
      }
    }
    throw alreadyExists(`volume ${name} already exists`);
  }

  /** The size of a clone's source; NOT_FOUND when it does not exist. */
  private async sourceBytes(source: { volume: string; snapshot?: string }): Promise<number> {
    const what = source.snapshot !== undefined ? `snapshot ${snapshotId(source.volume, source.snapshot)}` : `volume ${source.volume}`;
    try {
      if (source.snapshot !== undefined) return (await this.b.vmeta.getSnapshot(source.volume, source.snapshot)).snapshot.head.size;
      const v = await this.volumeInfo(source.volume);
      if (v) return v.size;
    } catch (err) {
      if (!isTorusError(err, 'NOT_EXIST')) throw err;
    }
    throw notFound(`no ${what}`);
  }

  async deleteVolume(req: { volume_id?: string }): Promise<Record<string, never>> {
    const name = required(req.volume_id, 'volume_id');
    const v = await this.volumeInfo(name);
    if (!v) return {};
    const att = await this.attachment(name);
    if (att && att.a.volumeId === v.record.id) throw precondition(`volume ${name} is published on node ${att.a.node}`);
    const snaps = await this.b.vmeta.listSnapshots(name);
    // A volume's snapshots live and die with it in Torus; deleting it would take them along.
    if (snaps.length > 0) throw precondition(`volume ${name} has ${snaps.length} snapshot(s) (${snaps.map((s) => s.name).join(', ')}); delete them first`);
    try {
      await this.b.vmeta.delete(name);
    } catch (err) {
      if (!isTorusError(err, 'NOT_EXIST')) throw err;
    }
    if (att) await this.b.kv.txn([{ key: ATTACHMENTS_PREFIX + name, target: 'mod', cmp: '==', value: att.mod }], [{ op: 'delete', key: ATTACHMENTS_PREFIX + name }]);
    return {};
  }

  async controllerPublishVolume(req: { volume_id?: string; node_id?: string; volume_capability?: VolumeCapability | null; readonly?: boolean; volume_context?: Params }): Promise<{ publish_context: Params }> {
    const name = required(req.volume_id, 'volume_id');
    const node = required(req.node_id, 'node_id');
    checkCap(req.volume_capability);
    const v = await this.volumeInfo(name);
    if (!v) throw notFound(`no volume ${name}`);
    const mine: Attachment = { node, readonly: req.readonly ?? false, volumeId: v.record.id };
    const key = ATTACHMENTS_PREFIX + name;
    for (let i = 0; i < 10; i++) {
      const cur = await this.attachment(name);
      // A record of an earlier volume of the same name (deleted outside CSI) does not count.
      if (cur && cur.a.volumeId === v.record.id) {
        if (cur.a.node !== node) throw precondition(`volume ${name} is published on node ${cur.a.node}; a volume is read-write on one node at a time`);
        if (cur.a.readonly !== mine.readonly) throw alreadyExists(`volume ${name} is published on node ${node} ${cur.a.readonly ? 'read-only' : 'read-write'}`);
        return { publish_context: {} };
      }
      const res = await this.b.kv.txn(
        [cur ? { key, target: 'mod', cmp: '==', value: cur.mod } : { key, target: 'version', cmp: '==', value: 0 }],
        [{ op: 'put', key, value: JSON.stringify(mine) }],
      );
      if (res.succeeded) return { publish_context: {} };
    }
    throw aborted(`volume ${name}: publishing kept racing with other calls; try again`);
  }

  async controllerUnpublishVolume(req: { volume_id?: string; node_id?: string }): Promise<Record<string, never>> {
    const name = required(req.volume_id, 'volume_id');
    const cur = await this.attachment(name);
    if (!cur || (req.node_id && cur.a.node !== req.node_id)) return {};
    await this.b.kv.txn([{ key: ATTACHMENTS_PREFIX + name, target: 'mod', cmp: '==', value: cur.mod }], [{ op: 'delete', key: ATTACHMENTS_PREFIX + name }]);
    return {};
  }

  async validateVolumeCapabilities(req: { volume_id?: string; volume_capabilities?: VolumeCapability[]; volume_context?: Params; parameters?: Params; mutable_parameters?: Params }): Promise<unknown> {
    const name = required(req.volume_id, 'volume_id');
    if (!req.volume_capabilities || req.volume_capabilities.length === 0) throw invalid('volume_capabilities is required');
    if (!(await this.volumeInfo(name))) throw notFound(`no volume ${name}`);
    const why = req.volume_capabilities.map(unsupported).find((x) => x !== undefined);
    if (why) return { message: why };
    let params: Params;
    try {
      params = checkParams({ ...req.parameters, ...req.mutable_parameters });
      checkParams(req.volume_context);
    } catch (err) {
      return { message: (err as Error).message };
    }
    return { confirmed: { volume_context: req.volume_context ?? {}, volume_capabilities: req.volume_capabilities, parameters: params } };
  }

  async listVolumes(req: { max_entries?: number; starting_token?: string }): Promise<unknown> {
    const vols = await this.b.vmeta.list();
    const { entries } = await this.b.kv.list(ATTACHMENTS_PREFIX);
    const nodes = new Map<string, Attachment>(entries.map((e) => [e.key.slice(ATTACHMENTS_PREFIX.length), JSON.parse(e.value) as Attachment]));
    const { items, next } = page(vols, req.max_entries, req.starting_token);
    return {
      entries: items.map((v) => {
        const a = nodes.get(v.record.name);
        return {
          volume: this.toVolume(v.record.name, v.head.size, {}, undefined),
          status: { published_node_ids: a && a.volumeId === v.record.id ? [a.node] : [] },
        };
      }),
      next_token: next,
    };
  }

  async createSnapshot(req: { source_volume_id?: string; name?: string; parameters?: Params }): Promise<{ snapshot: CsiSnapshot }> {
    const volume = required(req.source_volume_id, 'source_volume_id');
    const csiName = required(req.name, 'name');
    checkParams(req.parameters);
    const snap = torusName(csiName);
    for (let attempt = 0; attempt < 2; attempt++) {
      // Snapshot names are the CO's and unique across volumes; Torus's are per volume.
      const same = (await this.b.vmeta.listAllSnapshots()).filter((s) => s.snapshot.name === snap);
      const other = same.find((s) => s.volume.name !== volume);
      if (other) throw alreadyExists(`snapshot ${csiName} exists, of volume ${other.volume.name}`);
      if (same[0]) return { snapshot: toSnapshot(same[0].volume, same[0].snapshot) };
      try {
        const rec = await this.b.snapshot(volume, snap);
        return { snapshot: toSnapshot(await this.b.vmeta.get(volume), rec) };
      } catch (err) {
        if (isTorusError(err, 'NOT_EXIST')) throw notFound(`no volume ${volume}`);
        if (!isTorusError(err, 'EXISTS')) throw err;
      }
    }
    throw alreadyExists(`snapshot ${csiName} already exists`);
  }

  async deleteSnapshot(req: { snapshot_id?: string }): Promise<Record<string, never>> {
    const id = required(req.snapshot_id, 'snapshot_id');
    const s = parseSnapshotId(id);
    if (!s) return {};
    try {
      await this.b.vmeta.deleteSnapshot(s.volume, s.snapshot);
    } catch (err) {
      if (!isTorusError(err, 'NOT_EXIST')) throw err;
    }
    return {};
  }

  async listSnapshots(req: { max_entries?: number; starting_token?: string; source_volume_id?: string; snapshot_id?: string }): Promise<unknown> {
    let all = (await this.b.vmeta.listAllSnapshots()).map((s) => toSnapshot(s.volume, s.snapshot));
    if (req.snapshot_id) all = all.filter((s) => s.snapshot_id === req.snapshot_id);
    if (req.source_volume_id) all = all.filter((s) => s.source_volume_id === req.source_volume_id);
    all.sort((a, b) => a.snapshot_id.localeCompare(b.snapshot_id));
    const { items, next } = page(all, req.max_entries, req.starting_token);
    return { entries: items.map((snapshot) => ({ snapshot })), next_token: next };
  }

  async controllerExpandVolume(req: { volume_id?: string; capacity_range?: CapacityRange | null; volume_capability?: VolumeCapability | null }): Promise<{ capacity_bytes: number; node_expansion_required: boolean }> {
    const name = required(req.volume_id, 'volume_id');
    if (!req.capacity_range) throw invalid('capacity_range is required');
    if (req.volume_capability) checkCap(req.volume_capability);
    // A file system has to grow on the node too; a raw block volume is done here.
    const nodeToo = req.volume_capability?.access_type !== 'block';
    const v = await this.volumeInfo(name);
    if (!v) throw notFound(`no volume ${name}`);
    const size = sizeFor(req.capacity_range, v.size);
    if (v.size >= size) return { capacity_bytes: v.size, node_expansion_required: nodeToo };
    let vol: BlockVolume;
    try {
      vol = await this.b.openVolume(name);
    } catch (err) {
      // Expansion is offline: the node that has it staged holds its lock.
      if (isTorusError(err, 'LOCKED')) throw precondition(`volume ${name} is in use (staged on a node); expansion is offline: ${(err as Error).message}`);
      throw err;
    }
    try {
      if (vol.size < size) await vol.resize(size);
    } finally {
      await vol.close();
    }
    return { capacity_bytes: size, node_expansion_required: nodeToo };
  }
}
