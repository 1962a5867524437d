// Serves MemoryDevices over NBD in a process of its own, for tests and measurements with real
// clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio):
//
//   node dist/test/helpers/nbd-memory-server.js --export disk=64MiB --export small=1MiB:ro \
//     [--host 127.0.0.1] [--port 0] [--unix /tmp/nbd.sock] [--read-only] [--block-size 64KiB]
//
// Prints one JSON line once listening: {"port":N,"unix":"..."}; SIGTERM closes it cleanly.
// With --verbose, logs to stderr.

import { rmSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { parseSize } from '../../src/core/units.js';
import { MemoryDeviceProvider, NbdServer, type NbdLogger } from '../../src/nbd/index.js';

const { values } = parseArgs({
  options: {
    export: { type: 'string', multiple: true, default: [] },
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    unix: { type: 'string' },
    'read-only': { type: 'boolean', default: false },
    'block-size': { type: 'string', default: '64KiB' },
    'default-export': { type: 'string' },
    'max-in-flight': { type: 'string' },
    verbose: { type: 'boolean', default: false },
  },
});

const provider = new MemoryDeviceProvider({}, values['default-export'] !== undefined ? { defaultExport: values['default-export'] } : {});
for (const spec of values.export) {
  // name=size[:ro]
  const m = /^([^=]*)=([^:]+)(:ro)?$/.exec(spec);
  if (!m) throw new Error(`bad --export ${spec}: expected name=size[:ro]`);
  const name = m[1] ?? '';
  provider.create(name, {
    size: parseSize(m[2] ?? ''),
    blockSize: parseSize(values['block-size']),
    readOnly: m[3] !== undefined,
    description: `memory device ${name}`,
  });
}

const line = (level: string) => (obj: object, msg: string) => process.stderr.write(`${level} ${msg} ${JSON.stringify(obj)}\n`);
const log: NbdLogger | undefined = values.verbose ? { debug: line('debug'), info: line('info'), warn: line('warn') } : undefined;

if (values.unix !== undefined) rmSync(values.unix, { force: true });
const server = new NbdServer(provider, {
  readOnly: values['read-only'],
  listenTcp: { host: values.host, port: Number(values.port) },
  ...(values.unix !== undefined ? { listenUnix: values.unix } : {}),
  ...(values['max-in-flight'] !== undefined ? { maxInFlight: Number(values['max-in-flight']) } : {}),
  ...(log ? { log } : {}),
});
const addr = await server.listen();
process.stdout.write(`${JSON.stringify({ port: addr.tcp?.port, unix: addr.unix })}\n`);

let stopping = false;
const stop = (): void => {
  if (stopping) return;
  stopping = true;
  // a client that never finishes must not keep the process alive forever
  setTimeout(() => process.exit(0), 5000).unref();
  void server.close().then(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
