// Rings: pure functions from a block to an ordered list of peers. See docs/rings.md.

import type { RingModel, RingType } from '../core/models.js';
import type { PlacementRing } from './base.js';
import { KetamaRing } from './ketama.js';
import { validateRingModel } from './model.js';
import { EmptyRing, ModRing, SingleRing } from './simple.js';

export { isPlacementRing, type PlacementRing } from './base.js';
export { hashBlockRef, xxh32 } from './hash.js';
export {
  addPeers,
  changeReplication,
  effectiveReplication,
  newRingModel,
  removePeers,
  ringWarnings,
  validateRingModel,
} from './model.js';
export { placementStats, type PeerPlacement, type PlacementStats } from './stats.js';
export { MEAN_POINTS } from './ketama.js';

/** What `torusctl init` and friends should create when no type is given. */
export const DEFAULT_RING_TYPE = 'ketama' satisfies RingType;

/**
 * Builds the ring a model describes (a core `Ring`, plus `lookup` and `primaryShares`).
 * INVALID_ARGUMENT if the model is not valid. Building a ketama ring costs ~100 ms for 100
 * peers, so build once per ring version and share the result.
 */
export function createRing(model: RingModel): PlacementRing {
  const m = validateRingModel(model);
  switch (m.type) {
    case 'empty':
      return new EmptyRing(m);
    case 'single':
      return new SingleRing(m);
    case 'mod':
      return new ModRing(m);
    case 'ketama':
      return new KetamaRing(m);
  }
}
