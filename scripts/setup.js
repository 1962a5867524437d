// Set-up that `npm test`, `npm run demo` and CI share: whatever a fresh Debian machine with Node 20
// lacks is installed, and whatever is already there is left alone. Plain JavaScript with no
// dependencies, because it runs before `npm ci` has.
//
//   node scripts/setup.js [--test|--demo]   (default --test)

import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

/** Debian packages, and why. The demo needs fewer than the tests. */
export const PACKAGES = {
  demo: [
    'etcd-server', // the metadata store
    'libnbd-bin', // nbdinfo, nbdcopy, nbdfuse: NBD clients the demo suggests
    'qemu-utils', // qemu-img, qemu-io
    'nbd-client', // the kernel NBD client behind `torusblk nbd`
  ],
  test: [
    'etcd-server',
    'libnbd-bin',
    'qemu-utils',
    'nbdkit', // the reference NBD server
    'fio', // load with verification, --ioengine=nbd
    'nftables', // partitions inside network namespaces
    'iproute2',
    'vblade', // the reference AoE target
    'tshark', // decodes captured AoE frames
    'openssl', // certificates for the etcd TLS tests
    'etcd-client', // etcdctl: the failure guide's recovery steps for a full etcd, run by a test
    // what ../shared/tools/vm/run-in-vm needs for the kernel NBD and AoE initiators in a VM
    'qemu-system-x86',
    'nbd-client',
    'e2fsprogs',
    'busybox-static',
    // the container image's tests (test/integration/container.test.ts, shared/reference/containers.md)
    'podman', // builds and runs the image (Docker-compatible CLI and API)
    'buildah', // podman's image builder
    'runc', // the OCI runtime podman is set to use: crun refuses this machine's cgroup layout
    'catatonit', // the init of podman's pause image, which `podman kube play` builds locally
    'debootstrap', // base images from the Debian mirror: no container registry is reachable
    'docker-compose', // runs deploy/compose against podman's Docker API
    'chromium', // the headless browser the dashboard test drives (playwright-core downloads none)
    'zsh', // the shell-completion test loads the zsh completion in a real zsh
  ],
};

function say(msg) {
  process.stderr.write(`setup: ${msg}\n`);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: ROOT, ...opts });
  if (r.status !== 0) {
    say(`${cmd} ${args.join(' ')} failed (exit ${r.status ?? r.signal})`);
    process.exit(r.status || 1);
  }
}

function installed(pkg) {
  const r = spawnSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.includes('install ok installed');
}

export function ensurePackages(list) {
  if (!existsSync('/usr/bin/dpkg-query')) {
    say(`not a Debian system: install these yourself if something is missing: ${list.join(' ')}`);
    return;
  }
  const need = list.filter((p) => !installed(p));
  if (need.length === 0) return;
  say(`installing Debian packages: ${need.join(' ')}`);
  const cmd = process.getuid?.() === 0 ? ['apt-get'] : ['sudo', 'apt-get'];
  const apt = (args) => run(cmd[0], [...cmd.slice(1), ...args], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  apt(['update', '-qq']);
  apt(['install', '-y', '-qq', '--no-install-recommends', ...need]);
}

function newestMtime(dir) {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) newest = Math.max(newest, newestMtime(p));
    else if (e.name.endsWith('.ts')) newest = Math.max(newest, statSync(p).mtimeMs);
  }
  return newest;
}

export function ensureModules() {
  const marker = join(ROOT, 'node_modules', '.package-lock.json');
  if (existsSync(marker) && statSync(marker).mtimeMs >= statSync(join(ROOT, 'package-lock.json')).mtimeMs) return;
  say('installing node modules (npm ci)');
  run('npm', ['ci', '--no-audit', '--no-fund']);
}

export function ensureBuild() {
  const stamp = join(ROOT, 'dist', '.tsbuildinfo');
  const sources = Math.max(...['src', 'test', 'bench'].filter((d) => existsSync(join(ROOT, d))).map((d) => newestMtime(join(ROOT, d))));
  if (!existsSync(stamp) || statSync(stamp).mtimeMs < sources) {
    say('building (tsc)');
    run('npm', ['run', '--silent', 'build']);
  }
  // Missing, or older than its source (an addon that gained a function since it was built).
  const stale = (name) => {
    const built = join(ROOT, 'build', 'Release', `${name}.node`);
    return !existsSync(built) || statSync(built).mtimeMs < statSync(join(ROOT, 'native', `${name}.c`)).mtimeMs;
  };
  if (['aoe_socket', 'page_cache_read', 'malloc_tuning', 'file_lock', 'block_write'].some(stale)) {
    say('building the native addons: AoE raw socket, page-cache reads, batched block writes, malloc settings, data-dir lock (node-gyp)');
    run('npm', ['run', '--silent', 'build:native']);
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const which = process.argv.includes('--demo') ? 'demo' : 'test';
  ensurePackages(PACKAGES[which]);
  ensureModules();
  ensureBuild();
}
