#!/usr/bin/env bash
# Starts a whole cluster on this machine for demos, tests and the loadgen: N logic nodes (each
# with its own embedded store under $DIR) and M gates linked to all of them. Ctrl-C stops it.
#
#   deploy/local-cluster.sh [logic_nodes=3] [gates=2] [redis_masters=3]
#
# Gates listen on 127.0.0.1:7000, 7001, …; logic links on 127.0.0.1:7100, 7101, …; the logic
# nodes' HTTP APIs (s2c, groups, iplist, metrics) on 127.0.0.1:8080, 8081, …; with
# redis_masters > 0 (and redis-server installed) a Redis Cluster of that many masters, one
# replica each, on 127.0.0.1:7300…, which the logic nodes use as their directory (routes and
# presence). Each logic node keeps its messages in its own embedded store (ScyllaDB is not wired
# in yet; see docs/ARCHITECTURE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
nodes_n=${1:-3}
gates_n=${2:-2}
redis_n=${3:-3}
dir=${DIR:-/tmp/im-cluster}
cargo build --release -q -p im-server
bin=target/release/im-server
mkdir -p "$dir"
nodes=""
for i in $(seq 0 $((nodes_n - 1))); do nodes+="${nodes:+,}127.0.0.1:$((7100 + i))"; done
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
redis_nodes=""
if [ "$redis_n" -gt 0 ] && command -v redis-server >/dev/null; then
  addrs=()
  for i in $(seq 0 $((redis_n * 2 - 1))); do
    port=$((7300 + i))
    mkdir -p "$dir/redis$port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/redis$port/nodes.conf" --cluster-node-timeout 2000 \
      --appendonly yes --save '' --dir "$dir/redis$port" --daemonize no \
      >"$dir/redis$port.log" 2>&1 &
    pids+=($!)
    addrs+=("127.0.0.1:$port")
    redis_nodes+="${redis_nodes:+,}redis://127.0.0.1:$port"
  done
  for a in "${addrs[@]}"; do
    until redis-cli -h 127.0.0.1 -p "${a#*:}" ping >/dev/null 2>&1; do sleep 0.1; done
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/redis-create.log" 2>&1
  until redis-cli -p 7300 cluster info | grep -q cluster_state:ok; do sleep 0.2; done
fi
for i in $(seq 0 $((nodes_n - 1))); do
  "$bin" logic --node-id "$i" --nodes "$nodes" --data-dir "$dir/logic$i" --logic-workers 1 \
    --api-listen "127.0.0.1:$((8080 + i))" ${redis_nodes:+--redis-nodes "$redis_nodes"} >"$dir/logic$i.log" 2>&1 &
  pids+=($!)
done
for g in $(seq 1 "$gates_n"); do
  "$bin" gate --gate-id "$g" --logic "$nodes" --listen "127.0.0.1:$((7000 + g - 1))" --gate-cores 1 \
    >"$dir/gate$g.log" 2>&1 &
  pids+=($!)
done
echo "logic nodes: $nodes"
echo "http apis: $(for i in $(seq 0 $((nodes_n - 1))); do printf '127.0.0.1:%s ' $((8080 + i)); done)"
echo "redis cluster: ${redis_nodes:-none}"
echo "gates: $(for g in $(seq 1 "$gates_n"); do printf '127.0.0.1:%s ' $((7000 + g - 1)); done)"
echo "logs in $dir; Ctrl-C to stop"
wait
