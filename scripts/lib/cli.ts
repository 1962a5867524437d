import { createServer } from 'node:net';

// What the npm-run scripts (the demo, the benchmark) share: argument errors in one line, and a
// check that a loopback port is free before anything is started on it.

/**
 * `usage` prints `prog: message` (plus `hint`) on one line and exits with status 2, never a stack
 * trace; `orUsage` runs a parse or check and turns what it throws into that.
 */
export function usageExits(prog: string, hint = ''): { usage(message: string): never; orUsage<T>(f: () => T): T } {
  const usage = (message: string): never => {
    process.stderr.write(`${prog}: ${message}${hint}\n`);
    process.exit(2);
  };
  const orUsage = <T>(f: () => T): T => {
    try {
      return f();
    } catch (err) {
      // Node words some argument errors over several lines (a value that starts with a dash).
      return usage((err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, ' '));
    }
  };
  return { usage, orUsage };
}

/** Whether `port` on 127.0.0.1 can be listened on right now. */
export function portFree(port: number): Promise<boolean> {
  return new Promise((res) => {
    const s = createServer();
    s.once('error', () => res(false));
    s.listen(port, '127.0.0.1', () => s.close(() => res(true)));
  });
}
