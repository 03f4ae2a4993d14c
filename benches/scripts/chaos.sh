#!/usr/bin/env bash
# Faults under load (issue 16): a local cluster (deploy/local-cluster.sh: logic nodes with their
# embedded stores, gates, a Redis Cluster) carries c2c and group traffic from two loadgens while a
# seeded schedule kills, restarts and pauses its processes. The loadgens are the judges: they
# reconnect as phones do (the iplist's gates and backoff), send again what was never acked, and at
# the end every user that was online must be back and synced, every acknowledged message
# delivered exactly once per recipient, in per-sender order.
#
#   benches/scripts/chaos.sh                         (SECS=600, a fault every ~15 s)
#   SECS=60 FAULT_EVERY=10 benches/scripts/chaos.sh  (what CI runs, with debug builds)
#   SEED=1234 benches/scripts/chaos.sh               (the same draws as that run: the same faults
#                                                    until timing makes one be skipped)
# Faults start once both loadgens send and stop 15 s before the traffic ends, so that every one
# has healed and the cluster recovered while the loadgens still send and watch.
#
# Faults (FAULTS, comma separated; picked by a PRNG seeded with SEED, one every FAULT_EVERY
# seconds ± 30 %, overlapping when the previous one has not recovered yet, never two on one
# process, and a Redis fault only while the Redis Cluster is whole):
#   kill-logic    kill -9 of a logic node, restarted after 1–3 s (it waits for its old shard
#                 lease to run out before serving again: at most LEASE_MS)
#   kill-gate     kill -9 of a gate, restarted after 1–3 s (its users move to their next gate)
#   term-logic / term-gate
#                 a graceful restart, as a deploy does it: SIGTERM, wait for the exit (SIGKILL
#                 after 15 s, logged), start again after 1–3 s
#   stop-logic    SIGSTOP of a logic node for LEASE_MS + 1–2 s (longer than its lease), then
#                 SIGCONT; a node that finds itself fenced exits with 75 and is restarted
#   kill-redis-master / kill-redis-replica
#                 kill -9 of a Redis Cluster master (its replica takes over after the cluster's
#                 2 s node timeout) or replica, restarted after 3–5 s (it rejoins as a replica)
#   part-redis    (NETNS only) a network partition between a logic node and every Redis node,
#                 for 2–(LEASE_MS + 3 s), then healed: the node cannot renew its shard lease
#   part-gate     (NETNS only) a partition between a gate and a logic node, 2–8 s
#   part-peer     (NETNS only) a partition between two logic nodes, 2–8 s
#   fill-disk     (DATA_FS_MB only) the filesystem of a logic node's store filled up (fallocate)
#                 for 2–6 s, then freed. The node's next write that needs space fails; it must
#                 stop acknowledging (it aborts: a failed write to the store is fatal) and ack
#                 nothing it did not store; it is restarted once the space is back, as a
#                 supervisor would (and watched for 5 s more)
# With NETNS (a short prefix, e.g. imc; root only) every process runs in a network namespace of
# its own (deploy/local-cluster.sh NETNS) and a partition is a blackhole route for the other
# side's address in both namespaces (new connections time out, established ones stall, as on a
# cut cable); the loadgens connect from the bridge address NETNS_NET.1. NETNS adds the three
# partition kinds to the default FAULTS. With DATA_FS_MB (root only) every logic node's store is
# on a loop-mounted filesystem of that many MiB of its own (deploy/local-cluster.sh DATA_FS_MB),
# and fill-disk joins the default FAULTS. A slow disk is not simulated: this machine's kernel has
# no device-mapper (no dm-delay), and throttling a loop device would not slow the syncs honestly.
# Every fault and recovery is written to $OUT/faults.log with its time since the start.
#
# Verdict (exit 0 only if all hold): every SIGTERM'd process exited within 15 s, both loadgens
# exit 0 (their accounting: nothing lost,
# no phantom, no duplicate after dedup, no per-sender reordering, every send acknowledged, every
# user back; see loadgen/README.md), every process of the cluster is up and listening at the
# end, the Redis Cluster is ok. On failure the seed and the fault log are printed, so the run can
# be replayed with SEED=<seed>. Everything started is stopped on exit, failure or Ctrl-C.
#
# Environment: SECS (600), FAULT_EVERY (15), FAULTS (every kind NETNS and DATA_FS_MB allow), SEED
# (from the clock), NETNS, NETNS_NET, DATA_FS_MB (above), USERS
# (c2c users, 2000), RATE (c2c msgs/s, 400), GROUP_USERS (600), MEMBERS (20), GROUP_RATE
# (posts/s, 20), LOGIC_NODES (2), GATES (2), LEASE_MS (4000: the logic nodes' shard lease),
# BIN_DIR (target/release; built if missing), OUT (/tmp/im-chaos-<time>), BASE_PORT (7600),
# KEEP_DATA (1 keeps the stores and logs; they are kept anyway when the run fails).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
secs=${SECS:-600}
every=${FAULT_EVERY:-15}
netns=${NETNS:-}
net=${NETNS_NET:-10.77.0}
data_fs=${DATA_FS_MB:-}
faults=${FAULTS:-kill-logic,kill-gate,term-logic,term-gate,stop-logic,kill-redis-master,kill-redis-replica${netns:+,part-redis,part-gate,part-peer}${data_fs:+,fill-disk}}
seed=${SEED:-$(( $(date +%s%N) % 1000000007 ))}
users=${USERS:-2000}
rate=${RATE:-400}
group_users=${GROUP_USERS:-600}
members=${MEMBERS:-20}
group_rate=${GROUP_RATE:-20}
logic_n=${LOGIC_NODES:-2}
gates_n=${GATES:-2}
lease_ms=${LEASE_MS:-4000}
base=${BASE_PORT:-7600}
out=${OUT:-/tmp/im-chaos-$(date +%Y%m%d-%H%M%S)}
bin=${BIN_DIR:-$here/target/release}
mkdir -p "$out"
out=$(cd "$out" && pwd)
dir=$out/cluster

die() { echo "chaos: $*" >&2; exit 1; }
command -v redis-server >/dev/null || die "redis-server is not installed (apt-get install -y redis-server)"
case ,$faults, in
  *,part-*) [ -n "$netns" ] || die "partition faults need NETNS=<prefix> (processes in network namespaces, as root)" ;;
esac
case ,$faults, in
  *,fill-disk,*) [ -n "$data_fs" ] || die "fill-disk needs DATA_FS_MB=<MiB> (a loop-mounted filesystem per logic node, as root)" ;;
esac
if [ ! -x "$bin/im-server" ] || [ ! -x "$bin/im-loadgen" ]; then
  [ -z "${BIN_DIR:-}" ] || die "$bin has no im-server and im-loadgen"
  (cd "$here" && cargo build --release -q -p im-server -p im-loadgen)
fi

t_start=$(date +%s.%N)
echo "$t_start" >"$out/t_start"
since() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%7.1f", b - a }'; }
log() { echo "$(since) $*" | tee -a "$out/faults.log" >&2; }

cluster_pid=
lg_pids=()
cleanup() {
  trap - EXIT INT TERM
  set +e
  for p in "${lg_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  # Children of the fault subshells first (they may be sleeping before a restart).
  pkill -KILL -P $$ -f "sleep" 2>/dev/null
  pkill -CONT -f -- "--data-dir $dir/" 2>/dev/null # a paused node cannot stop
  if [ -n "$cluster_pid" ]; then
    kill -TERM "$cluster_pid" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$cluster_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # Restarted processes are not the cluster script's children: stop them by their arguments.
  pkill -TERM -f -- "--data-dir $dir/" 2>/dev/null
  pkill -TERM -f -- "^$bin/im-server gate .*--listen [0-9.]+:$(( base / 100 ))[0-9][0-9]" 2>/dev/null
  sleep 1
  pkill -KILL -f -- "--data-dir $dir/" 2>/dev/null
  pkill -KILL -f -- "^$bin/im-server gate .*--listen [0-9.]+:$(( base / 100 ))[0-9][0-9]" 2>/dev/null
  pkill -KILL -f -- "redis-server [0-9.]+:$(( (base + 300) / 100 ))[0-9][0-9]" 2>/dev/null
  pkill -KILL -f -- "$bin/im-loadgen" 2>/dev/null
  [ -n "$cluster_pid" ] && kill -KILL "$cluster_pid" 2>/dev/null
  wait 2>/dev/null
  if [ -n "$netns" ]; then
    # What the cluster script did not remove (it was killed, or processes it restarted).
    for l in $(ip -br link | awk -v p="${netns}h" 'index($1, p) == 1 { sub(/@.*/, "", $1); print $1 }'); do
      ip link del "$l" 2>/dev/null
    done
    for ns in $(ip netns list | awk -v p="$netns-" 'index($1, p) == 1 { print $1 }'); do
      ip netns del "$ns" 2>/dev/null
    done
    ip link del "${netns}br" 2>/dev/null
  fi
  if [ -n "$data_fs" ]; then
    # What the cluster script did not unmount (it was killed first); the images go with $dir.
    for m in "$dir"/fs*; do
      [ -d "$m" ] && mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; }
    done
  fi
  if [ "${verdict:-1}" = 0 ] && [ "${KEEP_DATA:-0}" != 1 ]; then
    rm -rf "$dir"/logic* "$dir"/redis7* "$dir"/fs*
  fi
}
trap cleanup EXIT
trap 'echo "chaos: interrupted" >&2; exit 130' INT TERM

log "seed $seed; ${secs}s of traffic, a fault every ~${every}s from: $faults"
DIR=$dir IM_BIN=$bin/im-server BASE_PORT=$base LOGIC_ARGS="--shard-lease-ms $lease_ms" NETNS=$netns NETNS_NET=$net DATA_FS_MB=$data_fs \
  "$here/deploy/local-cluster.sh" "$logic_n" "$gates_n" 3 >"$out/cluster.log" 2>&1 &
cluster_pid=$!
for _ in $(seq 1200); do
  grep -q "cluster ready" "$out/cluster.log" 2>/dev/null && break
  kill -0 "$cluster_pid" 2>/dev/null || { cat "$out/cluster.log" >&2; die "the cluster did not start"; }
  sleep 0.1
done
grep -q "cluster ready" "$out/cluster.log" || die "the cluster was not ready after 120 s"
log "cluster ready: $logic_n logic nodes, $gates_n gates, Redis Cluster 3+3"

gate_port() { echo $((base + $1 - 1)); }
link_port() { echo $((base + 100 + $1)); }
api_port() { echo $((base + 1080 + $1)); }
redis_port() { echo $((base + 300 + $1)); }
# The address of a process (redis…, logic<i>, gate<g>; as deploy/local-cluster.sh places them)
# and how to run a command in its network namespace.
host_of() {
  [ -n "$netns" ] || { echo 127.0.0.1; return; }
  case $1 in
    redis*) echo "$net.2" ;;
    logic*) echo "$net.$((10 + ${1#logic}))" ;;
    gate*) echo "$net.$((20 + ${1#gate}))" ;;
  esac
}
ns_of() { case $1 in redis*) echo "$netns-redis" ;; *) echo "$netns-$1" ;; esac; }
# Only in the background (`in_ns NAME cmd… &`): it execs, so `$!` is the process itself.
in_ns() {
  local name=$1
  shift
  if [ -n "$netns" ]; then exec ip netns exec "$(ns_of "$name")" "$@"; else exec "$@"; fi
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
rh=$(host_of redis)

# The pid of a cluster process by its name: logic<i>, gate<g>, redis<port>.
pid_of() {
  case $1 in
    logic*) pgrep -f -- "--data-dir $dir/logic${1#logic} " | head -1 ;;
    gate*) pgrep -f -- "^$bin/im-server gate --gate-id ${1#gate} " | head -1 ;;
    redis*) pgrep -f -- "^redis-server $rh:${1#redis}( |$)" | head -1 ;;
  esac
}
port_of() {
  case $1 in
    logic*) api_port "${1#logic}" ;;
    gate*) gate_port "${1#gate}" ;;
    redis*) echo "${1#redis}" ;;
  esac
}
# Whether a cluster process accepts connections.
listening() { port_open "$(host_of "$1")" "$(port_of "$1")"; }
log_of() {
  case $1 in
    logic*|gate*) echo "$dir/$1.log" ;;
    redis*) echo "$dir/redis${1#redis}.log" ;;
  esac
}
# The command line a process was started with (Redis rewrites its title: its arguments are the
# ones deploy/local-cluster.sh uses).
cmdline_of() {
  case $1 in
    redis*)
      local p=${1#redis}
      printf '%s\0' redis-server --port "$p" --bind "$rh" --cluster-enabled yes \
        --cluster-config-file "$dir/redis$p/nodes.conf" --cluster-node-timeout 2000 \
        --appendonly yes --save '' --dir "$dir/redis$p" --daemonize no \
        ${netns:+--protected-mode no} ;;
    *) cat "/proc/$2/cmdline" ;;
  esac
}
redis_ok() { redis-cli -h "$rh" -p "$(redis_port 0)" cluster info 2>/dev/null | grep -q cluster_state:ok; }
# Redis nodes by role: "port role" for every connected node.
redis_roles() {
  local p
  for i in 0 1 2 3 4 5; do
    p=$(redis_port "$i")
    redis-cli -h "$rh" -p "$p" role 2>/dev/null | head -1 | sed "s/^/$p /" || true
  done
}

mkdir -p "$out/down"
# kill -9 NAME (or SIGTERM it and wait for its exit, with SIG=TERM), wait, start it again with
# the same arguments; logs the recovery (listening).
kill_restart() {
  local name=$1 down_ms=$2 sig=${3:-KILL} pid cmd t0
  pid=$(pid_of "$name")
  [ -n "$pid" ] || { log "$name: not running, skipped"; rm -f "$out/down/$name"; return; }
  mapfile -d '' cmd < <(cmdline_of "$name" "$pid")
  if [ "$sig" = TERM ]; then
    t0=$(date +%s%N)
    kill -TERM "$pid"
    log "SIGTERM $name (pid $pid)"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not exit 15 s after SIGTERM; kill -9"
      echo "$name did not exit within 15 s of SIGTERM" >>"$out/violations"
      kill -KILL "$pid"
    fi
    log "$name exited $(( ($(date +%s%N) - t0) / 1000000 )) ms after SIGTERM; restart in ${down_ms} ms"
  else
    kill -KILL "$pid"
    log "kill -9 $name (pid $pid); restart in ${down_ms} ms"
  fi
  sleep "$(awk -v m="$down_ms" 'BEGIN { print m / 1000 }')"
  t0=$(date +%s%N)
  in_ns "$name" "${cmd[@]}" >>"$(log_of "$name")" 2>&1 &
  local npid=$!
  for _ in $(seq 600); do listening "$name" && break; sleep 0.1; done
  if listening "$name"; then
    log "$name back (pid $(pid_of "$name" || echo "$npid")), listening $(( ($(date +%s%N) - t0) / 1000000 )) ms after the restart"
  else
    log "$name NOT listening 60 s after its restart (pid $npid)"
  fi
  rm -f "$out/down/$name"
}
# SIGSTOP NAME for stop_ms, then SIGCONT; a fenced node exits 75 and is restarted.
stop_cont() {
  local name=$1 stop_ms=$2 pid cmd
  pid=$(pid_of "$name")
  [ -n "$pid" ] || { log "$name: not running, skipped"; rm -f "$out/down/$name"; return; }
  mapfile -d '' cmd < <(cmdline_of "$name" "$pid")
  kill -STOP "$pid"
  log "SIGSTOP $name (pid $pid) for ${stop_ms} ms (lease ${lease_ms} ms)"
  sleep "$(awk -v m="$stop_ms" 'BEGIN { print m / 1000 }')"
  kill -CONT "$pid"
  log "SIGCONT $name"
  sleep 2
  if ! kill -0 "$pid" 2>/dev/null; then
    log "$name exited after SIGCONT ($(tail -n 3 "$(log_of "$name")" | grep -o 'fenced, exiting.*' | head -1)); restarting"
    in_ns "$name" "${cmd[@]}" >>"$(log_of "$name")" 2>&1 &
    for _ in $(seq 600); do listening "$name" && break; sleep 0.1; done
    log "$name back (pid $!)"
  fi
  rm -f "$out/down/$name"
}
# A partition between A and B (cluster process names; "redis" is every Redis node) for ms
# milliseconds: a blackhole route for the other's address in each namespace, then removed. A
# logic node that exits meanwhile (it found itself fenced: 75) is restarted after the heal.
partition() {
  local a=$1 b=$2 ms=$3 ha hb pa pb cmd_a=() cmd_b=()
  ha=$(host_of "$a")
  hb=$(host_of "$b")
  pa=$(pid_of "$a" || true)
  pb=$(pid_of "$b" || true)
  [ -n "$pa" ] && case $a in logic*) mapfile -d '' cmd_a < <(cmdline_of "$a" "$pa") ;; esac
  [ -n "$pb" ] && case $b in logic*) mapfile -d '' cmd_b < <(cmdline_of "$b" "$pb") ;; esac
  ip -n "$(ns_of "$a")" route add blackhole "$hb/32"
  ip -n "$(ns_of "$b")" route add blackhole "$ha/32"
  log "partition $a | $b for ${ms} ms"
  sleep "$(awk -v m="$ms" 'BEGIN { print m / 1000 }')"
  ip -n "$(ns_of "$a")" route del blackhole "$hb/32"
  ip -n "$(ns_of "$b")" route del blackhole "$ha/32"
  log "healed $a | $b"
  sleep 2
  local n p c
  for n in "$a" "$b"; do
    case $n in logic*) ;; *) continue ;; esac
    p=$pa c=("${cmd_a[@]}")
    [ "$n" = "$b" ] && p=$pb c=("${cmd_b[@]}")
    if [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null && [ ${#c[@]} -gt 0 ]; then
      log "$n exited during the partition ($(tail -n 3 "$(log_of "$n")" | grep -o 'fenced, exiting.*' | head -1)); restarting"
      in_ns "$n" "${c[@]}" >>"$(log_of "$n")" 2>&1 &
      for _ in $(seq 600); do listening "$n" && break; sleep 0.1; done
      log "$n back (pid $!)"
    fi
  done
  rm -f "$out/down/$a" "$out/down/$b"
}

# Fills the filesystem of logic node NAME's store for ms milliseconds (fallocate until nothing is
# left), then frees it. A node that stopped meanwhile (its store's write failed: it aborts) is
# restarted once the space is back; one that is still up is watched 5 s more.
fill_disk() {
  local name=$1 ms=$2 fs=$dir/fs${1#logic} pid cmd avail n=0 p
  pid=$(pid_of "$name")
  [ -n "$pid" ] || { log "$name: not running, skipped"; rm -f "$out/down/$name"; return; }
  mapfile -d '' cmd < <(cmdline_of "$name" "$pid")
  while avail=$(df -B1 --output=avail "$fs" | tail -1 | tr -d ' ') && [ "$avail" -gt 0 ] && [ $n -lt 20 ]; do
    fallocate -l "$avail" "$fs/filler$n" 2>/dev/null || true
    n=$((n + 1))
  done
  log "disk of $name full for ${ms} ms ($(df -B1M --output=avail "$fs" | tail -1 | tr -d ' ') MiB left)"
  sleep "$(awk -v m="$ms" 'BEGIN { print m / 1000 }')"
  rm -f "$fs"/filler*
  log "disk of $name freed"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if ! kill -0 "$pid" 2>/dev/null; then
    log "$name stopped on the full disk ($(grep -o 'commit failed, aborting.*' "$(log_of "$name")" | tail -1 | cut -c1-160)); restarting"
    in_ns "$name" "${cmd[@]}" >>"$(log_of "$name")" 2>&1 &
    p=$!
    for _ in $(seq 600); do listening "$name" && break; sleep 0.1; done
    if listening "$name"; then
      log "$name back (pid $p)"
    else
      log "$name NOT listening 60 s after its restart (pid $p)"
    fi
  else
    log "$name back (pid $pid): it kept running through the full disk"
  fi
  rm -f "$out/down/$name"
}

RANDOM=$seed
pick() { local a=("$@"); echo "${a[$((RANDOM % ${#a[@]}))]}"; }
between() { echo $(( $1 + RANDOM % ($2 - $1 + 1) )); }

iplist="http://$(host_of logic0):$(api_port 0)"
src_c2c=() src_group=(--src-ips 127.0.0.10-127.0.0.12)
[ -n "$netns" ] && src_c2c=(--src-ips "$net.1") src_group=(--src-ips "$net.1")
common=(--iplist "$iplist" --reconnect-initial-ms 200 --reconnect-max-ms 3000
  --drain-quiet-ms 3000 --drain-max-secs 180 --ack-timeout-ms 60000 --login-retry-secs 120
  --heartbeat-secs 10 --login-timeout-secs 10 --seed "$seed")
"$bin/im-loadgen" c2c -n "$users" --msg-rate "$rate" --secs "$secs" --uid-base 1000000 \
  "${src_c2c[@]}" "${common[@]}" --json-out "$out/c2c.json" >"$out/c2c.txt" 2>&1 &
lg_pids+=($!)
"$bin/im-loadgen" group -n "$group_users" --members "$members" --msg-rate "$group_rate" \
  --secs "$secs" --uid-base 2000000 "${src_group[@]}" \
  "${common[@]}" --json-out "$out/group.json" >"$out/group.txt" 2>&1 &
lg_pids+=($!)
# Faults start once both loadgens are sending (their logins and group creation done).
for _ in $(seq 1200); do
  grep -qE '/s sent +[1-9]' "$out/c2c.txt" 2>/dev/null &&
    grep -qE '/s sent +[1-9]' "$out/group.txt" 2>/dev/null && break
  for p in "${lg_pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { tail -n 5 "$out/c2c.txt" "$out/group.txt" >&2; die "a loadgen exited before its traffic started"; }
  done
  sleep 0.1
done
sleep 2
log "traffic running: c2c $users users at $rate/s, group $group_users users × groups of $members at $group_rate posts/s"

IFS=, read -r -a kinds <<<"$faults"
# The last fault starts 15 s before the traffic ends: the longest (a partition of 8 s, a stop of
# LEASE_MS + 2 s, a Redis restart after 5 s) is over, and the cluster has had seconds to
# recover, while the loadgens still send. One that heals at the end is judged by the loadgens'
# 3 s of quiet alone (in a CI run, a 7.8 s partition of the logic nodes healed 4 s before the
# traffic ended read as 1 103 c2c messages lost: the peer link then stalled until TCP's next
# retransmission, ~7 s after the heal; links now end a partition after 5 s, UNACKED_MAX).
t_end=$(( $(date +%s) + secs - 15 ))
n_faults=0
while [ "$(date +%s)" -lt "$t_end" ]; do
  sleep "$(awk -v e="$every" -v r=$((RANDOM % 61)) 'BEGIN { print e * (0.7 + r / 100) }')"
  [ "$(date +%s)" -lt "$t_end" ] || break
  kind=$(pick "${kinds[@]}")
  case $kind in
    kill-logic|term-logic|stop-logic) name=logic$(between 0 $((logic_n - 1))) ;;
    kill-gate|term-gate) name=gate$(between 1 "$gates_n") ;;
    kill-redis-master|kill-redis-replica)
      if ! redis_ok || [ "$(redis_roles | wc -l)" -lt 6 ] || ls "$out/down" | grep -q redis; then
        log "$kind: the Redis Cluster is not whole, skipped"
        continue
      fi
      want=master; [ "$kind" = kill-redis-replica ] && want=slave
      mapfile -t cands < <(redis_roles | awk -v w="$want" '$2 == w { print $1 }')
      [ ${#cands[@]} -gt 0 ] || { log "$kind: no $want found, skipped"; continue; }
      name=redis$(pick "${cands[@]}") ;;
    part-redis) name=logic$(between 0 $((logic_n - 1))) peer=redis ;;
    fill-disk) name=logic$(between 0 $((logic_n - 1))) ;;
    part-gate) name=gate$(between 1 "$gates_n") peer=logic$(between 0 $((logic_n - 1))) ;;
    part-peer)
      [ "$logic_n" -ge 2 ] || { log "part-peer: one logic node, skipped"; continue; }
      name=logic$(between 0 $((logic_n - 1)))
      peer=logic$(( (${name#logic} + $(between 1 $((logic_n - 1)))) % logic_n )) ;;
    *) die "unknown fault $kind (FAULTS=$faults)" ;;
  esac
  case $kind in part-*) ;; *) peer= ;; esac
  if [ -e "$out/down/$name" ] || { [ -n "$peer" ] && ls "$out/down" | grep -q "^$peer"; }; then
    log "$kind $name${peer:+ | $peer}: still recovering from the last fault, skipped"
    continue
  fi
  touch "$out/down/$name"
  [ -n "$peer" ] && touch "$out/down/$peer"
  n_faults=$((n_faults + 1))
  case $kind in
    kill-logic|kill-gate) kill_restart "$name" "$(between 1000 3000)" & ;;
    term-logic|term-gate) kill_restart "$name" "$(between 1000 3000)" TERM & ;;
    kill-redis-*) kill_restart "$name" "$(between 3000 5000)" & ;;
    stop-logic) stop_cont "$name" $((lease_ms + $(between 1000 2000))) & ;;
    part-redis) partition "$name" redis "$(between 2000 $((lease_ms + 3000)))" & ;;
    part-gate|part-peer) partition "$name" "$peer" "$(between 2000 8000)" & ;;
    fill-disk) fill_disk "$name" "$(between 2000 6000)" & ;;
  esac
done
log "fault schedule done: $n_faults faults; waiting for the recoveries and the loadgens"
for _ in $(seq 900); do
  [ -z "$(ls "$out/down")" ] && break
  sleep 0.1
done

rc_c2c=0; rc_group=0
wait "${lg_pids[0]}" || rc_c2c=$?
wait "${lg_pids[1]}" || rc_group=$?
lg_pids=()
log "loadgens done: c2c rc $rc_c2c, group rc $rc_group"

verdict=0
bad() { log "VIOLATION: $*"; verdict=1; }
if [ -s "$out/violations" ]; then
  while read -r v; do bad "$v"; done <"$out/violations"
fi
[ "$rc_c2c" = 0 ] || bad "c2c loadgen exit $rc_c2c: $(grep 'FAILED' "$out/c2c.txt" | tr '\n' ' ')"
[ "$rc_group" = 0 ] || bad "group loadgen exit $rc_group: $(grep 'FAILED' "$out/group.txt" | tr '\n' ' ')"
for i in $(seq 0 $((logic_n - 1))); do
  port_open "$(host_of "logic$i")" "$(api_port "$i")" && port_open "$(host_of "logic$i")" "$(link_port "$i")" ||
    bad "logic$i is not up at the end"
done
for g in $(seq 1 "$gates_n"); do listening "gate$g" || bad "gate$g is not up at the end"; done
for i in 0 1 2 3 4 5; do port_open "$rh" "$(redis_port "$i")" || bad "redis $(redis_port "$i") is not up at the end"; done
redis_ok || bad "the Redis Cluster is not ok at the end"

python3 - "$out" "$seed" "$n_faults" "$verdict" <<'PY'
import json, sys, os
out, seed, n_faults, verdict = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(n):
    try:
        return json.load(open(os.path.join(out, n)))
    except Exception:
        return {}
c, g = load("c2c.json"), load("group.json")
cc, ga = c.get("c2c", {}), g.get("group", {})
acc = ga.get("accounting", {}) or {}
def lat(x):
    x = x or {}
    return {k: x.get(k) for k in ("p50_ms", "p99_ms", "max_ms")}
summary = {
    "seed": seed, "faults": n_faults, "passed": verdict == 0,
    "c2c": {k: cc.get(k) for k in ("sent", "acked", "delivered", "delivered_by_sync", "lost",
            "undelivered_offline", "phantom", "dedup_dups", "out_of_order", "ack_timeouts",
            "send_errors", "disconnects", "reconnected", "retries", "resent", "not_back")},
    "c2c_reconnect": lat(cc.get("reconnect_latency")),
    "group": {k: acc.get(k) for k in ("posts_acked", "expected", "received", "lost",
              "undelivered_offline", "phantom", "non_member", "order_mismatch_members")},
    "group_traffic": {k: ga.get(k) for k in ("sent", "acked", "ack_timeouts", "send_errors",
                      "dedup_dups", "out_of_order", "reconnected", "resent", "not_back")},
    "group_reconnect": lat(ga.get("reconnect_latency")),
}
# Per fault kind: how many, and how long the process was gone (kill -9 → listening again) or
# paused (SIGSTOP → SIGCONT), from the fault log.
import re
kinds, start, windows = {}, {}, []
for line in open(os.path.join(out, "faults.log")):
    m = re.match(r"\s*([\d.]+) (.*)", line)
    if not m:
        continue
    t, text = float(m.group(1)), m.group(2)
    if (k := re.match(r"kill -9 (\w+?)(\d+) ", text)):
        name = k.group(1) + k.group(2)
        kind = {"logic": "kill-logic", "gate": "kill-gate", "redis": "kill-redis"}[k.group(1)]
        start[name] = (kind, t)
    elif (k := re.match(r"SIGTERM (\w+?)(\d+) ", text)):
        start[k.group(1) + k.group(2)] = ("term-" + k.group(1), t)
    elif (k := re.match(r"SIGSTOP (\w+) ", text)):
        start[k.group(1)] = ("stop-logic", t)
    elif (k := re.match(r"disk of (\w+) full", text)):
        start[k.group(1)] = ("fill-disk", t)
    elif (k := re.match(r"partition (\S+) \| (\S+) for", text)):
        a, b = k.group(1), k.group(2)
        kind = "part-redis" if b == "redis" else "part-gate" if a.startswith("gate") else "part-peer"
        start[a + "|" + b] = (kind, t)
    elif (k := re.match(r"healed (\S+) \| (\S+)", text)):
        if (key := k.group(1) + "|" + k.group(2)) in start:
            kind, t0 = start.pop(key)
            kinds.setdefault(kind, []).append(t - t0)
            windows.append((kind, t0, t))
    elif (k := re.match(r"(\w+) back \(pid", text)) or (k := re.match(r"SIGCONT (\w+)", text)):
        if k.group(1) in start:
            kind, t0 = start.pop(k.group(1))
            kinds.setdefault(kind, []).append(t - t0)
            windows.append((kind, t0, t))
def stats(v):
    v = sorted(v)
    return {"count": len(v), "p50_s": round(v[len(v) // 2], 1), "max_s": round(v[-1], 1)}
summary["faults_by_kind"] = {k: stats(v) for k, v in sorted(kinds.items())}
# The clients' recovery by the fault that caused it: each lost connection (both loadgens'
# `reconnect_times`: when it was lost, how long until logged in and synced again) goes to the
# fault that started last before it, if it was lost between that fault's start and 10 s after
# its recovery (a client notices a dead peer late: heartbeats, the login timeout).
try:
    t_start = float(open(os.path.join(out, "t_start")).read())
except Exception:
    t_start = None
by_fault = {}
if t_start is not None:
    for rep in (cc, ga):
        for lost_at, took in rep.get("reconnect_times") or []:
            t = lost_at / 1000 - t_start
            cands = [w for w in windows if w[1] - 1 <= t <= w[2] + 10]
            kind = max(cands, key=lambda w: w[1])[0] if cands else "none"
            by_fault.setdefault(kind, []).append(took / 1000)
def cstats(v):
    v = sorted(v)
    q = lambda p: round(v[min(len(v) - 1, int(p * len(v)))], 2)
    return {"reconnects": len(v), "p50_s": q(0.5), "p99_s": q(0.99), "max_s": round(v[-1], 2)}
summary["client_recovery_by_fault"] = {k: cstats(v) for k, v in sorted(by_fault.items())}
fenced = 0
for f in os.listdir(os.path.join(out, "cluster")):
    if f.startswith("logic") and f.endswith(".log"):
        fenced += open(os.path.join(out, "cluster", f), errors="replace").read().count("fenced, exiting")
summary["fenced_exits"] = fenced
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
if [ "$verdict" = 0 ]; then
  log "PASSED: seed $seed, $n_faults faults (results in $out)"
else
  log "FAILED: seed $seed (replay: SEED=$seed SECS=$secs FAULT_EVERY=$every FAULTS=$faults $0); fault log $out/faults.log"
  exit 1
fi
