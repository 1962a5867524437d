import type { ChildProcess } from 'node:child_process';

// The caller's side of workload.ts: collects its JSON lines as events and waits on them.

export interface SyncEvent {
  ev: 'sync';
  n: number;
  t: number;
  ms: number;
  writeMs: number;
  ok: boolean;
  phase?: 'write' | 'flush';
  code?: string;
  msg?: string;
  spills?: number;
  fallbacks?: number;
  journalMoves?: number;
}

export interface ReadEvent {
  ev: 'read';
  t: number;
  ms: number;
  ok: boolean;
  code?: string;
  msg?: string;
  mismatch?: boolean;
}

export interface ClosedEvent {
  ev: 'closed';
  t: number;
  rounds: number;
  synced: string;
  inflight: string | null;
  model: string;
  finalSyncOk: boolean;
  verified: boolean;
  spills: number;
  fallbacks: number;
  journalMoves: number;
  finalError?: { code: string; msg: string };
  verifyError?: { code: string; msg: string };
}

export type WorkloadEvent = SyncEvent | ReadEvent | ClosedEvent | { ev: 'opened' | 'filled'; t: number; ms?: number };

export class WorkloadProc {
  readonly events: WorkloadEvent[] = [];
  private out = '';
  private err = '';
  private readonly listeners = new Set<() => void>();
  readonly exited: Promise<number | null>;
  /** Set once the process exited and its output was read to the end. */
  private done = false;

  constructor(readonly proc: ChildProcess) {
    proc.stdout!.on('data', (d: Buffer) => {
      this.out += d.toString();
      let nl: number;
      while ((nl = this.out.indexOf('\n')) >= 0) {
        const line = this.out.slice(0, nl);
        this.out = this.out.slice(nl + 1);
        try {
          this.events.push(JSON.parse(line) as WorkloadEvent);
        } catch {
          this.err += `(unparsed) ${line}\n`;
        }
      }
      for (const l of this.listeners) l();
    });
    proc.stderr!.on('data', (d: Buffer) => {
      this.err = (this.err + d.toString()).slice(-20_000);
    });
    // 'close', not 'exit': only then has every line it printed been read.
    this.exited = new Promise((r) =>
      proc.once('close', (code) => {
        this.done = true;
        for (const l of this.listeners) l();
        r(code);
      }),
    );
  }

  get stderr(): string {
    return this.err;
  }

  get syncs(): SyncEvent[] {
    return this.events.filter((e): e is SyncEvent => e.ev === 'sync');
  }

  get reads(): ReadEvent[] {
    return this.events.filter((e): e is ReadEvent => e.ev === 'read');
  }

  /** Failed syncs and reads, and reads that returned other bytes than the model's. */
  get errors(): (SyncEvent | ReadEvent)[] {
    return [...this.syncs, ...this.reads].filter((e) => !e.ok);
  }

  /** Resolves with the first event (in order) matching `pred`; rejects after `timeoutMs` or on exit. */
  until<T extends WorkloadEvent>(pred: (e: WorkloadEvent, all: readonly WorkloadEvent[]) => e is T, what: string, timeoutMs: number): Promise<T>;
  until(pred: (e: WorkloadEvent, all: readonly WorkloadEvent[]) => boolean, what: string, timeoutMs: number): Promise<WorkloadEvent>;
  until(pred: (e: WorkloadEvent, all: readonly WorkloadEvent[]) => boolean, what: string, timeoutMs: number): Promise<WorkloadEvent> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const hit = this.events.find((e) => pred(e, this.events));
        if (hit) return done(undefined, hit);
        if (this.done) done(new Error(`workload exited (${this.proc.exitCode ?? this.proc.signalCode}) while waiting for ${what}:\n${this.err}`));
      };
      const timer = setTimeout(() => done(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last events:\n${this.tail()}\n${this.err}`)), timeoutMs);
      const done = (err: Error | undefined, e?: WorkloadEvent): void => {
        clearTimeout(timer);
        this.listeners.delete(check);
        if (err) reject(err);
        else resolve(e!);
      };
      this.listeners.add(check);
      check();
    });
  }

  /** Waits for `count` more successful syncs that started at or after `since`. */
  async syncedSince(since: number, count: number, what: string, timeoutMs: number): Promise<void> {
    await this.until((_e, all) => all.filter((x) => x.ev === 'sync' && x.ok && x.t >= since).length >= count, what, timeoutMs);
  }

  tail(n = 8): string {
    return this.events.slice(-n).map((e) => JSON.stringify(e)).join('\n');
  }

  /** SIGTERM: the workload tries a last sync, verifies, closes, and reports. */
  async stop(timeoutMs = 45_000): Promise<ClosedEvent> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGTERM');
    const closed = (await this.until((e) => e.ev === 'closed', 'the workload to close', timeoutMs).catch((err: unknown) => {
      this.proc.kill('SIGKILL');
      throw err;
    })) as ClosedEvent;
    await this.exited;
    return closed;
  }

  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}
