// The storage node's writes, many per thread-pool job.
//
// Through Node's fs every pwrite is its own libuv job: a worker thread woken, then the main
// thread woken for the callback. Storing one block takes three (its data, its sector checksums,
// then its record), so a peer's batch of 8 blocks made 24 hand-offs. Here the writes of all the
// blocks that arrived in one turn of the event loop go to the thread pool as one job, which
// writes them in order and reports back once.
//
// JavaScript API (see src/storage/batch-write.ts for the typed wrapper):
//   writeBatch(fds: Int32Array, positions: Float64Array, buffers: Uint8Array[], groupEnds: Uint32Array,
//              callback(failedAt: Int32Array, errnos: Int32Array, syncErrno: number), syncFd?: number)
// Write i puts buffers[i] at positions[i] of fds[i], whole (short writes are continued). Writes
// are grouped: group g is writes [groupEnds[g-1], groupEnds[g]). A group's writes are made in
// order and the group stops at its first failure: failedAt[g] is the index within the group of
// the write that failed (-1: all done), errnos[g] its errno. Other groups go on. The caller keeps
// the buffers unchanged until the callback (the job holds a reference to the array).
// With syncFd (>= 0), the job ends with fdatasync(syncFd) after every write, and syncErrno is its
// errno (0: done; -1: not asked). A journal append made durable costs one hand-off, not two: the
// flush that followed it through Node's fs was a second job, with both threads woken again.

#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct {
  int fd;
  int64_t position;
  const uint8_t *data;
  size_t length;
} Write;

typedef struct {
  napi_async_work work;
  napi_ref callback;
  napi_ref buffers;
  size_t nwrites;
  size_t ngroups;
  Write *writes;
  uint32_t *group_ends;
  int32_t *failed_at;
  int32_t *errnos;
  int sync_fd;
  int sync_errno;
} Batch;

static napi_value throw_error(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

static int write_whole(const Write *w) {
  size_t done = 0;
  while (done < w->length) {
    ssize_t n = pwrite(w->fd, w->data + done, w->length - done, (off_t)(w->position + (int64_t)done));
    if (n > 0) {
      done += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? errno : EIO;
  }
  return 0;
}

static void execute(napi_env env, void *data) {
  (void)env;
  Batch *b = data;
  size_t start = 0;
  for (size_t g = 0; g < b->ngroups; g++) {
    size_t end = b->group_ends[g];
    b->failed_at[g] = -1;
    b->errnos[g] = 0;
    for (size_t i = start; i < end; i++) {
      int err = write_whole(&b->writes[i]);
      if (err != 0) {
        b->failed_at[g] = (int32_t)(i - start);
        b->errnos[g] = err;
        break;
      }
    }
    start = end;
  }
  b->sync_errno = -1;
  if (b->sync_fd >= 0) {
    int r;
    do r = fdatasync(b->sync_fd);
    while (r < 0 && errno == EINTR);
    b->sync_errno = r < 0 ? errno : 0;
  }
}

static void free_batch(napi_env env, Batch *b) {
  if (b->callback) napi_delete_reference(env, b->callback);
  if (b->buffers) napi_delete_reference(env, b->buffers);
  if (b->work) napi_delete_async_work(env, b->work);
  free(b->writes);
  free(b->group_ends);
  free(b->failed_at);
  free(b->errnos);
  free(b);
}

static napi_value int32_array(napi_env env, const int32_t *values, size_t n) {
  void *out;
  napi_value ab, arr;
  napi_create_arraybuffer(env, n * sizeof(int32_t), &out, &ab);
  for (size_t i = 0; i < n; i++) ((int32_t *)out)[i] = values[i];
  napi_create_typedarray(env, napi_int32_array, n, ab, 0, &arr);
  return arr;
}

static void complete(napi_env env, napi_status status, void *data) {
  Batch *b = data;
  if (status != napi_ok) {
    for (size_t g = 0; g < b->ngroups; g++) {
      b->failed_at[g] = 0;
      b->errnos[g] = ECANCELED;
    }
  }
  napi_value cb, global, argv[3];
  napi_get_reference_value(env, b->callback, &cb);
  napi_get_global(env, &global);
  argv[0] = int32_array(env, b->failed_at, b->ngroups);
  argv[1] = int32_array(env, b->errnos, b->ngroups);
  // A cancelled job synced nothing.
  napi_create_int32(env, status != napi_ok && b->sync_fd >= 0 ? ECANCELED : b->sync_errno, &argv[2]);
  free_batch(env, b);
  napi_call_function(env, global, cb, 3, argv, NULL);
}

static int typed(napi_env env, napi_value v, napi_typedarray_type want, void **out, size_t *len) {
  bool is;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return 0;
  napi_typedarray_type type;
  if (napi_get_typedarray_info(env, v, &type, len, out, NULL, NULL) != napi_ok || type != want) return 0;
  return 1;
}

static napi_value WriteBatch(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5)
    return throw_error(env, "writeBatch(fds, positions, buffers, groupEnds, callback[, syncFd])");
  int32_t sync_fd = -1;
  if (argc >= 6) {
    napi_valuetype t;
    napi_typeof(env, argv[5], &t);
    if (t != napi_undefined && (t != napi_number || napi_get_value_int32(env, argv[5], &sync_fd) != napi_ok))
      return throw_error(env, "syncFd must be a number");
  }
  int32_t *fds;
  double *positions;
  uint32_t *ends;
  size_t n, npos, ngroups, nbufs;
  if (!typed(env, argv[0], napi_int32_array, (void **)&fds, &n)) return throw_error(env, "fds must be an Int32Array");
  if (!typed(env, argv[1], napi_float64_array, (void **)&positions, &npos) || npos != n) return throw_error(env, "positions must be a Float64Array, one per fd");
  bool is_array;
  if (napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array) return throw_error(env, "buffers must be an array");
  uint32_t len32;
  napi_get_array_length(env, argv[2], &len32);
  nbufs = len32;
  if (nbufs != n) return throw_error(env, "buffers: one per fd");
  if (!typed(env, argv[3], napi_uint32_array, (void **)&ends, &ngroups) || ngroups == 0 || ends[ngroups - 1] != n)
    return throw_error(env, "groupEnds must be a Uint32Array ending at the number of writes");
  napi_valuetype cbtype;
  napi_typeof(env, argv[4], &cbtype);
  if (cbtype != napi_function) return throw_error(env, "callback must be a function");

  Batch *b = calloc(1, sizeof(Batch));
  if (!b) return throw_error(env, "out of memory");
  b->nwrites = n;
  b->ngroups = ngroups;
  b->sync_fd = sync_fd;
  b->sync_errno = -1;
  b->writes = calloc(n ? n : 1, sizeof(Write));
  b->group_ends = calloc(ngroups, sizeof(uint32_t));
  b->failed_at = calloc(ngroups, sizeof(int32_t));
  b->errnos = calloc(ngroups, sizeof(int32_t));
  if (!b->writes || !b->group_ends || !b->failed_at || !b->errnos) {
    free_batch(env, b);
    return throw_error(env, "out of memory");
  }
  uint32_t prev = 0;
  for (size_t g = 0; g < ngroups; g++) {
    if (ends[g] < prev || ends[g] > n) {
      free_batch(env, b);
      return throw_error(env, "groupEnds must not decrease");
    }
    b->group_ends[g] = prev = ends[g];
  }
  for (size_t i = 0; i < n; i++) {
    napi_value buf;
    void *data;
    size_t length;
    napi_get_element(env, argv[2], (uint32_t)i, &buf);
    if (!typed(env, buf, napi_uint8_array, &data, &length)) {
      free_batch(env, b);
      return throw_error(env, "every buffer must be a Uint8Array");
    }
    if (!(positions[i] >= 0) || positions[i] > 9007199254740991.0) {
      free_batch(env, b);
      return throw_error(env, "positions must be non-negative integers");
    }
    b->writes[i] = (Write){fds[i], (int64_t)positions[i], data, length};
  }
  napi_value name;
  napi_create_string_utf8(env, "torus.writeBatch", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[4], 1, &b->callback) != napi_ok || napi_create_reference(env, argv[2], 1, &b->buffers) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute, complete, b, &b->work) != napi_ok || napi_queue_async_work(env, b->work) != napi_ok) {
    free_batch(env, b);
    return throw_error(env, "cannot queue the write batch");
  }
  return NULL;
}

// CRC32C (Castagnoli, as @node-rs/crc32's crc32c) of each sector of a block, in one call: the
// store's checksum pass, which took one call (and one Buffer view) per sector from JavaScript.
static uint32_t crc_table[256];

static void init_crc_table(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    crc_table[i] = c;
  }
}

static uint32_t crc32c_soft(uint32_t crc, const uint8_t *p, size_t n) {
  crc = ~crc;
  while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
  uint64_t c = ~crc & 0xffffffffu;
  while (n >= 8) {
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = (uint32_t)c;
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}
#endif

static uint32_t (*crc32c)(uint32_t, const uint8_t *, size_t) = crc32c_soft;

// sectorCrcs(data: Uint8Array, sectorSize: number, out: Uint8Array): the CRC of each sector of
// data (the last may be short), u32 little-endian into out, 4 bytes per sector.
static napi_value SectorCrcs(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) return throw_error(env, "sectorCrcs(data, sectorSize, out)");
  uint8_t *data, *out;
  size_t length, outlen;
  uint32_t sector;
  if (!typed(env, argv[0], napi_uint8_array, (void **)&data, &length)) return throw_error(env, "data must be a Uint8Array");
  if (napi_get_value_uint32(env, argv[1], &sector) != napi_ok || sector == 0) return throw_error(env, "sectorSize must be a positive number");
  if (!typed(env, argv[2], napi_uint8_array, (void **)&out, &outlen)) return throw_error(env, "out must be a Uint8Array");
  size_t sectors = (length + sector - 1) / sector;
  if (outlen < sectors * 4) return throw_error(env, "out must have 4 bytes per sector");
  for (size_t s = 0; s < sectors; s++) {
    size_t start = s * sector;
    size_t n = length - start < sector ? length - start : sector;
    uint32_t c = crc32c(0, data + start, n);
    out[s * 4] = (uint8_t)c;
    out[s * 4 + 1] = (uint8_t)(c >> 8);
    out[s * 4 + 2] = (uint8_t)(c >> 16);
    out[s * 4 + 3] = (uint8_t)(c >> 24);
  }
  return NULL;
}

// dataRanges(fd: number): Float64Array of [start, end) pairs, the parts of the file that hold
// written data (SEEK_DATA/SEEK_HOLE; on ext4, unwritten extents count as holes). The store uses
// it at open to find free slots written before, which a journal append can use without
// allocating. A file system without hole support reports the whole file as data: every slot then
// counts as written and none is prepared, which is how the store behaved before.
static napi_value DataRanges(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok)
    return throw_error(env, "dataRanges(fd)");
  size_t cap = 64, n = 0;
  double *r = malloc(cap * sizeof(double));
  if (!r) return throw_error(env, "out of memory");
  off_t pos = 0;
  for (;;) {
    off_t start = lseek(fd, pos, SEEK_DATA);
    if (start < 0) break;
    off_t end = lseek(fd, start, SEEK_HOLE);
    if (end < 0) break;
    if (n + 2 > cap) {
      cap *= 2;
      double *grown = realloc(r, cap * sizeof(double));
      if (!grown) {
        free(r);
        return throw_error(env, "out of memory");
      }
      r = grown;
    }
    r[n++] = (double)start;
    r[n++] = (double)end;
    pos = end;
  }
  void *out;
  napi_value ab, arr;
  napi_create_arraybuffer(env, n * sizeof(double), &out, &ab);
  for (size_t i = 0; i < n; i++) ((double *)out)[i] = r[i];
  free(r);
  napi_create_typedarray(env, napi_float64_array, n, ab, 0, &arr);
  return arr;
}

static napi_value Init(napi_env env, napi_value exports) {
  init_crc_table();
#if defined(__x86_64__)
  if (__builtin_cpu_supports("sse4.2")) crc32c = crc32c_hw;
#endif
  napi_property_descriptor props[] = {
      {"writeBatch", NULL, WriteBatch, NULL, NULL, NULL, napi_default, NULL},
      {"sectorCrcs", NULL, SectorCrcs, NULL, NULL, NULL, napi_default, NULL},
      {"dataRanges", NULL, DataRanges, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
