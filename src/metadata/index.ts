export { EtcdMetadata, normalizeEndpoints, type EtcdOptions, type EtcdTls } from './etcd/etcd.js';
export { MemoryMetadata, MemoryMetadataStore } from './memory/memory.js';
export { PREFIX, keys } from './keys.js';
