{
  "targets": [
    {
      "target_name": "aoe_socket",
      "sources": ["native/aoe_socket.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
