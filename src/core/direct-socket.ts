import net from 'node:net';

// Node lets only a socket made from a handle choose where each of its reads lands (`onread`), and
// net.Server makes its sockets itself. So a server that wants the kernel to write straight into
// its own buffers moves each accepted socket's handle to a socket made with `onread`. The
// accepted socket stays open without a handle until the new one closes, so the listener's
// connection count (maxConnections, close()) still includes it.

export interface DirectReads {
  /** Where the next read lands; asked for the first time while the socket is being made. */
  buffer(): Buffer;
  /** A read of `n` bytes landed in `buf`; false pauses reading. */
  callback(n: number, buf: Buffer): boolean;
}

/**
 * A socket reading `accepted`'s connection with `onread`, or undefined (and `accepted` left as
 * it is) where the handle cannot move: a Node without these internals.
 */
export function directSocket(accepted: net.Socket, reads: DirectReads): net.Socket | undefined {
  const internal = accepted as net.Socket & { _handle?: { readStart?: unknown; useUserBuffer?: unknown } | null };
  const h = internal._handle;
  if (!h || typeof h.readStart !== 'function' || typeof h.useUserBuffer !== 'function') return undefined;
  internal._handle = null;
  const own = new net.Socket({
    handle: h,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: { buffer: () => reads.buffer(), callback: (n: number, buf: Uint8Array) => reads.callback(n, buf as Buffer) },
  } as net.SocketConstructorOpts);
  own.once('close', () => accepted.destroy());
  return own;
}
