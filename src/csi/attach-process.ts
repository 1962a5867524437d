import { spawn, type ChildProcess } from 'node:child_process';
import { TorusError, type ErrorCode } from '../core/errors.js';

// A volume attached on this node by its own `torusblk nbd VOLUME` process: it holds the volume's
// lock, serves it over NBD on a private socket and gives the node a block device (the kernel's
// NBD client, or nbdfuse and a loop device where the kernel has no NBD). One process per volume,
// so one volume's failure or hang stays its own, and the CSI server stays responsive while a
// volume syncs. SIGTERM makes it detach the device, sync and release the lock.

export interface Attached {
  readonly device: string;
  /** Why the process ended, once it has; undefined while it runs. */
  readonly ended: string | undefined;
  /** SIGTERM, then waits up to `timeoutMs` for the process to sync and exit. */
  detach(timeoutMs: number): Promise<void>;
}

export interface Attacher {
  attach(volume: string, opts: { writeCacheSize?: string }): Promise<Attached>;
}

// torusblk's documented exit statuses (README, "Errors and exit status") back to error codes.
const EXIT_CODES: Readonly<Record<number, ErrorCode>> = {
  2: 'INVALID_ARGUMENT',
  3: 'ETCD_UNAVAILABLE',
  4: 'NOT_INITIALIZED',
  6: 'NOT_EXIST',
  7: 'LOCKED',
  9: 'OUT_OF_SPACE',
};

export class ProcessAttacher implements Attacher {
  /** `command` and `args` run torusblk with its connection flags; `nbd VOLUME` is appended. */
  constructor(
    private readonly command: string,
    private readonly args: readonly string[],
    private readonly log: (volume: string, line: string) => void,
    private readonly attachTimeoutMs = 120_000,
  ) {}

  attach(volume: string, opts: { writeCacheSize?: string }): Promise<Attached> {
    const extra = opts.writeCacheSize ? ['--write-cache-size', opts.writeCacheSize] : [];
    const p: ChildProcess = spawn(this.command, [...this.args, 'nbd', volume, ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
    let ended: string | undefined;
    let lastError = '';
    let onAttached: (device: string) => void = () => undefined;
    let onEnded: () => void = () => undefined;
    const exited = new Promise<void>((resolve) =>
      p.once('close', (code, signal) => {
        ended = signal ? `killed by ${signal}` : `exited with status ${code}`;
        onEnded();
        resolve();
      }),
    );
    for (const s of [p.stdout!, p.stderr!]) {
      let buf = '';
      s.on('data', (d: Buffer) => {
        buf += d.toString();
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          const dev = /^Attached \S+ to (\/dev\/[^\s.]+)/.exec(line)?.[1];
          if (dev) onAttached(dev);
          // Its one-line error ("torusblk: ..."), if it fails; its other lines are logs worth keeping.
          if (line.startsWith('torusblk: ')) lastError = line.slice('torusblk: '.length);
          this.log(volume, line);
        }
      });
    }
    const detach = async (timeoutMs: number): Promise<void> => {
      if (ended === undefined) p.kill('SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<'late'>((r) => (timer = setTimeout(() => r('late'), timeoutMs)));
      const r = await Promise.race([exited, late]);
      clearTimeout(timer);
      if (r === 'late') throw new TorusError('TIMEOUT', `the attachment of ${volume} (pid ${p.pid}) is still syncing after ${timeoutMs} ms`);
    };
    return new Promise<Attached>((resolve, reject) => {
      const timer = setTimeout(() => {
        p.kill('SIGTERM');
        reject(new TorusError('TIMEOUT', `attaching ${volume} took more than ${this.attachTimeoutMs} ms`));
      }, this.attachTimeoutMs);
      onAttached = (device) => {
        clearTimeout(timer);
        resolve({
          device,
          get ended() {
            return ended;
          },
          detach,
        });
      };
      onEnded = () => {
        clearTimeout(timer);
        reject(new TorusError(EXIT_CODES[p.exitCode ?? -1] ?? 'IO', `attaching ${volume} failed: ${lastError || ended}`));
      };
    });
  }
}
