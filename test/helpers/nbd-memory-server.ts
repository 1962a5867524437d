// Serves MemoryDevices over NBD in a process of its own, for tests and measurements with real
// clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio):
//
//   node dist/test/helpers/nbd-memory-server.js --export disk=64MiB --export small=1MiB:ro \
//     [--host 127.0.0.1] [--port 0] [--unix /tmp/nbd.sock] [--read-only] [--block-size 64KiB]
//     [--tls on|require --tls-certificates DIR --tls-psk-file FILE --allow IDENTITY=EXPORT:rw|ro ...]
//
// With --allow, only the clients and exports listed are served (identity '-' for a client
// without TLS), as torusblk nbdserve serves its access rules from etcd.
// Prints one JSON line once listening: {"port":N,"unix":"..."}; SIGTERM closes it cleanly.
// With --verbose, logs to stderr.

import { rmSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { parseSize } from '../../src/core/units.js';
import { readCertDir, readPskFile } from '../../src/cli/shared/certs.js';
import { MemoryDeviceProvider, NbdServer, type NbdLogger } from '../../src/nbd/index.js';
import type { NbdAccess, NbdTlsOptions } from '../../src/nbd/server.js';

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
    tls: { type: 'string', default: 'off' },
    'tls-certificates': { type: 'string' },
    'tls-psk-file': { type: 'string' },
    allow: { type: 'string', multiple: true },
  },
});

function tlsOptions(): NbdTlsOptions | undefined {
  const mode = values.tls;
  if (mode === 'off') return undefined;
  if (mode !== 'on' && mode !== 'require') throw new Error(`bad --tls ${mode}`);
  const dir = values['tls-certificates'];
  const certs = dir !== undefined ? readCertDir(dir) : undefined;
  const psk = values['tls-psk-file'] !== undefined ? readPskFile(values['tls-psk-file']) : undefined;
  return { mode, ...(certs ? { cert: certs.serverCert, key: certs.serverKey, ca: certs.ca } : {}), ...(psk ? { psk } : {}) };
}

function accessOption(): NbdAccess | undefined {
  if (values.allow === undefined) return undefined;
  const rules = new Map<string, 'rw' | 'ro'>();
  for (const a of values.allow) {
    const m = /^([^=]+)=([^:]*):(rw|ro)$/.exec(a);
    if (!m) throw new Error(`bad --allow ${a}: expected IDENTITY=EXPORT:rw|ro`);
    rules.set(`${m[1]}=${m[2]}`, m[3] as 'rw' | 'ro');
  }
  return (identity, name) => Promise.resolve(rules.get(`${identity ?? '-'}=${name}`) ?? null);
}
const tls = tlsOptions();
const access = accessOption();

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
  ...(tls ? { tls } : {}),
  ...(access ? { access } : {}),
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
