import { TorusError, type ErrorCode } from '../../core/errors.js';

// Node's file-system errors ("ENOENT: no such file or directory, stat 'x'") as CLI users should
// read them: the path first, then what is wrong with it, and the exit status the contract gives
// (docs/cli.md). Anything else is left as it is.

const SYSTEM: Readonly<Record<string, { code: ErrorCode; text: string }>> = {
  ENOENT: { code: 'NOT_EXIST', text: 'no such file or directory' },
  EACCES: { code: 'INVALID_ARGUMENT', text: 'permission denied' },
  EPERM: { code: 'INVALID_ARGUMENT', text: 'operation not permitted' },
  EISDIR: { code: 'INVALID_ARGUMENT', text: 'is a directory' },
  ENOTDIR: { code: 'INVALID_ARGUMENT', text: 'a part of the path is not a directory' },
  EEXIST: { code: 'EXISTS', text: 'already exists' },
  ENOSPC: { code: 'OUT_OF_SPACE', text: 'no space left on the device' },
  EROFS: { code: 'INVALID_ARGUMENT', text: 'read-only file system' },
};

export function fromSystemError(err: unknown): unknown {
  if (!(err instanceof Error) || err instanceof TorusError) return err;
  const e = err as NodeJS.ErrnoException;
  const known = e.code ? SYSTEM[e.code] : undefined;
  if (!known || e.path === undefined) return err;
  return new TorusError(known.code, `${e.path}: ${known.text}`, { cause: err });
}
