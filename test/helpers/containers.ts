import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { REPO } from './procs.js';

// Podman on these machines (shared/reference/containers.md): configured by a containers.conf the
// tests write (runtime runc, ulimits within the machine's, host network only: podman's default
// bridge would change the host's forwarding settings), with base images made from the Debian
// mirror by debootstrap, since no container registry is reachable. The bases stand in for the
// official node:20 images the Dockerfile names; they carry this machine's own Node 20.

export const STATE = '/var/tmp/torus-test-containers';
export const CONF = join(STATE, 'containers.conf');
const MiB = 1024 * 1024;

const CONTAINERS_CONF = `# Written by the Torus tests (test/helpers/containers.ts); see shared/reference/containers.md.
[containers]
# Host network only: podman's bridge network sets net.ipv4.ip_forward and adds iptables chains.
netns = "host"
# This machine has no CAP_SYS_RESOURCE: podman's default rlimits cannot be set.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun 1.8 refuses this machine's hybrid cgroup layout.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
`;

export function containerEnv(): NodeJS.ProcessEnv {
  return { ...process.env, CONTAINERS_CONF: CONF };
}

/** Why containers cannot run here, or undefined when they can. */
export function containersUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  for (const tool of ['podman', 'runc', 'debootstrap'])
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed (scripts/setup.js installs it)`;
  if (!existsSync('/etc/apt/sources.list.d/debian.sources') && !existsSync('/etc/apt/sources.list')) return 'no Debian mirror configured for debootstrap';
  return undefined;
}

export interface Run {
  code: number | null;
  out: string;
}

/** Runs a command with the tests' containers.conf, bounded by `timeoutS`. */
export function sh(cmd: string, args: readonly string[], timeoutS = 300, env: NodeJS.ProcessEnv = containerEnv()): Promise<Run> {
  return new Promise((resolve) => {
    const p = spawn('timeout', ['-k', '10', String(timeoutS), cmd, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    p.on('close', (code) => resolve({ code, out }));
  });
}

/**
 * A build at low CPU priority: compiling (tsc, g++) takes both cores for a minute, and the tests
 * running alongside (a VM under software emulation among them) have deadlines.
 */
export function niced(cmd: string, args: readonly string[]): [string, string[]] {
  return ['nice', ['-n', '15', cmd, ...args]];
}

export async function must(cmd: string, args: readonly string[], timeoutS = 300, env?: NodeJS.ProcessEnv): Promise<string> {
  const r = await sh(cmd, args, timeoutS, env);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}:\n${r.out.slice(-4000)}`);
  return r.out;
}

const nodeVersion = process.version.replace(/^v/, '');
export const RUNTIME_BASE = `localhost/torus-test-node-runtime:${nodeVersion}-bookworm`;
export const BUILD_BASE = `localhost/torus-test-node-build:${nodeVersion}-bookworm`;

function debianMirror(): string {
  const sources = existsSync('/etc/apt/sources.list.d/debian.sources') ? readFileSync('/etc/apt/sources.list.d/debian.sources', 'utf8') : '';
  const m = /^URIs:\s*(\S+)/m.exec(sources) ?? /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/m.exec(existsSync('/etc/apt/sources.list') ? readFileSync('/etc/apt/sources.list', 'utf8') : '');
  if (!m) throw new Error('no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list');
  return m[1]!;
}

async function imageExists(name: string): Promise<boolean> {
  return (await sh('podman', ['image', 'exists', name], 60)).code === 0;
}

/**
 * The containers.conf, and the two base images when missing (about a minute the first time):
 * the runtime base is Debian bookworm (minbase) with this machine's `node` in /usr/local/bin, like
 * node:20-bookworm-slim; the build base adds python3, make, g++ and npm, like node:20-bookworm.
 */
export async function ensureBases(log: (s: string) => void): Promise<void> {
  mkdirSync(STATE, { recursive: true });
  writeFileSync(CONF, CONTAINERS_CONF);
  if (!(await imageExists(RUNTIME_BASE))) {
    const t0 = Date.now();
    const root = mkdtempSync(join(STATE, 'rootfs-'));
    try {
      await must(...niced('debootstrap', ['--variant=minbase', 'bookworm', root, debianMirror()]), 600);
      rmSync(join(root, 'var/cache/apt/archives'), { recursive: true, force: true });
      rmSync(join(root, 'var/lib/apt/lists'), { recursive: true, force: true });
      mkdirSync(join(root, 'var/lib/apt/lists/partial'), { recursive: true });
      mkdirSync(join(root, 'var/cache/apt/archives/partial'), { recursive: true });
      await must('install', ['-D', '-m', '755', process.execPath, join(root, 'usr/local/bin/node')]);
      await must('sh', ['-c', `tar -C "${root}" -c . | podman import --change 'CMD ["node"]' - ${RUNTIME_BASE}`], 300);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
    log(`made ${RUNTIME_BASE} from the Debian mirror in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  }
  if (!(await imageExists(BUILD_BASE))) {
    const t0 = Date.now();
    const npmDir = join(dirname(dirname(process.execPath)), 'lib', 'node_modules', 'npm');
    if (!existsSync(npmDir)) throw new Error(`npm not found at ${npmDir}`);
    const ctx = mkdtempSync(join(STATE, 'build-base-'));
    try {
      // Like the official image it stands in for: npm and Node's headers (node-gyp would fetch them
      // from nodejs.org, which is not reachable here), and this machine's CA bundle, which its
      // TLS-inspecting route to the npm registry needs.
      writeFileSync(
        join(ctx, 'Containerfile'),
        `FROM ${RUNTIME_BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 make g++ ca-certificates \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /usr/local/lib/node_modules /usr/local/include && cp -a /hostnpm /usr/local/lib/node_modules/npm && cp -a /hostinclude /usr/local/include/node \\
 && ln -sf ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm && ln -sf ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\
 && cp /hostca/ca-certificates.crt /usr/local/share/ca-certificates/build-host.crt && update-ca-certificates
ENV npm_config_nodedir=/usr/local npm_config_cafile=/etc/ssl/certs/ca-certificates.crt NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
`,
      );
      const include = join(dirname(dirname(process.execPath)), 'include', 'node');
      await must(...niced('podman', ['build', '--network=host', '-v', `${npmDir}:/hostnpm:ro`, '-v', `${include}:/hostinclude:ro`, '-v', '/etc/ssl/certs:/hostca:ro', '-t', BUILD_BASE, ctx]), 900);
    } finally {
      rmSync(ctx, { recursive: true, force: true });
    }
    log(`made ${BUILD_BASE} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  }
}

/** Builds the repository's Dockerfile from the local bases. */
export async function buildImage(tag: string): Promise<void> {
  await must(...niced('podman', ['build', '--network=host', '--build-arg', `BUILD_IMAGE=${BUILD_BASE}`, '--build-arg', `RUNTIME_IMAGE=${RUNTIME_BASE}`, '-t', tag, '-f', join(REPO, 'Dockerfile'), REPO]), 1200);
}

export async function imageBytes(tag: string): Promise<number> {
  return Number((await must('podman', ['image', 'inspect', '--format', '{{.Size}}', tag], 60)).trim());
}

export { MiB };
