import cliProgress from 'cli-progress';
import { formatSize } from '../../core/units.js';

/** A byte-progress bar on stderr (so stdout stays clean for data), or nothing when off. */
export function byteProgress(enabled: boolean, total: number, label: string): { update(done: number): void; stop(): void } {
  if (!enabled) return { update() {}, stop() {} };
  const bar = new cliProgress.SingleBar(
    {
      format: `${label} [{bar}] {percentage}% {done}/{all} {rate}/s ETA {eta_formatted}`,
      stream: process.stderr,
      hideCursor: true,
      etaBuffer: 50,
      fps: 5,
    },
    cliProgress.Presets.legacy,
  );
  const started = Date.now();
  bar.start(total, 0, { done: formatSize(0), all: formatSize(total), rate: formatSize(0) });
  return {
    update(done: number) {
      const secs = Math.max(0.001, (Date.now() - started) / 1000);
      bar.update(done, { done: formatSize(done), all: formatSize(total), rate: formatSize(Math.round(done / secs)) });
    },
    stop() {
      bar.stop();
    },
  };
}

export interface ProgressPoint {
  /** Bytes moved since watching began (never goes back). */
  readonly done: number;
  /** done + what the nodes say is left; grows when their estimates do. */
  readonly total: number;
  /** Bytes per second over the last samples, or the nodes' own figure before there are any. */
  readonly rate: number;
  /** Seconds left at that rate; undefined while unknown. */
  readonly etaSec: number | undefined;
  /** False until some node has published an estimate of what is left. */
  readonly estimated: boolean;
}

/**
 * Progress of a movement whose size is only known as the nodes' running estimates of what is
 * left: done never decreases, the total grows when an estimate does, and the rate is measured
 * here from what was moved between samples (nodes publish at their heartbeats, so a
 * single reading says little).
 */
export class MovementProgress {
  private done = 0;
  private total = 0;
  private readonly samples: { t: number; done: number }[] = [];

  constructor(private readonly windowMs = 10_000) {}

  update(bytesLeft: number, reportedRate: number, now = Date.now()): ProgressPoint {
    if (bytesLeft > 0 || this.total > 0) {
      this.done = Math.max(this.done, this.total - bytesLeft);
      this.total = Math.max(this.total, this.done + bytesLeft);
    }
    this.samples.push({ t: now, done: this.done });
    while (this.samples.length > 2 && now - this.samples[0]!.t > this.windowMs) this.samples.shift();
    const first = this.samples[0]!;
    const measured = now > first.t ? ((this.done - first.done) * 1000) / (now - first.t) : 0;
    const rate = measured > 0 ? measured : reportedRate;
    const left = this.total - this.done;
    return { done: this.done, total: this.total, rate, etaSec: rate > 0 && this.total > 0 ? Math.ceil(left / rate) : undefined, estimated: this.total > 0 };
  }
}

export function formatEta(sec: number | undefined): string {
  if (sec === undefined) return 'unknown';
  if (sec < 60) return `${sec}s`;
  if (sec < 3600) return `${Math.floor(sec / 60)}m${String(sec % 60).padStart(2, '0')}s`;
  return `${Math.floor(sec / 3600)}h${String(Math.floor((sec % 3600) / 60)).padStart(2, '0')}m`;
}

/** One line for a ProgressPoint, as the watch prints it where there is no terminal. */
export function progressLine(p: ProgressPoint): string {
  if (!p.estimated) return 'rebalance: estimating what is left to move';
  const pct = p.total > 0 ? Math.floor((100 * p.done) / p.total) : 0;
  return `rebalance: ${pct}% ${formatSize(p.done)} of ${formatSize(p.total)} moved, ${formatSize(Math.round(p.rate))}/s, ETA ${formatEta(p.etaSec)}`;
}

/** The watch's display: a bar on a terminal, a line per change elsewhere; both on stderr. */
export function movementDisplay(tty: boolean): { show(p: ProgressPoint): void; stop(): void } {
  if (!tty) {
    let last = '';
    return {
      show(p) {
        const line = progressLine(p);
        if (line !== last) process.stderr.write(`${line}\n`);
        last = line;
      },
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar(
    { format: 'rebalance [{bar}] {text}', stream: process.stderr, hideCursor: true, fps: 5 },
    cliProgress.Presets.legacy,
  );
  bar.start(1, 0, { text: 'estimating what is left to move' });
  return {
    show(p) {
      bar.setTotal(Math.max(1, p.total));
      bar.update(p.done, { text: progressLine(p).replace(/^rebalance: /, '') });
    },
    stop() {
      bar.stop();
    },
  };
}
