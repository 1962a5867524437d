// A client process for crash tests: opens a volume and, forever, makes a few writes of
// deterministic bytes (writeBytes below) and flushes, saying before each write what it writes and
// after each flush which writes it covered. The test kills it with SIGKILL (or cuts the power of
// storage nodes) whenever it likes, and checks what the volume holds with checkJournalState.
//
//   node volume-writer.js ETCD VOLUME [--max-write BYTES] [--checkpoint-bytes BYTES]
//                                     [--fold-idle-ms MS] [--segments-per-block N]
//
// Lines: "opened PID", "w I OFFSET LENGTH" before write I, "flushed N UPTO" once flush N, which
// covers every write up to I=UPTO, succeeded ("failed N CODE" if it did not: the writes stay
// pending and the next flush covers them).
import { parseArgs } from 'node:util';
import { toTorusError } from '../../src/core/errors.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { writeBytes } from './journal-check.js';
import { openVolumeClient } from './certs.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'max-write': { type: 'string', default: '200000' },
    'checkpoint-bytes': { type: 'string' },
    'fold-idle-ms': { type: 'string' },
    'segments-per-block': { type: 'string' },
  },
});
const [etcd, name] = positionals;
const meta = new EtcdMetadata({ endpoints: [etcd!] });
const vc = await openVolumeClient(meta);
const num = (k: string): number | undefined => (values[k as keyof typeof values] === undefined ? undefined : Number(values[k as keyof typeof values]));
const vol = await vc.openVolume(name!, {
  ...(num('checkpoint-bytes') !== undefined ? { checkpointBytes: num('checkpoint-bytes')! } : {}),
  ...(num('fold-idle-ms') !== undefined ? { foldIdleMs: num('fold-idle-ms')! } : {}),
  ...(num('segments-per-block') !== undefined ? { maxSegmentsPerBlock: num('segments-per-block')! } : {}),
});
const size = vol.size;
const maxWrite = Number(values['max-write']);
process.stdout.write(`opened ${process.pid}\n`);
let i = 0;
let n = 0;
for (;;) {
  n++;
  try {
    for (let k = 0; k < 5; k++) {
      const off = Math.floor(Math.random() * (size - 1));
      const len = Math.min(size - off, 1 + Math.floor(Math.random() * maxWrite));
      process.stdout.write(`w ${i} ${off} ${len}\n`);
      i++;
      await vol.write(off, writeBytes(i - 1, len));
    }
    await vol.flush();
    process.stdout.write(`flushed ${n} ${i - 1}\n`);
  } catch (err) {
    // A write refused (a fenced volume refuses them too) or a flush that failed: nothing since
    // the last "flushed" line is acknowledged.
    process.stdout.write(`failed ${n} ${toTorusError(err).code}\n`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
