import { createReadStream } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import type { MetadataService } from '../../core/interfaces.js';
import { formatSize, parseSize } from '../../core/units.js';
import type { VolumeClient } from '../../volume/client.js';
import { readPublishedIo } from '../../volume/io-stats.js';
import { VolumeMeta } from '../../volume/meta.js';
import { checkVolumeSize, parseVolSnap } from '../../volume/records.js';
import { TreeReader, allocatedBytes, volumeUsage } from '../../volume/usage.js';
import { withMeta, withVolumes } from '../shared/context.js';
import { emit, outputOptions, printJson, renderCsv, renderTable, sizeText, type OutputOpts } from '../shared/output.js';
import { byteProgress } from '../shared/progress.js';

// Volume administration: create, list, delete, resize, snapshots, clones, dump and load.

function volSnap(text: string): { volume: string; snapshot: string } {
  const { volume, snapshot } = parseVolSnap(text);
  if (!snapshot) throw new TorusError('INVALID_ARGUMENT', `expected VOLUME@SNAPSHOT, got "${text}"`);
  return { volume, snapshot };
}

/** A size argument, in the units people type, checked against the volume limits in those units. */
function volumeSize(text: string): number {
  const bytes = parseSize(text);
  if (bytes <= 0) throw new TorusError('INVALID_ARGUMENT', `invalid volume size "${text}": must be larger than 0`);
  try {
    checkVolumeSize(bytes);
  } catch {
    throw new TorusError('INVALID_ARGUMENT', `volume size ${formatSize(bytes)} is over the limit of 1 PiB`);
  }
  return bytes;
}

/**
 * Thin provisioning may promise more than the cluster holds; that is allowed (it is the point),
 * but said, with the figures, like LVM's thin pools do.
 */
async function overcommitWarning(meta: MetadataService, vm: VolumeMeta, blockSize: number): Promise<string | undefined> {
  const [ring, vols] = await Promise.all([meta.getRing(), vm.list()]);
  const raw = ring.peers.reduce((n, p) => n + p.totalBlocks, 0) * blockSize;
  const usable = Math.floor(raw / Math.max(1, ring.replication));
  const provisioned = vols.reduce((n, v) => n + v.head.size, 0);
  if (provisioned <= usable) return undefined;
  const ratio = usable > 0 ? `${(provisioned / usable).toFixed(1)}x` : 'no capacity yet';
  return `volumes now total ${formatSize(provisioned)} against ${formatSize(usable)} usable (${formatSize(raw)} raw at replication ${ring.replication}): overcommitted ${ratio}; writes fail with "out of space" once the cluster fills`;
}

export function createVolumeAction(): (name: string, size: string, o: { json?: boolean }, c: Command) => Promise<void> {
  return async (name, size, o, c) =>
    withMeta(c, async (meta) => {
      const bytes = volumeSize(size);
      const g = await meta.globalMetadata(); // a clear "not initialized" before anything else
      const vm = new VolumeMeta(meta.kv());
      const rec = await vm.create(name, bytes);
      const warning = await overcommitWarning(meta, vm, g.blockSize);
      if (warning) process.stderr.write(`warning: ${warning}\n`);
      emit(o, { name: rec.name, id: rec.id, size: bytes, warnings: warning ? [warning] : [] }, `created volume ${rec.name}: ${formatSize(bytes)}`);
    });
}

/** `create NAME SIZE` as torusctl and torusblk both spell it. */
export function createVolumeCommand(name: string, description: string): Command {
  return outputOptions(new Command(name).description(description).argument('<name>', 'volume name').argument('<size>', 'size, e.g. 10GiB')).action(createVolumeAction());
}

async function listVolumes(c: Command, opts: OutputOpts & { allocated: boolean }): Promise<void> {
  const show = async (meta: MetadataService, vc?: VolumeClient): Promise<void> => {
    await meta.globalMetadata();
    const vols = await new VolumeMeta(meta.kv()).list();
    // Allocation needs each volume's inode pages from the storage nodes; a volume whose pages
    // cannot be read gets no figure rather than failing the listing.
    const reader = vc ? new TreeReader(vc.block.distributor) : undefined;
    const allocated = new Map<string, number | null>();
    if (reader)
      for (const v of vols) allocated.set(v.record.name, await allocatedBytes(reader, v.head).catch(() => null));
    if (opts.json) {
      printJson(
        vols.map((v) => ({
          name: v.record.name,
          id: v.record.id,
          size: v.head.size,
          ...(reader ? { allocated: allocated.get(v.record.name) ?? null } : {}),
          type: v.record.type,
          status: v.lock ? 'in-use' : 'free',
          holder: v.lock ? { host: v.lock.host, pid: v.lock.pid, process: v.lock.holder, since: v.lock.since } : null,
          snapshots: v.snapshots,
          parent: v.record.parent ?? null,
          createdAt: v.record.createdAt,
        })),
      );
      return;
    }
    const head = ['VOLUME NAME', 'SIZE', ...(reader ? ['ALLOCATED'] : []), 'TYPE', 'STATUS', 'SNAPSHOTS', 'PARENT'];
    const rows = vols.map((v) => {
      const a = allocated.get(v.record.name);
      const alloc = a === null || a === undefined ? '?' : opts.csv ? String(a) : sizeText(a, opts);
      return [
        v.record.name,
        opts.csv ? String(v.head.size) : sizeText(v.head.size, opts),
        ...(reader ? [alloc] : []),
        v.record.type,
        opts.csv ? (v.lock ? 'in-use' : 'free') : v.lock ? `in-use (${v.lock.host})` : 'free',
        String(v.snapshots),
        v.record.parent ? [v.record.parent.volume, v.record.parent.snapshot].filter((x) => x !== undefined).join('@') : '',
      ];
    });
    process.stdout.write(opts.csv ? `${renderCsv(head, rows)}\n` : `${renderTable(head, rows)}\n`);
  };
  if (opts.allocated) await withVolumes(c, (vc, meta) => show(meta, vc));
  else await withMeta(c, (meta) => show(meta));
}

async function volumeInfo(c: Command, name: string, opts: OutputOpts): Promise<void> {
  await withVolumes(c, async (vc, meta) => {
    const g = await meta.globalMetadata();
    const vm = vc.vmeta;
    const record = await vm.get(name);
    const [{ head }, lock, io, readers] = await Promise.all([vm.head(record.id), vm.lockHolder(record.id), readPublishedIo(meta.kv(), name), vm.readers(record.id)]);
    const usage = await volumeUsage(vm, new TreeReader(vc.block.distributor), name);
    // Only the holder's own figures: a record from another process is not about this mount.
    const rates = io && lock && io.host === lock.host && io.pid === lock.pid ? io : undefined;
    const info = {
      name: record.name,
      id: record.id,
      type: record.type,
      createdAt: record.createdAt,
      parent: record.parent ?? null,
      size: head.size,
      blockSize: g.blockSize,
      allocated: usage.allocated,
      exclusive: usage.exclusive,
      shared: usage.shared,
      metadata: usage.metadata,
      snapshots: usage.snapshots,
      lock: lock ? { host: lock.host, pid: lock.pid, process: lock.holder, since: lock.since } : null,
      readers,
      // docs/journal.md: where the writer's journal is, and what the last checkpoint committed.
      journal: head.journal
        ? { kind: 'replicated', epoch: head.journal.epoch, segment: head.journal.segment, start: head.journal.start, replicas: head.journal.replicas, nextLsn: head.lsn ?? 1, tail: lock ? 'held by the writer' : 'left by a writer that stopped without closing: replayed by the next open' }
        : { kind: 'replicated', replicas: [], nextLsn: head.lsn ?? 1, tail: 'none (checkpointed at close)' },
      lastCheckpointEpoch: head.epoch,
      io: rates ? { at: rates.at, intervalSec: rates.intervalSec, rates: rates.rates, totals: rates.totals } : null,
    };
    if (opts.json) {
      printJson(info);
      return;
    }
    const sz = (n: number): string => sizeText(n, opts);
    const lines = [
      `Volume:      ${record.name} (id ${record.id}, ${record.type}${record.parent ? `, cloned from ${record.parent.volume}@${record.parent.snapshot}` : ''})`,
      `Created:     ${record.createdAt}`,
      `Size:        ${sz(head.size)}`,
      `Allocated:   ${sz(usage.allocated)} (${sz(usage.exclusive)} its own, ${sz(usage.shared)} shared with snapshots or clones), plus ${sz(usage.metadata)} of inode and run pages; each stored on R replicas (journal data counts until folded; the tail since the last checkpoint is not counted)`,
      `Lock:        ${lock ? `held by ${lock.host} pid ${lock.pid} (process ${lock.holder}) since ${lock.since}` : 'free (not mounted)'}`,
      `Readers:     ${readers === 0 ? 'none' : `${readers} read-only open${readers === 1 ? '' : 's'}, each holding the view it opened (GC keeps what it names until it closes)`}`,
      `Journal:     ${
        head.journal
          ? `segment ${head.journal.segment} of epoch ${head.journal.epoch} on ${head.journal.replicas.join(', ')}, tail from log block ${head.journal.start}${lock ? '' : ' (left without a close: the next open replays it)'}`
          : 'no tail (everything checkpointed)'
      }; next LSN ${head.lsn ?? 1}`,
      `I/O:         ${
        rates
          ? `${rates.rates.readOps} reads/s (${sz(Math.round(rates.rates.readBytes))}/s), ${rates.rates.writeOps} writes/s (${sz(Math.round(rates.rates.writtenBytes))}/s), ${rates.rates.flushOps} flushes/s over ${rates.intervalSec}s to ${rates.at}`
          : lock
            ? 'not reported by the holder yet'
            : 'none (not mounted)'
      }`,
      `Snapshots:   ${usage.snapshots.length}`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
    if (usage.snapshots.length > 0)
      process.stdout.write(
        `${renderTable(
          ['SNAPSHOT', 'TIMESTAMP', 'SIZE', 'REFERENCED', 'EXCLUSIVE'],
          usage.snapshots.map((s) => [s.name, s.when, sz(s.size), sz(s.referenced), sz(s.exclusive)]),
        )}\n`,
      );
  });
}

export function volumeCommand(): Command {
  const volume = new Command('volume').description('manage block volumes');
  volume.addCommand(createVolumeCommand('create-block', 'create a thin-provisioned block volume').alias('create'));
  volume.addCommand(
    outputOptions(new Command('list').description('list volumes, with the space each takes'), { csv: true, bytes: true })
      .option('--no-allocated', 'skip the ALLOCATED column (it reads every volume\'s inode pages from the storage nodes)')
      .action(async (opts: OutputOpts & { allocated: boolean }, c: Command) => listVolumes(c, opts)),
  );
  volume.addCommand(
    outputOptions(
      new Command('info').description("a volume's size, allocation (own and shared with snapshots), snapshots, lock holder and I/O rates").argument('<name>'),
      { bytes: true },
    ).action(async (name: string, opts: OutputOpts, c: Command) => volumeInfo(c, name, opts)),
  );
  volume.addCommand(
    outputOptions(new Command('delete').description('delete a volume and its snapshots (refused while mounted); storage is reclaimed by GC').argument('<name>')).action(
      async (name: string, o: { json?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          await new VolumeMeta(meta.kv()).delete(name);
          emit(o, { deleted: name }, `deleted volume ${name}`);
        }),
    ),
  );
  volume.addCommand(
    outputOptions(
      new Command('resize')
        .description('grow a volume (shrinking needs --allow-shrink); only while unmounted')
        .argument('<name>')
        .argument('<size>', 'new size, e.g. 20GiB')
        .option('--allow-shrink', 'allow a smaller size: data beyond it is discarded'),
    ).action(async (name: string, size: string, opts: { allowShrink?: boolean; json?: boolean }, c: Command) =>
      withVolumes(c, async (vc) => {
        const bytes = volumeSize(size);
        const vol = await vc.openVolume(name);
        try {
          const from = vol.size;
          if (bytes < from && !opts.allowShrink)
            throw new TorusError('INVALID_ARGUMENT', `shrinking volume ${name} from ${formatSize(from)} to ${formatSize(bytes)} loses the data past ${formatSize(bytes)}: pass --allow-shrink`);
          await vol.resize(bytes, opts.allowShrink ?? false);
          await vol.flush();
          emit(opts, { name, from, size: bytes }, `resized volume ${name}: ${formatSize(from)} -> ${formatSize(bytes)}`);
        } finally {
          await vol.close();
        }
      }),
    ),
  );
  return volume;
}

/** Writes to stdout, waiting for 'drain' when it is full; one listener at a time, removed after. */
function writeStdout(b: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    if (process.stdout.write(b)) return resolve();
    const done = (err?: Error): void => {
      process.stdout.off('drain', onDrain);
      process.stdout.off('error', onError);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = (): void => done();
    const onError = (err: Error): void => done(err);
    process.stdout.on('drain', onDrain);
    process.stdout.on('error', onError);
  });
}

async function dump(vc: VolumeClient, source: string, out: string, progress: boolean, force: boolean): Promise<number> {
  const { volume, snapshot } = parseVolSnap(source);
  const toStdout = out === '-';
  // 'wx' refuses an existing file (an image someone may still need) unless --force says otherwise.
  const fh = toStdout ? undefined : await open(out, force ? 'w' : 'wx').catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new TorusError('EXISTS', `${out} already exists: pass --force to overwrite it`);
    throw err;
  });
  let vol;
  try {
    vol = await vc.openVolume(volume, snapshot !== undefined ? { snapshot } : { readOnly: true });
  } catch (err) {
    await fh?.close();
    throw err;
  }
  const bar = byteProgress(progress, vol.size, 'dump');
  const chunk = Math.max(vol.blockSize, 4 * 1024 * 1024);
  let done = 0;
  try {
    if (fh) await fh.truncate(vol.size); // sparse: holes are never written
    for (let off = 0; off < vol.size; off += chunk) {
      const len = Math.min(chunk, vol.size - off);
      const extents = await vol.blockStatus(off, len);
      let pos = off;
      for (const e of extents) {
        if (pos >= off + len) break;
        const n = Math.min(e.length, off + len - pos);
        if (e.hole) {
          if (toStdout) await writeStdout(Buffer.alloc(n));
        } else {
          const data = await vol.read(pos, n);
          if (fh) await fh.write(data, 0, n, pos);
          else await writeStdout(data);
        }
        pos += n;
      }
      done = off + len;
      bar.update(done);
    }
  } finally {
    bar.stop();
    await fh?.close();
    await vol.close();
  }
  return done;
}

async function load(vc: VolumeClient, file: string, name: string, sizeArg: string | undefined, progress: boolean): Promise<number> {
  const fromStdin = file === '-';
  const fileSize = fromStdin ? undefined : (await stat(file)).size;
  if (fromStdin && !sizeArg) throw new TorusError('INVALID_ARGUMENT', 'loading from standard input needs the volume SIZE');
  const size = sizeArg ? volumeSize(sizeArg) : fileSize!;
  if (fileSize !== undefined && size < fileSize)
    throw new TorusError('INVALID_ARGUMENT', `size ${formatSize(size)} is smaller than the file (${formatSize(fileSize)})`);
  await vc.vmeta.create(name, size);
  const vol = await vc.openVolume(name);
  const bar = byteProgress(progress, fileSize ?? size, 'load');
  let pos = 0;
  try {
    const stream = fromStdin ? process.stdin : createReadStream(file, { highWaterMark: 4 * 1024 * 1024 });
    for await (const raw of stream) {
      const buf = raw as Buffer;
      if (pos + buf.length > size) throw new TorusError('INVALID_ARGUMENT', `input is larger than the volume size ${formatSize(size)}`);
      // Sparse-aware: the new volume already reads as zeros, so zero runs are not written.
      const bs = vol.blockSize;
      for (let i = 0; i < buf.length; ) {
        const n = Math.min(bs - ((pos + i) % bs), buf.length - i);
        const piece = buf.subarray(i, i + n);
        if (!isZero(piece)) await vol.write(pos + i, piece);
        i += n;
      }
      pos += buf.length;
      bar.update(pos);
    }
    await vol.flush();
  } finally {
    bar.stop();
    await vol.close();
  }
  return pos;
}

let zeros = Buffer.alloc(0);
function isZero(b: Buffer): boolean {
  if (zeros.length < b.length) zeros = Buffer.alloc(b.length);
  return b.equals(zeros.subarray(0, b.length));
}

export function blockCommand(): Command {
  const block = new Command('block').description('block volume data: snapshots, clones, dump and load');
  block.addCommand(createVolumeCommand('create', 'create a block volume (same as volume create-block)'));
  const snap = new Command('snapshot').description('point-in-time copies of a volume');
  snap.addCommand(
    outputOptions(new Command('create').description('snapshot a volume: everything flushed before the command (while mounted, its writer takes it)').argument('<volume@snapshot>')).action(
      async (vs: string, o: { json?: boolean }, c: Command) =>
        withVolumes(c, async (vc) => {
          const { volume, snapshot } = volSnap(vs);
          const rec = await vc.snapshot(volume, snapshot);
          emit(o, { volume, snapshot, timestamp: rec.when, size: rec.head.size }, `created snapshot ${volume}@${snapshot}`);
        }),
    ),
  );
  snap.addCommand(
    outputOptions(new Command('list').description("list a volume's snapshots").argument('<volume>'), { csv: true, bytes: true }).action(
      async (volume: string, opts: OutputOpts, c: Command) =>
        withMeta(c, async (meta) => {
          const snaps = await new VolumeMeta(meta.kv()).listSnapshots(volume);
          if (opts.json) {
            printJson(snaps.map((s) => ({ name: s.name, timestamp: s.when, size: s.head.size })));
            return;
          }
          const head = ['SNAPSHOT NAME', 'TIMESTAMP', 'SIZE'];
          const rows = snaps.map((s) => [s.name, s.when, opts.csv ? String(s.head.size) : sizeText(s.head.size, opts)]);
          process.stdout.write(opts.csv ? `${renderCsv(head, rows)}\n` : `Volume: ${volume}\n${renderTable(head, rows)}\n`);
        }),
    ),
  );
  snap.addCommand(
    outputOptions(new Command('delete').description('delete a snapshot; its storage is reclaimed by GC').argument('<volume@snapshot>')).action(
      async (vs: string, o: { json?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const { volume, snapshot } = volSnap(vs);
          await new VolumeMeta(meta.kv()).deleteSnapshot(volume, snapshot);
          emit(o, { volume, snapshot, deleted: true }, `deleted snapshot ${volume}@${snapshot}`);
        }),
    ),
  );
  snap.addCommand(
    outputOptions(new Command('restore').description('roll a volume back to a snapshot (only while unmounted)').argument('<volume@snapshot>')).action(
      async (vs: string, o: { json?: boolean }, c: Command) =>
        withVolumes(c, async (vc) => {
          const { volume, snapshot } = volSnap(vs);
          await vc.restore(volume, snapshot);
          emit(o, { volume, snapshot, restored: true }, `restored ${volume} to snapshot ${snapshot}`);
        }),
    ),
  );
  block.addCommand(snap);
  block.addCommand(
    outputOptions(
      new Command('clone')
        .description('create a new writable volume from a snapshot, sharing its unchanged blocks')
        .argument('<volume@snapshot>')
        .argument('<new-volume>'),
    ).action(async (vs: string, name: string, o: { json?: boolean }, c: Command) =>
      withVolumes(c, async (vc) => {
        const { volume, snapshot } = volSnap(vs);
        const created = await vc.clone(name, { volume, snapshot });
        const { head } = await vc.vmeta.head(created.id);
        emit(o, { name, id: created.id, size: head.size, parent: { volume, snapshot } }, `created volume ${name} from ${volume}@${snapshot}`);
      }),
    ),
  );
  block.addCommand(
    outputOptions(
      new Command('dump')
        .description('copy a volume (or VOLUME@SNAPSHOT) to a file, or - for standard output; holes stay holes in a file')
        .argument('<volume>')
        .argument('<output>', 'file to create, or - for standard output')
        .option('-f, --force', 'overwrite the output file if it exists')
        .option('-p, --progress', 'show progress on stderr'),
    ).action(async (source: string, out: string, opts: { progress?: boolean; force?: boolean; json?: boolean }, c: Command) =>
      withVolumes(c, async (vc) => {
        const n = await dump(vc, source, out, opts.progress ?? false, opts.force ?? false);
        // With - the data is standard output; the summary goes beside it, to stderr.
        const text = opts.json ? `${JSON.stringify({ source, output: out, bytes: n })}\n` : `copied ${n} bytes (${formatSize(n)})\n`;
        (out === '-' ? process.stderr : process.stdout).write(text);
      }),
    ),
  );
  block.addCommand(
    outputOptions(
      new Command('load')
        .description('create a volume from a file (or - for standard input, with SIZE); zero runs are not written')
        .argument('<input>')
        .argument('<volume>')
        .argument('[size]', 'volume size, at least the input size (default: the file size)')
        .option('-p, --progress', 'show progress on stderr'),
    ).action(async (file: string, name: string, size: string | undefined, opts: { progress?: boolean; json?: boolean }, c: Command) => {
      if (file !== '-') await stat(file); // a missing file is the first thing to hear about
      await withVolumes(c, async (vc) => {
        const n = await load(vc, file, name, size, opts.progress ?? false);
        emit(opts, { input: file, volume: name, bytes: n }, `copied ${n} bytes (${formatSize(n)})`);
      });
    }),
  );
  return block;
}
