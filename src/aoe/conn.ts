// The transport an AoE target or initiator is given (STYLE habit 8): whole Ethernet frames in and
// out of one interface. raw.ts implements it on an AF_PACKET socket; MemoryEthernet below is the
// in-memory twin for tests, a switch that needs neither root nor a network.

import { TorusError } from '../core/errors.js';
import { isGroupMac } from './frame.js';

export interface PacketConnStats {
  /** Frames the kernel received for the socket since the last call. */
  readonly packets: number;
  /** Frames the kernel dropped because the socket's receive buffer was full, since the last call. */
  readonly drops: number;
}

export interface PacketConn {
  /** This end's MAC address (6 bytes). */
  readonly mac: Buffer;
  /** The interface MTU: the largest Ethernet payload, excluding the 14-byte header. */
  readonly mtu: number;
  readonly name: string;
  /**
   * Sends one whole Ethernet frame (header included). False when it was dropped because a queue
   * was full; AoE is datagram-based and initiators retransmit, so callers count and move on.
   */
  send(frame: Uint8Array): boolean;
  /**
   * Registers the one receiver. Frames arrive in batches, each a Buffer its receiver owns (it may
   * keep views into it). `err` reports a receive error; frames may still follow.
   */
  onFrames(receiver: (frames: Buffer[], err?: Error) => void): void;
  stats(): PacketConnStats;
  close(): void;
}

/**
 * An in-memory Ethernet segment: a learning-free switch that delivers unicast frames to the port
 * with that MAC and group-addressed frames to every other port. Delivery is asynchronous and
 * batched per macrotask, like a socket's poll wakeup. `dropIf` lets a test lose frames.
 */
export class MemoryEthernet {
  private readonly ports = new Set<MemoryPort>();
  /** Every frame sent on the segment, in order (for assertions). */
  readonly sent: Buffer[] = [];
  dropIf: ((frame: Buffer) => boolean) | undefined;
  recordFrames = true;

  constructor(readonly mtu = 1500) {}

  /** A port with this 6-byte MAC, and optionally an MTU of its own (a jumbo host on a 1500 segment). */
  attach(mac: Uint8Array, name = `mem${this.ports.size}`, mtu = this.mtu): MemoryPort {
    if (mac.length !== 6) throw new TorusError('INVALID_ARGUMENT', 'a MAC address is 6 bytes');
    const port = new MemoryPort(this, Buffer.from(mac), mtu, name);
    this.ports.add(port);
    return port;
  }

  /** @internal */
  deliver(from: MemoryPort, frame: Buffer): void {
    if (this.recordFrames) this.sent.push(frame);
    if (this.dropIf?.(frame)) return;
    const dst = frame.subarray(0, 6);
    for (const p of this.ports) {
      if (p === from || p.closed) continue;
      if (isGroupMac(dst) || p.mac.equals(dst)) p.enqueue(Buffer.from(frame));
    }
  }

  /** @internal */
  detach(port: MemoryPort): void {
    this.ports.delete(port);
  }
}

export class MemoryPort implements PacketConn {
  closed = false;
  private receiver: ((frames: Buffer[], err?: Error) => void) | undefined;
  private queue: Buffer[] = [];
  private scheduled = false;
  private received = 0;

  constructor(
    private readonly segment: MemoryEthernet,
    readonly mac: Buffer,
    readonly mtu: number,
    readonly name: string,
  ) {}

  send(frame: Uint8Array): boolean {
    if (this.closed) throw new TorusError('CLOSED', `${this.name} is closed`);
    if (frame.length < 14 || frame.length > this.mtu + 14)
      throw new TorusError('INVALID_ARGUMENT', `a ${frame.length}-byte frame does not fit ${this.name}'s MTU ${this.mtu}`);
    this.segment.deliver(this, Buffer.from(frame));
    return true;
  }

  onFrames(receiver: (frames: Buffer[], err?: Error) => void): void {
    this.receiver = receiver;
    this.flushSoon();
  }

  stats(): PacketConnStats {
    const packets = this.received;
    this.received = 0;
    return { packets, drops: 0 };
  }

  close(): void {
    this.closed = true;
    this.receiver = undefined;
    this.queue = [];
    this.segment.detach(this);
  }

  /** @internal */
  enqueue(frame: Buffer): void {
    // A frame bigger than this port's MTU would not be received by a real NIC either.
    if (frame.length > this.mtu + 14) return;
    this.queue.push(frame);
    this.received++;
    this.flushSoon();
  }

  private flushSoon(): void {
    if (this.scheduled || this.queue.length === 0 || !this.receiver) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      const batch = this.queue;
      this.queue = [];
      if (batch.length > 0 && this.receiver && !this.closed) this.receiver(batch);
    });
  }
}

/** Two ports on a fresh segment: the usual target/initiator pair for unit tests. */
export function memoryPacketPair(
  opts: { mtu?: number; macA?: Uint8Array; macB?: Uint8Array } = {},
): { segment: MemoryEthernet; a: MemoryPort; b: MemoryPort } {
  const segment = new MemoryEthernet(opts.mtu ?? 1500);
  const a = segment.attach(opts.macA ?? Buffer.from([0x02, 0, 0, 0, 0, 0x0a]), 'memA');
  const b = segment.attach(opts.macB ?? Buffer.from([0x02, 0, 0, 0, 0, 0x0b]), 'memB');
  return { segment, a, b };
}
