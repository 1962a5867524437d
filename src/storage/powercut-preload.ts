// Loaded with `node --import .../powercut-preload.js` and TORUS_POWERCUT_DIR=DIR: logs, before
// each change this process makes to a file or directory, what the change destroys, so that
// applyPowerCut (powercut.ts) can undo every change no fsync covered once the process is dead.
// It patches Node's fs functions (callback, sync and promise forms, and FileHandle) that change
// files or names; reads are untouched. Changes are made synchronously, each right after its undo
// record, so the log is exact at every instant a kill -9 can land. The store's batched writes
// (native/block_write.c, in the thread pool, out of fs's sight) are logged before their job
// starts, and a sync counts them only once their job has reported done. Test code only.

import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { basename, dirname, join, resolve } from 'node:path';
import { nativeAddonPath } from '../core/native.js';
import { BACKUP_DIR, DATA_FILE, LOG_FILE, POWERCUT_ENV, readLog, type Entry } from './powercut.js';

type Cb = (err: NodeJS.ErrnoException | null, ...rest: unknown[]) => void;

const logDir = process.env[POWERCUT_ENV];
if (!logDir) throw new Error(`powercut-preload: set ${POWERCUT_ENV} to the directory for the undo log`);
// The originals, captured before anything is patched.
const o = {
  openSync: fs.openSync,
  closeSync: fs.closeSync,
  writeSync: fs.writeSync,
  readSync: fs.readSync,
  fstatSync: fs.fstatSync,
  fsyncSync: fs.fsyncSync,
  fdatasyncSync: fs.fdatasyncSync,
  ftruncateSync: fs.ftruncateSync,
  renameSync: fs.renameSync,
  linkSync: fs.linkSync,
  mkdirSync: fs.mkdirSync,
  rmSync: fs.rmSync,
  unlinkSync: fs.unlinkSync,
  existsSync: fs.existsSync,
  statSync: fs.statSync,
  fsync: fs.fsync,
  fdatasync: fs.fdatasync,
  fspOpen: fsp.open,
};

o.mkdirSync(join(logDir, BACKUP_DIR), { recursive: true });
const logFd = o.openSync(join(logDir, LOG_FILE), 'a');
const binFd = o.openSync(join(logDir, DATA_FILE), 'a');
let binOff = o.fstatSync(binFd).size;
// A process started again over an uncut log (killed without a cut, as kill -9 alone is) carries
// on its numbering: an fsync now covers the dead process's writes too, as it would on a disk.
let seq = readLog(logDir).reduce((m, e) => Math.max(m, 'seq' in e ? e.seq : e.upto), 0);
let backups = 0;

/** An entry without what log() fills in (its seq, and where its bytes went). */
type Logged = { readonly t: Entry['t'] } & Record<string, unknown>;

function log(e: Logged, bytes?: Uint8Array): number {
  const s = e.t === 'S' || e.t === 'D' ? seq : ++seq;
  const rec: Record<string, unknown> = { ...e };
  if (e.t !== 'S' && e.t !== 'D') rec.seq = s;
  if (bytes) {
    let off = 0;
    while (off < bytes.length) off += o.writeSync(binFd, bytes, off, bytes.length - off);
    rec.binOff = binOff;
    rec.binLen = bytes.length;
    binOff += bytes.length;
  }
  const line = Buffer.from(`${JSON.stringify(rec)}\n`);
  let off = 0;
  while (off < line.length) off += o.writeSync(logFd, line, off, line.length - off);
  return s;
}

interface Tracked {
  readonly path: string;
  readonly ino: string;
  readonly dir: boolean;
  pos: number;
}
const fds = new Map<number, Tracked>();

function track(fd: number, path: string, append: boolean): void {
  if (fd === logFd || fd === binFd) return;
  const st = o.fstatSync(fd);
  if (!st.isFile() && !st.isDirectory()) return;
  fds.set(fd, { path: resolve(path), ino: `${st.dev}:${st.ino}`, dir: st.isDirectory(), pos: append ? st.size : 0 });
}

function flagsOf(flags: unknown): number {
  if (typeof flags === 'number') return flags;
  const C = fs.constants;
  switch (flags ?? 'r') {
    case 'r':
    case 'rs':
    case 'sr':
      return C.O_RDONLY;
    case 'r+':
    case 'rs+':
    case 'sr+':
      return C.O_RDWR;
    case 'w':
      return C.O_WRONLY | C.O_CREAT | C.O_TRUNC;
    case 'wx':
    case 'xw':
      return C.O_WRONLY | C.O_CREAT | C.O_TRUNC | C.O_EXCL;
    case 'w+':
      return C.O_RDWR | C.O_CREAT | C.O_TRUNC;
    case 'wx+':
    case 'xw+':
      return C.O_RDWR | C.O_CREAT | C.O_TRUNC | C.O_EXCL;
    case 'a':
      return C.O_WRONLY | C.O_CREAT | C.O_APPEND;
    case 'ax':
    case 'xa':
      return C.O_WRONLY | C.O_CREAT | C.O_APPEND | C.O_EXCL;
    case 'a+':
      return C.O_RDWR | C.O_CREAT | C.O_APPEND;
    case 'ax+':
    case 'xa+':
      return C.O_RDWR | C.O_CREAT | C.O_APPEND | C.O_EXCL;
    default:
      return C.O_RDWR;
  }
}

/** Logs what opening `path` with `flags` is about to change: a new name, or a truncation. */
function beforeOpen(path: string, flags: unknown): { append: boolean } {
  const f = flagsOf(flags);
  const C = fs.constants;
  const abs = resolve(String(path));
  const existed = o.existsSync(abs);
  if (!existed && (f & C.O_CREAT) !== 0) log({ t: 'C', path: abs });
  else if (existed && (f & C.O_TRUNC) !== 0 && (f & (C.O_WRONLY | C.O_RDWR)) !== 0) {
    const st = o.statSync(abs);
    if (st.isFile() && st.size > 0) {
      const pre = fs.readFileSync(abs);
      log({ t: 'T', path: abs, ino: `${st.dev}:${st.ino}`, len: 0, size: st.size }, pre);
    }
  }
  return { append: (f & C.O_APPEND) !== 0 };
}

/** Logs what writing `len` bytes at `at` of the tracked file `fd` will overwrite; its seq. */
function logOverwrite(t: Tracked, fd: number, at: number, len: number): number {
  const size = o.fstatSync(fd).size;
  const preLen = Math.max(0, Math.min(len, size - at));
  const pre = Buffer.alloc(preLen);
  for (let off = 0; off < preLen; ) {
    const n = o.readSync(fd, pre, off, preLen - off, at + off);
    if (n === 0) break;
    off += n;
  }
  return log({ t: 'W', path: t.path, ino: t.ino, off: at, len, size }, pre);
}

/** Writes `buf` at `position` (the descriptor's own position when null), logging what it overwrites. */
function write(fd: number, buf: Uint8Array, position: number | null | undefined): number {
  const t = fds.get(fd);
  if (!t || t.dir) return o.writeSync(fd, buf, 0, buf.length, position ?? null);
  const at = typeof position === 'number' && position >= 0 ? position : t.pos;
  logOverwrite(t, fd, at, buf.length);
  let done = 0;
  while (done < buf.length) done += o.writeSync(fd, buf, done, buf.length - done, at + done);
  if (typeof position !== 'number' || position < 0) t.pos = at + done;
  return done;
}

function truncate(fd: number, len: number): void {
  const t = fds.get(fd);
  if (t && !t.dir) {
    const size = o.fstatSync(fd).size;
    let pre: Buffer | undefined;
    if (len < size) {
      pre = Buffer.alloc(size - len);
      for (let off = 0; off < pre.length; ) {
        const n = o.readSync(fd, pre, off, pre.length - off, len + off);
        if (n === 0) break;
        off += n;
      }
    }
    log({ t: 'T', path: t.path, ino: t.ino, len, size }, pre);
  }
  o.ftruncateSync(fd, len);
}

/** Native writes logged whose job has not reported done yet: seq -> the file's inode. */
const inFlight = new Map<number, string>();

/**
 * What an fsync of `fd` will cover once it finishes: everything logged before it started, except
 * native writes to the file still in flight then (`own`: the syncing job's own writes, which it
 * makes before its fdatasync).
 */
function syncMark(fd: number, own?: ReadonlySet<number>): () => void {
  const t = fds.get(fd);
  const upto = seq;
  const skip: number[] = [];
  if (t && !t.dir) for (const [s, ino] of inFlight) if (ino === t.ino && !own?.has(s)) skip.push(s);
  return () => {
    if (!t) return;
    if (t.dir) log({ t: 'D', path: t.path, upto });
    else log(skip.length > 0 ? { t: 'S', ino: t.ino, upto, skip } : { t: 'S', ino: t.ino, upto });
  };
}

function backupOf(path: string): string {
  return join(logDir!, BACKUP_DIR, `${process.pid}-${++backups}-${basename(path)}`);
}

function rename(from: string, to: string): void {
  const a = resolve(String(from));
  const b = resolve(String(to));
  let backup: string | undefined;
  if (o.existsSync(b) && o.statSync(b).isFile()) {
    backup = backupOf(b);
    o.linkSync(b, backup);
  }
  log(backup ? { t: 'R', from: a, to: b, backup } : { t: 'R', from: a, to: b });
  o.renameSync(a, b);
}

/** Removes a file by moving it aside, so a cut can bring it back. Directories pass through. */
function remove(path: string, rm: () => void): void {
  const abs = resolve(String(path));
  if (!o.existsSync(abs) || !o.statSync(abs).isFile()) return rm();
  const backup = backupOf(abs);
  log({ t: 'U', path: abs, backup });
  o.renameSync(abs, backup);
}

function mkdir(path: string, opts: fs.MakeDirectoryOptions | fs.Mode | undefined): string | undefined {
  const abs = resolve(String(path));
  const created: string[] = [];
  const recursive = typeof opts === 'object' && opts !== null && opts.recursive === true;
  for (let p = abs; !o.existsSync(p); p = dirname(p)) {
    created.unshift(p);
    if (!recursive || dirname(p) === p) break;
  }
  for (const p of created) log({ t: 'M', path: p });
  const r = o.mkdirSync(abs, opts as fs.MakeDirectoryOptions);
  return r;
}

function bytesOf(data: unknown, encoding?: unknown): Uint8Array {
  if (typeof data === 'string') return Buffer.from(data, (typeof encoding === 'string' ? encoding : 'utf8') as BufferEncoding);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError('powercut-preload: unsupported write data');
}

/** (buffer, offset?, length?, position?) or (string, position?, encoding?), as fs.write takes them. */
function writeArgs(data: unknown, a: unknown, b: unknown, c: unknown): { buf: Uint8Array; position: number | null } {
  if (typeof data === 'string') return { buf: bytesOf(data, b), position: typeof a === 'number' ? a : null };
  const all = bytesOf(data);
  if (typeof a === 'object' && a !== null) {
    const opt = a as { offset?: number; length?: number; position?: number | null };
    const off = opt.offset ?? 0;
    return { buf: all.subarray(off, off + (opt.length ?? all.length - off)), position: opt.position ?? null };
  }
  const off = typeof a === 'number' ? a : 0;
  const len = typeof b === 'number' ? b : all.length - off;
  return { buf: all.subarray(off, off + len), position: typeof c === 'number' ? c : null };
}

function later(cb: Cb, err: unknown, ...rest: unknown[]): void {
  setImmediate(() => cb((err as NodeJS.ErrnoException) ?? null, ...rest));
}

function lastFn(args: unknown[]): Cb {
  const cb = args[args.length - 1];
  if (typeof cb !== 'function') throw new TypeError('powercut-preload: callback expected');
  return cb as Cb;
}

// ---- the patches ----

const P = fs as unknown as Record<string, unknown>;

P.openSync = (path: fs.PathLike, flags?: fs.OpenMode, mode?: fs.Mode): number => {
  const { append } = beforeOpen(String(path), flags);
  const fd = o.openSync(path, flags ?? 'r', mode);
  track(fd, String(path), append);
  return fd;
};
P.open = (path: fs.PathLike, ...args: unknown[]): void => {
  const cb = lastFn(args);
  const flags = typeof args[0] === 'function' ? undefined : args[0];
  const mode = typeof args[1] === 'function' ? undefined : args[1];
  try {
    later(cb, null, (P.openSync as typeof fs.openSync)(path, flags as fs.OpenMode, mode as fs.Mode));
  } catch (err) {
    later(cb, err);
  }
};
P.closeSync = (fd: number): void => {
  fds.delete(fd);
  o.closeSync(fd);
};
P.close = (fd: number, cb?: Cb): void => {
  try {
    (P.closeSync as typeof fs.closeSync)(fd);
    if (cb) later(cb, null);
  } catch (err) {
    if (cb) later(cb, err);
  }
};
P.writeSync = (fd: number, data: unknown, a?: unknown, b?: unknown, c?: unknown): number => {
  const { buf, position } = writeArgs(data, a, b, c);
  return write(fd, buf, position);
};
P.write = (fd: number, data: unknown, ...args: unknown[]): void => {
  const cb = lastFn(args);
  const rest = args.slice(0, -1);
  try {
    const { buf, position } = writeArgs(data, rest[0], rest[1], rest[2]);
    later(cb, null, write(fd, buf, position), data);
  } catch (err) {
    later(cb, err);
  }
};
P.writevSync = (fd: number, buffers: ArrayBufferView[], position?: number | null): number => write(fd, Buffer.concat(buffers.map((x) => bytesOf(x))), position);
P.writev = (fd: number, buffers: ArrayBufferView[], ...args: unknown[]): void => {
  const cb = lastFn(args);
  const position = typeof args[0] === 'number' ? args[0] : null;
  try {
    later(cb, null, write(fd, Buffer.concat(buffers.map((x) => bytesOf(x))), position), buffers);
  } catch (err) {
    later(cb, err);
  }
};
P.ftruncateSync = (fd: number, len = 0): void => truncate(fd, len);
P.ftruncate = (fd: number, ...args: unknown[]): void => {
  const cb = lastFn(args);
  try {
    truncate(fd, typeof args[0] === 'number' ? args[0] : 0);
    later(cb, null);
  } catch (err) {
    later(cb, err);
  }
};
for (const name of ['fsync', 'fdatasync'] as const) {
  const sync = o[`${name}Sync`];
  P[`${name}Sync`] = (fd: number): void => {
    const done = syncMark(fd);
    sync(fd);
    done();
  };
  const orig = o[name];
  P[name] = (fd: number, cb: Cb): void => {
    const done = syncMark(fd);
    orig(fd, (err) => {
      if (!err) done();
      cb(err);
    });
  };
}
P.renameSync = (from: fs.PathLike, to: fs.PathLike): void => rename(String(from), String(to));
P.rename = (from: fs.PathLike, to: fs.PathLike, cb: Cb): void => {
  try {
    rename(String(from), String(to));
    later(cb, null);
  } catch (err) {
    later(cb, err);
  }
};
P.unlinkSync = (path: fs.PathLike): void => remove(String(path), () => o.unlinkSync(path));
P.unlink = (path: fs.PathLike, cb: Cb): void => {
  try {
    remove(String(path), () => o.unlinkSync(path));
    later(cb, null);
  } catch (err) {
    later(cb, err);
  }
};
P.rmSync = (path: fs.PathLike, opts?: fs.RmOptions): void => remove(String(path), () => o.rmSync(path, opts));
P.mkdirSync = (path: fs.PathLike, opts?: fs.MakeDirectoryOptions | fs.Mode): string | undefined => mkdir(String(path), opts);
P.mkdir = (path: fs.PathLike, ...args: unknown[]): void => {
  const cb = lastFn(args);
  try {
    later(cb, null, mkdir(String(path), typeof args[0] === 'function' ? undefined : (args[0] as fs.MakeDirectoryOptions)));
  } catch (err) {
    later(cb, err);
  }
};

// The store's batched writes: batch-write.ts loads the addon through require, whose cache now
// holds an object whose writeBatch is this wrapper (the addon's own properties are read-only),
// the rest inherited. Every write's undo record is logged before the job is queued;
// the job's own fdatasync, once it reports success, covers them and what was logged before.
// Were two jobs in flight at once over the same bytes, the later record's pre-image could hold
// the earlier job's bytes, and a cut keeping the earlier write could see it undone: a failure
// that is the harness's, never a loss it hides.
type BatchDone = (failedAt: Int32Array, errnos: Int32Array, syncErrno: number) => void;
interface BlockWriteAddon {
  writeBatch(fds: Int32Array, positions: Float64Array, buffers: Uint8Array[], groupEnds: Uint32Array, callback: BatchDone, syncFd?: number): void;
}
const blockWritePath = nativeAddonPath('block_write');
if (blockWritePath && o.existsSync(blockWritePath)) {
  const req = createRequire(import.meta.url);
  const addon = req(blockWritePath) as BlockWriteAddon;
  const writeBatch = addon.writeBatch.bind(addon);
  const wrapped = Object.create(addon) as BlockWriteAddon;
  req.cache[blockWritePath]!.exports = wrapped;
  Object.defineProperty(wrapped, 'writeBatch', { enumerable: true, value: (...[wfds, positions, buffers, groupEnds, callback, syncFd]: Parameters<BlockWriteAddon['writeBatch']>) => {
    const mine = new Set<number>();
    for (let i = 0; i < wfds.length; i++) {
      const t = fds.get(wfds[i]!);
      if (!t || t.dir) continue;
      const s = logOverwrite(t, wfds[i]!, positions[i]!, buffers[i]!.length);
      mine.add(s);
      inFlight.set(s, t.ino);
    }
    const synced = syncFd !== undefined && syncFd >= 0 ? syncMark(syncFd, mine) : undefined;
    const done: BatchDone = (failedAt, errnos, syncErrno) => {
      for (const s of mine) inFlight.delete(s);
      if (synced && syncErrno === 0) synced();
      callback(failedAt, errnos, syncErrno);
    };
    try {
      writeBatch(wfds, positions, buffers, groupEnds, done, syncFd);
    } catch (err) {
      for (const s of mine) inFlight.delete(s);
      throw err;
    }
  } });
}

const PP = fsp as unknown as Record<string, unknown>;
const probe = await o.fspOpen('/dev/null', 'r');
const FH = Object.getPrototypeOf(probe) as Record<string, unknown>;
await probe.close();
const fhClose = FH.close as (this: fsp.FileHandle) => Promise<void>;
const fhSync = FH.sync as (this: fsp.FileHandle) => Promise<void>;
const fhDatasync = FH.datasync as (this: fsp.FileHandle) => Promise<void>;

PP.open = async (path: fs.PathLike, flags?: fs.OpenMode, mode?: fs.Mode): Promise<fsp.FileHandle> => {
  const { append } = beforeOpen(String(path), flags);
  const fh = await o.fspOpen(path, flags, mode);
  track(fh.fd, String(path), append);
  return fh;
};
FH.close = async function (this: fsp.FileHandle): Promise<void> {
  fds.delete(this.fd);
  return fhClose.call(this);
};
FH.write = async function (this: fsp.FileHandle, data: unknown, a?: unknown, b?: unknown, c?: unknown) {
  const { buf, position } = writeArgs(data, a, b, c);
  return { bytesWritten: write(this.fd, buf, position), buffer: data };
};
FH.writev = async function (this: fsp.FileHandle, buffers: ArrayBufferView[], position?: number | null) {
  return { bytesWritten: write(this.fd, Buffer.concat(buffers.map((x) => bytesOf(x))), position), buffers };
};
FH.writeFile = async function (this: fsp.FileHandle, data: unknown, opts?: unknown) {
  const enc = typeof opts === 'string' ? opts : (opts as { encoding?: string } | undefined)?.encoding;
  write(this.fd, bytesOf(data, enc), null);
};
FH.truncate = async function (this: fsp.FileHandle, len = 0) {
  truncate(this.fd, len);
};
FH.sync = async function (this: fsp.FileHandle) {
  const done = syncMark(this.fd);
  await fhSync.call(this);
  done();
};
FH.datasync = async function (this: fsp.FileHandle) {
  const done = syncMark(this.fd);
  await fhDatasync.call(this);
  done();
};
PP.rename = async (from: fs.PathLike, to: fs.PathLike): Promise<void> => rename(String(from), String(to));
PP.unlink = async (path: fs.PathLike): Promise<void> => remove(String(path), () => o.unlinkSync(path));
PP.rm = async (path: fs.PathLike, opts?: fs.RmOptions): Promise<void> => remove(String(path), () => o.rmSync(path, opts));
PP.mkdir = async (path: fs.PathLike, opts?: fs.MakeDirectoryOptions | fs.Mode): Promise<string | undefined> => mkdir(String(path), opts);

syncBuiltinESMExports();
