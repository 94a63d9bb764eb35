# syntax=docker/dockerfile:1
# emu3-serve: one image for every service (emu3 coordinator, shard, vq, gateway, make-tiny, up); docs/deploy.md.
#   docker build -t emu3-serve:0.1.0 .
# The npm settings are .ci/run's, so the install is offline-safe the same way: no dependency install script runs
# (onnxruntime-node's would download its CUDA provider) and ONNXRUNTIME_NODE_INSTALL=skip stops it on any npm.

# --- build: every dependency, then the TypeScript build (dist/) ---
FROM node:20-bookworm-slim AS build
WORKDIR /src
ENV ONNXRUNTIME_NODE_INSTALL=skip \
    npm_config_update_notifier=false
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --ignore-scripts
COPY tsconfig.json ./
COPY proto ./proto
COPY lib ./lib
COPY services ./services
COPY cli ./cli
RUN npx tsc -p tsconfig.json

# --- runtime: production dependencies only, the built JavaScript, the protos ---
FROM node:20-bookworm-slim AS runtime
# tini: PID 1 that forwards SIGTERM to node (the services drain on it) and reaps zombies.
# libvulkan1: the Vulkan loader for the webgpu device; the NVIDIA driver's Vulkan ICD is mounted into the container by
# the NVIDIA container toolkit when NVIDIA_DRIVER_CAPABILITIES includes "graphics".
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini libvulkan1 \
 && rm -rf /var/lib/apt/lists/*
ENV NODE_ENV=production \
    ONNXRUNTIME_NODE_INSTALL=skip \
    npm_config_update_notifier=false \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    EMU3_CACHE_DIR=/var/cache/emu3 \
    HOME=/tmp
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --ignore-scripts \
 && npm cache clean --force
COPY proto ./proto
COPY bin ./bin
COPY deploy/lws-entry.sh ./deploy/lws-entry.sh
COPY --from=build /src/dist ./dist
# A fixed non-root uid/gid (the manifests' runAsUser/runAsGroup). The root filesystem can be mounted read-only:
# graph caches go to EMU3_CACHE_DIR (a volume), models come from a read-only volume under /models, HOME is /tmp.
RUN groupadd --system --gid 10001 emu3 \
 && useradd --system --uid 10001 --gid emu3 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin emu3 \
 && mkdir -p /var/cache/emu3 /models \
 && chown emu3:emu3 /var/cache/emu3
USER 10001:10001
VOLUME ["/var/cache/emu3"]
# coordinator 50051 (public) and 50060 (ResultSink), vq 50052, shard 50061, /metrics 9464
EXPOSE 50051 50052 50060 50061 9464
ENTRYPOINT ["/usr/bin/tini", "--", "node", "/app/bin/emu3.js"]
CMD ["--help"]
