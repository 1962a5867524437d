// Peer RPC: the binary block protocol between Torus processes. See docs/protocols/peer-rpc.md.
export * from './address.js';
export * from './breaker.js';
export * from './client.js';
export * from './codec.js';
export * from './pipe.js';
export * from './pool.js';
export * from './server.js';
