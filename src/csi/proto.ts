import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';

// The CSI services as grpc-js definitions, loaded from csi.proto at start (no generated code).
// Field names keep the spec's snake_case, int64 sizes are JS numbers (volumes stay under 2^50
// bytes), enums are their names, and a oneof's set member is named by the oneof (for example
// `access_type: 'mount'`).

/** The .proto sits in the source tree; the compiled module is in dist/src/csi. */
export function protoPath(): string {
  for (const rel of ['./csi.proto', '../../../src/csi/csi.proto']) {
    const p = fileURLToPath(new URL(rel, import.meta.url));
    if (existsSync(p)) return p;
  }
  throw new Error('csi.proto not found next to the CSI module or in src/csi');
}

export interface CsiServices {
  Identity: grpc.ServiceClientConstructor;
  Controller: grpc.ServiceClientConstructor;
  Node: grpc.ServiceClientConstructor;
}

let loaded: CsiServices | undefined;

export function csiServices(): CsiServices {
  if (!loaded) {
    const def = loadSync(protoPath(), { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
    const pkg = grpc.loadPackageDefinition(def) as unknown as { csi: { v1: CsiServices } };
    loaded = pkg.csi.v1;
  }
  return loaded;
}

// ---- the messages, as the loader presents them (only the fields this driver reads or writes) ----

export type AccessModeName =
  | 'UNKNOWN'
  | 'SINGLE_NODE_WRITER'
  | 'SINGLE_NODE_READER_ONLY'
  | 'MULTI_NODE_READER_ONLY'
  | 'MULTI_NODE_SINGLE_WRITER'
  | 'MULTI_NODE_MULTI_WRITER'
  | 'SINGLE_NODE_SINGLE_WRITER'
  | 'SINGLE_NODE_MULTI_WRITER';

export interface VolumeCapability {
  block?: Record<string, never> | null;
  mount?: { fs_type?: string; mount_flags?: string[]; volume_mount_group?: string } | null;
  access_type?: 'block' | 'mount';
  access_mode?: { mode?: AccessModeName | number } | null;
}

export interface CapacityRange {
  required_bytes?: number;
  limit_bytes?: number;
}

export interface ContentSource {
  snapshot?: { snapshot_id?: string } | null;
  volume?: { volume_id?: string } | null;
  type?: 'snapshot' | 'volume';
}

export interface CsiVolume {
  capacity_bytes: number;
  volume_id: string;
  volume_context: Record<string, string>;
  content_source?: ContentSource | null;
}

export interface CsiSnapshot {
  size_bytes: number;
  snapshot_id: string;
  source_volume_id: string;
  creation_time: { seconds: number; nanos: number };
  ready_to_use: boolean;
}

export type Params = Record<string, string>;
