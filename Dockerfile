# The Torus image: torusd, torusctl and torusblk (with the CSI driver), configured by environment
# variables (docs/deploy.md). Works with docker build and podman/buildah:
#
#   docker build -t torus .
#   docker run --net=host -v /srv/torus:/data -e STORAGE_SIZE=20GiB -e LISTEN_HOST=$MY_IP \
#     -e ETCD_HOST=10.0.0.2 torus
#
# BUILD_IMAGE and RUNTIME_IMAGE name the official Node 20 images; the tests build the same file
# from local bases made from the Debian mirror (no registry there), passed as build arguments.
ARG BUILD_IMAGE=docker.io/library/node:20-bookworm
ARG RUNTIME_IMAGE=docker.io/library/node:20-bookworm-slim

# ---- build: TypeScript, the native addons (node-gyp: python3, make, g++), production modules ----
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
# No scripts yet: `prepare` would compile before the sources are here.
RUN npm ci --no-audit --no-fund --ignore-scripts
COPY tsconfig.json binding.gyp ./
COPY native native
COPY src src
RUN npx tsc -p tsconfig.json && npm run --silent build:native && npm prune --omit=dev --no-audit --no-fund

# ---- runtime ----
FROM ${RUNTIME_IMAGE}
# tini: PID 1 that reaps the helpers torusblk starts and passes signals on.
# libnbd-bin (nbdfuse), fuse3, nbd-client, mount (losetup, mount), e2fsprogs (mkfs.ext4,
# resize2fs): attaching volumes as block devices and ext4 file systems (torusblk nbd, CSI).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      tini libnbd-bin fuse3 nbd-client mount util-linux e2fsprogs \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin torus
WORKDIR /opt/torus
COPY package.json binding.gyp ./
COPY --from=build /src/node_modules node_modules
COPY --from=build /src/dist/src dist/src
COPY --from=build /src/build/Release/*.node build/Release/
COPY bin bin
COPY src/csi/csi.proto src/csi/csi.proto
COPY deploy/container/torus-entrypoint.sh /usr/local/bin/torus-entrypoint
RUN ln -s /opt/torus/bin/torusd.js /usr/local/bin/torusd && ln -s /opt/torus/bin/torusd.js /usr/local/bin/torus \
 && ln -s /opt/torus/bin/torusctl.js /usr/local/bin/torusctl \
 && ln -s /opt/torus/bin/torusblk.js /usr/local/bin/torusblk && ln -s /opt/torus/bin/torusblk.js /usr/local/bin/torusblock \
 && mkdir -p /data && chown torus:torus /data
# torusd's data. It runs as the user torus (10001): started as root, the entrypoint gives /data
# to that user and drops to it. torusblk stays root: NBD, loop devices, FUSE and mounts need it.
VOLUME ["/data"]
# Peer protocol and HTTP (/healthz, /metrics, /v1/status): LISTEN_PEER_PORT, LISTEN_HTTP_PORT.
EXPOSE 40000 4321
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/torus-entrypoint"]
