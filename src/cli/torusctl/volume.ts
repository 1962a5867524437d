import { createReadStream } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import { formatSize, parseSize } from '../../core/units.js';
import type { VolumeClient } from '../../volume/client.js';
import { VolumeMeta } from '../../volume/meta.js';
import { parseVolSnap } from '../../volume/records.js';
import { withMeta, withVolumes } from '../shared/context.js';
import { printJson, renderCsv, renderTable } from '../shared/output.js';
import { byteProgress } from '../shared/progress.js';

// Volume administration: create, list, delete, resize, snapshots, clones, dump and load.

function volSnap(text: string): { volume: string; snapshot: string } {
  const { volume, snapshot } = parseVolSnap(text);
  if (!snapshot) throw new TorusError('INVALID_ARGUMENT', `expected VOLUME@SNAPSHOT, got "${text}"`);
  return { volume, snapshot };
}

export function createVolumeAction(): (name: string, size: string, _o: unknown, c: Command) => Promise<void> {
  return async (name, size, _o, c) =>
    withMeta(c, async (meta) => {
      const bytes = parseSize(size);
      await meta.globalMetadata(); // a clear "not initialized" before anything else
      const rec = await new VolumeMeta(meta.kv()).create(name, bytes);
      process.stdout.write(`created volume ${rec.name}: ${formatSize(bytes)}\n`);
    });
}

async function listVolumes(c: Command, opts: { json?: boolean; csv?: boolean }): Promise<void> {
  await withMeta(c, async (meta) => {
    await meta.globalMetadata();
    const vols = await new VolumeMeta(meta.kv()).list();
    if (opts.json) {
      printJson(
        vols.map((v) => ({
          name: v.record.name,
          id: v.record.id,
          size: v.head.size,
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
    const head = ['VOLUME NAME', 'SIZE', 'TYPE', 'STATUS', 'SNAPSHOTS', 'PARENT'];
    const rows = vols.map((v) => [
      v.record.name,
      formatSize(v.head.size),
      v.record.type,
      v.lock ? `in-use (${v.lock.host})` : 'free',
      String(v.snapshots),
      v.record.parent ? [v.record.parent.volume, v.record.parent.snapshot].filter((x) => x !== undefined).join('@') : '',
    ]);
    process.stdout.write(opts.csv ? `${renderCsv(head, rows)}\n` : `${renderTable(head, rows)}\n`);
  });
}

export function volumeCommand(): Command {
  const volume = new Command('volume').description('manage block volumes');
  volume.addCommand(
    new Command('create-block')
      .alias('create')
      .description('create a thin-provisioned block volume')
      .argument('<name>', 'volume name')
      .argument('<size>', 'size, e.g. 10GiB')
      .action(createVolumeAction()),
  );
  volume.addCommand(
    new Command('list')
      .description('list volumes')
      .option('--json', 'print JSON (sizes in bytes)')
      .option('--csv', 'print CSV')
      .action(async (opts: { json?: boolean; csv?: boolean }, c: Command) => listVolumes(c, opts)),
  );
  volume.addCommand(
    new Command('delete')
      .description('delete a volume and its snapshots (refused while mounted); storage is reclaimed by GC')
      .argument('<name>')
      .action(async (name: string, _o: unknown, c: Command) =>
        withMeta(c, async (meta) => {
          await new VolumeMeta(meta.kv()).delete(name);
          process.stdout.write(`deleted volume ${name}\n`);
        }),
      ),
  );
  volume.addCommand(
    new Command('resize')
      .description('grow a volume (shrinking needs --allow-shrink); only while unmounted')
      .argument('<name>')
      .argument('<size>')
      .option('--allow-shrink', 'allow a smaller size: data beyond it is discarded')
      .action(async (name: string, size: string, opts: { allowShrink?: boolean }, c: Command) =>
        withVolumes(c, async (vc) => {
          const bytes = parseSize(size);
          const vol = await vc.openVolume(name);
          try {
            const from = vol.size;
            await vol.resize(bytes, opts.allowShrink ?? false);
            await vol.flush();
            process.stdout.write(`resized volume ${name}: ${formatSize(from)} -> ${formatSize(bytes)}\n`);
          } finally {
            await vol.close();
          }
        }),
      ),
  );
  return volume;
}

async function dump(vc: VolumeClient, source: string, out: string, progress: boolean): Promise<number> {
  const { volume, snapshot } = parseVolSnap(source);
  const vol = await vc.openVolume(volume, snapshot !== undefined ? { snapshot } : { readOnly: true });
  const toStdout = out === '-';
  const fh = toStdout ? undefined : await open(out, 'w');
  const bar = byteProgress(progress, vol.size, 'dump');
  const chunk = Math.max(vol.blockSize, 4 * 1024 * 1024);
  let done = 0;
  try {
    if (fh) await fh.truncate(vol.size); // sparse: holes are never written
    const stdoutWrite = (b: Buffer): Promise<void> =>
      new Promise((res, rej) => {
        if (process.stdout.write(b)) res();
        else process.stdout.once('drain', res).once('error', rej);
      });
    for (let off = 0; off < vol.size; off += chunk) {
      const len = Math.min(chunk, vol.size - off);
      const extents = await vol.blockStatus(off, len);
      let pos = off;
      for (const e of extents) {
        if (pos >= off + len) break;
        const n = Math.min(e.length, off + len - pos);
        if (e.hole) {
          if (toStdout) await stdoutWrite(Buffer.alloc(n));
        } else {
          const data = await vol.read(pos, n);
          if (fh) await fh.write(data, 0, n, pos);
          else await stdoutWrite(data);
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

async function load(vc: VolumeClient, file: string, name: string, sizeText: string | undefined, progress: boolean): Promise<number> {
  const fromStdin = file === '-';
  const fileSize = fromStdin ? undefined : (await stat(file)).size;
  if (fromStdin && !sizeText) throw new TorusError('INVALID_ARGUMENT', 'loading from standard input needs the volume SIZE');
  const size = sizeText ? parseSize(sizeText) : fileSize!;
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
  block.addCommand(
    new Command('create').description('create a block volume (same as volume create-block)').argument('<name>').argument('<size>').action(createVolumeAction()),
  );
  const snap = new Command('snapshot').description('point-in-time copies of a volume');
  snap.addCommand(
    new Command('create')
      .description('snapshot a volume: everything flushed before the command (while mounted, its writer takes it)')
      .argument('<volume@snapshot>')
      .action(async (vs: string, _o: unknown, c: Command) =>
        withVolumes(c, async (vc) => {
          const { volume, snapshot } = volSnap(vs);
          await vc.snapshot(volume, snapshot);
          process.stdout.write(`created snapshot ${volume}@${snapshot}\n`);
        }),
      ),
  );
  snap.addCommand(
    new Command('list')
      .description("list a volume's snapshots")
      .argument('<volume>')
      .option('--json', 'print JSON')
      .option('--csv', 'print CSV')
      .action(async (volume: string, opts: { json?: boolean; csv?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const snaps = await new VolumeMeta(meta.kv()).listSnapshots(volume);
          if (opts.json) {
            printJson(snaps.map((s) => ({ name: s.name, timestamp: s.when, size: s.head.size })));
            return;
          }
          const head = ['SNAPSHOT NAME', 'TIMESTAMP', 'SIZE'];
          const rows = snaps.map((s) => [s.name, s.when, formatSize(s.head.size)]);
          process.stdout.write(opts.csv ? `${renderCsv(head, rows)}\n` : `Volume: ${volume}\n${renderTable(head, rows)}\n`);
        }),
      ),
  );
  snap.addCommand(
    new Command('delete')
      .description('delete a snapshot; its storage is reclaimed by GC')
      .argument('<volume@snapshot>')
      .action(async (vs: string, _o: unknown, c: Command) =>
        withMeta(c, async (meta) => {
          const { volume, snapshot } = volSnap(vs);
          await new VolumeMeta(meta.kv()).deleteSnapshot(volume, snapshot);
          process.stdout.write(`deleted snapshot ${volume}@${snapshot}\n`);
        }),
      ),
  );
  snap.addCommand(
    new Command('restore')
      .description('roll a volume back to a snapshot (only while unmounted)')
      .argument('<volume@snapshot>')
      .action(async (vs: string, _o: unknown, c: Command) =>
        withVolumes(c, async (vc) => {
          const { volume, snapshot } = volSnap(vs);
          await vc.restore(volume, snapshot);
          process.stdout.write(`restored ${volume} to snapshot ${snapshot}\n`);
        }),
      ),
  );
  block.addCommand(snap);
  block.addCommand(
    new Command('clone')
      .description('create a new writable volume from a snapshot, sharing its unchanged blocks')
      .argument('<volume@snapshot>')
      .argument('<new-volume>')
      .action(async (vs: string, name: string, _o: unknown, c: Command) =>
        withVolumes(c, async (vc) => {
          const { volume, snapshot } = volSnap(vs);
          await vc.clone(name, { volume, snapshot });
          process.stdout.write(`created volume ${name} from ${volume}@${snapshot}\n`);
        }),
      ),
  );
  block.addCommand(
    new Command('dump')
      .description('copy a volume (or VOLUME@SNAPSHOT) to a file, or - for standard output; holes stay holes in a file')
      .argument('<volume>')
      .argument('<output>')
      .option('-p, --progress', 'show progress on stderr')
      .action(async (source: string, out: string, opts: { progress?: boolean }, c: Command) =>
        withVolumes(c, async (vc) => {
          const n = await dump(vc, source, out, opts.progress ?? false);
          process.stderr.write(`copied ${n} bytes\n`);
        }),
      ),
  );
  block.addCommand(
    new Command('load')
      .description('create a volume from a file (or - for standard input, with SIZE); zero runs are not written')
      .argument('<input>')
      .argument('<volume>')
      .argument('[size]', 'volume size, at least the input size (default: the file size)')
      .option('-p, --progress', 'show progress on stderr')
      .action(async (file: string, name: string, size: string | undefined, opts: { progress?: boolean }, c: Command) =>
        withVolumes(c, async (vc) => {
          const n = await load(vc, file, name, size, opts.progress ?? false);
          process.stdout.write(`copied ${n} bytes\n`);
        }),
      ),
  );
  return block;
}
