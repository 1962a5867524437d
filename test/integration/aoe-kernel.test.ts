import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { packageRoot, rawSocketAvailable } from '../../src/aoe/index.js';
import { createLab, netnsUnavailable } from '../helpers/netns.js';
import { startNsCluster, type NsCluster } from '../helpers/ns-cluster.js';
import { stopProcess, waitForOutput } from '../helpers/procs.js';

// The Linux kernel's own AoE initiator (aoe.ko, in a small VM: this machine's kernel has no aoe
// module) against vblade first and then our target: the guest discovers e7.3 on a tap in the
// segment's bridge, makes an ext4 file system, writes a file, remounts and checks it, and
// e2fsck finds the file system clean. The third run serves a cluster volume with `torusblk aoe`,
// and what the kernel wrote is then read back through NBD and checked. Slow (software
// emulation); each run is bounded.

const HELPERS = join(dirname(fileURLToPath(import.meta.url)), '..', 'helpers');
const MEMORY_TARGET = join(HELPERS, 'aoe-memory-target.js');
const ROOT = packageRoot() ?? resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const RUN_IN_VM = resolve(ROOT, '..', 'shared', 'tools', 'vm', 'run-in-vm');
const SIZE_MIB = 64;
const READY_MS = 15_000;

function missing(): string | undefined {
  if (!existsSync(RUN_IN_VM)) return `the VM tool is not at ${RUN_IN_VM}`;
  const ns = netnsUnavailable();
  if (ns) return ns;
  if (!rawSocketAvailable()) return 'the AoE raw socket addon is not built (node-gyp rebuild)';
  if (spawnSync('sh', ['-c', 'command -v qemu-system-x86_64']).status !== 0) return 'qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)';
  for (const tool of ['vblade', 'nbdcopy']) if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed`;
  return undefined;
}

const skip = missing();
if (skip) console.log(`# skipping the kernel AoE initiator test: ${skip}`);

const GUEST_JOB = `
set -e
echo eth1 > /dev/etherd/interfaces
echo > /dev/etherd/discover
for i in $(seq 150); do [ -e /dev/etherd/e7.3 ] && break; sleep 0.2; done
if [ ! -e /dev/etherd/e7.3 ]; then echo "no /dev/etherd/e7.3"; ls /dev/etherd; dmesg | grep -i aoe | tail; exit 1; fi
echo "SECTORS $(cat '/sys/block/etherd!e7.3/size')"
mkfs.ext4 -q -F /dev/etherd/e7.3
mount /dev/etherd/e7.3 /mnt
dd if=/dev/urandom of=/mnt/data bs=65536 count=48 2>/dev/null
md5sum /mnt/data > /tmp/sum
sync
umount /mnt
mount /dev/etherd/e7.3 /mnt
md5sum -c /tmp/sum
umount /mnt
e2fsck -fn /dev/etherd/e7.3
echo "DEVICE-MD5 $(md5sum < /dev/etherd/e7.3 | cut -d' ' -f1)"
dmesg | grep -E "aoe: .*(sectors|data frames)" || true
echo KERNEL-AOE-OK
`;

describe('the Linux AoE initiator (in a VM) against vblade and our target', { skip }, () => {
  for (const kind of ['vblade', 'ours', 'torus volume'] as const) {
    test(`${kind}: discover, mkfs.ext4, mount, write, remount, verify, e2fsck clean`, async () => {
      const lab = createLab({ hosts: ['target'] });
      const dir = mkdtempSync(join(tmpdir(), 'aoe-kernel-'));
      let target: ChildProcess | undefined;
      let targetOut = '';
      let cluster: NsCluster | undefined;
      try {
        lab.addTap('tap0');
        const ns = lab.hosts.target!.ns;
        if (kind === 'vblade') {
          const img = join(dir, 'disk.img');
          spawnSync('truncate', ['-s', `${SIZE_MIB}M`, img]);
          target = lab.start(ns, 'vblade', ['7', '3', 'eth0', img]);
          await waitForOutput(target, /e7\.3, \d+ sectors/, 'vblade', READY_MS);
        } else if (kind === 'torus volume') {
          cluster = await startNsCluster(lab, ns);
          cluster.ok('torusctl', ['volume', 'create-block', 'v', `${SIZE_MIB}MiB`]);
          target = cluster.start('torusblk', ['aoe', 'v', 'eth0', '7', '3']);
          await waitForOutput(target, /serving v .* as AoE target e7\.3/, 'torusblk aoe', READY_MS);
        } else {
          target = lab.start(ns, process.execPath, [MEMORY_TARGET, '--iface', 'eth0', '--shelf', '7', '--slot', '3', '--size', `${SIZE_MIB}MiB`]);
          await waitForOutput(target, /"maxSectors"/, 'aoe-memory-target', READY_MS);
        }
        target.stdout?.on('data', (d: Buffer) => (targetOut += d.toString()));
        target.stderr?.on('data', (d: Buffer) => (targetOut += d.toString()));
        const job = join(dir, 'job.sh');
        writeFileSync(job, GUEST_JOB);
        const vm = spawnSync(RUN_IN_VM, ['--tap', `${lab.bridgeNs}:tap0`, '--timeout', '150', job], { encoding: 'utf8', timeout: 170_000, maxBuffer: 16 * 1024 * 1024 });
        const out = `${vm.stdout ?? ''}${vm.stderr ?? ''}`;
        assert.equal(vm.status, 0, `guest job failed (${vm.status}):\n${out}\ntarget:\n${targetOut}`);
        assert.match(out, new RegExp(`SECTORS ${(SIZE_MIB * 1024 * 1024) / 512}\\b`), 'the kernel sees the capacity IDENTIFY reported');
        assert.match(out, /data: OK/, 'the file read back after a remount matches');
        assert.match(out, /KERNEL-AOE-OK/);
        for (const l of out.split('\n').filter((x) => /aoe: |SECTORS/.test(x))) console.log(`guest (${kind}): ${l.trim()}`);
        if (cluster) {
          // What the kernel wrote, read back through NBD once the target has synced and let go.
          const guestMd5 = /DEVICE-MD5 ([0-9a-f]{32})/.exec(out)?.[1];
          assert.ok(guestMd5, 'the guest printed the device checksum');
          await stopProcess(target);
          const srv = cluster.start('torusblk', ['nbdserve', '--read-only', '--listen', '127.0.0.1:10809']);
          await waitForOutput(srv, /serving NBD/, 'torusblk nbdserve', READY_MS);
          const img = join(dir, 'volume.img');
          const copy = lab.run(ns, 'nbdcopy', ['nbd://127.0.0.1:10809/v', img], 120);
          await stopProcess(srv);
          assert.equal(copy.code, 0, copy.stderr);
          assert.equal(createHash('md5').update(readFileSync(img)).digest('hex'), guestMd5, 'the volume read through NBD is what the kernel wrote over AoE');
          const fsck = spawnSync('e2fsck', ['-fn', img], { encoding: 'utf8', timeout: 60_000 });
          assert.equal(fsck.status, 0, `e2fsck of the volume read through NBD: ${fsck.stdout}${fsck.stderr}`);
        }
      } finally {
        if (target) await stopProcess(target);
        await cluster?.stop();
        if (kind === 'ours') console.log(`# target: ${targetOut.trim().split('\n').pop() ?? ''}`);
        lab.destroy();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
