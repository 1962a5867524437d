import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { isTorusError, type ErrorCode } from '../core/errors.js';
import type { RingModel, RingPeer } from '../core/models.js';
import {
  addPeers,
  changeReplication,
  createRing,
  effectiveReplication,
  newRingModel,
  removePeers,
  ringWarnings,
  validateRingModel,
} from './index.js';

const A = 'aaaaaaaa-0000-4000-8000-000000000001';
const B = 'bbbbbbbb-0000-4000-8000-000000000002';
const C = 'cccccccc-0000-4000-8000-000000000003';
const peer = (uuid: string, totalBlocks = 1000): RingPeer => ({ uuid, totalBlocks });

function throwsCode(fn: () => unknown, code: ErrorCode, message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(isTorusError(e, code), `expected ${code}, got ${String(e)}`);
    assert.match(e.message, message);
    assert.ok(!e.message.includes('\n'), 'one-line message');
    return true;
  });
}

const ketama = (peers: RingPeer[], replication = 2, version = 1): RingModel => ({ type: 'ketama', version, replication, peers });

describe('model validation', () => {
  const cases: [string, unknown, RegExp][] = [
    ['unknown type', { type: 'crush', version: 1, replication: 1, peers: [] }, /unknown ring type "crush" \(expected one of: empty, single, mod, ketama\)/],
    ['replication 0', ketama([peer(A)], 0), /replication must be an integer >= 1, got 0/],
    ['fractional replication', ketama([peer(A)], 1.5), /replication must be an integer >= 1, got 1.5/],
    ['replication 0 for a memberless ketama ring', ketama([], 0), /replication must be an integer >= 1/],
    ['negative replication on an empty ring', { type: 'empty', version: 1, replication: -1, peers: [] }, /integer >= 0, got -1/],
    ['duplicate uuids', ketama([peer(A), peer(B), peer(A)]), /duplicate peer uuid "aaaaaaaa-0000-4000-8000-000000000001"/],
    ['single with 0 peers', { type: 'single', version: 1, replication: 1, peers: [] }, /single ring needs exactly 1 peer, got 0/],
    ['single with 2 peers', { type: 'single', version: 1, replication: 1, peers: [peer(A), peer(B)] }, /single ring needs exactly 1 peer, got 2/],
    ['empty with peers', { type: 'empty', version: 1, replication: 1, peers: [peer(A)] }, /empty ring cannot have peers, got 1/],
    ['zero totalBlocks', ketama([peer(A, 0)]), /peer aaaaaaaa-.*: totalBlocks must be a positive integer, got 0/],
    ['negative totalBlocks', ketama([peer(A, -5)]), /totalBlocks must be a positive integer, got -5/],
    ['fractional totalBlocks', ketama([peer(A, 2.5)]), /totalBlocks must be a positive integer, got 2.5/],
    ['NaN totalBlocks', ketama([peer(A, Number.NaN)]), /got NaN/],
    ['version 0', ketama([peer(A)], 1, 0), /version must be an integer >= 1, got 0/],
    ['fractional version', ketama([peer(A)], 1, 1.5), /version must be an integer >= 1, got 1.5/],
    ['empty uuid', ketama([peer('')]), /uuid must be a non-empty string/],
    ['uuid with spaces', ketama([peer(` ${A}`)]), /leading or trailing whitespace/],
    ['peers not a list', { type: 'mod', version: 1, replication: 1, peers: 'x' }, /peers must be a list/],
  ];
  for (const [name, model, message] of cases) {
    it(`rejects ${name}`, () => {
      throwsCode(() => validateRingModel(model as RingModel), 'INVALID_ARGUMENT', message);
      throwsCode(() => createRing(model as RingModel), 'INVALID_ARGUMENT', message);
    });
  }

  it('accepts every valid shape', () => {
    for (const m of [
      { type: 'empty', version: 1, replication: 0, peers: [] },
      { type: 'empty', version: 1, replication: 2, peers: [] },
      { type: 'single', version: 3, replication: 1, peers: [peer(A)] },
      { type: 'single', version: 3, replication: 2, peers: [peer(A)] },
      { type: 'mod', version: 1, replication: 5, peers: [peer(A), peer(B)] },
      { type: 'ketama', version: 9, replication: 1, peers: [] },
      ketama([peer(A), peer(B, 1), peer(C, 2 ** 40)], 3),
    ] as RingModel[])
      assert.deepEqual(validateRingModel(m), m);
  });

  it('keeps only the ring fields of a peer and does not alias the input', () => {
    const info = { uuid: A, totalBlocks: 10, address: 'tdp://x:1', usedBlocks: 3 };
    const input = { type: 'ketama' as const, version: 1, replication: 1, peers: [info] };
    const m = validateRingModel(input);
    assert.deepEqual(m.peers, [{ uuid: A, totalBlocks: 10 }]);
    assert.equal(JSON.stringify(m), `{"type":"ketama","version":1,"replication":1,"peers":[{"uuid":"${A}","totalBlocks":10}]}`);
    assert.ok(Object.isFrozen(m) && Object.isFrozen(m.peers) && Object.isFrozen(m.peers[0]));
    input.peers.push({ ...info, uuid: B });
    assert.equal(m.peers.length, 1);
    assert.deepEqual(createRing(m).toModel(), m);
  });

  it('newRingModel validates', () => {
    assert.deepEqual(newRingModel('mod', 2, [peer(A), peer(B)], 4), { type: 'mod', version: 4, replication: 2, peers: [peer(A), peer(B)] });
    throwsCode(() => newRingModel('single', 1, [], 1), 'INVALID_ARGUMENT', /exactly 1 peer/);
  });
});

describe('addPeers', () => {
  it('appends new peers, bumps the version and refreshes weights of known ones', () => {
    const next = addPeers(ketama([peer(A, 10), peer(B, 20)], 2, 7), [peer(C, 30), peer(A, 11)]);
    assert.deepEqual(next, ketama([peer(A, 11), peer(B, 20), peer(C, 30)], 2, 8));
  });

  it('works from a memberless ketama or mod ring', () => {
    assert.deepEqual(addPeers(ketama([], 2, 1), [peer(B), peer(A)]).peers, [peer(B), peer(A)]);
    assert.deepEqual(addPeers({ type: 'mod', version: 1, replication: 1, peers: [peer(A)] }, [peer(B)]).version, 2);
  });

  it('fails with EXISTS when nothing is new', () => {
    throwsCode(() => addPeers(ketama([peer(A), peer(B)]), [peer(A, 99)]), 'EXISTS', /aaaaaaaa-.* already in the ring/);
    throwsCode(() => addPeers(ketama([peer(A)]), []), 'EXISTS', /no peers given/);
  });

  it('refuses empty and single rings, pointing at manual-change', () => {
    throwsCode(() => addPeers({ type: 'empty', version: 1, replication: 2, peers: [] }, [peer(A)]), 'INVALID_ARGUMENT', /empty ring.*torusctl ring manual-change/);
    throwsCode(() => addPeers({ type: 'single', version: 1, replication: 1, peers: [peer(A)] }, [peer(B)]), 'INVALID_ARGUMENT', /single ring.*ring manual-change/);
  });

  it('rejects a peer listed twice and invalid weights', () => {
    throwsCode(() => addPeers(ketama([peer(A)]), [peer(B), peer(B)]), 'INVALID_ARGUMENT', /listed twice/);
    throwsCode(() => addPeers(ketama([peer(A)]), [peer(B, 0)]), 'INVALID_ARGUMENT', /totalBlocks must be a positive integer/);
  });
});

describe('removePeers', () => {
  it('drops the listed members and bumps the version', () => {
    assert.deepEqual(removePeers(ketama([peer(A), peer(B), peer(C)], 2, 3), [B, 'not-a-member']), ketama([peer(A), peer(C)], 2, 4));
  });

  it('fails with NOT_EXIST when none is a member', () => {
    throwsCode(() => removePeers(ketama([peer(A), peer(B)]), [C]), 'NOT_EXIST', /none of cccccccc-.* is in the ring/);
    throwsCode(() => removePeers(ketama([peer(A), peer(B)]), []), 'NOT_EXIST', /no peers given/);
  });

  it('refuses to remove every member, and refuses empty and single rings', () => {
    throwsCode(() => removePeers(ketama([peer(A), peer(B)]), [A, B]), 'INVALID_ARGUMENT', /every member/);
    throwsCode(() => removePeers({ type: 'single', version: 1, replication: 1, peers: [peer(A)] }, [A]), 'INVALID_ARGUMENT', /manual-change/);
  });

  it('undoes addPeers', () => {
    const uuid = fc.uuid();
    fc.assert(
      fc.property(
        fc.uniqueArray(uuid, { minLength: 2, maxLength: 12 }),
        fc.integer({ min: 1, max: 11 }),
        fc.integer({ min: 1, max: 5 }),
        (uuids, split, rep) => {
          fc.pre(split < uuids.length);
          const base = ketama(uuids.slice(0, split).map((u) => peer(u)), rep, 5);
          const added = addPeers(base, uuids.slice(split).map((u) => peer(u)));
          assert.equal(added.version, 6);
          assert.deepEqual(added.peers.map((p) => p.uuid), uuids);
          const back = removePeers(added, uuids.slice(split));
          assert.deepEqual(back, { ...base, version: 7 });
        },
      ),
    );
  });
});

describe('changeReplication', () => {
  it('sets replication and bumps the version, for any ring type', () => {
    assert.deepEqual(changeReplication(ketama([peer(A)], 2, 4), 3), ketama([peer(A)], 3, 5));
    assert.equal(changeReplication({ type: 'empty', version: 1, replication: 0, peers: [] }, 2).replication, 2);
  });

  it('requires an integer >= 1', () => {
    for (const n of [0, -1, 1.5, Number.NaN]) throwsCode(() => changeReplication(ketama([peer(A)]), n), 'INVALID_ARGUMENT', /replication must be an integer >= 1/);
  });
});

describe('effectiveReplication and warnings', () => {
  it('caps replication at the member count', () => {
    assert.equal(effectiveReplication(ketama([peer(A), peer(B)], 3)), 2);
    assert.equal(effectiveReplication(ketama([peer(A), peer(B), peer(C)], 2)), 2);
    assert.equal(effectiveReplication({ type: 'empty', version: 1, replication: 2, peers: [] }), 0);
  });

  it('warns about degraded replication in the documented words', () => {
    assert.deepEqual(ringWarnings(ketama([peer(A), peer(B)], 3)), [
      'replication 3 exceeds the 2 member(s): only 2 copies of each block will be kept (degraded)',
    ]);
    assert.deepEqual(ringWarnings(ketama([peer(A), peer(B)], 2)), []);
    assert.deepEqual(ringWarnings({ type: 'single', version: 1, replication: 2, peers: [peer(A)] }), [
      'replication 2 exceeds the 1 member(s): only 1 copies of each block will be kept (degraded)',
    ]);
  });

  it('warns about rings with no members', () => {
    assert.match(ringWarnings({ type: 'empty', version: 1, replication: 2, peers: [] }).join(), /the ring is empty/);
    assert.match(ringWarnings(ketama([], 2)).join(), /ketama ring has no members/);
  });

  it('warns when a peer outweighs 1/replication of the ring', () => {
    const w = ringWarnings(ketama([peer(A, 600), peer(B, 200), peer(C, 200)], 2));
    assert.equal(w.length, 1);
    assert.match(w[0] ?? '', /peer aaaaaaaa-.* has 60.0% of the ring's weight .* replication 2/);
    assert.deepEqual(ringWarnings(ketama([peer(A, 600), peer(B, 200), peer(C, 200)], 1)), []);
    assert.deepEqual(ringWarnings(ketama([peer(A, 500), peer(B, 250), peer(C, 250)], 2)), []);
  });
});
