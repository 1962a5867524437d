// A raw AF_PACKET socket for ATA over Ethernet, polled on Node's event loop.
//
// Only the transport lives here: opening a socket bound to one interface and EtherType 0x88A2,
// sending whole Ethernet frames, and handing every received frame to JavaScript in batches.
// Every protocol decision (addressing, validation, replies) is made in TypeScript (src/aoe), so
// this file never needs to change when the protocol code does.
//
// JavaScript API (see src/aoe/raw.ts for the typed wrapper):
//   open(ifname, onFrames) -> handle { name, mac: Buffer, mtu, ifindex, send(frame), stats(), close() }
//   onFrames(frames: Buffer[], error?: Error) is called once per poll wakeup with every frame read.
//
// Lifetime: while open, the handle object is held by a strong reference so it cannot be collected
// under a live uv_poll_t. close() stops polling and closes the fd at once; when libuv has finished
// with the poll handle the reference is dropped, and the finalizer frees the native state.

#define _GNU_SOURCE
#include <errno.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netpacket/packet.h>
#include <arpa/inet.h>
#include <node_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define AOE_ETHERTYPE 0x88A2
// Frames read per wakeup before yielding back to the loop: enough to drain a burst from a busy
// initiator, few enough that timers and sends are not starved behind a flood.
#define MAX_BATCH 256
// Larger than any Ethernet frame the kernel will hand us (jumbo frames top out near 9216 bytes;
// 64 KiB covers the loopback-sized MTUs veth allows too).
#define RECV_BUF_SIZE 65536
#define SOCK_BUF_SIZE (4 * 1024 * 1024)

typedef struct {
  napi_env env;
  int fd;
  int ifindex;
  int open;       // fd valid and polled
  int poll_live;  // uv handle initialised and its close callback not run yet
  int finalized;  // the JS object is gone; free once the poll handle is closed
  int tearing_down;
  uv_poll_t poll;
  napi_ref self;
  napi_ref callback;
  napi_async_context async;
  unsigned char *buf;
} aoe_sock;

static void free_sock(aoe_sock *s) {
  free(s->buf);
  free(s);
}

// Errors carry a Node-style `code` so the TypeScript side can turn them into TorusErrors.
static napi_value make_error(napi_env env, const char *code, const char *msg) {
  napi_value c, m, e;
  napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &c);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_error(env, c, m, &e);
  return e;
}

static const char *errno_code(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENODEV: return "ENODEV";
    case ENXIO: return "ENXIO";
    case ENETDOWN: return "ENETDOWN";
    case EMSGSIZE: return "EMSGSIZE";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    default: return "EIO";
  }
}

static napi_value errno_error(napi_env env, int err, const char *what, const char *ifname) {
  char msg[256];
  if (err == EPERM || err == EACCES)
    snprintf(msg, sizeof msg, "%s on %s needs CAP_NET_RAW (run as root or grant the capability)", what, ifname);
  else if (err == ENODEV || err == ENXIO)
    snprintf(msg, sizeof msg, "no network interface named \"%s\"", ifname);
  else
    snprintf(msg, sizeof msg, "%s on %s failed: %s", what, ifname, strerror(err));
  return make_error(env, errno_code(err), msg);
}

static napi_value throw_value(napi_env env, napi_value err) {
  napi_throw(env, err);
  return NULL;
}

static void do_close(aoe_sock *s);

static void on_poll_closed(uv_handle_t *h) {
  aoe_sock *s = h->data;
  s->poll_live = 0;
  if (s->finalized) {
    free_sock(s);
    return;
  }
  // The poll is gone, so the handle object may now be collected; its finalizer frees `s`.
  if (!s->tearing_down && s->self != NULL) {
    napi_delete_reference(s->env, s->self);
    s->self = NULL;
  }
}

static void cleanup_hook(void *arg) {
  aoe_sock *s = arg;
  s->tearing_down = 1;
  do_close(s);
}

static void do_close(aoe_sock *s) {
  if (!s->open) return;
  s->open = 0;
  uv_poll_stop(&s->poll);
  close(s->fd);
  s->fd = -1;
  uv_close((uv_handle_t *)&s->poll, on_poll_closed);
  if (!s->tearing_down) {
    napi_remove_env_cleanup_hook(s->env, cleanup_hook, s);
    napi_delete_reference(s->env, s->callback);
    s->callback = NULL;
    napi_async_destroy(s->env, s->async);
    s->async = NULL;
  }
}

static void finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  aoe_sock *s = data;
  s->finalized = 1;
  if (s->open) {
    // Only reachable at environment teardown: the strong reference keeps open handles alive.
    s->tearing_down = 1;
    do_close(s);
  }
  if (!s->poll_live) free_sock(s);
}

static void on_readable(uv_poll_t *h, int status, int events) {
  (void)events;
  aoe_sock *s = h->data;
  if (!s->open) return;
  napi_env env = s->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value frames;
  napi_create_array(env, &frames);
  uint32_t n = 0;
  int err = status < 0 ? -status : 0;
  for (int i = 0; err == 0 && i < MAX_BATCH; i++) {
    struct sockaddr_ll from;
    socklen_t fromlen = sizeof from;
    // MSG_TRUNC makes recvfrom report the frame's real length, so an oversized frame is dropped
    // instead of being delivered cut short.
    ssize_t r = recvfrom(s->fd, s->buf, RECV_BUF_SIZE, MSG_TRUNC, (struct sockaddr *)&from, &fromlen);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
      break;
    }
    // Packet sockets also see frames other sockets on this host send out of the interface.
    if (from.sll_pkttype == PACKET_OUTGOING) continue;
    if (r > RECV_BUF_SIZE) continue;
    napi_value b;
    void *copy;
    // A copy per frame: JavaScript may keep it (a write waiting on the device) while this
    // receive buffer is reused for the next frame.
    if (napi_create_buffer_copy(env, (size_t)r, s->buf, &copy, &b) != napi_ok) break;
    napi_set_element(env, frames, n++, b);
  }
  if (n > 0 || err != 0) {
    napi_value cb, recv, argv[2];
    napi_get_reference_value(env, s->callback, &cb);
    napi_get_reference_value(env, s->self, &recv);
    argv[0] = frames;
    if (err != 0) {
      char what[64];
      snprintf(what, sizeof what, "receiving on ifindex %d", s->ifindex);
      char msg[160];
      snprintf(msg, sizeof msg, "%s failed: %s", what, strerror(err));
      argv[1] = make_error(env, errno_code(err), msg);
    } else {
      napi_get_undefined(env, &argv[1]);
    }
    napi_status st = napi_make_callback(env, s->async, recv, cb, 2, argv, NULL);
    if (st == napi_pending_exception) {
      napi_value e;
      napi_get_and_clear_last_exception(env, &e);
      napi_fatal_exception(env, e);
    }
  }
  napi_close_handle_scope(env, scope);
}

static aoe_sock *unwrap_this(napi_env env, napi_callback_info info, size_t *argc, napi_value *argv) {
  napi_value self;
  if (napi_get_cb_info(env, info, argc, argv, &self, NULL) != napi_ok) return NULL;
  void *p = NULL;
  if (napi_unwrap(env, self, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "not an AoE socket handle");
    return NULL;
  }
  return p;
}

static napi_value sock_send(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  aoe_sock *s = unwrap_this(env, info, &argc, argv);
  if (s == NULL) return NULL;
  bool is_ta = false;
  if (argc < 1 || napi_is_typedarray(env, argv[0], &is_ta) != napi_ok || !is_ta) {
    napi_throw_type_error(env, NULL, "send(frame) needs a Buffer or Uint8Array");
    return NULL;
  }
  napi_typedarray_type type;
  size_t length, offset;
  void *data;
  napi_value ab;
  napi_get_typedarray_info(env, argv[0], &type, &length, &data, &ab, &offset);
  if (type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "send(frame) needs a Buffer or Uint8Array");
    return NULL;
  }
  if (length < ETH_HLEN || length > RECV_BUF_SIZE) {
    napi_throw_range_error(env, NULL, "an Ethernet frame is between 14 and 65536 bytes");
    return NULL;
  }
  if (!s->open) return throw_value(env, make_error(env, "ERR_SOCKET_CLOSED", "the AoE socket is closed"));
  ssize_t r;
  do r = send(s->fd, data, length, 0);
  while (r < 0 && errno == EINTR);
  napi_value result;
  if (r < 0) {
    // A full socket or device queue drops the frame: AoE initiators retransmit, so the caller
    // only needs to know it happened.
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
      napi_get_boolean(env, false, &result);
      return result;
    }
    char what[64];
    snprintf(what, sizeof what, "ifindex %d", s->ifindex);
    return throw_value(env, errno_error(env, errno, "sending a frame", what));
  }
  napi_get_boolean(env, true, &result);
  return result;
}

static napi_value sock_stats(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  aoe_sock *s = unwrap_this(env, info, &argc, NULL);
  if (s == NULL) return NULL;
  // struct tpacket_stats from <linux/if_packet.h>, which clashes with glibc's <netpacket/packet.h>.
  struct {
    unsigned int tp_packets;
    unsigned int tp_drops;
  } st = {0, 0};
  socklen_t len = sizeof st;
  // The kernel resets these counters on every read, so each call reports the interval since the last.
  if (s->open) getsockopt(s->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len);
  napi_value obj, packets, drops;
  napi_create_object(env, &obj);
  napi_create_uint32(env, st.tp_packets, &packets);
  napi_create_uint32(env, st.tp_drops, &drops);
  napi_set_named_property(env, obj, "packets", packets);
  napi_set_named_property(env, obj, "drops", drops);
  return obj;
}

static napi_value sock_close(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  aoe_sock *s = unwrap_this(env, info, &argc, NULL);
  if (s == NULL) return NULL;
  do_close(s);
  return NULL;
}

static void set_buffer_size(int fd, int force_opt, int opt) {
  int size = SOCK_BUF_SIZE;
  // The FORCE variants pass rmem_max/wmem_max when we have CAP_NET_ADMIN; otherwise take what we get.
  if (setsockopt(fd, SOL_SOCKET, force_opt, &size, sizeof size) < 0) setsockopt(fd, SOL_SOCKET, opt, &size, sizeof size);
}

static napi_value aoe_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char name[IFNAMSIZ + 8];
  size_t namelen = 0;
  napi_valuetype t0 = napi_undefined, t1 = napi_undefined;
  if (argc >= 1) napi_typeof(env, argv[0], &t0);
  if (argc >= 2) napi_typeof(env, argv[1], &t1);
  if (t0 != napi_string || t1 != napi_function) {
    napi_throw_type_error(env, NULL, "open(ifname: string, onFrames: function)");
    return NULL;
  }
  napi_get_value_string_utf8(env, argv[0], name, sizeof name, &namelen);
  if (namelen == 0 || namelen >= IFNAMSIZ) return throw_value(env, errno_error(env, ENODEV, "opening", name));

  // Protocol 0 receives nothing until bind() names the interface and EtherType, so no frame from
  // another interface can slip in between socket() and bind().
  int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_value(env, errno_error(env, errno, "opening a raw AF_PACKET socket", name));

  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  memcpy(ifr.ifr_name, name, namelen);
  int err = 0;
  const char *what = "looking up the interface";
  int ifindex = 0, mtu = 0;
  unsigned char mac[6];
  if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) {
    err = errno;
  } else {
    ifindex = ifr.ifr_ifindex;
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) {
      err = errno;
    } else if (ifr.ifr_hwaddr.sa_family != ARPHRD_ETHER) {
      close(fd);
      char msg[128];
      snprintf(msg, sizeof msg, "%s is not an Ethernet interface (AoE needs Ethernet framing)", name);
      return throw_value(env, make_error(env, "EINVAL", msg));
    } else {
      memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
      if (ioctl(fd, SIOCGIFMTU, &ifr) < 0) err = errno;
      else mtu = ifr.ifr_mtu;
    }
  }
  if (err == 0) {
    set_buffer_size(fd, SO_RCVBUFFORCE, SO_RCVBUF);
    set_buffer_size(fd, SO_SNDBUFFORCE, SO_SNDBUF);
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(AOE_ETHERTYPE);
    sll.sll_ifindex = ifindex;
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
      err = errno;
      what = "binding the raw socket";
    }
  }
  if (err != 0) {
    close(fd);
    return throw_value(env, errno_error(env, err, what, name));
  }

  aoe_sock *s = calloc(1, sizeof *s);
  unsigned char *buf = malloc(RECV_BUF_SIZE);
  uv_loop_t *loop = NULL;
  if (s == NULL || buf == NULL || napi_get_uv_event_loop(env, &loop) != napi_ok) {
    free(s);
    free(buf);
    close(fd);
    return throw_value(env, make_error(env, "ENOMEM", "out of memory opening an AoE socket"));
  }
  s->env = env;
  s->fd = fd;
  s->ifindex = ifindex;
  s->buf = buf;
  if (uv_poll_init(loop, &s->poll, fd) != 0) {
    free_sock(s);
    close(fd);
    return throw_value(env, make_error(env, "EIO", "cannot poll the AoE socket"));
  }
  s->poll.data = s;
  s->poll_live = 1;
  s->open = 1;

  napi_value obj, v_name, v_mac, v_mtu, v_ifindex, res_name;
  void *macdata;
  napi_create_object(env, &obj);
  napi_create_string_utf8(env, name, namelen, &v_name);
  napi_create_buffer_copy(env, 6, mac, &macdata, &v_mac);
  napi_create_int32(env, mtu, &v_mtu);
  napi_create_int32(env, ifindex, &v_ifindex);
  napi_property_descriptor props[] = {
      {"name", NULL, NULL, NULL, NULL, v_name, napi_enumerable, NULL},
      {"mac", NULL, NULL, NULL, NULL, v_mac, napi_enumerable, NULL},
      {"mtu", NULL, NULL, NULL, NULL, v_mtu, napi_enumerable, NULL},
      {"ifindex", NULL, NULL, NULL, NULL, v_ifindex, napi_enumerable, NULL},
      {"send", NULL, sock_send, NULL, NULL, NULL, napi_default, NULL},
      {"stats", NULL, sock_stats, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, sock_close, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, obj, sizeof props / sizeof props[0], props);
  napi_wrap(env, obj, s, finalize, NULL, NULL);
  napi_create_reference(env, obj, 1, &s->self);
  napi_create_reference(env, argv[1], 1, &s->callback);
  napi_create_string_utf8(env, "AoeSocket", NAPI_AUTO_LENGTH, &res_name);
  napi_async_init(env, obj, res_name, &s->async);
  napi_add_env_cleanup_hook(env, cleanup_hook, s);
  if (uv_poll_start(&s->poll, UV_READABLE, on_readable) != 0) {
    do_close(s);
    return throw_value(env, make_error(env, "EIO", "cannot poll the AoE socket"));
  }
  return obj;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor desc = {"open", NULL, aoe_open, NULL, NULL, NULL, napi_default, NULL};
  napi_define_properties(env, exports, 1, &desc);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
