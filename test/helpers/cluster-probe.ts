// One-shot questions to a cluster, asked from wherever the process runs (inside a network
// namespace under `ip netns exec`, so that the test process never addresses a namespace IP).
// Prints one JSON object on stdout.
//
//   node cluster-probe.js copies ETCD           copies of every live block (see copies.ts)
//   node cluster-probe.js sha ETCD VOLUME       sha256 of the volume's synced head, read-only
//   node cluster-probe.js take ETCD VOLUME [touch]
//                                               opens it for writing (takes the lock, as a new
//                                               writer would), then the same sha256; with `touch`
//                                               rewrites its first 4 KiB unchanged and syncs (a
//                                               commit, which lets GC reclaim an older writer's
//                                               uncommitted blocks); closes
//   node cluster-probe.js watch ETCD [MS]       `copies` every MS (300) ms, one JSON line each with
//                                               its time, until killed (at most 15 minutes)
import { createHash } from 'node:crypto';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { NO_BREAKER } from '../../src/rpc/breaker.js';
import { countCopies } from './copies.js';
import { openVolumeClient } from './certs.js';

const [cmd, etcd, volume, extra] = process.argv.slice(2);
if (!cmd || !etcd) {
  process.stderr.write('usage: cluster-probe.js copies|sha|take ETCD [VOLUME]\n');
  process.exit(2);
}
// A wedged probe must not hang its caller: it exits on its own.
const limitMs = cmd === 'watch' ? 15 * 60_000 : 50_000;
setTimeout(() => {
  process.stderr.write(`probe: gave up after ${limitMs / 1000} s\n`);
  process.exit(cmd === 'watch' ? 0 : 3);
}, limitMs).unref();

const meta = new EtcdMetadata({ endpoints: etcd.split(',') });
let code = 0;
try {
  // No breaker and quick reconnects: a node that comes back must be seen at once, not after the
  // cool-down a breaker opened while it was away would impose.
  const vc = await openVolumeClient(meta, { rpc: { requestTimeoutMs: 3000, connectTimeoutMs: 1500, breaker: NO_BREAKER, backoff: { initialMs: 50, maxMs: 300 } } });
  try {
    if (cmd === 'copies') {
      process.stdout.write(`${JSON.stringify(await countCopies(meta, vc.block))}\n`);
    } else if (cmd === 'watch') {
      const every = Number(volume ?? 300);
      for (;;) {
        const t = Date.now();
        try {
          const r = await countCopies(meta, vc.block);
          process.stdout.write(`${JSON.stringify({ t, ms: Date.now() - t, live: r.live, min: r.min, max: r.max, misplaced: r.misplaced, histogram: r.histogram })}\n`);
        } catch (err) {
          process.stdout.write(`${JSON.stringify({ t, ms: Date.now() - t, error: (err as Error).message })}\n`);
        }
        await new Promise((r) => setTimeout(r, Math.max(0, every - (Date.now() - t))));
      }
    } else if (cmd === 'sha' || cmd === 'take') {
      const t0 = Date.now();
      const vol = await vc.openVolume(volume!, { readOnly: cmd === 'sha' });
      const opened = Date.now() - t0;
      const data = await vol.read(0, vol.size);
      const sha = createHash('sha256').update(data).digest('hex');
      if (cmd === 'take' && extra === 'touch') {
        await vol.write(0, data.subarray(0, 4096));
        await vol.flush();
      }
      await vol.close();
      process.stdout.write(`${JSON.stringify({ sha, size: vol.size, openMs: opened, head: vol.head })}\n`);
    } else {
      throw new Error(`unknown probe ${cmd}`);
    }
  } finally {
    await vc.close();
  }
} catch (err) {
  process.stderr.write(`probe ${cmd}: ${(err as Error).message}\n`);
  code = 1;
} finally {
  await meta.close();
}
process.exit(code);
