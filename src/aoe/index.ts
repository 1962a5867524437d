// The AoE front end: a pure frame codec, ATA helpers, the target, and its transports (a raw
// AF_PACKET socket, and an in-memory Ethernet segment for tests).
export * from './frame.js';
export * from './ata.js';
export { ATA_READ_ERROR, ataFailure, type AtaFailure } from './errors.js';
export { MemoryEthernet, MemoryPort, memoryPacketPair, type PacketConn, type PacketConnStats } from './conn.js';
export { RawPacketConn, addonPath, packageRoot, rawSocketAvailable } from './raw.js';
export {
  AoeTarget,
  AOE_TARGET_DEFAULTS,
  type AoeLogger,
  type AoeTargetOptions,
  type AoeTargetState,
  type AoeTargetStats,
} from './server.js';
