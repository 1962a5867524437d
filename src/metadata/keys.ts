// The etcd key layout, in one place. Everything the cluster owns lives under PREFIX, so
// `torusctl wipe` is one prefix delete and several clusters can share an etcd by prefix later.

export const PREFIX = '/torus/';

export const keys = {
  global: `${PREFIX}meta/global`,
  ring: `${PREFIX}meta/ring`,
  nodesPrefix: `${PREFIX}nodes/`,
  node: (uuid: string): string => `${PREFIX}nodes/${uuid}`,
} as const;
