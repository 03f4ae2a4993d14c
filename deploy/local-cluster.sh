#!/usr/bin/env bash
# Starts a whole cluster on this machine for demos, tests and the loadgen: N logic nodes (each
# with its own embedded store under $DIR) and M gates linked to all of them. Ctrl-C stops it.
#
#   deploy/local-cluster.sh [logic_nodes=3] [gates=2]
#
# Gates listen on 127.0.0.1:7000, 7001, …; logic links on 127.0.0.1:7100, 7101, …
# Redis Cluster and ScyllaDB are not used yet by the running processes (see docs/ARCHITECTURE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
nodes_n=${1:-3}
gates_n=${2:-2}
dir=${DIR:-/tmp/im-cluster}
cargo build --release -q -p im-server
bin=target/release/im-server
mkdir -p "$dir"
nodes=""
for i in $(seq 0 $((nodes_n - 1))); do nodes+="${nodes:+,}127.0.0.1:$((7100 + i))"; done
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in $(seq 0 $((nodes_n - 1))); do
  "$bin" logic --node-id "$i" --nodes "$nodes" --data-dir "$dir/logic$i" --logic-workers 1 \
    >"$dir/logic$i.log" 2>&1 &
  pids+=($!)
done
for g in $(seq 1 "$gates_n"); do
  "$bin" gate --gate-id "$g" --logic "$nodes" --listen "127.0.0.1:$((7000 + g - 1))" --gate-cores 1 \
    >"$dir/gate$g.log" 2>&1 &
  pids+=($!)
done
echo "logic nodes: $nodes"
echo "gates: $(for g in $(seq 1 "$gates_n"); do printf '127.0.0.1:%s ' $((7000 + g - 1)); done)"
echo "logs in $dir; Ctrl-C to stop"
wait
