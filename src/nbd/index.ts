// The NBD front end: a codec (pure), a server for any DeviceProvider, and in-memory devices.
export * from './codec.js';
export { NBD_ERRNO, nbdErrno, openErrorReply } from './errors.js';
export {
  NbdServer,
  NBD_SERVER_DEFAULTS,
  blockSizeConstraints,
  transmissionFlags,
  type NbdListenAddresses,
  type NbdLogger,
  type NbdServerOptions,
  type NbdServerStats,
} from './server.js';
export {
  MemoryDevice,
  MemoryDeviceProvider,
  type DeviceOp,
  type MemoryDeviceOptions,
  type MemoryDeviceProviderOptions,
  type MemoryDeviceStats,
} from './memory-device.js';
