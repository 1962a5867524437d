import { randomUUID } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, openSync, readdirSync, readFileSync, renameSync, statfsSync, statSync, writeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { TorusError } from '../core/errors.js';
import { parseSize } from '../core/units.js';
import { fsyncDirSync, mkdirDurableSync } from '../storage/durable-fs.js';

// A storage node's identity lives in its data dir: a UUID kept across restarts (the ring names
// nodes by it) and the id of the cluster the dir was formatted for, so a disk moved to another
// cluster is refused instead of silently mixing two clusters' blocks.

export interface NodeIdentity {
  readonly uuid: string;
  readonly clusterId: string;
  readonly createdAt: string;
}

const IDENTITY_FILE = 'node.json';

function writeAtomic(path: string, text: string): void {
  const tmp = `${path}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  // The rename is durable only once the directory is: without this a power cut could leave the
  // node with no identity, or the old one.
  fsyncDirSync(dirname(path));
}

/** The identity a data dir already has; WRONG_CLUSTER if it was formatted for another cluster. */
export function readIdentity(dataDir: string, clusterId: string, etcdDesc: string): NodeIdentity | undefined {
  const path = join(dataDir, IDENTITY_FILE);
  if (!existsSync(path)) return undefined;
  let id: NodeIdentity;
  try {
    id = JSON.parse(readFileSync(path, 'utf8')) as NodeIdentity;
  } catch {
    throw new TorusError('IO', `${path} is damaged; move the data dir away to start this node afresh`);
  }
  if (typeof id.uuid !== 'string' || typeof id.clusterId !== 'string') throw new TorusError('IO', `${path} is damaged`);
  if (id.clusterId !== clusterId)
    throw new TorusError(
      'WRONG_CLUSTER',
      `data dir ${resolve(dataDir)} belongs to cluster ${id.clusterId}, but etcd at ${etcdDesc} holds cluster ${clusterId}: use another --data-dir, or empty this one if its data is no longer wanted`,
    );
  return id;
}

/** Gives a fresh data dir its identity. Call with the data dir locked (the block store's lock). */
export function createIdentity(dataDir: string, clusterId: string, uuid: string = randomUUID()): NodeIdentity {
  mkdirDurableSync(dataDir);
  const id: NodeIdentity = { uuid, clusterId, createdAt: new Date().toISOString() };
  writeAtomic(join(dataDir, IDENTITY_FILE), `${JSON.stringify(id, null, 2)}\n`);
  return id;
}

/**
 * What in a data dir others can get at: the dir, its block dir and the files in it, and anything
 * group or others may read, list or write (mode bits 0077). Older releases created the block
 * files 0644 under the usual umask; they are reported, not changed, so the operator decides.
 */
export function openPermissions(dataDir: string): string[] {
  const out: string[] = [];
  const look = (path: string): void => {
    let st;
    try {
      st = statSync(path);
    } catch {
      return;
    }
    const mode = st.mode & 0o777;
    if ((mode & 0o077) !== 0) out.push(`${path} (mode ${mode.toString(8).padStart(4, '0')})`);
    if (st.isDirectory() && path !== dataDir) for (const f of readdirSync(path)) look(join(path, f));
  };
  look(dataDir);
  look(join(dataDir, 'block'));
  look(join(dataDir, IDENTITY_FILE));
  return out;
}

/**
 * `--size`: bytes ("20GiB") or a share of the data dir's filesystem ("50%"). Refuses a size
 * the filesystem cannot hold, counting what this node's files already occupy as available.
 */
export function resolveStorageSize(text: string, dataDir: string, alreadyAllocated: number): number {
  mkdirDurableSync(dataDir);
  const fs = statfsSync(dataDir);
  const total = fs.blocks * fs.bsize;
  const free = fs.bavail * fs.bsize;
  let bytes: number;
  const pct = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(text);
  if (pct) {
    const p = Number(pct[1]);
    if (!(p > 0 && p <= 100)) throw new TorusError('INVALID_ARGUMENT', `invalid --size ${text}: a percentage must be between 0 and 100`);
    bytes = Math.floor((total * p) / 100);
  } else {
    bytes = parseSize(text);
  }
  if (bytes <= 0) throw new TorusError('INVALID_ARGUMENT', `invalid --size ${text}: must be larger than 0`);
  const available = free + alreadyAllocated;
  if (bytes > available)
    throw new TorusError(
      'INVALID_ARGUMENT',
      `--size ${text} (${bytes} bytes) is larger than the ${available} bytes free on the filesystem of ${resolve(dataDir)}`,
    );
  return bytes;
}
