#!/usr/bin/env bash
# Starts a whole cluster on this machine for demos, tests and the loadgen: N logic nodes (each
# with its own embedded store under $DIR) and M gates linked to all of them. Ctrl-C (SIGINT) or
# SIGTERM stops every process it started and exits 0.
#
#   deploy/local-cluster.sh [logic_nodes=3] [gates=2] [redis_masters=3]
#
# Gates listen on 127.0.0.1:7000, 7001, …; logic links on 127.0.0.1:7100, 7101, …; the logic
# nodes' HTTP APIs (s2c, groups, iplist, metrics) on 127.0.0.1:8080, 8081, …; with
# redis_masters > 0 (and redis-server installed) a Redis Cluster of that many masters, one
# replica each, on 127.0.0.1:7300… (cluster bus: port + 10000), which the logic nodes use as
# their directory (routes, presence, gate registry). Each logic node keeps its messages in its
# own embedded store unless SCYLLA_NODES names a shared ScyllaDB.
#
# When every process listens, the script prints "cluster ready" as its last line; if a process
# exits or does not listen within READY_TIMEOUT seconds, it stops everything and exits 1.
#
# Environment (all optional):
#   DIR            data and logs (default /tmp/im-cluster). Running again with the same DIR
#                  resumes the stores and the Redis Cluster kept there.
#   IM_BIN         im-server binary to run instead of building target/release/im-server
#                  (cargo build --release) first.
#   BASE_PORT      port layout base (default 7000): gates BASE_PORT+0…, logic links
#                  BASE_PORT+100…, HTTP APIs BASE_PORT+1080…, Redis BASE_PORT+300….
#   SCYLLA_NODES   ScyllaDB contact points (host:port,…) for the logic nodes' shared store; the
#                  keyspace (IM_SCYLLA_KEYSPACE, default "im") must exist (deploy/scylla/README.md).
#   READY_TIMEOUT  seconds to wait for each process to listen (default 60).
#   GATE_ARGS      more `im-server gate` flags for every gate (e.g. "--idle-timeout-secs 600").
#   LOGIC_ARGS     more `im-server logic` flags for every logic node (e.g. "--shard-lease-ms 3000").
#   NETNS          a short name prefix (e.g. "imc", root only): run every process in a network
#                  namespace of its own, so that links between them can be cut (partitions,
#                  benches/scripts/chaos.sh). A bridge "<NETNS>br" in this namespace has
#                  NETNS_NET.1/24 (default 10.77.0.1); the Redis nodes share "<NETNS>-redis" at
#                  .2, logic node i is "<NETNS>-logic<i>" at .(10+i), gate g "<NETNS>-gate<g>" at
#                  .(20+g); every address above is then that IP instead of 127.0.0.1 (Redis
#                  without protected mode: the bridge is private to this machine). The
#                  namespaces and the bridge are removed when the script stops.
#   DATA_FS_MB     (root only) each logic node's store on a filesystem of its own: an ext4 image
#                  of this many MiB ($DIR/fs<i>.img, sparse, no blocks reserved for root),
#                  loop-mounted at $DIR/fs<i>, with $DIR/logic<i> a link to fs<i>/data; so one
#                  node's disk can be filled up (benches/scripts/chaos.sh fill-disk). Unmounted
#                  when the script stops; the images stay in DIR (a rerun mounts them again).
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
nodes_n=${1:-3}
gates_n=${2:-2}
redis_n=${3:-3}
dir=${DIR:-/tmp/im-cluster}
case $dir in /*) ;; *) dir=$here/$dir ;; esac
base=${BASE_PORT:-7000}
ready_timeout=${READY_TIMEOUT:-60}
gate_port() { echo $((base + $1 - 1)); }  # gate ids start at 1
link_port() { echo $((base + 100 + $1)); }
api_port() { echo $((base + 1080 + $1)); }
redis_port() { echo $((base + 300 + $1)); }
netns=${NETNS:-}
net=${NETNS_NET:-10.77.0}
# The address of a process (redis, logic<i>, gate<g>) and how to run a command in its namespace.
host_of() {
  if [ -z "$netns" ]; then echo 127.0.0.1; return; fi
  case $1 in
    redis) echo "$net.2" ;;
    logic*) echo "$net.$((10 + ${1#logic}))" ;;
    gate*) echo "$net.$((20 + ${1#gate}))" ;;
  esac
}
# Only in the background (`in_ns NAME cmd… &`): it execs, so `$!` is the process itself.
in_ns() {
  local name=$1
  shift
  if [ -n "$netns" ]; then exec ip netns exec "$netns-$name" "$@"; else exec "$@"; fi
}
# ns_add NAME: a namespace with a veth into the bridge and the address host_of NAME.
ns_add() {
  local ns="$netns-$1" ip octet
  ip=$(host_of "$1")
  octet=${ip##*.}
  ip netns add "$ns"
  ip link add "${netns}h$octet" type veth peer name eth0 netns "$ns"
  ip link set "${netns}h$octet" master "${netns}br" up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
}
# Removes the host ends of the veths first (that removes both ends at once; a namespace's own
# removal is asynchronous), then the namespaces and the bridge. Also clears what an earlier run
# with the same prefix left.
ns_teardown() {
  [ -n "$netns" ] || return 0
  local ns l
  for l in $(ip -br link | awk -v p="${netns}h" 'index($1, p) == 1 { sub(/@.*/, "", $1); print $1 }'); do
    ip link del "$l" 2>/dev/null || true
  done
  for ns in $(ip netns list | awk -v p="$netns-" 'index($1, p) == 1 { print $1 }'); do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "${netns}br" 2>/dev/null || true
}

data_fs=${DATA_FS_MB:-}
# fs_setup: a loop-mounted filesystem per logic node (DATA_FS_MB); fs_teardown unmounts them
# (lazily if a process still holds one: it is gone once that exits).
fs_setup() {
  local i img mnt
  for i in $(seq 0 $((nodes_n - 1))); do
    img=$dir/fs$i.img mnt=$dir/fs$i
    if [ ! -e "$img" ]; then
      truncate -s "${data_fs}M" "$img"
      mkfs.ext4 -q -F -m 0 "$img" || fail "mkfs.ext4 $img failed"
    fi
    mkdir -p "$mnt"
    mountpoint -q "$mnt" || mount -o loop "$img" "$mnt" || fail "cannot loop-mount $img (DATA_FS_MB needs root and loop devices)"
    mkdir -p "$mnt/data"
    if [ -e "$dir/logic$i" ] && [ ! -L "$dir/logic$i" ]; then
      fail "$dir/logic$i is a directory of an earlier run without DATA_FS_MB; use another DIR"
    fi
    ln -sfn "fs$i/data" "$dir/logic$i"
  done
}
fs_teardown() {
  [ -n "$data_fs" ] || return 0
  local i
  for i in $(seq 0 $((nodes_n - 1))); do
    mountpoint -q "$dir/fs$i" 2>/dev/null || continue
    umount "$dir/fs$i" 2>/dev/null || umount -l "$dir/fs$i" 2>/dev/null || true
  done
}

if [ -n "${IM_BIN:-}" ]; then
  case $IM_BIN in
    */*) case $IM_BIN in /*) bin=$IM_BIN ;; *) bin=$here/$IM_BIN ;; esac ;;
    *) bin=$(command -v "$IM_BIN") || { echo "IM_BIN=$IM_BIN: not found" >&2; exit 1; } ;;
  esac
else
  cargo build --release -q -p im-server
  bin=$PWD/target/release/im-server
fi
[ -x "$bin" ] || { echo "$bin: not an executable" >&2; exit 1; }
mkdir -p "$dir"

# Children by kind, stopped in reverse order of start: gates, then logic nodes, then Redis.
redis_pids=()
logic_pids=()
gate_pids=()

# Sends SIGTERM to the given pids, waits up to 10 s for them to exit, then SIGKILLs the rest.
stop_pids() {
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + 10)) p alive
  while :; do
    alive=()
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    [ ${#alive[@]} -gt 0 ] || break
    if [ $SECONDS -ge $deadline ]; then
      echo "killing ${alive[*]} (no exit 10 s after SIGTERM)" >&2
      kill -KILL "${alive[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

cleanup() {
  trap - EXIT INT TERM
  stop_pids ${gate_pids[@]+"${gate_pids[@]}"}
  stop_pids ${logic_pids[@]+"${logic_pids[@]}"}
  stop_pids ${redis_pids[@]+"${redis_pids[@]}"}
  ns_teardown
  fs_teardown
}
trap 'cleanup' EXIT
trap 'echo "stopping" >&2; cleanup; exit 0' INT TERM

fail() {
  echo "local-cluster: $*" >&2
  exit 1 # the EXIT trap stops what was started
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_ready NAME PID LOG HOST PORT [LINE]: until HOST:PORT accepts connections (and LOG has a
# line starting with LINE), failing when PID exits or after READY_TIMEOUT seconds.
wait_ready() {
  local name=$1 pid=$2 log=$3 host=$4 port=$5 line=${6:-} deadline=$((SECONDS + ready_timeout))
  while :; do
    if [ -z "$line" ] || grep -q "^$line" "$log" 2>/dev/null; then
      port_open "$host" "$port" && return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited during startup; last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
      fail "$name did not start"
    fi
    [ $SECONDS -lt $deadline ] || fail "$name not listening on $host:$port after ${ready_timeout}s (log: $log)"
    sleep 0.1
  done
}

if [ -n "$netns" ]; then
  [ "$(id -u)" = 0 ] || fail "NETNS needs root (ip netns)"
  ns_teardown
  ip link add "${netns}br" type bridge || fail "cannot create bridge ${netns}br"
  ip addr add "$net.1/24" dev "${netns}br"
  ip link set "${netns}br" up
  [ "$redis_n" -gt 0 ] && ns_add redis
  for i in $(seq 0 $((nodes_n - 1))); do ns_add "logic$i"; done
  for g in $(seq 1 "$gates_n"); do ns_add "gate$g"; done
fi
rh=$(host_of redis)
if [ -n "$data_fs" ]; then
  [ "$(id -u)" = 0 ] || fail "DATA_FS_MB needs root (mount)"
  fs_setup
fi

nodes=""
for i in $(seq 0 $((nodes_n - 1))); do nodes+="${nodes:+,}$(host_of "logic$i"):$(link_port "$i")"; done

redis_nodes=""
if [ "$redis_n" -gt 0 ] && command -v redis-server >/dev/null; then
  addrs=()
  for i in $(seq 0 $((redis_n * 2 - 1))); do
    port=$(redis_port "$i")
    mkdir -p "$dir/redis$port"
    in_ns redis redis-server --port "$port" --bind "$rh" --cluster-enabled yes \
      --cluster-config-file "$dir/redis$port/nodes.conf" --cluster-node-timeout 2000 \
      --appendonly yes --save '' --dir "$dir/redis$port" --daemonize no \
      ${netns:+--protected-mode no} >"$dir/redis$port.log" 2>&1 &
    redis_pids+=($!)
    addrs+=("$rh:$port")
    redis_nodes+="${redis_nodes:+,}redis://$rh:$port"
  done
  for i in "${!addrs[@]}"; do
    port=${addrs[$i]#*:}
    wait_ready "redis-server :$port" "${redis_pids[$i]}" "$dir/redis$port.log" "$rh" "$port"
    until redis-cli -h "$rh" -p "$port" ping >/dev/null 2>&1; do
      kill -0 "${redis_pids[$i]}" 2>/dev/null || fail "redis-server :$port exited (log: $dir/redis$port.log)"
      sleep 0.1
    done
  done
  first=${addrs[0]#*:}
  # A DIR kept from an earlier run already holds the cluster (nodes.conf): do not create it again.
  known=$(redis-cli -h "$rh" -p "$first" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')
  if [ "$known" != "${#addrs[@]}" ]; then
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
      >"$dir/redis-create.log" 2>&1 || fail "redis-cli --cluster create failed (log: $dir/redis-create.log)"
  fi
  deadline=$((SECONDS + ready_timeout))
  for a in "${addrs[@]}"; do
    until redis-cli -h "$rh" -p "${a#*:}" cluster info 2>/dev/null | grep cluster_state:ok >/dev/null; do
      [ $SECONDS -lt $deadline ] || fail "Redis Cluster not ok after ${ready_timeout}s (node $a)"
      sleep 0.2
    done
  done
elif [ "$redis_n" -gt 0 ]; then
  echo "redis-server not installed: running without a Redis Cluster (no directory, no iplist)" >&2
fi

for i in $(seq 0 $((nodes_n - 1))); do
  # shellcheck disable=SC2086 # LOGIC_ARGS is a list of flags
  in_ns "logic$i" "$bin" logic --node-id "$i" --nodes "$nodes" --data-dir "$dir/logic$i" --logic-workers 1 \
    --api-listen "$(host_of "logic$i"):$(api_port "$i")" ${redis_nodes:+--redis-nodes "$redis_nodes"} \
    ${SCYLLA_NODES:+--scylla-nodes "$SCYLLA_NODES"} ${LOGIC_ARGS:-} >"$dir/logic$i.log" 2>&1 &
  logic_pids+=($!)
done
for i in $(seq 0 $((nodes_n - 1))); do
  # "api on" is printed after the link listener and the API are both bound.
  wait_ready "logic node $i" "${logic_pids[$i]}" "$dir/logic$i.log" "$(host_of "logic$i")" "$(api_port "$i")" "api on "
done
for g in $(seq 1 "$gates_n"); do
  # shellcheck disable=SC2086 # GATE_ARGS is a list of flags
  in_ns "gate$g" "$bin" gate --gate-id "$g" --logic "$nodes" --listen "$(host_of "gate$g"):$(gate_port "$g")" --gate-cores 1 \
    ${GATE_ARGS:-} >"$dir/gate$g.log" 2>&1 &
  gate_pids+=($!)
done
for g in $(seq 1 "$gates_n"); do
  wait_ready "gate $g" "${gate_pids[$((g - 1))]}" "$dir/gate$g.log" "$(host_of "gate$g")" "$(gate_port "$g")" "listening on "
done

echo "logic nodes: $nodes"
echo "http apis: $(for i in $(seq 0 $((nodes_n - 1))); do printf '%s:%s ' "$(host_of "logic$i")" "$(api_port "$i")"; done)"
echo "redis cluster: ${redis_nodes:-none}"
echo "scylla: ${SCYLLA_NODES:-none (embedded store per logic node)}"
echo "gates: $(for g in $(seq 1 "$gates_n"); do printf '%s:%s ' "$(host_of "gate$g")" "$(gate_port "$g")"; done)"
echo "logs in $dir; Ctrl-C to stop"
echo "cluster ready"
# Returns when every child has exited, or is interrupted by the INT/TERM trap.
wait
