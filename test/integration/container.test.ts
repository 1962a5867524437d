import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseAllDocuments, stringify } from 'yaml';
import { buildImage, containersUnavailable, containerEnv, ensureBases, imageBytes, MiB, must, niced, RUNTIME_BASE, sh, STATE } from '../helpers/containers.js';
import { freePort, startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { eventually, REPO, stopProcess } from '../helpers/procs.js';

// The image from the repository's Dockerfile, built here (from local bases that stand in for the
// official Node images: no registry is reachable) and run as its users would: the original
// README's two `docker run` examples with podman's docker-compatible CLI, a 3-node cluster whose
// volume is written and read over NBD from the host, the compose file through docker-compose
// and podman's Docker API, and the Kubernetes DaemonSet's pod template with `podman kube play`.
// Host network only (containers.md): nothing here touches the host's forwarding or firewall.

const IMAGE = 'localhost/torus:test';
const ETCD_IMAGE = 'localhost/torus-test-etcd:bookworm';
const skip = containersUnavailable();
if (skip) console.log(`# skipping the container tests: ${skip}`);

let work: string;
let etcd: EtcdHandle;
const names: string[] = [];
const log = (s: string): void => console.log(s);
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function etcdEnv(): string[] {
  const [host, port] = etcd.endpoint.split(':');
  // Every container on this host's loopback (--net=host): peer RPC in plaintext, as the compose file does.
  return ['-e', `ETCD_HOST=${host}`, '-e', `ETCD_PORT=${port}`, '-e', 'TORUS_INSECURE_PEER_NETWORK=1'];
}

/** `podman run --rm --net=host IMAGE ARGS` with the test etcd's settings. */
async function inImage(args: string[], timeoutS = 60): Promise<string> {
  return must('podman', ['run', '--rm', '--net=host', ...etcdEnv(), IMAGE, ...args], timeoutS);
}

async function healthy(port: number, host = '127.0.0.1'): Promise<void> {
  await eventually(`/healthz on ${host}:${port}`, async () => (await fetch(`http://${host}:${port}/healthz`)).ok, 60_000);
}

async function removeContainers(): Promise<void> {
  for (const n of names.splice(0)) await sh('podman', ['rm', '-f', '-t', '5', n], 60);
}

before(async () => {
  if (skip) return;
  // A fresh machine has no state directory yet (ensureBases makes it too, but after this).
  mkdirSync(STATE, { recursive: true });
  work = mkdtempSync(join(STATE, 'run-'));
  const t0 = Date.now();
  await ensureBases(log);
  await buildImage(IMAGE);
  log(`image built in ${((Date.now() - t0) / 1000).toFixed(0)} s (bases included): ${(await imageBytes(IMAGE) / MiB).toFixed(0)} MiB`);
  etcd = await startEtcd();
});

after(async () => {
  if (skip) return;
  await removeContainers();
  await etcd?.stop();
  if (work) spawnSync('rm', ['-rf', work]);
});

describe('the container image', { skip }, () => {
  test('runs torusctl and torusblk, refuses unknown settings in one line, and passes other commands through', async () => {
    assert.match(await inImage(['torusctl', '--version']), /torusctl\nVersion: /);
    assert.match(await inImage(['torusblk', 'csi', '--help']), /--endpoint/);
    const tools = ['nbdfuse', 'losetup', 'mkfs.ext4', 'resize2fs', 'blkid', 'nbd-client', 'tini'];
    assert.equal((await inImage(['sh', '-c', `for t in ${tools.join(' ')}; do command -v $t; done`])).trim().split('\n').length, tools.length, 'the tools the CSI node plugin needs');
    const bad = await sh('podman', ['run', '--rm', '--net=host', '-e', 'TORUS_GC_INTERVALL=1m', IMAGE], 60);
    assert.equal(bad.code, 2);
    assert.match(bad.out, /^torus-container: TORUS_GC_INTERVALL is not a setting/m);
    assert.equal(bad.out.trim().split('\n').length, 1, `one line: ${bad.out}`);
  });

  test("a 3-node cluster from the README's host-networking example; a volume written and read over NBD from the host", async () => {
    await inImage(['torusctl', 'init']);
    const nodes: { peer: number; http: number; dir: string }[] = [];
    for (let i = 0; i < 3; i++) {
      const n = { peer: await freePort(), http: await freePort(), dir: join(work, `data${i}`) };
      mkdirSync(n.dir);
      nodes.push(n);
      names.push(`torus-test-node${i}`);
      // The original README's first `docker run`, with podman, this image and the test's ports.
      await must('podman', [
        'run', '-d', '--name', `torus-test-node${i}`,
        '--net=host',
        '-v', `${n.dir}:/data`,
        '-e', 'STORAGE_SIZE=256MiB',
        '-e', 'LISTEN_HOST=127.0.0.1',
        '-e', `LISTEN_HTTP_PORT=${n.http}`,
        '-e', `LISTEN_PEER_PORT=${n.peer}`,
        ...etcdEnv(),
        IMAGE,
      ]);
    }
    for (const n of nodes) await healthy(n.http);
    assert.match(await inImage(['torusctl', 'peer', 'add', '--all-peers']), /3 member\(s\)/);
    // torusd dropped root: its data dir, and what it wrote there, belong to the image's user.
    for (const n of nodes) assert.equal(statSync(join(n.dir, 'node.json')).uid, 10001);
    const top = await must('podman', ['top', 'torus-test-node0', 'user', 'args']);
    assert.match(top, /^torus\s+.*torusd/m, top);

    await inImage(['torusctl', 'volume', 'create-block', 'ctrvol', '64MiB']);
    const nbdPort = await freePort();
    names.push('torus-test-nbd');
    await must('podman', ['run', '-d', '--name', 'torus-test-nbd', '--net=host', ...etcdEnv(), IMAGE, 'torusblk', 'nbdserve', '--listen', `127.0.0.1:${nbdPort}`]);
    await eventually('nbdserve', async () => (await sh('nbdinfo', ['--size', `nbd://127.0.0.1:${nbdPort}/ctrvol`], 30)).code === 0, 60_000);
    const data = randomBytes(16 * MiB);
    const file = join(work, 'in.bin');
    writeFileSync(file, data);
    await must('nbdcopy', ['--flush', file, `nbd://127.0.0.1:${nbdPort}/ctrvol`], 120, process.env);
    const back = join(work, 'out.bin');
    await must('nbdcopy', [`nbd://127.0.0.1:${nbdPort}/ctrvol`, back], 120, process.env);
    assert.equal(sha(readFileSync(back).subarray(0, data.length)), sha(data));
    // A stop is SIGTERM to torusd through tini: it syncs and exits 0.
    await must('podman', ['stop', '-t', '30', 'torus-test-nbd']);
    assert.equal((await must('podman', ['inspect', '--format', '{{.State.ExitCode}}', 'torus-test-nbd'])).trim(), '0');
    await must('podman', ['stop', '-t', '30', 'torus-test-node2']);
    assert.equal((await must('podman', ['inspect', '--format', '{{.State.ExitCode}}', 'torus-test-node2'])).trim(), '0');
    await removeContainers();
  });

  test("the README's non-host-networking example: the node advertises the container's address", async () => {
    // Podman's bridge network is not allowed here; a network namespace of our own (nothing
    // routed in or out) plays the container network, with an address on a veth inside it, and
    // etcd on that namespace's 127.0.0.1:2379, where the example's ETCD_HOST=127.0.0.1 points.
    const ns = `torus-ctr-${process.pid}`;
    const dir = join(work, 'nonhost');
    mkdirSync(join(dir, 'data'), { recursive: true });
    const inNs = (cmd: string, args: string[], t = 60): Promise<string> => must('nsenter', [`--net=/run/netns/${ns}`, cmd, ...args], t);
    await must('ip', ['netns', 'add', ns]);
    let etcdProc: ChildProcess | undefined;
    const name = 'torus-test-nonhost';
    try {
      for (const args of [['link', 'set', 'lo', 'up'], ['link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1'], ['addr', 'add', '10.77.0.1/24', 'dev', 'v0'], ['link', 'set', 'v0', 'up'], ['link', 'set', 'v1', 'up']])
        await must('ip', ['-n', ns, ...args]);
      await inNs('sysctl', ['-qw', 'net.ipv6.conf.all.disable_ipv6=1']);
      etcdProc = spawn('nsenter', [`--net=/run/netns/${ns}`, 'etcd', '--data-dir', join(dir, 'etcd')], { stdio: 'ignore' });
      await eventually('etcd in the namespace', async () => (await sh('nsenter', [`--net=/run/netns/${ns}`, 'curl', '-fsS', 'http://127.0.0.1:2379/health'], 10)).code === 0, 30_000);
      await inNs('podman', ['run', '--rm', '-e', 'ETCD_HOST=127.0.0.1', IMAGE, 'torusctl', 'init']);
      names.push(name);
      // As written: no --net=host, no LISTEN_HOST; podman's default network here is the one it runs in.
      await inNs('podman', ['run', '-d', '--name', name, '-v', `${join(dir, 'data')}:/data`, '-e', 'STORAGE_SIZE=256MiB', '-e', 'ETCD_HOST=127.0.0.1', '-e', 'TORUS_INSECURE_PEER_NETWORK=1', IMAGE]);
      await eventually('the node reporting in', async () => /http:\/\/10\.77\.0\.1:40000/.test(await inNs('podman', ['run', '--rm', '-e', 'ETCD_HOST=127.0.0.1', IMAGE, 'torusctl', 'list-peers', '--json'])), 60_000);
      assert.equal((await inNs('curl', ['-fsS', 'http://10.77.0.1:4321/healthz'])).length > 0, true, '/healthz on the advertised address');
    } finally {
      await sh('podman', ['rm', '-f', '-t', '5', name], 60);
      names.splice(names.indexOf(name), 1);
      if (etcdProc) await stopProcess(etcdProc, 'SIGKILL');
      await sh('ip', ['netns', 'del', ns], 30);
    }
  });

  test('the compose file: docker-compose over podman\'s Docker API brings up etcd and three nodes that join the ring', { skip: spawnSync('sh', ['-c', 'command -v docker-compose']).status === 0 ? false : 'docker-compose is not installed' }, async () => {
    // An etcd image from the same local base (the compose file names the etcd project's image).
    const ctx = join(work, 'etcd-image');
    mkdirSync(ctx);
    writeFileSync(join(ctx, 'Containerfile'), `FROM ${RUNTIME_BASE}\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server && rm -rf /var/lib/apt/lists/*\n`);
    if ((await sh('podman', ['image', 'exists', ETCD_IMAGE], 30)).code !== 0) await must(...niced('podman', ['build', '--network=host', '-t', ETCD_IMAGE, ctx]), 600);
    const sock = join(work, 'podman.sock');
    const service = spawn('podman', ['system', 'service', '--time=0', `unix://${sock}`], { env: containerEnv(), stdio: 'ignore' });
    const ports = await Promise.all(Array.from({ length: 8 }, () => freePort()));
    const env = {
      ...containerEnv(),
      DOCKER_HOST: `unix://${sock}`,
      TORUS_IMAGE: IMAGE,
      ETCD_IMAGE,
      ETCD_PORT: String(ports[0]),
      ETCD_PEER_PORT: String(ports[1]),
      TORUS_PEER_PORT_1: String(ports[2]),
      TORUS_PEER_PORT_2: String(ports[3]),
      TORUS_PEER_PORT_3: String(ports[4]),
      TORUS_HTTP_PORT_1: String(ports[5]),
      TORUS_HTTP_PORT_2: String(ports[6]),
      TORUS_HTTP_PORT_3: String(ports[7]),
    };
    const compose = (args: string[], t = 180): Promise<string> => must('docker-compose', ['-p', `torustest${process.pid}`, '-f', join(REPO, 'deploy', 'compose', 'docker-compose.yml'), ...args], t, env);
    try {
      await eventually('the podman API socket', async () => (await sh('curl', ['-fsS', '--unix-socket', sock, 'http://d/_ping'], 10)).code === 0, 30_000);
      await compose(['up', '-d', '--no-build']);
      const peers = async (): Promise<{ address: string; member: string }[]> =>
        {
          // docker-compose says what it creates on the same output; the JSON list follows.
          const out = await compose(['run', '--rm', 'torusctl', 'list-peers', '--json'], 60);
          return JSON.parse(out.slice(out.search(/^\[/m))) as { address: string; member: string }[];
        };
      const seen = await eventually(
        'three nodes in the ring',
        async () => {
          const p = await peers();
          return p.length === 3 && p.every((x) => x.member === 'OK') ? p : undefined;
        },
        120_000,
      );
      assert.deepEqual(seen.map((p) => p.address).sort(), [2, 3, 4].map((i) => `http://127.0.0.1:${ports[i]}`).sort());
    } finally {
      await sh('docker-compose', ['-p', `torustest${process.pid}`, '-f', join(REPO, 'deploy', 'compose', 'docker-compose.yml'), 'down', '-v', '-t', '10'], 180, env);
      await stopProcess(service, 'SIGTERM');
    }
  });

  test("podman kube play runs the DaemonSet's pod template: a storage node that joins, as the unprivileged user", async () => {
    const ds = parseAllDocuments(readFileSync(join(REPO, 'deploy', 'kubernetes', '30-torusd.yaml'), 'utf8'))[0]!.toJS() as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    const config = parseAllDocuments(readFileSync(join(REPO, 'deploy', 'kubernetes', '01-config.yaml'), 'utf8'))[0]!.toJS()['data'] as Record<string, string>;
    const spec = structuredClone(ds['spec'].template.spec);
    const peer = await freePort();
    const http = await freePort();
    const dataDir = join(work, 'kube-data');
    mkdirSync(dataDir);
    // What the cluster would fill in (config map values, the pod IP), this test's ports and data
    // dir; podman 4.3 plays Pods, not DaemonSets, and refuses `ports` on the host network.
    const values: Record<string, string> = { ETCD_HOST: etcd.endpoint, STORAGE_SIZE: '256MiB', LISTEN_HOST: '127.0.0.1', LISTEN_PEER_PORT: String(peer), LISTEN_HTTP_PORT: String(http) };
    assert.ok(config['etcd-endpoints'] && config['storage-size']);
    const c = spec.containers[0];
    c.image = IMAGE;
    c.imagePullPolicy = 'Never';
    c.env = c.env.map((e: { name: string }) => ({ name: e.name, value: values[e.name] ?? (e as { value?: string }).value }));
    delete c.ports;
    c.readinessProbe.httpGet.port = http;
    c.livenessProbe.httpGet.port = http;
    spec.volumes[0].hostPath.path = dataDir;
    // The peer secret the cluster would hold in a Secret, here a file the node's user can read.
    const secretDir = join(work, 'kube-peer');
    mkdirSync(secretDir);
    writeFileSync(join(secretDir, 'secret'), `${randomBytes(32).toString('hex')}\n`, { mode: 0o444 });
    const sv = spec.volumes.find((v: { name: string }) => v.name === 'peer-secret');
    delete sv.secret;
    sv.hostPath = { path: secretDir, type: 'Directory' };
    delete spec.priorityClassName;
    delete spec.serviceAccountName;
    const pod = { apiVersion: 'v1', kind: 'Pod', metadata: { name: `torusd-kube-${process.pid}`, labels: ds['spec'].template.metadata.labels }, spec };
    const file = join(work, 'pod.yaml');
    writeFileSync(file, stringify(pod));
    try {
      await must('podman', ['kube', 'play', file], 120);
      await healthy(http);
      const peers = await inImage(['torusctl', 'list-peers', '--json']);
      assert.match(peers, new RegExp(`http://127.0.0.1:${peer}`));
      assert.equal(statSync(join(dataDir, 'node.json')).uid, 10001, 'torusd runs as the user torus with the capabilities the manifest leaves it');
    } finally {
      await sh('podman', ['kube', 'down', file], 120);
    }
  });
});

