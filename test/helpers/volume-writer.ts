// A client process for crash tests: opens a volume, then forever writes random pieces and syncs
// every few writes, printing after each successful sync the state it committed. The test kills
// it with SIGKILL at some point and checks the volume equals the last state printed.
//
//   node volume-writer.js ETCD VOLUME SIZE
// prints "syncing <n> <sha256 of the whole volume>" before each sync and "synced <n>" after it
// succeeded. A kill can land after etcd took a sync's commit but before "synced" is printed, so
// the volume must afterwards equal either the last synced state or the one being synced.
import { createHash, randomBytes } from 'node:crypto';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { VolumeClient } from '../../src/volume/client.js';

const [etcd, name, sizeText] = process.argv.slice(2);
const size = Number(sizeText);
const meta = new EtcdMetadata({ endpoints: [etcd!] });
const vc = await VolumeClient.open(meta);
const vol = await vc.openVolume(name!);
const model = await vol.read(0, size);
let n = 0;
process.stdout.write(`opened ${process.pid}\n`);
for (;;) {
  for (let i = 0; i < 5; i++) {
    const off = Math.floor(Math.random() * (size - 1));
    const len = Math.min(size - off, 1 + Math.floor(Math.random() * 200_000));
    const d = randomBytes(len);
    await vol.write(off, d);
    d.copy(model, off);
  }
  n++;
  process.stdout.write(`syncing ${n} ${createHash('sha256').update(model).digest('hex')}\n`);
  await vol.flush();
  process.stdout.write(`synced ${n}\n`);
}
