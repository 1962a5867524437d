// The flags of the etcd members that the demo, the benchmark and the tests run on loopback.
// Logging is errors only: etcd's info lines would drown the reason it exits, if it does.

/**
 * etcd keeps every revision until it is compacted, and every sync writes one: without this, a
 * busy volume walks etcd to its space quota, where it refuses all writes. torusd compacts too
 * (server/compactor.ts); etcd's own auto-compaction keeps an etcd bounded that no torusd uses.
 * Both keep five minutes of history (docs/failure-guide.md, "etcd's size").
 */
export const AUTO_COMPACTION = ['--auto-compaction-mode', 'periodic', '--auto-compaction-retention', '5m'];

export interface EtcdMemberSpec {
  readonly name: string;
  readonly dataDir: string;
  readonly clientPort: number;
  readonly peerPort: number;
  /** `name=http://127.0.0.1:PEERPORT,...` for every member; this member alone when absent. */
  readonly initialCluster?: string;
}

export function etcdMemberArgs(m: EtcdMemberSpec): string[] {
  const client = `http://127.0.0.1:${m.clientPort}`;
  const peer = `http://127.0.0.1:${m.peerPort}`;
  return [
    '--name', m.name,
    '--data-dir', m.dataDir,
    '--listen-client-urls', client,
    '--advertise-client-urls', client,
    '--listen-peer-urls', peer,
    '--initial-advertise-peer-urls', peer,
    '--initial-cluster', m.initialCluster ?? `${m.name}=${peer}`,
    ...AUTO_COMPACTION,
    '--log-level', 'error',
    '--logger', 'zap',
  ];
}

export function singleEtcdArgs(name: string, dataDir: string, clientPort: number, peerPort: number): string[] {
  return etcdMemberArgs({ name, dataDir, clientPort, peerPort });
}
