// An exclusive advisory lock on an open file (flock), which Node does not expose.
//
// The block store locks its data dir with it (src/storage/dir-lock.ts). A pid file alone let two
// processes take over the same stale lock at once, and pids mean nothing across containers; a
// flock is held by the open file itself, so the kernel drops it when its holder dies, however
// it dies, and two holders can never coexist on one host's file system.
//
// JavaScript API:
//   tryLock(fd) -> 0 when the lock is now held, else the errno (EWOULDBLOCK when another holds it)

#include <errno.h>
#include <node_api.h>
#include <sys/file.h>

static napi_value TryLock(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd = -1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, NULL, "tryLock(fd): an open file descriptor");
    return NULL;
  }
  int rc;
  do {
    rc = flock(fd, LOCK_EX | LOCK_NB);
  } while (rc != 0 && errno == EINTR);
  napi_value result;
  napi_create_int32(env, rc == 0 ? 0 : errno, &result);
  return result;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"tryLock", NULL, TryLock, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
