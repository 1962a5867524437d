// A power-cut harness in the spirit of Jepsen's LazyFS, at the level of Node's fs calls.
//
// kill -9 keeps the page cache, so a crash test that only kills processes cannot catch a missing
// fsync. A process started with `--import powercut-preload.js` and TORUS_POWERCUT_DIR set writes,
// before every change it makes to a file or a directory, what that change destroys (the bytes it
// overwrites, the size it changes, the name it creates, moves or removes) to an undo log in that
// directory, and notes each fsync/fdatasync with what it covered. After the process is killed,
// `applyPowerCut` undoes every change that no fsync covered, newest first, leaving the files as
// a machine that lost power at that instant may have left them:
//
// - a write or truncate survives only if an fsync or fdatasync of the same file (any descriptor)
//   started after it completed and then finished;
// - a create, rename, unlink or mkdir survives only if an fsync of its directory did (POSIX
//   promises no more; ext4 often does more, which is why a real disk rarely shows these bugs).
//
// Strict mode drops everything unsynced. `keep: 'random'` lets each unsynced write to a 512-byte
// sector of a file persist or not, independently, as write-back may (see applyPowerCut). The
// harness is test code: nothing in the product imports it.

import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, readdirSync, renameSync, rmSync, unlinkSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';

export const POWERCUT_ENV = 'TORUS_POWERCUT_DIR';
export const LOG_FILE = 'undo.jsonl';
export const DATA_FILE = 'undo.bin';
export const BACKUP_DIR = 'backups';

/** One change, as logged before it was made. `seq` orders all entries of a process. */
export type Entry =
  /** Write: bytes [off, off+len) were `pre` (binOff/binLen in undo.bin) and the file was `size` long. */
  | { readonly t: 'W'; readonly seq: number; readonly path: string; readonly ino: string; readonly off: number; readonly len: number; readonly size: number; readonly binOff: number; readonly binLen: number }
  /** Truncate to `len`: the file was `size` long; if shorter now, the cut bytes are in undo.bin. */
  | { readonly t: 'T'; readonly seq: number; readonly path: string; readonly ino: string; readonly len: number; readonly size: number; readonly binOff: number; readonly binLen: number }
  /** A new file (or directory, 'M') was created at `path`. */
  | { readonly t: 'C' | 'M'; readonly seq: number; readonly path: string }
  /** `from` was renamed to `to`; what `to` held before is at `backup` (a hard link), if anything. */
  | { readonly t: 'R'; readonly seq: number; readonly from: string; readonly to: string; readonly backup?: string }
  /** `path` was removed: the file lives on at `backup`. */
  | { readonly t: 'U'; readonly seq: number; readonly path: string; readonly backup: string }
  /**
   * An fsync/fdatasync of a file finished: it covers that file's changes with seq <= upto, except
   * `skip`: writes logged before it started whose native job (the thread pool's) had not yet
   * reported done, and which may therefore have reached the file only after the sync.
   */
  | { readonly t: 'S'; readonly ino: string; readonly upto: number; readonly skip?: readonly number[] }
  /** An fsync of a directory finished: it covers the names changed in it with seq <= upto. */
  | { readonly t: 'D'; readonly path: string; readonly upto: number };

export function readLog(dir: string): Entry[] {
  const path = join(dir, LOG_FILE);
  if (!existsSync(path)) return [];
  const out: Entry[] = [];
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    if (line === '') continue;
    try {
      out.push(JSON.parse(line) as Entry);
    } catch {
      // The process died while writing its last line: that change was never made (each line is
      // written before its change), so it needs no undo.
    }
  }
  return out;
}

export interface CutReport {
  /** Changes undone, by kind. */
  readonly undone: Record<string, number>;
  /** Unsynced writes kept (random mode). */
  readonly kept: number;
  readonly entries: number;
}

/**
 * Undoes, in the files the logged process touched, every change no fsync covered, and clears
 * the log so the next process starts from the state the cut left. Call only after the process
 * is dead.
 *
 * `keep: 'random'` (with `random` as the coin): an unsynced write may instead persist, decided
 * per 512-byte sector of its file, as a disk's write-back may reach some sectors and not others.
 * A sector that persists keeps every unsynced write to it, in order; names (create, rename,
 * unlink) are still undone unless their directory was synced.
 */
export function applyPowerCut(dir: string, opts: { keep?: 'none' | 'random'; random?: () => number } = {}): CutReport {
  const entries = readLog(dir);
  const bin = existsSync(join(dir, DATA_FILE)) ? readFileSync(join(dir, DATA_FILE)) : Buffer.alloc(0);
  // Per file, the furthest a sync without exceptions reached, and the few syncs that skipped
  // writes still in flight (only those need looking at one by one).
  const fileSynced = new Map<string, number>();
  const skippingSyncs = new Map<string, { readonly upto: number; readonly skip: readonly number[] }[]>();
  const dirSynced = new Map<string, number>();
  for (const e of entries) {
    if (e.t === 'S' && e.skip) {
      const list = skippingSyncs.get(e.ino) ?? [];
      list.push({ upto: e.upto, skip: e.skip });
      skippingSyncs.set(e.ino, list);
    }
    else if (e.t === 'S') fileSynced.set(e.ino, Math.max(fileSynced.get(e.ino) ?? 0, e.upto));
    else if (e.t === 'D') dirSynced.set(e.path, Math.max(dirSynced.get(e.path) ?? 0, e.upto));
  }
  const dataDurable = (ino: string, seq: number): boolean =>
    (fileSynced.get(ino) ?? 0) >= seq || (skippingSyncs.get(ino) ?? []).some((s) => s.upto >= seq && !s.skip.includes(seq));
  const nameDurable = (path: string, seq: number): boolean => (dirSynced.get(dirname(path)) ?? 0) >= seq;
  const undone: Record<string, number> = {};
  let kept = 0;
  const random = opts.random ?? Math.random;
  // Random mode: which unsynced sectors of which file persist, decided once per sector.
  const pagePersists = new Map<string, boolean>();
  const persists = (ino: string, page: number): boolean => {
    const k = `${ino}@${page}`;
    let v = pagePersists.get(k);
    if (v === undefined) pagePersists.set(k, (v = random() < 0.5));
    return v;
  };
  const count = (t: string): void => {
    undone[t] = (undone[t] ?? 0) + 1;
  };
  for (let i = entries.length - 1; i >= 0; i--) {
    const e = entries[i]!;
    switch (e.t) {
      case 'W': {
        if (dataDurable(e.ino, e.seq) || !existsSync(e.path)) break;
        const pre = bin.subarray(e.binOff, e.binOff + e.binLen);
        const fd = openSync(e.path, 'r+');
        try {
          if (opts.keep === 'random') {
            // Restore only the pages that do not persist; a page that persists keeps the write.
            let restored = false;
            for (let p = Math.floor(e.off / UNIT); p * UNIT < e.off + e.len; p++) {
              const a = Math.max(e.off, p * UNIT);
              const b = Math.min(e.off + e.len, (p + 1) * UNIT);
              if (persists(e.ino, p)) continue;
              restored = true;
              if (a - e.off < pre.length) writeAll(fd, pre.subarray(a - e.off, Math.min(b - e.off, pre.length)), a);
            }
            // A write that grew the file: the new size persists with its last unit (a size that
            // did not reach the disk drops whatever lay beyond the old end).
            if (e.off + e.len > e.size && !persists(e.ino, Math.floor((e.off + e.len - 1) / UNIT))) ftruncateSync(fd, e.size);
            if (restored) count('W');
            else kept++;
          } else {
            writeAll(fd, pre, e.off);
            if (e.off + e.len > e.size) ftruncateSync(fd, e.size);
            count('W');
          }
        } finally {
          closeSync(fd);
        }
        break;
      }
      case 'T': {
        if (dataDurable(e.ino, e.seq) || !existsSync(e.path)) break;
        const fd = openSync(e.path, 'r+');
        try {
          ftruncateSync(fd, e.size);
          if (e.binLen > 0) writeAll(fd, bin.subarray(e.binOff, e.binOff + e.binLen), e.len);
        } finally {
          closeSync(fd);
        }
        count('T');
        break;
      }
      case 'C':
        if (nameDurable(e.path, e.seq)) break;
        rmSync(e.path, { force: true });
        count('C');
        break;
      case 'M':
        if (nameDurable(e.path, e.seq)) break;
        rmSync(e.path, { recursive: true, force: true });
        count('M');
        break;
      case 'R':
        if (nameDurable(e.to, e.seq) && nameDurable(e.from, e.seq)) break;
        if (existsSync(e.to)) renameSync(e.to, e.from);
        if (e.backup && existsSync(e.backup)) renameSync(e.backup, e.to);
        count('R');
        break;
      case 'U':
        if (nameDurable(e.path, e.seq)) break;
        if (existsSync(e.backup)) renameSync(e.backup, e.path);
        count('U');
        break;
      default:
        break;
    }
  }
  // What survived the cut is the new baseline: backups of durable removals are gone for good.
  rmSync(join(dir, BACKUP_DIR), { recursive: true, force: true });
  for (const f of [LOG_FILE, DATA_FILE]) if (existsSync(join(dir, f))) unlinkSync(join(dir, f));
  return { undone, kept, entries: entries.length };
}

/**
 * Random mode decides persistence per 512-byte sector: the smallest unit a disk writes
 * atomically, which is all docs/on-disk-format.md assumes. Pages would be kinder (no torn record
 * arrays or data half-written within a page).
 */
const UNIT = 512;

function writeAll(fd: number, buf: Uint8Array, pos: number): void {
  for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off, buf.length - off, pos + off);
}

/** Files the log dir holds, for tests that check it was cleared. */
export function logFiles(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir) : [];
}
