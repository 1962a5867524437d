import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';
import { parseAllDocuments } from 'yaml';
import { invocation } from '../../src/cli/container.js';
import { buildProgram as torusblk } from '../../src/cli/torusblk.js';
import { buildProgram as torusctl } from '../../src/cli/torusctl.js';
import { buildProgram as torusd } from '../../src/cli/torusd.js';
import { DEFAULT_DRIVER_NAME } from '../../src/csi/common.js';
import { REPO } from '../helpers/procs.js';

// The deployment files checked offline (no Kubernetes API server here): every manifest against
// the Kubernetes schemas in `kubernetes-models` (types, required fields) and, through the
// TypeScript compiler, against its types (unknown fields, which the schemas let through); then
// what ties them together: names, namespaces, the driver name, the etcd endpoints, and the
// environment the image's entrypoint reads.

const K8S = join(REPO, 'deploy', 'kubernetes');
type Obj = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

function load(dir: string): { file: string; obj: Obj }[] {
  const out: { file: string; obj: Obj }[] = [];
  for (const f of readdirSync(dir).filter((n) => n.endsWith('.yaml')).sort()) {
    for (const doc of parseAllDocuments(readFileSync(join(dir, f), 'utf8'))) {
      assert.deepEqual(doc.errors, [], `${f}: YAML errors`);
      const obj = doc.toJS() as Obj | null;
      if (obj) out.push({ file: f, obj });
    }
  }
  return out;
}

const main = load(K8S);
const snapshots = load(join(K8S, 'snapshots'));
const find = (kind: string, name: string): Obj => {
  const o = main.find((d) => d.obj['kind'] === kind && d.obj['metadata']?.name === name)?.obj;
  assert.ok(o, `${kind} ${name} is in deploy/kubernetes`);
  return o;
};
const podSpecs = (): { where: string; spec: Obj; claims: string[] }[] =>
  main
    .filter((d) => d.obj['spec']?.template?.spec)
    .map((d) => ({ where: `${d.obj['kind']} ${d.obj['metadata'].name}`, spec: d.obj['spec'].template.spec as Obj, claims: ((d.obj['spec'].volumeClaimTemplates ?? []) as Obj[]).map((v) => v['metadata'].name as string) }));

test('every manifest passes the Kubernetes schemas (kubernetes-models)', async () => {
  assert.ok(main.length >= 15, `found ${main.length} objects`);
  for (const { file, obj } of main) {
    const where = `${file}: ${obj['apiVersion']}/${obj['kind']} ${obj['metadata']?.name}`;
    let Model: new (o: Obj) => { validate(): void };
    try {
      Model = ((await import(`kubernetes-models/${obj['apiVersion']}/${obj['kind']}`)) as Record<string, typeof Model>)[obj['kind']]!;
    } catch {
      assert.fail(`${where}: no such apiVersion/kind`);
    }
    try {
      new Model(obj).validate();
    } catch (e) {
      const errs = (e as { errors?: { instancePath?: string; message?: string }[] }).errors ?? [{ message: (e as Error).message }];
      assert.fail(`${where}: ${errs.map((x) => `${x.instancePath ?? ''} ${x.message}`).join('; ')}`);
    }
  }
});

test('no manifest has a field its type does not know (TypeScript excess-property check)', () => {
  const dir = mkdtempSync(join(REPO, 'dist', '.manifest-check-'));
  try {
    let src = '';
    main.forEach(({ obj }, i) => {
      src += `import type { I${obj['kind']} as T${i} } from 'kubernetes-models/${obj['apiVersion']}/${obj['kind']}';\n`;
      src += `export const m${i}: T${i} = ${JSON.stringify(obj)};\n`;
    });
    const file = join(dir, 'manifests.ts');
    writeFileSync(file, src);
    const program = ts.createProgram([file], { strict: true, noEmit: true, module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, skipLibCheck: true, types: [] });
    const problems = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
    assert.deepEqual(problems, []);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the VolumeSnapshotClass (a CRD, not in kubernetes-models) has what the snapshot controller reads', () => {
  assert.equal(snapshots.length, 1);
  const c = snapshots[0]!.obj;
  assert.equal(c['apiVersion'], 'snapshot.storage.k8s.io/v1');
  assert.equal(c['kind'], 'VolumeSnapshotClass');
  assert.deepEqual(Object.keys(c).sort(), ['apiVersion', 'deletionPolicy', 'driver', 'kind', 'metadata']);
  assert.ok(['Delete', 'Retain'].includes(c['deletionPolicy'] as string));
  assert.equal(c['driver'], DEFAULT_DRIVER_NAME);
});

test('the pieces agree: namespace, service accounts, config keys, driver name, socket paths, etcd members', () => {
  const ns = find('Namespace', 'torus-system')['metadata'].name as string;
  for (const { obj } of main) if (!['Namespace', 'ClusterRole', 'ClusterRoleBinding', 'CSIDriver', 'StorageClass'].includes(obj['kind'])) assert.equal(obj['metadata'].namespace, ns, `${obj['kind']} ${obj['metadata'].name} is in ${ns}`);
  const config = find('ConfigMap', 'torus-config')['data'] as Record<string, string>;
  for (const { where, spec, claims } of podSpecs()) {
    if (spec['serviceAccountName']) find('ServiceAccount', spec['serviceAccountName']);
    for (const c of spec['containers'] as Obj[]) {
      for (const e of (c['env'] ?? []) as Obj[]) {
        const ref = e['valueFrom']?.configMapKeyRef;
        if (ref) assert.ok(ref.name === 'torus-config' && ref.key in config, `${where}: ${e['name']} reads torus-config/${ref.key}`);
      }
      for (const m of (c['volumeMounts'] ?? []) as Obj[]) assert.ok(((spec['volumes'] ?? []) as Obj[]).some((v) => v['name'] === m['name']) || claims.includes(m['name']), `${where}: volume ${m['name']}`);
    }
  }
  for (const b of main.filter((d) => d.obj['kind'].endsWith('Binding')).map((d) => d.obj)) {
    find(b['roleRef'].kind, b['roleRef'].name);
    for (const s of b['subjects'] as Obj[]) find('ServiceAccount', s['name']);
  }
  // One driver name everywhere.
  assert.equal(find('CSIDriver', DEFAULT_DRIVER_NAME)['spec'].attachRequired, true, 'ControllerPublish records which node has a volume');
  assert.equal(find('StorageClass', 'torus')['provisioner'], DEFAULT_DRIVER_NAME);
  const node = find('DaemonSet', 'torus-csi-node')['spec'].template.spec as Obj;
  const registrar = (node['containers'] as Obj[]).find((c) => c['name'] === 'node-driver-registrar')!;
  assert.ok((registrar['args'] as string[]).includes(`--kubelet-registration-path=/var/lib/kubelet/plugins/${DEFAULT_DRIVER_NAME}/csi.sock`));
  assert.equal((node['volumes'] as Obj[]).find((v) => v['name'] === 'plugin-dir')!['hostPath'].path, `/var/lib/kubelet/plugins/${DEFAULT_DRIVER_NAME}`);
  assert.equal(find('DaemonSet', 'torus-csi-node')['spec'].updateStrategy.type, 'OnDelete', 'restarting the node plugin cuts the volumes it serves');
  // The etcd members the config lists are the StatefulSet's.
  const etcd = find('StatefulSet', 'torus-etcd');
  const members = Array.from({ length: etcd['spec'].replicas as number }, (_, i) => `torus-etcd-${i}.${etcd['spec'].serviceName}.${ns}.svc:2379`);
  assert.equal(config['etcd-endpoints'], members.join(','));
  assert.equal(find('Service', etcd['spec'].serviceName)['spec'].clusterIP, 'None');
  // Our containers all run the same image.
  const images = new Set(podSpecs().flatMap(({ spec }) => (spec['containers'] as Obj[]).map((c) => c['image'] as string)).filter((i) => i.includes('/torus:')));
  assert.equal(images.size, 1, [...images].join(' '));
});

test("our containers' environment and arguments are ones the image's entrypoint and programs accept", () => {
  const programs = { torusd: torusd(), torusctl: torusctl(), torusblk: torusblk() };
  for (const { where, spec } of podSpecs()) {
    for (const c of (spec['containers'] as Obj[]).filter((x) => (x['image'] as string).includes('/torus:'))) {
      const env: Record<string, string> = {};
      for (const e of (c['env'] ?? []) as Obj[]) env[e['name']] = e['value'] ?? (e['valueFrom']?.configMapKeyRef ? 'from-config' : '10.0.0.7');
      if (env['ETCD_HOST']) env['ETCD_HOST'] = find('ConfigMap', 'torus-config')['data']['etcd-endpoints'];
      const args = ((c['args'] ?? []) as string[]).map((a) => a.replace('$(NODE_NAME)', 'node-1'));
      if (c['command']) {
        // The init Job runs the entrypoint from a shell: check the command it runs.
        const line = /torus-entrypoint (.*?) \|\|/.exec(args.join(' '))?.[1];
        assert.ok(line, `${where}: ${args.join(' ')}`);
        args.splice(0, args.length, ...line.split(' '));
      }
      const inv = invocation(args, env, programs);
      const p = { torusd: torusd(), torusctl: torusctl(), torusblk: torusblk() }[inv.program];
      p.exitOverride();
      p.configureOutput({ writeErr: () => undefined, writeOut: () => undefined });
      // Parse only (no action runs): unknown options or commands throw.
      const sub = inv.args.find((a) => !a.startsWith('-') && p.commands.some((s) => s.name() === a));
      if (sub) {
        const cmd = p.commands.find((s) => s.name() === sub)!;
        cmd.exitOverride();
        assert.doesNotThrow(() => cmd.parseOptions(inv.args.slice(inv.args.indexOf(sub) + 1)), `${where}: ${inv.args.join(' ')}`);
      } else {
        assert.deepEqual(p.parseOptions(inv.args).unknown, [], `${where}: ${inv.args.join(' ')}`);
      }
      if (inv.program === 'torusd') assert.ok(inv.args.includes('--auto-join') && inv.args.includes('--host'), `${where}: joins the ring and serves /healthz`);
    }
  }
});

test('the compose file: three torusd on their own ports, all with settings the entrypoint accepts', () => {
  const doc = parseAllDocuments(readFileSync(join(REPO, 'deploy', 'compose', 'docker-compose.yml'), 'utf8'), { merge: true })[0]!;
  assert.deepEqual(doc.errors, []);
  const services = (doc.toJS() as Obj)['services'] as Record<string, Obj>;
  const nodes = Object.entries(services).filter(([n]) => /^torus\d$/.test(n));
  assert.equal(nodes.length, 3);
  const ports = new Set<string>();
  const programs = { torusd: torusd(), torusctl: torusctl(), torusblk: torusblk() };
  for (const [name, s] of nodes) {
    assert.equal(s['network_mode'], 'host', `${name}: host network`);
    const env = Object.fromEntries(Object.entries(s['environment'] as Record<string, string>).map(([k, v]) => [k, String(v).replace(/\$\{[A-Z0-9_]+:-([^}]*)\}/, '$1')]));
    const inv = invocation([], env, programs);
    ports.add(env['LISTEN_PEER_PORT']!).add(env['LISTEN_HTTP_PORT']!);
    assert.ok(inv.args.includes('--auto-join'));
  }
  assert.equal(ports.size, 6, 'no two nodes share a port');
});

// ---- systemd ----

const SYSTEMD = join(REPO, 'deploy', 'systemd');

/** KEY=value lines of an environment file. */
function envFile(path: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

/** A unit's command line as systemd expands it: ${V} is one word, $V splits on spaces, %i/%I the instance. */
function expand(line: string, env: Record<string, string>, instance: string): string[] {
  const words: string[] = [];
  for (const w of line.replace(/%[iI]/g, instance).split(/\s+/).filter(Boolean)) {
    const whole = /^\$\{([A-Z0-9_]+)\}$/.exec(w);
    const split = /^\$([A-Z0-9_]+)$/.exec(w);
    if (whole) words.push(env[whole[1]!] ?? '');
    else if (split) words.push(...(env[split[1]!] ?? '').split(/\s+/).filter(Boolean));
    else words.push(w.replace(/\$\{([A-Z0-9_]+)\}/g, (_, k: string) => env[k] ?? ''));
  }
  return words;
}

function unitValue(text: string, key: string): string {
  const m = new RegExp(`^${key}=(.*)$`, 'm').exec(text);
  assert.ok(m, `${key}= is set`);
  return m[1]!;
}

test('the systemd units pass systemd-analyze verify (only the install paths are missing here)', { skip: spawnSync('sh', ['-c', 'command -v systemd-analyze']).status === 0 ? false : 'no systemd-analyze' }, () => {
  const dir = mkdtempSync(join(REPO, 'dist', '.units-'));
  try {
    for (const f of ['torusd.service', 'torusblk@.service']) writeFileSync(join(dir, f), readFileSync(join(SYSTEMD, f)));
    symlinkSync('torusblk@.service', join(dir, 'torusblk@vol1.service'));
    const r = spawnSync('systemd-analyze', ['verify', '--man=no', join(dir, 'torusd.service'), join(dir, 'torusblk@vol1.service')], { encoding: 'utf8', timeout: 60_000 });
    const problems = `${r.stdout}${r.stderr}`
      .split('\n')
      .filter(Boolean)
      .filter((l) => !/Command (\/usr\/local\/bin\/torus(d|blk)|\/sbin\/modprobe) is not executable/.test(l));
    assert.deepEqual(problems, []);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the units' command lines, with the example settings, are ones torusd and torusblk accept", () => {
  const d = readFileSync(join(SYSTEMD, 'torusd.service'), 'utf8');
  assert.match(d, /^After=network-online\.target etcd\.service$/m);
  assert.match(d, /^Wants=network-online\.target$/m);
  const dArgs = expand(unitValue(d, 'ExecStart'), envFile(join(SYSTEMD, 'torusd.env')), '');
  assert.equal(dArgs.shift(), '/usr/local/bin/torusd');
  const p = torusd();
  p.exitOverride();
  assert.deepEqual(p.parseOptions(dArgs).unknown, [], dArgs.join(' '));
  assert.ok(dArgs.includes('--auto-join'));
  // Every TORUS_ name in the env file is one the container image also reads (one vocabulary).
  const programs = { torusd: torusd(), torusctl: torusctl(), torusblk: torusblk() };
  const env = envFile(join(SYSTEMD, 'torusd.env'));
  delete env['TORUS_OPTIONS'];
  assert.doesNotThrow(() => invocation([], env, programs));

  const b = readFileSync(join(SYSTEMD, 'torusblk@.service'), 'utf8');
  assert.match(b, /^KillMode=mixed$/m, 'SIGTERM reaches torusblk alone, which detaches and syncs');
  const bArgs = expand(unitValue(b, 'ExecStart'), { ...envFile(join(SYSTEMD, 'torusblk.env')), DEVICE: '/dev/nbd3' }, 'vol1');
  assert.equal(bArgs.shift(), '/usr/local/bin/torusblk');
  const blk = torusblk();
  const nbd = blk.commands.find((c) => c.name() === 'nbd')!;
  blk.exitOverride();
  nbd.exitOverride();
  const at = bArgs.indexOf('nbd');
  assert.deepEqual(blk.parseOptions(bArgs.slice(0, at)).unknown, []);
  assert.deepEqual(nbd.parseOptions(bArgs.slice(at + 1)).operands, ['vol1', '/dev/nbd3']);
});
