import { TorusError } from '../core/errors.js';
import { BLOCK_REF_SIZE, decodeBlockRef, encodeBlockRef, isZeroRef, ZERO_REF } from '../core/ids.js';
import type { Pointer } from './records.js';

// Overlay runs: what a checkpoint writes so the overlays survive without the journal
// (docs/journal.md). A run is one or more pages (blocks of type Run); every page names the page
// before it, newest first from the head, and carries a table of the log blocks its entries point
// into (with their CRCs, for end-to-end checked reads). A page flagged BASE holds the complete
// overlay state: pages older than it are not needed. Pure encode and decode.

const MAGIC = 0x314e5254; // "TRN1" little-endian
const HEADER = 64;
const LOG_ENTRY = 32;
const ENTRY = 32;
const FLAG_BASE = 0x1;
const SLOT_ZERO = 0xffffffff;
const SLOT_RESET = 0xfffffffe;
const SLOT_TRIM = 0xfffffffd;

/** A log block an entry points into (a clone's runs point into its parent's). */
export interface RunLog {
  readonly volume: number;
  readonly epoch: number;
  readonly index: number;
  readonly crc: number;
}

export type RunEntry =
  /** Bytes [start, start+length) of block `index` come from log block `log` at `logOffset`. */
  | { readonly kind: 'log'; readonly index: number; readonly lsn: number; readonly start: number; readonly length: number; readonly log: RunLog; readonly logOffset: number }
  /** ... read as zeros. */
  | { readonly kind: 'zero'; readonly index: number; readonly lsn: number; readonly start: number; readonly length: number }
  /** ... read as zeros and need no storage. */
  | { readonly kind: 'trim'; readonly index: number; readonly lsn: number; readonly start: number; readonly length: number }
  /** Block `index`'s overlays up to `lsn` were folded into its base. */
  | { readonly kind: 'reset'; readonly index: number; readonly lsn: number };

export interface RunPage {
  readonly prev: Pointer | null;
  /** This page and the ones after it are the complete overlay state. */
  readonly base: boolean;
  readonly entries: readonly RunEntry[];
}

export function logKeyOf(l: { readonly volume: number; readonly epoch: number; readonly index: number }): string {
  return `${l.volume}:${l.epoch}:${l.index}`;
}

function u64(buf: Buffer, v: number, at: number): void {
  buf.writeUInt32LE(v % 2 ** 32, at);
  buf.writeUInt32LE(Math.floor(v / 2 ** 32), at + 4);
}

function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32LE(at + 4) * 2 ** 32 + buf.readUInt32LE(at);
}

/**
 * Splits entries into pages of `pageSize` bytes. Each page's log table holds the log blocks of
 * its own entries. Returns the pages' contents in order (oldest entries first); `linkAndEncode`
 * writes them once their refs are known.
 */
export function pageEntries(entries: readonly RunEntry[], pageSize: number): RunEntry[][] {
  const pages: RunEntry[][] = [];
  let cur: RunEntry[] = [];
  let logs = new Set<string>();
  let used = HEADER;
  for (const e of entries) {
    const logKey = e.kind === 'log' ? logKeyOf(e.log) : undefined;
    const need = ENTRY + (logKey !== undefined && !logs.has(logKey) ? LOG_ENTRY : 0);
    if (used + need > pageSize && cur.length > 0) {
      pages.push(cur);
      cur = [];
      logs = new Set();
      used = HEADER;
    }
    cur.push(e);
    used += ENTRY;
    if (logKey !== undefined && !logs.has(logKey)) {
      logs.add(logKey);
      used += LOG_ENTRY;
    }
  }
  if (cur.length > 0 || pages.length === 0) pages.push(cur);
  return pages;
}

export function encodeRunPage(page: RunPage, pageSize: number): Buffer {
  const logs: RunLog[] = [];
  const slotOf = new Map<string, number>();
  for (const e of page.entries) {
    if (e.kind !== 'log') continue;
    const k = logKeyOf(e.log);
    if (!slotOf.has(k)) {
      slotOf.set(k, logs.length);
      logs.push(e.log);
    }
  }
  const need = HEADER + logs.length * LOG_ENTRY + page.entries.length * ENTRY;
  if (need > pageSize) throw new TorusError('INTERNAL', `a run page of ${need} bytes does not fit a ${pageSize}-byte block`);
  const buf = Buffer.alloc(pageSize);
  buf.writeUInt32LE(MAGIC, 0);
  buf.writeUInt16LE(1, 4);
  buf.writeUInt16LE(page.base ? FLAG_BASE : 0, 6);
  encodeBlockRef(page.prev?.ref ?? ZERO_REF, buf, 8);
  buf.writeUInt32LE((page.prev?.crc ?? 0) >>> 0, 8 + BLOCK_REF_SIZE);
  buf.writeUInt32LE(logs.length, 36);
  buf.writeUInt32LE(page.entries.length, 40);
  let p = HEADER;
  for (const l of logs) {
    u64(buf, l.volume, p);
    u64(buf, l.epoch, p + 8);
    u64(buf, l.index, p + 16);
    buf.writeUInt32LE(l.crc >>> 0, p + 24);
    p += LOG_ENTRY;
  }
  for (const e of page.entries) {
    u64(buf, e.index, p);
    u64(buf, e.lsn, p + 8);
    if (e.kind === 'reset') buf.writeUInt32LE(SLOT_RESET, p + 24);
    else {
      buf.writeUInt32LE(e.start, p + 16);
      buf.writeUInt32LE(e.length, p + 20);
      if (e.kind === 'zero') buf.writeUInt32LE(SLOT_ZERO, p + 24);
      else if (e.kind === 'trim') buf.writeUInt32LE(SLOT_TRIM, p + 24);
      else {
        buf.writeUInt32LE(slotOf.get(logKeyOf(e.log))!, p + 24);
        buf.writeUInt32LE(e.logOffset, p + 28);
      }
    }
    p += ENTRY;
  }
  return buf;
}

/**
 * A run page's chain pointer, base flag and log table, without its entries: which log blocks it
 * names is all GC needs, and a page holds thousands of entries over a few dozen log blocks.
 */
export function decodeRunPageLogs(buf: Buffer): Pick<RunPage, 'prev' | 'base'> & { readonly logs: readonly RunLog[] } {
  const { prev, base, logs } = decodeRunPageHead(buf);
  return { prev, base, logs };
}

function decodeRunPageHead(buf: Buffer) {
  const bad = (why: string): never => {
    throw new TorusError('CORRUPT', `overlay run page: ${why}`);
  };
  if (buf.length < HEADER || buf.readUInt32LE(0) !== MAGIC) bad('bad magic');
  if (buf.readUInt16LE(4) !== 1) bad(`unknown version ${buf.readUInt16LE(4)}`);
  const base = (buf.readUInt16LE(6) & FLAG_BASE) !== 0;
  const prevRef = decodeBlockRef(buf, 8);
  const prev = isZeroRef(prevRef) ? null : { ref: prevRef, crc: buf.readUInt32LE(8 + BLOCK_REF_SIZE) };
  const nLogs = buf.readUInt32LE(36);
  const entries = buf.readUInt32LE(40);
  if (HEADER + nLogs * LOG_ENTRY + entries * ENTRY > buf.length) bad('counts exceed the page');
  const logs: RunLog[] = [];
  for (let i = 0, p = HEADER; i < nLogs; i++, p += LOG_ENTRY) logs.push({ volume: readU64(buf, p), epoch: readU64(buf, p + 8), index: readU64(buf, p + 16), crc: buf.readUInt32LE(p + 24) });
  return { prev, base, logs, entries, bad };
}

export function decodeRunPage(buf: Buffer): RunPage {
  const { prev, base, logs, entries: n, bad } = decodeRunPageHead(buf);
  let p = HEADER + logs.length * LOG_ENTRY;
  const entries: RunEntry[] = [];
  for (let i = 0; i < n; i++, p += ENTRY) {
    const index = readU64(buf, p);
    const lsn = readU64(buf, p + 8);
    const slot = buf.readUInt32LE(p + 24);
    if (slot === SLOT_RESET) entries.push({ kind: 'reset', index, lsn });
    else {
      const start = buf.readUInt32LE(p + 16);
      const length = buf.readUInt32LE(p + 20);
      if (slot === SLOT_ZERO) entries.push({ kind: 'zero', index, lsn, start, length });
      else if (slot === SLOT_TRIM) entries.push({ kind: 'trim', index, lsn, start, length });
      else {
        const log = logs[slot];
        if (!log) bad(`entry ${i} names log slot ${slot} of ${logs.length}`);
        entries.push({ kind: 'log', index, lsn, start, length, log: log!, logOffset: buf.readUInt32LE(p + 28) });
      }
    }
  }
  return { prev, base, entries };
}
