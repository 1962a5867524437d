// Reply buffers (issue 15): a device that can read into the caller's memory (a volume's
// readInto) is given a buffer from the server's pool, which goes back once the socket has taken
// the reply. Released buffers are poisoned here, so a buffer handed back before its reply left
// reaches the client as garbage; and the pool must really be reused, or nothing was gained.

import assert from 'node:assert/strict';
import net from 'node:net';
import { describe, it } from 'node:test';
import { TorusError } from '../core/errors.js';
import { Cmd, Errno } from './codec.js';
import { MemoryDevice, MemoryDeviceProvider } from './memory-device.js';
import { NbdServer } from './server.js';
import { TestClient, poisonedSockets } from './testing.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const { path: socketPath, cleanups } = poisonedSockets('nbd-reply-pool-');

/** Reads into the caller's buffer, after a turn of the event loop (as a disk read would), and can fail on demand. */
class IntoDevice extends MemoryDevice {
  intoReads = 0;
  failAt: number | undefined;

  async readInto(offset: number, into: Buffer): Promise<void> {
    await new Promise((r) => setImmediate(r));
    if (this.failAt !== undefined && offset <= this.failAt && this.failAt < offset + into.length) throw new TorusError('IO', 'injected read failure');
    this.intoReads++;
    (await this.read(offset, into.length)).copy(into);
  }
}

async function serving(size = 16 * MiB): Promise<{ disk: IntoDevice; server: NbdServer; connect: (structured: boolean) => Promise<TestClient> }> {
  const disk = new IntoDevice({ size, blockSize: 64 * KiB });
  for (let off = 0; off < size; off += MiB) {
    const b = Buffer.allocUnsafe(MiB);
    for (let i = 0; i < MiB; i += 4) b.writeUInt32LE((off + i) >>> 0, i);
    await disk.write(off, b);
  }
  const path = socketPath();
  const server = new NbdServer(new MemoryDeviceProvider({ disk }), { listenUnix: path });
  await server.listen();
  cleanups.push(() => server.close());
  const connect = async (structured: boolean): Promise<TestClient> => {
    const c = new TestClient(net.connect(path));
    cleanups.push(() => void c.stream.destroy());
    await c.go('disk', { structured });
    return c;
  };
  return { disk, server, connect };
}

/** What the device holds at `offset`: each 4-byte word is its own offset. */
function expected(offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) {
    const at = offset + i;
    b[i] = (Math.floor(at / 4) * 4) >>> (8 * (at % 4));
  }
  return b;
}

describe('nbd reply buffers', () => {
  for (const structured of [false, true]) {
    it(`pipelined READs of many sizes get their own bytes from reused, poisoned buffers (${structured ? 'structured' : 'simple'} replies)`, async () => {
      const { disk, server, connect } = await serving();
      const c = await connect(structured);
      const sizes = [512, 4 * KiB, 4 * KiB + 512, 60 * KiB, 64 * KiB, 200 * KiB, MiB];
      for (let round = 0; round < 6; round++) {
        const reads = Array.from({ length: 48 }, (_, i) => {
          const length = sizes[(i + round) % sizes.length]!;
          const offset = ((i * 7919 + round * 104729) * 512) % (disk.size - length);
          return { offset, length };
        });
        const replies = await Promise.all(reads.map((r) => c.request(Cmd.READ, r)));
        replies.forEach((rep, i) => {
          assert.equal(rep.error, 0);
          assert.ok(rep.data?.equals(expected(reads[i]!.offset, reads[i]!.length)), `READ ${reads[i]!.offset}+${reads[i]!.length}, round ${round}`);
        });
      }
      assert.equal(disk.intoReads, 6 * 48, 'every READ went through readInto');
      const pool = server.replyBuffers;
      // 48 reads of up to 1 MiB in flight overflow the 8 MiB kept idle now and then; most still reuse.
      assert.ok(pool.reused > pool.allocated, `buffers reused: ${pool.reused} reuses, ${pool.allocated} allocations`);
      assert.equal(pool.outstanding, 0, 'every buffer back once its reply left');
    });
  }

  it('a failed read returns its buffer and answers EIO; a client gone with replies unsent returns them all', async () => {
    const { disk, server, connect } = await serving();
    const c = await connect(true);
    disk.failAt = 5 * MiB;
    const bad = await c.request(Cmd.READ, { offset: 5 * MiB - 100, length: 4 * KiB });
    assert.equal(bad.error, Errno.EIO);
    assert.equal(server.replyBuffers.outstanding, 0);
    disk.failAt = undefined;
    // Many large reads, then the client hangs up before reading their replies.
    const gone = await connect(false);
    const pending = Array.from({ length: 32 }, (_, i) => gone.request(Cmd.READ, { offset: i * 256 * KiB, length: 256 * KiB }).catch(() => undefined));
    await new Promise((r) => setTimeout(r, 20));
    gone.stream.destroy();
    await Promise.all(pending);
    const deadline = Date.now() + 5000;
    while (server.replyBuffers.outstanding > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(server.replyBuffers.outstanding, 0, 'the buffers of replies never sent went back too');
    // And the other connection still reads correctly from the reused buffers.
    const again = await c.request(Cmd.READ, { offset: 3 * MiB, length: 256 * KiB });
    assert.ok(again.data?.equals(expected(3 * MiB, 256 * KiB)));
  });
});
