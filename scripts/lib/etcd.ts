// The flags of the etcd members that the demo, the benchmark and the tests run on loopback.
// Logging is errors only: etcd's info lines would drown the reason it exits, if it does.

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
    '--log-level', 'error',
    '--logger', 'zap',
  ];
}

export function singleEtcdArgs(name: string, dataDir: string, clientPort: number, peerPort: number): string[] {
  return etcdMemberArgs({ name, dataDir, clientPort, peerPort });
}
