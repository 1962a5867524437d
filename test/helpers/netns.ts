// A private Ethernet segment made of network namespaces, for tests that need real interfaces:
// one namespace holds a bridge, and each "host" is a namespace of its own with one veth (eth0)
// into that bridge. No addresses, no default route, IPv6 off: nothing in it can reach, or be
// reached from, anywhere else. Every process runs under `ip netns exec`, and destroy() kills the
// processes it started and deletes every namespace (which takes their interfaces with them),
// also when the test process exits early.

import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';

export interface LabHost {
  readonly ns: string;
  /** The host's interface inside its namespace. */
  readonly ifname: 'eth0';
  readonly mac: string;
}

export interface Lab {
  readonly bridgeNs: string;
  readonly bridge: 'br0';
  readonly hosts: Readonly<Record<string, LabHost>>;
  /** Runs a command to completion in a namespace, bounded by `timeoutS`. */
  run(ns: string, cmd: string, args: readonly string[], timeoutS?: number): { code: number; stdout: string; stderr: string };
  /** Starts a long-running process in a namespace; destroy() kills it if it is still running. */
  start(ns: string, cmd: string, args: readonly string[], opts?: SpawnOptions): ChildProcess;
  /** Creates a tap device in the bridge namespace, attached to the bridge and up. */
  addTap(name: string): void;
  destroy(): void;
}

function ip(args: readonly string[], timeoutS = 20): { code: number; out: string } {
  const r = spawnSync('timeout', [String(timeoutS), 'ip', ...args], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

function must(args: readonly string[]): void {
  const r = ip(args);
  if (r.code !== 0) throw new Error(`ip ${args.join(' ')} failed: ${r.out.trim()}`);
}

/** Why namespaces cannot be used here, or undefined if they can. */
export function netnsUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root to create network namespaces';
  const probe = `torus-probe-${process.pid}`;
  const r = ip(['netns', 'add', probe]);
  if (r.code !== 0) return `cannot create a network namespace: ${r.out.trim()}`;
  ip(['netns', 'del', probe]);
  return undefined;
}

let labs = 0;
const live = new Set<Lab>();
process.on('exit', () => {
  for (const lab of live) lab.destroy();
});

/** Builds the segment; `hosts` names the host namespaces (MACs 02:00:00:00:01:01, :02, ...). */
export function createLab(opts: { hosts: readonly string[]; mtu?: number }): Lab {
  const prefix = `taoe${process.pid}x${labs++}`;
  const bridgeNs = `${prefix}-br`;
  const namespaces: string[] = [];
  const procs = new Set<ChildProcess>();
  const hosts: Record<string, LabHost> = {};
  let destroyed = false;

  const lab: Lab = {
    bridgeNs,
    bridge: 'br0',
    hosts,
    run(ns, cmd, args, timeoutS = 60) {
      const r = spawnSync('timeout', [String(timeoutS), 'ip', 'netns', 'exec', ns, cmd, ...args], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
      return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
    },
    start(ns, cmd, args, spawnOpts = {}) {
      const p = spawn('ip', ['netns', 'exec', ns, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], ...spawnOpts });
      procs.add(p);
      p.once('exit', () => procs.delete(p));
      return p;
    },
    addTap(name) {
      must(['-n', bridgeNs, 'tuntap', 'add', 'dev', name, 'mode', 'tap']);
      if (opts.mtu) must(['-n', bridgeNs, 'link', 'set', name, 'mtu', String(opts.mtu)]);
      must(['-n', bridgeNs, 'link', 'set', name, 'master', 'br0', 'up']);
    },
    destroy() {
      if (destroyed) return;
      destroyed = true;
      live.delete(lab);
      for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      // `ip netns exec` replaces itself with the command, so the pids above are the commands
      // themselves; anything they forked is found by namespace and ended by pid.
      for (const ns of namespaces) {
        const pids = ip(['netns', 'pids', ns]).out.split(/\s+/).filter((s) => /^\d+$/.test(s));
        for (const pid of pids) {
          try {
            process.kill(Number(pid), 'SIGKILL');
          } catch {
            // already gone
          }
        }
      }
      for (const ns of namespaces.reverse()) ip(['netns', 'del', ns]);
    },
  };
  live.add(lab);

  try {
    const addNs = (ns: string): void => {
      must(['netns', 'add', ns]);
      namespaces.push(ns);
      // No IPv6 means no router solicitations or DAD probes on the segment: only what tests send.
      spawnSync('ip', ['netns', 'exec', ns, 'sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
      must(['-n', ns, 'link', 'set', 'lo', 'up']);
    };
    addNs(bridgeNs);
    must(['-n', bridgeNs, 'link', 'add', 'br0', 'type', 'bridge']);
    // Forward at once (no STP listening/learning delay) and never age out MACs during a test.
    must(['-n', bridgeNs, 'link', 'set', 'br0', 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0']);
    if (opts.mtu) must(['-n', bridgeNs, 'link', 'set', 'br0', 'mtu', String(opts.mtu)]);
    must(['-n', bridgeNs, 'link', 'set', 'br0', 'up']);
    opts.hosts.forEach((name, i) => {
      const ns = `${prefix}-${name}`;
      addNs(ns);
      const port = `p${i}`;
      const mac = `02:00:00:00:01:${(i + 1).toString(16).padStart(2, '0')}`;
      must(['-n', bridgeNs, 'link', 'add', port, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns]);
      if (opts.mtu) {
        must(['-n', bridgeNs, 'link', 'set', port, 'mtu', String(opts.mtu)]);
        must(['-n', ns, 'link', 'set', 'eth0', 'mtu', String(opts.mtu)]);
      }
      must(['-n', ns, 'link', 'set', 'eth0', 'address', mac]);
      must(['-n', bridgeNs, 'link', 'set', port, 'master', 'br0', 'up']);
      must(['-n', ns, 'link', 'set', 'eth0', 'up']);
      hosts[name] = { ns, ifname: 'eth0', mac };
    });
  } catch (err) {
    lab.destroy();
    throw err;
  }
  return lab;
}
