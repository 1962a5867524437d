import type { MetadataService } from '../core/interfaces.js';
import type { RingModel } from '../core/models.js';
import { formatAgo, formatSize } from '../core/units.js';
import type { VolumeBlockStore } from '../volume/inode.js';
import { VolumeMeta } from '../volume/meta.js';
import { TreeReader, allocatedBytes } from '../volume/usage.js';
import { NEARLY_FULL, peerStatuses, type PeerStatus } from './cluster.js';
import { judgeHealth, type Health } from './health.js';

// What torusd's web dashboard shows, read from etcd like `torusctl` reads it (the same judgements:
// peerStatuses, judgeHealth), plus the events this node saw while it watched: peers going down and
// coming back, maintenance windows, ring changes, volumes created and deleted, health changes.
// Sizes come with their human form so the page formats nothing itself.

export interface DashboardEvent {
  readonly at: string;
  readonly kind: 'peer' | 'ring' | 'volume' | 'health' | 'maintenance';
  readonly text: string;
}

export interface DashboardView {
  readonly generatedAt: string;
  readonly node: { readonly uuid: string; readonly address: string };
  readonly health: Health;
  readonly ring: { readonly version: number; readonly type: string; readonly replication: number; readonly members: number; readonly balanced: boolean };
  readonly capacity: { readonly total: number; readonly used: number; readonly totalText: string; readonly usedText: string; readonly usedPercent: number };
  readonly peers: readonly {
    uuid: string;
    address: string;
    member: string;
    maintenanceUntil: string | null;
    size: number | null;
    used: number | null;
    sizeText: string;
    usedText: string;
    usedPercent: number | null;
    nearlyFull: boolean;
    updated: string;
    rebalancing: boolean;
  }[];
  readonly volumes: readonly { name: string; size: number; sizeText: string; allocated: number | null; allocatedText: string; status: string; holder: string; snapshots: number }[];
  readonly rebalance: { readonly active: boolean; readonly bytesLeft: number; readonly bytesLeftText: string; readonly rateText: string; readonly etaText: string; readonly waiting: readonly string[] };
  readonly events: readonly DashboardEvent[];
}

const MAX_EVENTS = 100;
/** Allocation walks every volume's inode pages: done at most this often, and only for someone looking. */
const ALLOCATION_EVERY_MS = 30_000;

function eta(bytes: number, rate: number): string {
  if (bytes <= 0) return '-';
  if (rate <= 0) return 'unknown';
  const s = Math.ceil(bytes / rate);
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export class Dashboard {
  private readonly events: DashboardEvent[] = [];
  private last: { ring?: RingModel; members: Map<string, string>; maint: Set<string>; volumes: Set<string>; health?: string } = { members: new Map(), maint: new Set(), volumes: new Set() };
  private allocation = new Map<string, number | null>();
  private allocationAt = 0;
  private allocating: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly vm: VolumeMeta;

  constructor(
    private readonly meta: MetadataService,
    private readonly self: { uuid: string; address: string },
    private readonly store: () => VolumeBlockStore | undefined,
    private readonly onError: (err: Error) => void = () => {},
  ) {
    this.vm = new VolumeMeta(meta.kv());
  }

  /** Watches for events every `everyMs` (a stopped node sees none, and says since when it watches). */
  start(everyMs = 5000): void {
    this.record('health', `dashboard started on ${this.self.address || this.self.uuid}; events from now on`);
    const tick = (): void => {
      this.timer = setTimeout(() => {
        void this.watch()
          .catch((err: unknown) => this.onError(err as Error))
          .finally(() => {
            if (this.timer) tick();
          });
      }, everyMs);
      this.timer.unref();
    };
    tick();
  }

  stop(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** What the tick has recorded, newest first. */
  recentEvents(): readonly DashboardEvent[] {
    return [...this.events];
  }

  private record(kind: DashboardEvent['kind'], text: string): void {
    this.events.unshift({ at: new Date().toISOString(), kind, text });
    if (this.events.length > MAX_EVENTS) this.events.length = MAX_EVENTS;
  }

  private diff(ring: RingModel, peers: readonly PeerStatus[], volumes: readonly string[], health: Health): void {
    const first = !this.last.ring;
    const name = (p: PeerStatus): string => p.address || p.uuid;
    if (!first) {
      if (ring.version !== this.last.ring!.version)
        this.record('ring', `ring v${ring.version}: ${ring.peers.length} member(s), replication ${ring.replication} (was v${this.last.ring!.version}: ${this.last.ring!.peers.length}, ${this.last.ring!.replication})`);
      for (const p of peers) {
        const was = this.last.members.get(p.uuid);
        if (was === undefined) this.record('peer', `${name(p)} appeared (${p.member})`);
        else if (was !== p.member) this.record('peer', `${name(p)}: ${was} -> ${p.member}`);
        if (p.maintenance && !this.last.maint.has(p.uuid)) this.record('maintenance', `${name(p)}: maintenance until ${p.maintenance.until}${p.maintenance.reason ? ` (${p.maintenance.reason})` : ''}`);
      }
      for (const u of this.last.maint) if (!peers.some((p) => p.uuid === u && p.maintenance)) this.record('maintenance', `${u}: maintenance ended`);
      for (const v of volumes) if (!this.last.volumes.has(v)) this.record('volume', `volume ${v} created`);
      for (const v of this.last.volumes) if (!volumes.includes(v)) this.record('volume', `volume ${v} deleted`);
      if (health.status !== this.last.health) this.record('health', `cluster ${health.status}${health.problems[0] ? `: ${health.problems[0]}` : ''}`);
    }
    this.last = {
      ring,
      members: new Map(peers.map((p) => [p.uuid, p.member])),
      maint: new Set(peers.filter((p) => p.maintenance).map((p) => p.uuid)),
      volumes: new Set(volumes),
      health: health.status,
    };
  }

  private refreshAllocation(vols: Awaited<ReturnType<VolumeMeta['list']>>): void {
    const store = this.store();
    if (!store || this.allocating || Date.now() - this.allocationAt < ALLOCATION_EVERY_MS) return;
    this.allocating = (async () => {
      const reader = new TreeReader(store);
      const next = new Map<string, number | null>();
      for (const v of vols) next.set(v.record.name, await allocatedBytes(reader, v.head).catch(() => null));
      this.allocation = next;
      this.allocationAt = Date.now();
    })()
      .catch((err: unknown) => this.onError(err as Error))
      .finally(() => (this.allocating = undefined));
  }

  /**
   * What the background tick does: read the cluster and record what changed. Not the allocation
   * walk, which reads every volume's tree: run every 30 s on every node whether anyone looked or
   * not, it was a steady load on an idle cluster.
   */
  private async watch(): Promise<void> {
    const [{ ring, peers }, vols] = await Promise.all([peerStatuses(this.meta), this.vm.list()]);
    this.diff(ring, peers, vols.map((v) => v.record.name), judgeHealth(ring, peers));
  }

  async view(): Promise<DashboardView> {
    const [g, { ring, peers }, vols] = await Promise.all([this.meta.globalMetadata(), peerStatuses(this.meta), this.vm.list()]);
    const health = judgeHealth(ring, peers);
    this.diff(ring, peers, vols.map((v) => v.record.name), health);
    this.refreshAllocation(vols);
    const now = Date.now();
    let total = 0;
    let used = 0;
    const peerRows = peers.map((p) => {
      const src = p.info ?? p.known;
      const bs = src?.blockSize || g.blockSize;
      const size = src ? src.totalBlocks * bs : null;
      const u = src ? src.usedBlocks * bs : null;
      if (p.info && p.member !== 'DOWN' && p.member !== 'MAINT') {
        total += size ?? 0;
        used += u ?? 0;
      }
      const down = p.member === 'DOWN' || p.member === 'MAINT';
      return {
        uuid: p.uuid,
        address: p.address,
        member: p.member,
        maintenanceUntil: p.maintenance?.until ?? null,
        size,
        used: u,
        sizeText: size !== null ? formatSize(size) : '?',
        usedText: u !== null ? formatSize(u) : '?',
        usedPercent: size ? Math.round((1000 * (u ?? 0)) / size) / 10 : null,
        nearlyFull: size !== null && u !== null && size > 0 && u >= NEARLY_FULL * size,
        updated: src ? (down ? `last seen ${formatAgo(now - src.lastSeen)}` : formatAgo(now - src.lastSeen)) : 'never seen',
        rebalancing: !down && (p.info?.rebalance.rebalancing ?? false),
      };
    });
    return {
      generatedAt: new Date(now).toISOString(),
      node: this.self,
      health,
      ring: { version: ring.version, type: ring.type, replication: ring.replication, members: ring.peers.length, balanced: !health.rebalancing && health.downPeers.length === 0 && health.maintenancePeers.length === 0 },
      capacity: { total, used, totalText: formatSize(total), usedText: formatSize(used), usedPercent: total > 0 ? Math.round((1000 * used) / total) / 10 : 0 },
      peers: peerRows,
      volumes: vols.map((v) => {
        const a = this.allocation.get(v.record.name);
        return {
          name: v.record.name,
          size: v.head.size,
          sizeText: formatSize(v.head.size),
          allocated: a ?? null,
          allocatedText: a === undefined ? 'counting...' : a === null ? '?' : formatSize(a),
          status: v.lock ? 'in use' : 'free',
          holder: v.lock ? `${v.lock.host} pid ${v.lock.pid}` : '',
          snapshots: v.snapshots,
        };
      }),
      rebalance: {
        active: health.rebalancing,
        bytesLeft: health.bytesLeft,
        bytesLeftText: formatSize(health.bytesLeft),
        rateText: `${formatSize(Math.round(health.rate))}/s`,
        etaText: eta(health.bytesLeft, health.rate),
        waiting: health.waitingPeers,
      },
      events: this.recentEvents(),
    };
  }
}
