// Serves a MemoryDevice over AoE on a raw socket, in a process of its own, for integration tests
// and measurements (the volume-backed target is `torusblk aoe`):
//
//   node dist/test/helpers/aoe-memory-target.js --iface eth0 --shelf 7 --slot 3 --size 64MiB \
//     [--block-size 64KiB] [--buffer-count 64] [--allow MAC,...] [--allow-remote-config] [--verbose]
//
// Prints one JSON line once serving: {"mac":"..","mtu":N,"maxSectors":N,"sectors":N}. SIGTERM or
// SIGINT stops it cleanly and prints the target's counters to stderr.

import { parseArgs } from 'node:util';
import { parseSize } from '../../src/core/units.js';
import { AoeTarget, RawPacketConn, formatMac, type AoeLogger } from '../../src/aoe/index.js';
import { MemoryDevice } from '../../src/nbd/memory-device.js';

const { values } = parseArgs({
  options: {
    iface: { type: 'string', default: 'eth0' },
    shelf: { type: 'string', default: '7' },
    slot: { type: 'string', default: '3' },
    size: { type: 'string', default: '64MiB' },
    'block-size': { type: 'string', default: '64KiB' },
    'buffer-count': { type: 'string', default: '64' },
    verbose: { type: 'boolean', default: false },
    allow: { type: 'string' },
    'allow-remote-config': { type: 'boolean', default: false },
  },
});

const line = (level: string) => (obj: object, msg: string) => process.stderr.write(`${level} ${msg} ${JSON.stringify(obj)}\n`);
const log: AoeLogger | undefined = values.verbose ? { debug: line('debug'), info: line('info'), warn: line('warn') } : undefined;

const device = new MemoryDevice({ size: parseSize(values.size), blockSize: parseSize(values['block-size']) });
const conn = RawPacketConn.open(values.iface);
const target = new AoeTarget(conn, device, {
  shelf: Number(values.shelf),
  slot: Number(values.slot),
  bufferCount: Number(values['buffer-count']),
  ...(values.allow ? { allow: values.allow.split(',') } : {}),
  remoteConfig: values['allow-remote-config'],
  ...(log ? { log } : {}),
});
target.start();
process.stdout.write(`${JSON.stringify({ mac: formatMac(conn.mac), mtu: conn.mtu, maxSectors: target.maxSectors, sectors: target.totalSectors })}\n`);

let stopping = false;
const stop = (): void => {
  if (stopping) return;
  stopping = true;
  setTimeout(() => process.exit(0), 5000).unref();
  void target.close().then(() => {
    process.stderr.write(`aoe-memory-target stats ${JSON.stringify({ ...target.stats, device: device.stats })}\n`);
    process.exit(0);
  });
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
