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
