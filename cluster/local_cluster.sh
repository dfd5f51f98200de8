#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head node plus (optionally) a worker node,
# each with its own temp dir and ports, bound to 127.0.0.1 only.
#
#   cluster/local_cluster.sh up      # start head (+ worker); prints RAY_ADDRESS and the dashboard URL
#   cluster/local_cluster.sh add-worker  # start the worker node now (after `up` with LC_WORKER_CPUS=0)
#   cluster/local_cluster.sh down    # stop exactly these nodes (other Ray clusters keep running)
#   cluster/local_cluster.sh status
#
# Settings (environment):
#   LC_DIR        state and temp dirs            (default /tmp/ray-lc)
#   LC_PORT_BASE  first of the ports it uses     (default 6500; it uses BASE..BASE+299)
#   LC_HEAD_CPUS  CPUs of the head node          (default 1)
#   LC_WORKER_CPUS CPUs of the worker node, 0 = no worker node (default 1)
#   LC_AUTOSCALING_CONFIG  an autoscaler config for the head (`ray start --autoscaling-config`);
#                 with Ray's fake multi-node provider (RAY_FAKE_CLUSTER=1) the autoscaler starts
#                 worker nodes on this machine, under the head's temp dir (stopped by `down`)
# Token authentication is on (RAY_AUTH_MODE=token); the token is ~/.ray/auth_token.
set -euo pipefail

LC_DIR=${LC_DIR:-/tmp/ray-lc}
BASE=${LC_PORT_BASE:-6500}
HEAD_CPUS=${LC_HEAD_CPUS:-1}
WORKER_CPUS=${LC_WORKER_CPUS:-1}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RAY=${RAY:-$(command -v ray || echo ray)}
IP=127.0.0.1

node_ports() {  # $1 = offset of this node's fixed ports, $2 = offset of its 100 worker ports
  # (the blocks of the two nodes must not overlap: a worker process of one node holding a
  # port the other node's agent needs kills that node's raylet)
  local o=$(( BASE + $1 )) w=$(( BASE + $2 ))
  echo --node-manager-port=$((o + 0)) --object-manager-port=$((o + 1)) \
       --dashboard-agent-listen-port=$((o + 2)) --dashboard-agent-grpc-port=$((o + 3)) \
       --runtime-env-agent-port=$((o + 4)) --metrics-export-port=$((o + 5)) \
       --min-worker-port=$w --max-worker-port=$((w + 99))
}

up() {
  mkdir -p "$LC_DIR"
  # A fresh machine has no token yet; `ray start` with token auth refuses to run without one.
  if [ "$RAY_AUTH_MODE" = "token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    "$RAY" get-auth-token --generate >/dev/null
  fi
  "$RAY" start --head --node-ip-address=$IP --port=$BASE --num-cpus="$HEAD_CPUS" --num-gpus=0 \
    --include-dashboard=true --dashboard-host=$IP --dashboard-port=$((BASE + 1)) \
    --ray-client-server-port=$((BASE + 2)) $(node_ports 10 100) \
    --temp-dir="$LC_DIR/head" --disable-usage-stats \
    ${LC_AUTOSCALING_CONFIG:+--autoscaling-config="$LC_AUTOSCALING_CONFIG"} >"$LC_DIR/head.log" 2>&1 \
    || { cat "$LC_DIR/head.log" >&2; exit 1; }
  if [ "$WORKER_CPUS" != "0" ]; then
    start_worker && wait_nodes 2 || { down; exit 1; }
  fi
  echo "RAY_ADDRESS=$IP:$BASE"
  echo "DASHBOARD=http://$IP:$((BASE + 1))"
}

start_worker() {  # the worker node (LC_WORKER_CPUS CPUs, at least 1), joining the running head
  local cpus=$WORKER_CPUS; [ "$cpus" = "0" ] && cpus=1
  "$RAY" start --address=$IP:$BASE --node-ip-address=$IP --num-cpus="$cpus" --num-gpus=0 \
    $(node_ports 20 200) --temp-dir="$LC_DIR/worker" --disable-usage-stats >"$LC_DIR/worker.log" 2>&1 \
    || { cat "$LC_DIR/worker.log" >&2; return 1; }
}

node_count() {  # (`ray status` names nodes node_<id> on a cluster without an autoscaler)
  "$RAY" status --address=$IP:$BASE 2>/dev/null | grep -c ' node_' || true
}

wait_nodes() {  # `ray start` returns before a worker node has registered: wait for $1 nodes
  for _ in $(seq 1 120); do
    [ "$(node_count)" -ge "$1" ] && return 0
    sleep 0.5
  done
  echo "only some of the $1 node(s) came up; see $LC_DIR/*.log" >&2
  return 1
}

add_worker() {  # a node joining later, e.g. while a job waits for resources (--wait-for-resources)
  local before; before=$(node_count)
  start_worker && wait_nodes $((before + 1)) && echo "worker node joined $IP:$BASE"
}

pids() {  # the nodes' daemons name their temp dir (or, the client server, the GCS port) on
          # their command line; workers and dashboard modules are their descendants
  local roots all kids
  roots=$(pgrep -f -- "$LC_DIR/(head|worker)|ray.util.client.server --address=[^ ]*:$BASE " || true)
  all=$roots
  while [ -n "$roots" ]; do
    kids=$(for r in $roots; do pgrep -P "$r" || true; done)
    all="$all $kids"
    roots=$kids
  done
  echo $all
}

down() {
  local p
  p=$(pids)
  [ -z "$p" ] && { echo "no nodes running under $LC_DIR"; return 0; }
  kill -TERM $p 2>/dev/null || true
  # Up to 15 s for a clean exit, but gcs_server and raylet often ignore SIGTERM for good: once
  # 2 s pass with no process leaving, the rest are killed.
  local left n stalled=0
  left=$(echo $p | wc -w)
  for _ in $(seq 1 30); do
    sleep 0.5
    n=$(pids | wc -w)
    [ "$n" -eq 0 ] && break
    if [ "$n" -lt "$left" ]; then left=$n stalled=0; else stalled=$((stalled + 1)); fi
    [ "$stalled" -ge 4 ] && break
  done
  p=$(pids); [ -n "$p" ] && kill -KILL $p 2>/dev/null || true
  sleep 0.5
  [ -z "$(pids)" ] || { echo "processes still running under $LC_DIR" >&2; return 1; }
  echo "stopped the nodes under $LC_DIR"
}

status() {
  RAY_ADDRESS=$IP:$BASE "$RAY" status
}

case "${1:-}" in
  up) up ;;
  add-worker) add_worker ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|add-worker|down|status" >&2; exit 2 ;;
esac
