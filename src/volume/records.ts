import { TorusError } from '../core/errors.js';
import { BlockType, ZERO_REF, type BlockRef } from '../core/ids.js';

// Volume metadata records as stored in etcd (JSON). Field names are the on-etcd format.

/** A pointer to an inode page (or a data block): its ref and the CRC32C of its bytes. */
export interface Pointer {
  readonly ref: BlockRef;
  readonly crc: number;
}

/**
 * Where a volume's journal is (docs/journal.md): the writing session's epoch, the segment its
 * log blocks are in, the first block of the tail (what no checkpoint covers yet), and the
 * replicas appends go to.
 */
export interface JournalPos {
  readonly epoch: number;
  readonly segment: number;
  readonly start: number;
  readonly replicas: readonly string[];
  /**
   * The smallest k of this session's directly stored blocks (Block records) the tail may name:
   * GC keeps them from there on. Absent in heads from before Block records: 0.
   */
  readonly directStart?: number;
}

/** The state a checkpoint commits: the inode tree's root, the overlay runs, and the journal's tail. */
export interface Head {
  /** Root page of the inode tree; null for a volume never written (all zeros). */
  readonly root: Pointer | null;
  /** Levels of the tree, leaves included (>= 1). */
  readonly depth: number;
  /** Volume size in bytes. */
  readonly size: number;
  /**
   * Every block with an epoch (its ref's inode number) above this may belong to a sync still in
   * flight; GC never deletes those. Blocks at or below it are referenced by a tree or garbage.
   */
  readonly epoch: number;
  /** The newest overlay run page; null or absent: no overlays (heads from before the journal). */
  readonly runs?: Pointer | null;
  /** The next journal record's LSN. */
  readonly lsn?: number;
  /** The journal's tail, if a writer has one; absent after a clean close. */
  readonly journal?: JournalPos | null;
}

export interface VolumeRecord {
  readonly id: number;
  readonly name: string;
  readonly type: 'block';
  readonly createdAt: string;
  /** For a clone: where its first inode came from (a snapshot, or a volume as of its last sync). */
  readonly parent?: { readonly volume: string; readonly snapshot?: string };
}

export interface LockRecord {
  /** The holder's process identity and a random token for this acquisition. */
  readonly holder: string;
  readonly host: string;
  readonly pid: number;
  readonly since: string;
  readonly token: string;
}

export interface SnapshotRecord {
  readonly name: string;
  readonly when: string;
  readonly head: Head;
}

export const MAX_VOLUME_SIZE = 2 ** 50; // 1 PiB: indexes and offsets stay exact in doubles
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function checkVolumeName(name: string): void {
  if (!NAME.test(name))
    throw new TorusError(
      'INVALID_ARGUMENT',
      `invalid volume name "${name}": use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
}

export function checkSnapshotName(name: string): void {
  if (!NAME.test(name))
    throw new TorusError('INVALID_ARGUMENT', `invalid snapshot name "${name}": use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`);
}

export function checkVolumeSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new TorusError('INVALID_ARGUMENT', `invalid volume size ${size}: must be larger than 0`);
  if (size > MAX_VOLUME_SIZE) throw new TorusError('INVALID_ARGUMENT', `volume size ${size} is over the limit of 1 PiB`);
}

/** "VOL@SNAP" → [VOL, SNAP]; SNAP undefined without '@'. */
export function parseVolSnap(text: string): { volume: string; snapshot?: string } {
  const at = text.indexOf('@');
  if (at < 0) return { volume: text };
  return { volume: text.slice(0, at), snapshot: text.slice(at + 1) };
}

// Refs are stored as [type, volume, inode, index] so the JSON stays readable.
type RefJson = [number, number, number, number];

function refToJson(r: BlockRef): RefJson {
  return [r.type, r.volume, r.inode, r.index];
}

function refFromJson(v: unknown): BlockRef {
  if (!Array.isArray(v) || v.length !== 4 || !v.every((x) => Number.isSafeInteger(x) && x >= 0))
    throw new TorusError('INTERNAL', 'malformed block ref in volume metadata');
  const [type, volume, inode, index] = v as RefJson;
  return { type: type as BlockType, volume, inode, index };
}

export function encodeHead(h: Head): string {
  return JSON.stringify({
    root: h.root ? { ref: refToJson(h.root.ref), crc: h.root.crc } : null,
    depth: h.depth,
    size: h.size,
    epoch: h.epoch,
    ...(h.runs ? { runs: { ref: refToJson(h.runs.ref), crc: h.runs.crc } } : {}),
    ...(h.lsn !== undefined ? { lsn: h.lsn } : {}),
    ...(h.journal ? { journal: { ...h.journal, replicas: [...h.journal.replicas] } } : {}),
  });
}

export function decodeHead(text: string): Head {
  const o = JSON.parse(text) as {
    root: { ref: unknown; crc: number } | null;
    depth: number;
    size: number;
    epoch: number;
    runs?: { ref: unknown; crc: number } | null;
    lsn?: number;
    journal?: JournalPos | null;
  };
  const j = o.journal;
  if (j && !(Number.isSafeInteger(j.epoch) && Number.isSafeInteger(j.segment) && Number.isSafeInteger(j.start) && Array.isArray(j.replicas) && (j.directStart === undefined || Number.isSafeInteger(j.directStart))))
    throw new TorusError('INTERNAL', 'malformed journal position in volume metadata');
  return {
    root: o.root ? { ref: refFromJson(o.root.ref), crc: o.root.crc >>> 0 } : null,
    depth: o.depth,
    size: o.size,
    epoch: o.epoch,
    runs: o.runs ? { ref: refFromJson(o.runs.ref), crc: o.runs.crc >>> 0 } : null,
    lsn: o.lsn ?? 1,
    journal: j ? { epoch: j.epoch, segment: j.segment, start: j.start, replicas: j.replicas.map(String), ...(j.directStart ? { directStart: j.directStart } : {}) } : null,
  };
}

export function encodeSnapshot(s: SnapshotRecord): string {
  return JSON.stringify({ name: s.name, when: s.when, head: JSON.parse(encodeHead(s.head)) as unknown });
}

export function decodeSnapshot(text: string): SnapshotRecord {
  const o = JSON.parse(text) as { name: string; when: string; head: unknown };
  return { name: o.name, when: o.when, head: decodeHead(JSON.stringify(o.head)) };
}

export const NO_POINTER: Pointer = { ref: ZERO_REF, crc: 0 };
export { BlockType };
