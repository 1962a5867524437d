// glibc malloc settings for the long-running processes (torusd, torusblk).
//
// Node allocates every Buffer above its 8 KiB pool with malloc. glibc serves the big ones (NBD
// payloads, blocks, RPC bodies: 64 KiB to 1 MiB, thousands a second) from fresh mmap()s, or from a
// heap top it gives back to the kernel as soon as it is free, so their pages are faulted in and
// zeroed by the kernel again on every use. Keeping requests under 32 MiB in the heap and up to 64
// MiB of free heap top resident makes them reuse memory: 12 -> 2.5 page faults per MiB allocated
// in a loop of 1 MiB Buffers (src/core/malloc.test.ts), and sequential reads through nbdserve
// 29-45% faster (docs/performance.md). Both settings are what MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
// would set, had the process been started with them.
//
// Keeping freed memory has a price once a burst is over: what a node freed after a job of large
// writes stays resident until the same sizes are asked for again, hundreds of MiB after a few
// jobs (docs/performance.md, P8). So the process also asks how much malloc holds free, and gives
// it back when the event loop has been quiet for a while (src/core/malloc.ts).
//
// JavaScript API (src/core/malloc.ts):
//   tune(mmapThreshold, trimThreshold) -> true when glibc accepted both
//   stats() -> { heapBytes, freeBytes }: what malloc's arenas hold (mmapped chunks included),
//              and how much of it is free
//   trim() -> true when malloc_trim gave memory back to the kernel

#include <malloc.h>
#include <node_api.h>
#include <stdint.h>

static napi_value Tune(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int64_t mmap_threshold = 0, trim_threshold = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_int64(env, argv[0], &mmap_threshold) != napi_ok ||
      napi_get_value_int64(env, argv[1], &trim_threshold) != napi_ok || mmap_threshold <= 0 || trim_threshold <= 0 ||
      mmap_threshold > INT32_MAX || trim_threshold > INT32_MAX) {
    napi_throw_type_error(env, NULL, "tune(mmapThreshold, trimThreshold): two positive byte counts");
    return NULL;
  }
  int ok = mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold) == 1 && mallopt(M_TRIM_THRESHOLD, (int)trim_threshold) == 1;
  napi_value result;
  napi_get_boolean(env, ok, &result);
  return result;
}

static napi_value Stats(napi_env env, napi_callback_info info) {
  (void)info;
  struct mallinfo2 mi = mallinfo2();
  napi_value result, heap, free_bytes;
  napi_create_object(env, &result);
  napi_create_double(env, (double)(mi.arena + mi.hblkhd), &heap);
  napi_create_double(env, (double)mi.fordblks, &free_bytes);
  napi_set_named_property(env, result, "heapBytes", heap);
  napi_set_named_property(env, result, "freeBytes", free_bytes);
  return result;
}

static napi_value Trim(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value result;
  napi_get_boolean(env, malloc_trim(0) == 1, &result);
  return result;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"tune", NULL, Tune, NULL, NULL, NULL, napi_default, NULL},
      {"stats", NULL, Stats, NULL, NULL, NULL, napi_default, NULL},
      {"trim", NULL, Trim, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
