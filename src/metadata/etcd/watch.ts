import { TorusError, toTorusError } from '../../core/errors.js';
import type { EtcdEndpoints, Member } from './endpoints.js';

// Follows one key across member failures and compactions. It reads the key, then watches from the
// revision after the read. When the member goes away, the watch moves to another member and
// resumes after the last change it delivered. When etcd cancels the watch (the revision to resume
// from has been compacted, or the member lost its state), it reads the key again and watches
// from there. Nothing is missed; a value may be delivered twice, so consumers ignore repeats.

const PAUSE_MIN_MS = 100;
const PAUSE_MAX_MS = 5000;

/** Why a watch ended: we stopped it, its member went away, or etcd cancelled it. */
type End = 'stopped' | 'member' | 'canceled';

export function followKey(ep: EtcdEndpoints, key: string, what: string, onValue: (value: string) => void, onError: (err: TorusError) => void): () => void {
  let stopped = false;
  let stop: (() => void) | undefined;
  /** The revision to watch from; undefined: read the key first. */
  let from: bigint | undefined;
  let wake: (() => void) | undefined;
  const pauseFor = (ms: number): Promise<void> =>
    new Promise((r) => {
      const t = setTimeout(r, ms);
      wake = () => {
        clearTimeout(t);
        r();
      };
    });

  const watchOn = (m: Member, start: bigint): Promise<End> =>
    new Promise((resolve) => {
      const w = m.client.watch().key(key).startRevision(start.toString()).watcher();
      let done = false;
      let connected = false;
      const end = (e: End): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        stop = undefined;
        // A watcher etcd cancelled is gone already; any other is detached (at once when the
        // stream is down, else by a cancel request). Its listeners stay, ignoring what follows:
        // an 'error' event without a listener would bring the process down.
        if (e !== 'canceled') void w.cancel().catch(() => undefined);
        resolve(e);
      };
      // A member that takes the stream but never confirms the watch is as good as gone.
      const timer = setTimeout(() => end('member'), ep.timeoutMs);
      stop = () => end('stopped');
      w.on('connected', () => {
        if (done || connected) return;
        connected = true;
        clearTimeout(timer);
        ep.succeeded(m);
      });
      w.on('put', (kv) => {
        if (done) return;
        from = BigInt(kv.mod_revision) + 1n;
        onValue(kv.value.toString());
      });
      w.on('disconnected', () => end('member'));
      w.on('error', () => end('canceled'));
    });

  void (async () => {
    let pause = PAUSE_MIN_MS;
    while (!stopped) {
      try {
        if (from === undefined) {
          const res = await ep.call(`read ${what}`, 'idempotent', (c, o) => c.kv.range({ key: Buffer.from(key) }, o));
          if (stopped) return;
          const kv = res.kvs[0];
          if (kv) onValue(kv.value.toString());
          from = BigInt(res.header.revision) + 1n;
        }
        const m = ep.preferred();
        const began = Date.now();
        const e = await watchOn(m, from);
        if (e === 'stopped') return;
        if (e === 'canceled') from = undefined;
        else ep.failed(m, 'the watch stream broke');
        // A watch that held for a while starts the next one at once; one failing fast backs off.
        if (Date.now() - began > PAUSE_MAX_MS) pause = PAUSE_MIN_MS;
        else {
          await pauseFor(pause);
          pause = Math.min(PAUSE_MAX_MS, pause * 2);
        }
      } catch (err) {
        if (stopped) return;
        onError(toTorusError(err, 'ETCD_UNAVAILABLE'));
        await pauseFor(pause);
        pause = Math.min(PAUSE_MAX_MS, pause * 2);
      }
    }
  })();

  const end = (): void => {
    stopped = true;
    stop?.();
    wake?.();
  };
  const unregister = ep.onClose(end);
  return () => {
    end();
    unregister();
  };
}
