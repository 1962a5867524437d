export { EtcdMetadata, normalizeEndpoints, type EtcdOptions, type EtcdTls } from './etcd/etcd.js';
export { MemoryMetadata, MemoryMetadataStore } from './memory/memory.js';
export { PREFIX, keys } from './keys.js';
export { AccessRules, ANONYMOUS, ANY_IDENTITY, type AccessMode, type AccessRule } from './access.js';
