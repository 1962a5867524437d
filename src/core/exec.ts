import { spawn, spawnSync } from 'node:child_process';

// Running the system's tools (nbd-client, losetup, mount, mkfs, ...) from the processes that
// attach devices: torusblk's front ends and the CSI node service.

/**
 * Runs a command without blocking the event loop, and resolves (never rejects) with its exit and
 * its stdout and stderr together. The NBD server such commands talk to (through the kernel or
 * FUSE) may live in this very process, so a synchronous spawn could deadlock.
 */
export function runCommand(cmd: string, args: readonly string[], timeoutMs = 30_000): Promise<{ ok: boolean; code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    p.on('error', (err) => resolve({ ok: false, code: null, out: err.message }));
    p.on('close', (code) => resolve({ ok: code === 0, code, out: out.trim() }));
  });
}

/** Whether `cmd` is on the PATH. */
export function haveCommand(cmd: string): boolean {
  return spawnSync('sh', ['-c', 'command -v "$1"', 'sh', cmd]).status === 0;
}
