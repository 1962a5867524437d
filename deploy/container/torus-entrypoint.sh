#!/bin/sh
# The image's entrypoint. No arguments, flags, or a Torus program: the environment becomes flags
# (src/cli/container.ts) and the program runs. Anything else runs as given (sh, etcdctl, ...).
case "${1:-}" in
  "" | -* | torusd | torus | torusctl | torusblk | torusblock) exec node /opt/torus/bin/torus-container.js "$@" ;;
  *) exec "$@" ;;
esac
