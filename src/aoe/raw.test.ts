import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { netnsUnavailable } from '../../test/helpers/netns.js';
import { RawPacketConn, addonPath, packageRoot, rawSocketAvailable } from './raw.js';

// The raw socket addon's edges. Opening needs CAP_NET_RAW, so most of this runs only as root;
// frames through a real veth pair are checked in a child process inside a scratch namespace.

const built = rawSocketAvailable();
const root = process.getuid?.() === 0;
const RAW_JS = fileURLToPath(new URL('./raw.js', import.meta.url));

describe('aoe raw socket', () => {
  test('the addon is looked for next to binding.gyp, however deep the compiled file sits', () => {
    const rootDir = packageRoot();
    assert.ok(rootDir && existsSync(join(rootDir, 'binding.gyp')));
    assert.equal(addonPath(), join(rootDir, 'build', 'Release', 'aoe_socket.node'));
    assert.equal(packageRoot('/'), undefined);
  });

  test('an unknown interface and a non-Ethernet one are clear INVALID_ARGUMENT errors', { skip: !built || !root ? 'needs root and the built addon' : false }, () => {
    assert.throws(
      () => RawPacketConn.open('nosuchif0'),
      (e) => isTorusError(e, 'INVALID_ARGUMENT') && e.message === 'AoE: no network interface named "nosuchif0"',
    );
    assert.throws(() => RawPacketConn.open('x'.repeat(20)), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(
      () => RawPacketConn.open('lo'),
      (e) => isTorusError(e, 'INVALID_ARGUMENT') && /not an Ethernet interface/.test(e.message),
    );
  });

  test('without CAP_NET_RAW the error says so in one line', { skip: !built || !root || spawnSync('sh', ['-c', 'command -v setpriv']).status !== 0 ? 'needs root, setpriv and the built addon' : false }, () => {
    const script = `import(${JSON.stringify(RAW_JS)}).then((m) => { try { m.RawPacketConn.open('lo'); } catch (e) { console.log(e.code + ' ' + e.message); } });`;
    const r = spawnSync('setpriv', ['--bounding-set=-net_raw', process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(r.stdout.trim(), 'INVALID_ARGUMENT AoE: opening a raw AF_PACKET socket on lo needs CAP_NET_RAW (run as root or grant the capability)', r.stderr);
  });

  test('frames cross a veth pair in batches; a socket never sees frames sent from its own host', { skip: !built || netnsUnavailable() ? 'needs root, network namespaces and the built addon' : false }, () => {
    const ns = `taoe-raw-${process.pid}`;
    const ip = (...args: string[]): void => {
      const r = spawnSync('ip', args, { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
    };
    ip('netns', 'add', ns);
    try {
      ip('-n', ns, 'link', 'add', 'a0', 'type', 'veth', 'peer', 'name', 'b0');
      ip('-n', ns, 'link', 'set', 'a0', 'up');
      ip('-n', ns, 'link', 'set', 'b0', 'up');
      const script = `
        const { RawPacketConn } = await import(${JSON.stringify(RAW_JS)});
        const a = RawPacketConn.open('a0'), b = RawPacketConn.open('b0'), sameHost = RawPacketConn.open('a0');
        let got = 0, batches = 0, own = 0, sizes = new Set();
        sameHost.onFrames((f) => { own += f.length; });
        const done = new Promise((res) => b.onFrames((f) => { got += f.length; batches++; for (const x of f) sizes.add(x.length); if (got >= 3000) res(); }));
        const frame = Buffer.alloc(1514); frame.fill(0xff, 0, 6); a.mac.copy(frame, 6); frame.writeUInt16BE(0x88a2, 12);
        let sent = 0;
        for (let i = 0; i < 3000; i++) if (a.send(i % 2 ? frame : frame.subarray(0, 60))) sent++;
        await Promise.race([done, new Promise((r) => setTimeout(r, 5000))]);
        let closedCode = '';
        b.close();
        try { b.send(frame); } catch (e) { closedCode = e.code; }
        a.close(); sameHost.close();
        console.log(JSON.stringify({ sent, got, batches, own, sizes: [...sizes].sort((x, y) => x - y), mtu: a.mtu, closedCode }));`;
      const r = spawnSync('ip', ['netns', 'exec', ns, process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
      assert.equal(r.status, 0, r.stderr);
      const out = JSON.parse(r.stdout.trim()) as { sent: number; got: number; batches: number; own: number; sizes: number[]; mtu: number; closedCode: string };
      assert.equal(out.sent, 3000);
      assert.equal(out.got, 3000);
      assert.ok(out.batches < out.got, `frames arrive in batches (${out.batches} wakeups for ${out.got} frames)`);
      assert.equal(out.own, 0, 'outgoing frames are not looped back to sockets on the sending host');
      assert.deepEqual(out.sizes, [60, 1514]);
      assert.equal(out.mtu, 1500);
      assert.equal(out.closedCode, 'CLOSED');
    } finally {
      spawnSync('ip', ['netns', 'del', ns]);
    }
  });
});
