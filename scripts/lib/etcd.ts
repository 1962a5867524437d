// The flags of the one-member etcd clusters that the demo, the benchmark and the tests run on
// loopback. Logging is errors only: etcd's info lines would drown the reason it exits, if it does.

export function singleEtcdArgs(name: string, dataDir: string, clientPort: number, peerPort: number): string[] {
  const client = `http://127.0.0.1:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  return [
    '--name', name,
    '--data-dir', dataDir,
    '--listen-client-urls', client,
    '--advertise-client-urls', client,
    '--listen-peer-urls', peer,
    '--initial-advertise-peer-urls', peer,
    '--initial-cluster', `${name}=${peer}`,
    '--log-level', 'error',
    '--logger', 'zap',
  ];
}
