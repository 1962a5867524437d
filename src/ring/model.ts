import { TorusError } from '../core/errors.js';
import { RING_TYPES, type RingModel, type RingPeer, type RingType } from '../core/models.js';

// Ring models are what etcd stores; every change goes through these functions so that a stored
// model is always one createRing accepts. Each change bumps the version by exactly one because
// MetadataService.setRing only accepts version + 1 (that is how concurrent edits are caught).

function invalid(message: string): TorusError {
  return new TorusError('INVALID_ARGUMENT', message);
}

function isPositiveInteger(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 1;
}

function describeValue(v: unknown): string {
  return typeof v === 'string' ? `"${v}"` : String(v);
}

/**
 * Checks a model and returns a frozen copy holding only the known fields (a PeerInfo passed
 * as a RingPeer must not drag its address and counters into etcd). INVALID_ARGUMENT, with a
 * one-line reason, when the model can never make a valid ring.
 */
export function validateRingModel(model: RingModel): RingModel {
  if (typeof model !== 'object' || model === null) throw invalid('ring model must be an object');
  const type: unknown = model.type;
  if (typeof type !== 'string' || !(RING_TYPES as readonly string[]).includes(type))
    throw invalid(`unknown ring type ${describeValue(type)} (expected one of: ${RING_TYPES.join(', ')})`);
  if (!isPositiveInteger(model.version)) throw invalid(`ring version must be an integer >= 1, got ${describeValue(model.version)}`);
  if (!Array.isArray(model.peers)) throw invalid('ring peers must be a list');

  const replication: unknown = model.replication;
  if (type === 'empty') {
    // An empty ring stores nothing, but it keeps the replication asked for at init so that
    // the first real ring can inherit it.
    if (typeof replication !== 'number' || !Number.isSafeInteger(replication) || replication < 0)
      throw invalid(`ring replication must be an integer >= 0, got ${describeValue(replication)}`);
  } else if (!isPositiveInteger(replication)) {
    throw invalid(`ring replication must be an integer >= 1, got ${describeValue(replication)}`);
  }

  const seen = new Set<string>();
  const peers: RingPeer[] = [];
  for (const p of model.peers as readonly unknown[]) {
    if (typeof p !== 'object' || p === null) throw invalid('ring peer must be an object with uuid and totalBlocks');
    const { uuid, totalBlocks } = p as Record<string, unknown>;
    if (typeof uuid !== 'string' || uuid.length === 0) throw invalid(`ring peer uuid must be a non-empty string, got ${describeValue(uuid)}`);
    if (uuid.trim() !== uuid) throw invalid(`ring peer uuid "${uuid}" has leading or trailing whitespace`);
    if (seen.has(uuid)) throw invalid(`duplicate peer uuid "${uuid}" in the ring`);
    seen.add(uuid);
    if (!isPositiveInteger(totalBlocks))
      throw invalid(`peer ${uuid}: totalBlocks must be a positive integer, got ${describeValue(totalBlocks)}`);
    peers.push(Object.freeze({ uuid, totalBlocks }));
  }

  if (type === 'empty' && peers.length > 0) throw invalid(`an empty ring cannot have peers, got ${peers.length}`);
  if (type === 'single' && peers.length !== 1) throw invalid(`a single ring needs exactly 1 peer, got ${peers.length}`);

  return Object.freeze({
    type: type as RingType,
    version: model.version,
    replication: replication as number,
    peers: Object.freeze(peers),
  });
}

export function newRingModel(type: RingType, replication: number, peers: readonly RingPeer[], version: number): RingModel {
  return validateRingModel({ type, replication, peers, version });
}

function checkModifiable(model: RingModel, verb: string): void {
  if (model.type === 'empty' || model.type === 'single')
    throw invalid(`cannot ${verb} a ${model.type} ring; use \`torusctl ring manual-change\` to set a new ring type and peer list`);
}

function nextVersion(model: RingModel): number {
  return model.version + 1;
}

/**
 * Appends the peers not yet in the ring (in the order given) and refreshes the totalBlocks of
 * those already there. EXISTS if every peer is already a member.
 */
export function addPeers(model: RingModel, peers: readonly RingPeer[]): RingModel {
  const current = validateRingModel(model);
  checkModifiable(current, 'add peers to');
  const given = new Map<string, RingPeer>();
  for (const p of peers) {
    if (given.has(p.uuid)) throw invalid(`peer ${p.uuid} is listed twice`);
    given.set(p.uuid, p);
  }
  const members = new Set(current.peers.map((p) => p.uuid));
  const added = [...given.values()].filter((p) => !members.has(p.uuid));
  if (added.length === 0) {
    const names = [...given.keys()];
    throw new TorusError(
      'EXISTS',
      names.length === 0 ? 'no peers given to add' : `peer${names.length === 1 ? '' : 's'} ${names.join(', ')} already in the ring`,
    );
  }
  const kept = current.peers.map((p) => {
    const update = given.get(p.uuid);
    return update === undefined ? p : { uuid: p.uuid, totalBlocks: update.totalBlocks };
  });
  return validateRingModel({ ...current, version: nextVersion(current), peers: [...kept, ...added] });
}

/** Drops the listed peers. NOT_EXIST if none of them is a member. */
export function removePeers(model: RingModel, uuids: readonly string[]): RingModel {
  const current = validateRingModel(model);
  checkModifiable(current, 'remove peers from');
  const drop = new Set(uuids);
  const kept = current.peers.filter((p) => !drop.has(p.uuid));
  if (kept.length === current.peers.length)
    throw new TorusError('NOT_EXIST', uuids.length === 0 ? 'no peers given to remove' : `none of ${uuids.join(', ')} is in the ring`);
  if (kept.length === 0)
    throw invalid('removing every member would leave no peer to hold any block; add the replacement peers first');
  return validateRingModel({ ...current, version: nextVersion(current), peers: kept });
}

export function changeReplication(model: RingModel, n: number): RingModel {
  const current = validateRingModel(model);
  if (!isPositiveInteger(n)) throw invalid(`replication must be an integer >= 1, got ${describeValue(n)}`);
  return validateRingModel({ ...current, version: nextVersion(current), replication: n });
}

/** How many copies of each block the ring really keeps. */
export function effectiveReplication(model: RingModel): number {
  return Math.min(model.replication, model.peers.length);
}

/** Things an operator should know about a valid model; the CLI prints them, nothing fails on them. */
export function ringWarnings(model: RingModel): string[] {
  const warnings: string[] = [];
  const n = model.peers.length;
  if (n === 0) {
    warnings.push(
      model.type === 'empty'
        ? 'the ring is empty: no block can be stored until it has peers (torusctl ring manual-change)'
        : `the ${model.type} ring has no members: no block can be stored until peers are added`,
    );
    return warnings;
  }
  if (model.replication > n)
    warnings.push(`replication ${model.replication} exceeds the ${n} member(s): only ${n} copies of each block will be kept (degraded)`);
  if (model.type === 'ketama') {
    // A peer can hold at most one copy of each block, so once its weight share exceeds 1/R its
    // capacity cannot be used in full and the others fill faster than their weight says.
    const r = effectiveReplication(model);
    const total = model.peers.reduce((s, p) => s + p.totalBlocks, 0);
    if (r > 1) {
      for (const p of model.peers) {
        if (p.totalBlocks * r > total)
          warnings.push(
            `peer ${p.uuid} has ${pct(p.totalBlocks / total)} of the ring's weight but holds at most one copy of each block: with replication ${r} the other peers fill faster than their weight`,
          );
      }
    }
  }
  return warnings;
}

export function pct(x: number): string {
  return `${(x * 100).toFixed(1)}%`;
}
