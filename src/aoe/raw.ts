// PacketConn on a raw AF_PACKET socket (native/aoe_socket.c), bound to one interface and the AoE
// EtherType, polled by libuv on the main thread. Needs root or CAP_NET_RAW.
//
// The addon is built by node-gyp into <repo>/build/Release/aoe_socket.node (src/core/native.ts
// finds it).

import { TorusError } from '../core/errors.js';
import { loadNativeAddon, nativeAddonPath } from '../core/native.js';
import type { PacketConn, PacketConnStats } from './conn.js';

interface NativeHandle {
  readonly name: string;
  readonly mac: Buffer;
  readonly mtu: number;
  readonly ifindex: number;
  send(frame: Uint8Array): boolean;
  stats(): PacketConnStats;
  close(): void;
}

interface NativeAddon {
  open(ifname: string, onFrames: (frames: Buffer[], err?: Error) => void): NativeHandle;
}

const ADDON_NAME = 'aoe_socket';

export { packageRoot } from '../core/native.js';

/** Where the addon is expected, whether or not it is built. */
export function addonPath(): string | undefined {
  return nativeAddonPath(ADDON_NAME);
}

let cached: NativeAddon | undefined;

function loadAddon(): NativeAddon {
  cached ??= loadNativeAddon<NativeAddon>(ADDON_NAME);
  if (!cached)
    throw new TorusError(
      'INTERNAL',
      `the AoE raw socket addon is not built (expected ${addonPath() ?? 'build/Release/aoe_socket.node'}); build it with node-gyp rebuild (see docs/protocols/aoe.md)`,
    );
  return cached;
}

/** True when the addon is built and loadable (tests skip otherwise). */
export function rawSocketAvailable(): boolean {
  try {
    loadAddon();
    return true;
  } catch {
    return false;
  }
}

/** The one place the addon's errno-style errors become TorusErrors. */
function fromNative(err: unknown, ifname: string): TorusError {
  if (err instanceof TorusError) return err;
  const e = err as { code?: unknown; message?: unknown };
  const message = `AoE: ${typeof e.message === 'string' ? e.message : String(err)}`;
  switch (e.code) {
    // Missing privileges and missing interfaces can never succeed as given: fix the invocation.
    case 'EPERM':
    case 'EACCES':
    case 'ENODEV':
    case 'ENXIO':
    case 'EINVAL':
      return new TorusError('INVALID_ARGUMENT', message, { cause: err });
    case 'ERR_SOCKET_CLOSED':
      return new TorusError('CLOSED', message, { cause: err });
    default:
      return new TorusError('IO', `${message} (${ifname})`, { cause: err });
  }
}

export class RawPacketConn implements PacketConn {
  readonly mac: Buffer;
  readonly mtu: number;
  readonly name: string;
  readonly ifindex: number;
  private receiver: ((frames: Buffer[], err?: Error) => void) | undefined;
  private pending: Buffer[] = [];
  private readonly handle: NativeHandle;
  private closed = false;

  private constructor(ifname: string) {
    const addon = loadAddon();
    try {
      this.handle = addon.open(ifname, (frames, err) => this.dispatch(frames, err));
    } catch (err) {
      throw fromNative(err, ifname);
    }
    this.mac = Buffer.from(this.handle.mac);
    this.mtu = this.handle.mtu;
    this.name = this.handle.name;
    this.ifindex = this.handle.ifindex;
  }

  /** Opens a raw AoE socket on `ifname`. INVALID_ARGUMENT without CAP_NET_RAW or for an unknown interface. */
  static open(ifname: string): RawPacketConn {
    return new RawPacketConn(ifname);
  }

  send(frame: Uint8Array): boolean {
    try {
      return this.handle.send(frame);
    } catch (err) {
      throw fromNative(err, this.name);
    }
  }

  onFrames(receiver: (frames: Buffer[], err?: Error) => void): void {
    this.receiver = receiver;
    if (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      receiver(batch);
    }
  }

  stats(): PacketConnStats {
    return this.handle.stats();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.receiver = undefined;
    this.pending = [];
    this.handle.close();
  }

  private dispatch(frames: Buffer[], err?: Error): void {
    if (this.closed) return;
    const wrapped = err ? fromNative(err, this.name) : undefined;
    if (this.receiver) {
      this.receiver(frames, wrapped);
      return;
    }
    // Frames that arrive between open and onFrames are kept (bounded) rather than lost.
    if (this.pending.length < 1024) this.pending.push(...frames.slice(0, 1024 - this.pending.length));
  }
}
