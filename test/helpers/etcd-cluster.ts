import { spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
import { etcdMemberArgs } from '../../scripts/lib/etcd.js';
import { freePort, killProc, spawnEtcd, waitHealthy, type EtcdProc } from './etcd.js';

// A real etcd cluster of several members on loopback, for failover tests: members are killed
// with SIGKILL (the way a crash or a power cut looks to the others) and restarted on their data
// dirs and ports.

export interface EtcdCluster {
  /** host:port of each member's client URL, in member order. */
  readonly endpoints: readonly string[];
  /** The -C value that names every member. */
  readonly all: string;
  running(i: number): boolean;
  /** The member's process (for its pid), while it runs. */
  proc(i: number): ChildProcess | undefined;
  kill(i: number): Promise<void>;
  /** Starts a killed member again on its data dir and ports; resolves once it is healthy. */
  restart(i: number): Promise<void>;
  /** The index of the member that leads, as the running members see it (bounded wait). */
  leader(): Promise<number>;
  /** Makes member `i` the leader (etcd's MoveLeader), and waits until it is. */
  moveLeader(i: number): Promise<void>;
  /** Each running member's database size in bytes (etcd's Status: dbSize). */
  dbSizes(): Promise<number[]>;
  /** The members a process has TCP connections to (from `ss`), by index. */
  usedBy(pid: number): number[];
  stop(): Promise<void>;
}

interface Member {
  name: string;
  clientPort: number;
  peerPort: number;
  dataDir: string;
  p: EtcdProc | undefined;
}

export async function startEtcdCluster(n = 3): Promise<EtcdCluster> {
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(base, 'torus-etcd-cluster-'));
  let members: Member[] = [];
  const argsOf = (m: Member): string[] =>
    etcdMemberArgs({ ...m, dataDir: m.dataDir, initialCluster: members.map((x) => `${x.name}=http://127.0.0.1:${x.peerPort}`).join(',') });
  const endpoint = (m: Member): string => `127.0.0.1:${m.clientPort}`;
  // A port found free can be taken by a test running alongside before etcd binds it: try others.
  for (let attempt = 1; ; attempt++) {
    members = [];
    for (let i = 0; i < n; i++) members.push({ name: `m${i}`, clientPort: await freePort(), peerPort: await freePort(), dataDir: join(dir, `m${i}`), p: undefined });
    for (const m of members) m.p = spawnEtcd(argsOf(m));
    try {
      await Promise.all(members.map((m) => waitHealthy(endpoint(m), m.p!.proc, m.p!.output)));
      break;
    } catch (err) {
      await Promise.all(members.map((m) => killProc(m.p!.proc)));
      await Promise.all(members.map((m) => m.p!.closed));
      const out = members.map((m) => `${m.name}: ${m.p!.output()}`).join('\n');
      rmSync(dir, { recursive: true, force: true });
      if (attempt >= 3 || !out.includes('address already in use')) throw new Error(`${(err as Error).message.split('\n')[0]}\n${out}`);
    }
  }
  const endpoints = members.map(endpoint);
  const clients = endpoints.map((e) => new Etcd3({ hosts: `http://${e}` }));
  const running = (i: number): boolean => {
    const p = members[i]!.p?.proc;
    return p !== undefined && p.exitCode === null && p.signalCode === null;
  };
  const status = async (i: number): Promise<{ id: string; leader: string; dbSize: number }> => {
    const s = await clients[i]!.maintenance.status({ deadline: Date.now() + 2000 });
    return { id: s.header.member_id, leader: s.leader, dbSize: Number(s.dbSize) };
  };
  const ids = await Promise.all(members.map((_, i) => status(i).then((s) => s.id)));
  const leader = async (): Promise<number> => {
    for (let tries = 0; tries < 100; tries++) {
      for (const [i] of members.entries()) {
        if (!running(i)) continue;
        const s = await status(i).catch(() => undefined);
        const at = s ? ids.indexOf(s.leader) : -1;
        if (at >= 0 && running(at)) return at;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error('no etcd member leads');
  };
  return {
    endpoints,
    all: endpoints.join(','),
    running,
    proc: (i) => (running(i) ? members[i]!.p!.proc : undefined),
    async kill(i) {
      const p = members[i]!.p;
      if (p) await killProc(p.proc);
    },
    async restart(i) {
      const m = members[i]!;
      if (m.p) await killProc(m.p.proc);
      m.p = spawnEtcd(argsOf(m));
      await waitHealthy(endpoint(m), m.p.proc, m.p.output);
    },
    leader,
    async moveLeader(i) {
      const from = await leader();
      if (from === i) return;
      await clients[from]!.maintenance.moveLeader({ targetID: ids[i]! }, { deadline: Date.now() + 5000 });
      for (let tries = 0; tries < 100 && (await leader()) !== i; tries++) await new Promise((r) => setTimeout(r, 100));
      if ((await leader()) !== i) throw new Error(`member ${i} did not become the leader`);
    },
    async dbSizes() {
      return Promise.all(members.map((_, i) => (running(i) ? status(i).then((s) => s.dbSize) : Promise.resolve(0))));
    },
    usedBy(pid) {
      const r = spawnSync('ss', ['-tnpH', 'state', 'established'], { encoding: 'utf8' });
      const used = new Set<number>();
      for (const line of r.stdout.split('\n')) {
        if (!line.includes(`pid=${pid},`)) continue;
        // Recv-Q Send-Q Local Peer Process: the peer is the fourth column.
        const i = endpoints.indexOf(line.trim().split(/\s+/)[3] ?? '');
        if (i >= 0) used.add(i);
      }
      return [...used];
    },
    async stop() {
      for (const c of clients) c.close();
      await Promise.all(members.map((m) => (m.p ? killProc(m.p.proc) : undefined)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
