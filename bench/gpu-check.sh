#!/usr/bin/env bash
# The webgpu checks for a machine with a real GPU (docs/gpu.md): the Vulkan devices, the webgpu tests, each webgpu
# graph's node placement, bench:stage on one real-shaped Emu3 layer (hidden 4096, 32 heads, 8 KV heads) in fp16 and
# int4 with tokens/s and GB/s against the device's bandwidth, and a 720×720 VQ decode on webgpu. Everything it
# prints is also kept under OUT_DIR (default gpu-check-<time>).
# Usage: bench/gpu-check.sh [OUT_DIR]   env: DEVICE_GBPS (the device's nominal read bandwidth, e.g. 4800 for an
# H200; "bw eff" then uses it instead of the measured one), TEST_TIMEOUT_MS (default 900000)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
step() { printf '\n== %s\n' "$1"; }

step 'vulkaninfo --summary (the adapter Dawn takes: the first discrete GPU)'
vulkaninfo --summary 2>&1 | tee "$out/vulkaninfo.txt"
if ! grep -q 'PHYSICAL_DEVICE_TYPE_DISCRETE_GPU\|PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU' "$out/vulkaninfo.txt"; then
  echo 'gpu-check: Vulkan lists no GPU (only a CPU device?): on NVIDIA in a container, NVIDIA_DRIVER_CAPABILITIES' \
    'must include graphics (docs/gpu.md)' >&2
  exit 1
fi

step 'build'
npx tsc -p tsconfig.json

step 'webgpu tests'
node --test --test-timeout="${TEST_TIMEOUT_MS:-900000}" dist/test/unit/stage-webgpu.test.js \
  dist/test/unit/sampling-head.test.js 2>&1 | tee "$out/tests.txt"

step 'node placement per webgpu graph (ORT verbose log)'
node dist/bench/webgpu-placement.js 2>&1 | tee "$out/placement.txt"

step 'bench:stage on one real-shaped Emu3 layer, fp16 and int4'
node dist/bench/stage.js --device webgpu --model layer --precisions fp16,int4 --dir "$out/bench-stage" \
  ${DEVICE_GBPS:+--device-gbps "$DEVICE_GBPS"} 2>&1 | tee "$out/stage.md"

step '720×720 VQ decode on webgpu'
npm run bench:vq -- --device webgpu 2>&1 | tee "$out/vq.txt"

step "done: results in $out"
