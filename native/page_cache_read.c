// Reads that never wait for the disk, for the storage node's small reads.
//
// A read through Node's fs goes to libuv's thread pool: a wake-up of a worker thread and a hand-back
// to the main thread, for every 4 KiB. When the bytes are already in the page cache the read
// itself takes a few microseconds, far less than the two hand-offs. preadv2 with RWF_NOWAIT
// (Linux 4.14+) reads on the calling thread and returns EAGAIN instead of waiting for the disk, so
// the event loop is never blocked on I/O: the caller goes to the thread pool only for what is not
// cached.
//
// JavaScript API (see src/storage/page-cache.ts for the typed wrapper):
//   readCached(fd, buffer, position) -> bytes read from the page cache (0 .. buffer.length), or
//                                       -1 when nothing could be read without waiting (or the
//                                       kernel or filesystem does not support it)
//   dropCache(fd) -> undefined       posix_fadvise(DONTNEED) of the whole file, for tests

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdint.h>
#include <sys/uio.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

static napi_value throw_error(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

static napi_value ReadCached(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) return throw_error(env, "readCached(fd, buffer, position)");
  int32_t fd;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok) return throw_error(env, "fd must be a number");
  void *data;
  size_t length;
  if (napi_get_buffer_info(env, argv[1], &data, &length) != napi_ok) return throw_error(env, "buffer must be a Buffer");
  int64_t position;
  if (napi_get_value_int64(env, argv[2], &position) != napi_ok || position < 0) return throw_error(env, "position must be a non-negative number");

  size_t done = 0;
  while (done < length) {
    struct iovec iov = {(char *)data + done, length - done};
    ssize_t n = preadv2(fd, &iov, 1, (off_t)(position + (int64_t)done), RWF_NOWAIT);
    if (n > 0) {
      done += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    // 0 is end of file; EAGAIN is "would wait"; EOPNOTSUPP/EINVAL/ENOSYS mean no support. In every
    // case the caller's ordinary read decides (and reports real errors).
    break;
  }
  napi_value result;
  napi_create_int64(env, done > 0 ? (int64_t)done : -1, &result);
  return result;
}

static napi_value DropCache(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1) return throw_error(env, "dropCache(fd)");
  int32_t fd;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok) return throw_error(env, "fd must be a number");
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  return NULL;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"readCached", NULL, ReadCached, NULL, NULL, NULL, napi_default, NULL},
      {"dropCache", NULL, DropCache, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
