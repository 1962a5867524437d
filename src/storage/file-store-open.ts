// Opening a FileBlockStore's data dir: formatting an empty one, growing one opened with a larger
// size, and recovering what a crash left: torn records, one ref in several slots, blocks whose
// records outran their data, and which free slots the file system holds as written. What it
// returns is the in-memory state the store (file-store.ts) is constructed from.

import { randomBytes } from 'node:crypto';
import { open, rename, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { TorusError } from '../core/errors.js';
import { nativeDataRanges } from './batch-write.js';
import { checkBlockSize, emptyStats, type BlockStoreStats } from './common.js';
import { lockDir, type DirLock } from './dir-lock.js';
import { fsyncDir, mkdirDurableSync, PRIVATE_FILE } from './durable-fs.js';
import { fileSize, ioError, readFull, writeFull } from './file-store-io.js';
import { readSlotSectors } from './file-store-read.js';
import { FREE, OPEN, PENDING, USED, ZERO_RECORD } from './file-store-slots.js';
import {
  DATA_FILE,
  FORMAT_VERSION,
  HEADER_AREA_SIZE,
  HEADER_COPY_OFFSETS,
  HEADER_COPY_SIZE,
  LOCK_FILE,
  Layout,
  MAX_BLOCK_SIZE,
  RECORD_SIZE,
  SECTOR_SIZE,
  SLOTS_PER_GROUP,
  TABLE_FILE,
  checkHeaderSupported,
  checksumArraySize,
  RECORD_FREE,
  RECORD_TORN,
  decodeHeader,
  encodeHeader,
  encodeFence,
  decodeFence,
  FENCE_FILE,
  FENCE_RECORD_SIZE,
  COMPAT_DURABLE_GEN,
  scanRecord,
  type ScannedRecord,
  type StoreHeader,
} from './format.js';

const OPEN_SCAN_PARALLELISM = 4;

export interface FileBlockStoreOptions {
  /** Directory holding the store's files; created if missing. */
  readonly dir: string;
  /** The cluster's block size; must match what the directory was formatted with. */
  readonly blockSize: number;
  /** Capacity in bytes; rounded down to whole blocks. May grow between opens, never shrink. */
  readonly sizeBytes: number;
}

/** A data dir opened, locked and recovered: what a FileBlockStore starts from. */
export interface RecoveredStore {
  readonly dir: string;
  readonly data: FileHandle;
  readonly table: FileHandle;
  readonly lock: DirLock;
  /** The header in force, and which of its two copies is known durable. */
  readonly header: StoreHeader;
  readonly headerCopy: number;
  readonly layout: Layout;
  /** Per slot (header.slotCount of them): its generation, its checksum array's CRC, its state. */
  readonly gens: Float64Array;
  readonly sums: Uint32Array;
  readonly state: Uint8Array;
  /** Whether every byte of the slot's data is known written. */
  readonly warm: Uint8Array;
  /** Each ref held, to its slot; and the keys of the open log blocks among them. */
  readonly index: Map<string, number>;
  readonly openKeys: Set<string>;
  readonly nextGen: number;
  /** Generations whose records are durable (all at or below it): every one opening found. */
  readonly syncedGen: number;
  /** The free slots, in the order they go onto the free stacks. */
  readonly free: number[];
  /** Per volume, the highest journal epoch fenced, and the open fence table holding them. */
  readonly fences: Map<number, number>;
  readonly fenceFile: FileHandle;
  readonly fenceRecords: number;
  /** What opening found (torn records, duplicates, unsynced blocks dropped) and read. */
  readonly counters: BlockStoreStats;
}

/** The state while it is recovered; the fence table is opened last. */
type Recovering = { -readonly [K in Exclude<keyof RecoveredStore, 'fenceFile' | 'fenceRecords'>]: RecoveredStore[K] } & {
  readonly nSlots: number;
  readonly sectors: number;
  readonly blockSize: number;
  readonly sectorSize: number;
  /** Slots whose clearing record opening wrote; free after the next sync (opening does it). */
  readonly pendingFree: number[];
};

/**
 * Opens the store in `opts.dir`, formatting it if empty and growing it if `sizeBytes` is larger
 * than before, and recovers it. INVALID_ARGUMENT for another block size or a smaller size, LOCKED
 * if another process has it open.
 */
export async function openDataDir(opts: FileBlockStoreOptions): Promise<RecoveredStore> {
  const { dir, blockSize, sizeBytes } = opts;
  checkBlockSize(blockSize, MAX_BLOCK_SIZE);
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0)
    throw new TorusError('INVALID_ARGUMENT', `invalid store size ${sizeBytes}`);
  const slots = Math.floor(sizeBytes / blockSize);
  if (slots < 1)
    throw new TorusError('INVALID_ARGUMENT', `store size ${sizeBytes} bytes is smaller than one block (${blockSize} bytes)`);
  try {
    mkdirDurableSync(dir);
  } catch (err) {
    throw ioError('creating the data dir', err, dir);
  }
  const lock = await lockDir(dir, join(dir, LOCK_FILE));
  const handles: FileHandle[] = [];
  try {
    const tablePath = join(dir, TABLE_FILE);
    const dataPath = join(dir, DATA_FILE);
    let header: StoreHeader;
    let headerCopy = 0;
    let data: FileHandle;
    let table: FileHandle;
    if ((await fileSize(tablePath)) === undefined) {
      header = await format(dir, blockSize, slots);
      data = await open(dataPath, 'r+');
      handles.push(data);
      table = await open(tablePath, 'r+');
      handles.push(table);
    } else {
      if ((await fileSize(dataPath)) === undefined)
        throw new TorusError('CORRUPT', `block store in ${dir} has a slot table but no data file ${DATA_FILE}`);
      data = await open(dataPath, 'r+');
      handles.push(data);
      table = await open(tablePath, 'r+');
      handles.push(table);
      ({ header, copy: headerCopy } = await readHeader(dir, table));
      if (header.blockSize !== blockSize)
        throw new TorusError(
          'INVALID_ARGUMENT',
          `data dir ${dir} was formatted with block size ${header.blockSize}, cluster uses ${blockSize}`,
        );
      const layout = new Layout(header.blockSize, header.sectorSize, header.slotsPerGroup);
      const [dataSize, tableSize] = [(await data.stat()).size, (await table.stat()).size];
      if (dataSize < layout.dataFileSize(header.slotCount) || tableSize < layout.tableFileSize(header.slotCount))
        throw new TorusError(
          'CORRUPT',
          `block store in ${dir} is truncated: header says ${header.slotCount} slots but ${DATA_FILE} is ${dataSize} bytes and ${TABLE_FILE} ${tableSize} bytes`,
        );
      if (slots < header.slotCount)
        throw new TorusError(
          'INVALID_ARGUMENT',
          `block store in ${dir} holds ${header.slotCount} blocks (${header.slotCount * blockSize} bytes); ` +
            `refusing to shrink it to ${slots} blocks (${sizeBytes} bytes): stores only grow`,
        );
      if (slots > header.slotCount) ({ header, copy: headerCopy } = await grow(data, table, header, headerCopy, slots));
    }
    const nSlots = header.slotCount;
    const r: Recovering = {
      dir,
      data,
      table,
      lock,
      header,
      headerCopy,
      layout: new Layout(header.blockSize, header.sectorSize, header.slotsPerGroup),
      nSlots,
      blockSize: header.blockSize,
      sectorSize: header.sectorSize,
      sectors: Math.ceil(header.blockSize / header.sectorSize),
      gens: new Float64Array(nSlots),
      sums: new Uint32Array(nSlots),
      state: new Uint8Array(nSlots),
      warm: new Uint8Array(nSlots),
      index: new Map(),
      openKeys: new Set(),
      nextGen: 1,
      syncedGen: 0,
      free: [],
      pendingFree: [],
      fences: new Map(),
      counters: emptyStats(),
    };
    await load(r);
    return { ...r, ...(await loadFences(r.dir, r.fences)) };
  } catch (err) {
    await Promise.allSettled(handles.map((h) => h.close()));
    await lock.release();
    throw ioError('opening the block store', err, dir);
  }
}

/**
 * Creates both files sparse. The table is written under a temporary name and renamed, so a
 * table file that exists is always a complete one: a crash mid-format leaves nothing half-made.
 */
async function format(dir: string, blockSize: number, slots: number): Promise<StoreHeader> {
  const layout = new Layout(blockSize, SECTOR_SIZE, SLOTS_PER_GROUP);
  const header: StoreHeader = {
    version: FORMAT_VERSION,
    sequence: 1,
    blockSize,
    sectorSize: SECTOR_SIZE,
    slotCount: slots,
    recordSize: RECORD_SIZE,
    checksumArraySize: checksumArraySize(blockSize, SECTOR_SIZE),
    slotsPerGroup: SLOTS_PER_GROUP,
    incompatFlags: 0,
    compatFlags: COMPAT_DURABLE_GEN,
    durableGen: 0,
    storeId: randomBytes(16).toString('hex'),
    createdAt: Date.now(),
  };
  const data = await open(join(dir, DATA_FILE), 'w+', PRIVATE_FILE);
  try {
    await data.truncate(layout.dataFileSize(slots));
    await data.sync();
  } finally {
    await data.close();
  }
  const tmp = join(dir, `${TABLE_FILE}.new`);
  const table = await open(tmp, 'w+', PRIVATE_FILE);
  try {
    await table.truncate(layout.tableFileSize(slots));
    const enc = encodeHeader(header);
    for (const off of HEADER_COPY_OFFSETS) await writeFull(table, enc, off);
    await table.sync();
  } finally {
    await table.close();
  }
  await rename(tmp, join(dir, TABLE_FILE));
  await fsyncDir(dir);
  return header;
}

/** The newest valid header copy and which copy it is. */
async function readHeader(dir: string, table: FileHandle): Promise<{ header: StoreHeader; copy: number }> {
  const area = Buffer.alloc(HEADER_AREA_SIZE);
  const { bytesRead } = await table.read(area, 0, HEADER_AREA_SIZE, 0);
  let best: StoreHeader | undefined;
  let copy = 0;
  HEADER_COPY_OFFSETS.forEach((off, i) => {
    if (bytesRead < off + HEADER_COPY_SIZE) return;
    const h = decodeHeader(area.subarray(off, off + HEADER_COPY_SIZE));
    if (h && (!best || h.sequence > best.sequence)) [best, copy] = [h, i];
  });
  if (!best) throw new TorusError('CORRUPT', `${join(dir, TABLE_FILE)} has no valid header (not a torus block store, or both copies damaged)`);
  checkHeaderSupported(best, dir);
  return { header: best, copy };
}

/** Writes `next` over the header copy that is not `copy`, durably; it is then the one in force. */
async function writeOtherHeaderCopy(table: FileHandle, next: StoreHeader, copy: number): Promise<{ header: StoreHeader; copy: number }> {
  // Into the other copy, so the one being overwritten is never the only valid one.
  await writeFull(table, encodeHeader(next), HEADER_COPY_OFFSETS[1 - copy] ?? 0);
  await table.datasync();
  return { header: next, copy: 1 - copy };
}

/**
 * Extends both files, makes the new sizes durable, and only then publishes the new slot count
 * in the header: a crash before that leaves longer files the old header ignores.
 */
async function grow(data: FileHandle, table: FileHandle, header: StoreHeader, copy: number, slots: number): Promise<{ header: StoreHeader; copy: number }> {
  const layout = new Layout(header.blockSize, header.sectorSize, header.slotsPerGroup);
  const dataSize = (await data.stat()).size;
  const tableSize = (await table.stat()).size;
  if (dataSize < layout.dataFileSize(slots)) await data.truncate(layout.dataFileSize(slots));
  if (tableSize < layout.tableFileSize(slots)) await table.truncate(layout.tableFileSize(slots));
  await data.sync();
  await table.sync();
  return writeOtherHeaderCopy(table, { ...header, slotCount: slots, sequence: header.sequence + 1 }, copy);
}

/** Rebuilds the index from the records, reading only the record regions of the table. */
async function load(r: Recovering): Promise<void> {
  const { layout, nSlots } = r;
  const G = layout.slotsPerGroup;
  const groups = Math.ceil(nSlots / G);
  const dups = new Map<string, number[]>();
  const torn: number[] = [];
  const rec: ScannedRecord = { generation: 0, checksumsCrc: 0, key: '', open: false };
  let maxGen = 0;
  const scanGroup = async (g: number): Promise<Buffer> => {
    const count = Math.min(G, nSlots - g * G);
    const buf = Buffer.allocUnsafe(count * RECORD_SIZE);
    await readFull(r.table, buf, layout.recordOffset(g * G));
    return buf;
  };
  for (let g0 = 0; g0 < groups; g0 += OPEN_SCAN_PARALLELISM) {
    const batch: Promise<Buffer>[] = [];
    for (let g = g0; g < Math.min(groups, g0 + OPEN_SCAN_PARALLELISM); g++) batch.push(scanGroup(g));
    const bufs = await Promise.all(batch);
    bufs.forEach((buf, i) => {
      const base = (g0 + i) * G;
      for (let j = 0; j * RECORD_SIZE < buf.length; j++) {
        const kind = scanRecord(buf, j * RECORD_SIZE, rec);
        if (kind === RECORD_FREE) continue;
        const slot = base + j;
        if (kind === RECORD_TORN) {
          torn.push(slot);
          continue;
        }
        r.state[slot] = rec.open ? OPEN : USED;
        if (!rec.open) r.warm[slot] = 1;
        r.gens[slot] = rec.generation;
        r.sums[slot] = rec.checksumsCrc;
        if (rec.generation > maxGen) maxGen = rec.generation;
        const key = rec.key;
        if (rec.open) r.openKeys.add(key);
        const prev = r.index.get(key);
        if (prev === undefined) {
          r.index.set(key, slot);
        } else {
          const list = dups.get(key);
          if (list) list.push(slot);
          else dups.set(key, [prev, slot]);
        }
      }
    });
  }
  // Above the durable watermark too: when the newest blocks were deleted before this open, the
  // records alone would hand out generations at or below it again, and a power cut that left
  // such a block's record without its data was taken for durable by the next open, unchecked.
  r.nextGen = Math.max(maxGen, r.header.durableGen ?? 0) + 1;
  for (const [key, slots] of dups) await resolveDuplicate(r, key, slots);
  await checkUnsynced(r);
  // Cleared so the damage is reported once, not at every open until the slot is reused.
  for (const slot of torn) await writeFull(r.table, ZERO_RECORD, layout.recordOffset(slot));
  r.counters.tornRecordsAtOpen = torn.length;
  // Makes whatever a crashed predecessor left in the page cache durable, so every later
  // flush and crash starts from a known baseline (and duplicate clears below are durable).
  await r.data.datasync();
  await r.table.datasync();
  r.syncedGen = r.nextGen - 1;
  findWrittenSlots(r);
  for (let s = nSlots - 1; s >= 0; s--) if (r.state[s] === FREE) r.free.push(s);
  // A store from before the durable watermark (the first release) gets one now, durable before
  // any write: everything it holds was just synced. Left for the first flush to add, a power cut
  // before that flush's header reached the disk found no flag at the next open and checked none
  // of the blocks this build had written since.
  if ((r.header.compatFlags & COMPAT_DURABLE_GEN) === 0) {
    const h = r.header;
    const next: StoreHeader = { ...h, durableGen: r.nextGen - 1, compatFlags: h.compatFlags | COMPAT_DURABLE_GEN, sequence: h.sequence + 1 };
    ({ header: r.header, copy: r.headerCopy } = await writeOtherHeaderCopy(r.table, next, r.headerCopy));
  }
  for (const s of r.pendingFree) r.free.push(s);
}

/**
 * Reads the fence table into `fences`, compacting it when it holds mostly superseded records.
 * Returns it open, and how many records it holds.
 */
async function loadFences(dir: string, fences: Map<number, number>): Promise<{ fenceFile: FileHandle; fenceRecords: number }> {
  const path = join(dir, FENCE_FILE);
  const size = await fileSize(path);
  if (size === undefined) {
    const fenceFile = await open(path, 'w+', PRIVATE_FILE);
    await closingOnError(fenceFile, () => fsyncDir(dir));
    return { fenceFile, fenceRecords: 0 };
  }
  const fh = await open(path, 'r+');
  const buf = Buffer.alloc(size);
  if (size > 0) await closingOnError(fh, () => readFull(fh, buf, 0));
  let n = 0;
  // A record cut short by a crash ends the table: it was never acknowledged.
  for (let f = decodeFence(buf, 0); f; f = decodeFence(buf, ++n * FENCE_RECORD_SIZE)) fences.set(f.volume, Math.max(f.epoch, fences.get(f.volume) ?? 0));
  if (n <= 4 * fences.size + 1024) return { fenceFile: fh, fenceRecords: n };
  await fh.close();
  const tmp = `${path}.new`;
  const out = await open(tmp, 'w+', PRIVATE_FILE);
  const all = Buffer.alloc(fences.size * FENCE_RECORD_SIZE);
  let i = 0;
  for (const [volume, epoch] of fences) encodeFence(volume, epoch, all, i++ * FENCE_RECORD_SIZE);
  await closingOnError(out, async () => {
    await writeFull(out, all, 0);
    await out.sync();
  });
  await out.close();
  await rename(tmp, path);
  await fsyncDir(dir);
  return { fenceFile: await open(path, 'r+'), fenceRecords: fences.size };
}

/** The caller gets the file only if `fn` succeeds: a failed open of the store leaks no handle. */
async function closingOnError<T>(fh: FileHandle, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    await fh.close().catch(() => undefined);
    throw err;
  }
}

/**
 * After a crash, the blocks written since the header's durable generation may have records
 * without their data (a power cut persists writes in any order): each is read and checked, and
 * one that fails is dropped here, at open. Otherwise the store would answer HAS for it and take
 * a put of it as a no-op, and a replica with a bad copy would pass for one with a good copy.
 */
async function checkUnsynced(r: Recovering): Promise<void> {
  if ((r.header.compatFlags & COMPAT_DURABLE_GEN) === 0) return;
  const since = r.header.durableGen ?? 0;
  for (const [key, slot] of r.index) {
    if (r.state[slot] !== USED || r.gens[slot]! <= since) continue;
    const res = await readSlotSectors(r, slot, r.sums[slot]!, 0, r.sectors);
    if (typeof res !== 'string') continue;
    r.index.delete(key);
    r.state[slot] = FREE;
    r.gens[slot] = 0;
    await writeFull(r.table, ZERO_RECORD, r.layout.recordOffset(slot));
    r.counters.unsyncedDroppedAtOpen++;
  }
}

/**
 * One ref in several slots happens after a crash between a delete and a re-put of the same
 * ref. Blocks are immutable, so any intact copy is right: prefer the newest that verifies.
 */
async function resolveDuplicate(r: Recovering, key: string, slots: number[]): Promise<void> {
  r.counters.duplicatesAtOpen++;
  slots.sort((a, b) => r.gens[b]! - r.gens[a]!);
  let winner = slots[0]!;
  for (const s of slots) {
    const res = await readSlotSectors(r, s, r.sums[s]!, 0, r.sectors);
    if (typeof res !== 'string') {
      winner = s;
      break;
    }
  }
  r.index.set(key, winner);
  for (const s of slots) {
    if (s === winner) continue;
    await writeFull(r.table, ZERO_RECORD, r.layout.recordOffset(s));
    r.state[s] = PENDING;
    r.gens[s] = 0;
    r.pendingFree.push(s);
  }
}

/**
 * Marks warm every slot whose data the file system holds as written, so that what a freed slot
 * or an earlier preparation made ready stays ready across restarts: a slot is zeroed at most once
 * in the life of the store (the store never punches holes).
 */
function findWrittenSlots(r: Recovering): void {
  const ranges = nativeDataRanges(r.data.fd);
  if (!ranges) return;
  let r0 = 0;
  for (let slot = 0; slot < r.nSlots; slot++) {
    const start = r.layout.dataOffset(slot);
    const end = start + r.blockSize;
    while (r0 < ranges.length && ranges[r0 + 1]! <= start) r0 += 2;
    if (r0 < ranges.length && ranges[r0]! <= start && ranges[r0 + 1]! >= end) r.warm[slot] = 1;
  }
}
