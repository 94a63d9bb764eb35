#!/bin/sh
# Entry point of the LeaderWorkerSet pods (deploy/k8s): turns a pod's place in its group into emu3's flags, then
# execs emu3 (so SIGTERM from the kubelet, through tini, reaches node itself and the service drains).
#
#   lws-entry.sh coordinator [coordinator flags]   the leader (LWS_WORKER_INDEX 0)
#   lws-entry.sh shard [shard flags]               worker w = 1 .. LWS_GROUP_SIZE-1: pipeline stage w-1
#
# The leader is index 0, so a group of size S has S-1 stages: worker w runs --stage-index w-1 --stages S-1 (its
# layers are split exactly as `emu3 up` splits them). LeaderWorkerSet names pods <lws>-<group> (leader) and
# <lws>-<group>-<w> (workers) under one headless Service, and gives every pod LWS_LEADER_ADDRESS =
# <lws>-<group>.<subdomain...>; so worker w is reached at <lws>-<group>-<w>.<subdomain...>. From these the
# coordinator gets --shards (workers 1..S-1 in order) and --sink-advertise (its own stable name), every shard
# --allow-reply-to that same address (a shard sends results nowhere else), and every stage but the last gets --next
# (worker w+1).
set -eu
role=${1:?usage: lws-entry.sh coordinator|shard [flags]}
shift
: "${LWS_GROUP_SIZE:?LWS_GROUP_SIZE is not set (not a LeaderWorkerSet pod?)}"
: "${LWS_WORKER_INDEX:?LWS_WORKER_INDEX is not set (not a LeaderWorkerSet pod?)}"
: "${LWS_LEADER_ADDRESS:?LWS_LEADER_ADDRESS is not set (not a LeaderWorkerSet pod?)}"
case $LWS_LEADER_ADDRESS in
*.*) ;;
*) echo "lws-entry.sh: LWS_LEADER_ADDRESS '$LWS_LEADER_ADDRESS' has no domain part" >&2; exit 2 ;;
esac
stages=$((LWS_GROUP_SIZE - 1))
if [ "$stages" -lt 1 ]; then
  echo "lws-entry.sh: LWS_GROUP_SIZE $LWS_GROUP_SIZE leaves no shard (size = stages + 1)" >&2
  exit 2
fi
leader_host=${LWS_LEADER_ADDRESS%%.*}
domain=${LWS_LEADER_ADDRESS#*.}
shard_port=${EMU3_SHARD_PORT:-50061}
sink_port=${EMU3_SINK_PORT:-50060}
worker_address() { printf '%s-%s.%s:%s' "$leader_host" "$1" "$domain" "$shard_port"; }
bin="$(dirname "$0")/../bin/emu3.js"
case $role in
coordinator)
  shards=""
  w=1
  while [ "$w" -le "$stages" ]; do
    shards="$shards${shards:+,}$(worker_address "$w")"
    w=$((w + 1))
  done
  exec node "$bin" coordinator --shards "$shards" --sink-advertise "$LWS_LEADER_ADDRESS:$sink_port" "$@"
  ;;
shard)
  stage=$((LWS_WORKER_INDEX - 1))
  if [ "$stage" -lt 0 ]; then
    echo "lws-entry.sh: a shard must be a worker (LWS_WORKER_INDEX >= 1), got $LWS_WORKER_INDEX" >&2
    exit 2
  fi
  if [ $((stage + 1)) -lt "$stages" ]; then set -- --next "$(worker_address $((LWS_WORKER_INDEX + 1)))" "$@"; fi
  exec node "$bin" shard --stage-index "$stage" --stages "$stages" --allow-reply-to "$LWS_LEADER_ADDRESS:$sink_port" "$@"
  ;;
*)
  echo "lws-entry.sh: unknown role '$role' (coordinator or shard)" >&2
  exit 2
  ;;
esac
