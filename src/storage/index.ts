export { FileBlockStore, type FileBlockStoreOptions, type SlotLocation } from './file-store.js';
export { MemoryBlockStore, type MemoryBlockStoreOptions } from './memory-store.js';
export type { BlockStoreStats, LocalBlockStore, ScrubReport, VerifyResult } from './common.js';
export type { StoreHeader } from './format.js';
