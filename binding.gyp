{
  "targets": [
    {
      "target_name": "aoe_socket",
      "sources": ["native/aoe_socket.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8"]
    },
    {
      "target_name": "page_cache_read",
      "sources": ["native/page_cache_read.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8"]
    },
    {
      "target_name": "file_lock",
      "sources": ["native/file_lock.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8"]
    },
    {
      "target_name": "block_write",
      "sources": ["native/block_write.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8"]
    },
    {
      "target_name": "malloc_tuning",
      "sources": ["native/malloc_tuning.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
