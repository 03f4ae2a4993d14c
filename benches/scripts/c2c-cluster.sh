#!/usr/bin/env bash
# c2c in the distributed shape (gates and logic nodes as processes, a Redis Cluster as the
# directory: deploy/local-cluster.sh) with the CPU per message of each kind of process, to compare
# with the single node at the same rate (benches/scripts/c2c-rates.sh; issue 13: "the distributed
# shape within 2x of the single node's CPU per message").
#
#   benches/scripts/c2c-cluster.sh BIN_DIR [rate...]      (default rates: 2000 5000)
#
# BIN_DIR holds im-server and im-loadgen (release). For each rate: a fresh cluster of LOGIC logic
# nodes (1 worker each), GATES gates (1 core each) and REDIS Redis masters (one replica each),
# `sync` and a wait for a 1-minute load average below QUIET_LOAD (0.5; at most QUIET_WAIT=240 s),
# then `im-loadgen c2c` with its users spread over every gate (uid % GATES). Prints one line per
# rate: the load before the run, send->deliver p50/p99, loss, and CPU (utime+stime from /proc over
# the loadgen run) per sent message of the gates, the logic nodes, Redis, and the sum.
# Environment: USERS (2000), SECS (10), LOGIC (2), GATES (2), REDIS (3), OUT (results dir),
# BASE_PORT (7700). Every process started is stopped on exit.
# SCENARIO=large-group runs `im-loadgen large-group` instead (one group of MEMBERS (100000)
# members of which USERS are online; the rates are posts/s) and reports CPU per member copy
# delivered: the large group's posts cross the links once per gate core (`SendMany`). The
# per-process split then covers the whole run (the group's build too); the loadgen's own
# measure of every server process (`--server-pid`) over the posting alone is the "posting" figure.
set -euo pipefail
bin=${1:?usage: c2c-cluster.sh BIN_DIR [rate...]}
case $bin in /*) ;; *) bin=$PWD/$bin ;; esac
shift
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(2000 5000)
users=${USERS:-2000}
scenario=${SCENARIO:-c2c}
case $scenario in
  c2c | large-group) ;;
  *) echo "SCENARIO is c2c or large-group" >&2; exit 2 ;;
esac
secs=${SECS:-10}
logic=${LOGIC:-2}
gates=${GATES:-2}
redis=${REDIS:-3}
base=${BASE_PORT:-7700}
out=${OUT:-/tmp/im-c2c-cluster-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/../.." && pwd)
tck=$(getconf CLK_TCK)
cpid=
stop() {
  if [ -n "$cpid" ]; then
    kill -TERM "$cpid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$cpid" 2>/dev/null || true
    wait "$cpid" 2>/dev/null || true
  fi
  cpid=
}
trap stop EXIT
# Sum of utime+stime (ticks) of the given pids.
ticks() {
  local s=0 p
  for p in "$@"; do
    s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$s"
}
servers=()
for g in $(seq 0 $((gates - 1))); do servers+=("127.0.0.1:$((base + g))"); done
server_list=$(IFS=,; echo "${servers[*]}")
for rate in "${rates[@]}"; do
  dir=$out/cluster-$rate
  rm -rf "$dir"
  mkdir -p "$dir"
  DIR=$dir BASE_PORT=$base IM_BIN=$bin/im-server READY_TIMEOUT=120 \
    "$here/deploy/local-cluster.sh" "$logic" "$gates" "$redis" >"$out/cluster-$rate.log" 2>&1 &
  cpid=$!
  for _ in $(seq 1800); do
    grep -q "cluster ready" "$out/cluster-$rate.log" 2>/dev/null && break
    kill -0 "$cpid" 2>/dev/null || break
    sleep 0.1
  done
  grep -q "cluster ready" "$out/cluster-$rate.log" || {
    echo "rate $rate/s: the cluster did not start (log: $out/cluster-$rate.log)" >&2
    exit 1
  }
  gate_pids=() logic_pids=() redis_pids=()
  for p in $(pgrep -P "$cpid"); do
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || true)
    case $cmd in
      *" gate "*) gate_pids+=("$p") ;;
      *" logic "*) logic_pids+=("$p") ;;
      *redis-server*) redis_pids+=("$p") ;;
    esac
  done
  [ ${#gate_pids[@]} -eq "$gates" ] && [ ${#logic_pids[@]} -eq "$logic" ] || {
    echo "rate $rate/s: found ${#gate_pids[@]} gates and ${#logic_pids[@]} logic nodes" >&2
    exit 1
  }
  sync
  for _ in $(seq $(( ${QUIET_WAIT:-240} / 5 ))); do
    awk -v q="${QUIET_LOAD:-0.5}" '{exit !($1 < q)}' /proc/loadavg && break
    sleep 5
  done
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  g0=$(ticks "${gate_pids[@]}")
  l0=$(ticks "${logic_pids[@]}")
  r0=$(ticks ${redis_pids[@]+"${redis_pids[@]}"})
  args=(c2c -n "$users")
  if [ "$scenario" = large-group ]; then
    args=(large-group -n "$users" -m "${MEMBERS:-100000}")
    for p in "${gate_pids[@]}" "${logic_pids[@]}" ${redis_pids[@]+"${redis_pids[@]}"}; do
      args+=(--server-pid "$p")
    done
  fi
  timeout 600 "$bin/im-loadgen" "${args[@]}" --msg-rate "$rate" --secs "$secs" \
    --server "$server_list" --json-out "$out/c2c-$rate.json" >"$out/c2c-$rate.txt" 2>&1 || true
  g1=$(ticks "${gate_pids[@]}")
  l1=$(ticks "${logic_pids[@]}")
  r1=$(ticks ${redis_pids[@]+"${redis_pids[@]}"})
  stop
  python3 - "$out/c2c-$rate.json" "$rate" "$load" "$tck" "$((g1 - g0))" "$((l1 - l0))" "$((r1 - r0))" "$scenario" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
rate, load, tck = sys.argv[2], sys.argv[3], int(sys.argv[4])
g, l, r = (int(x) for x in sys.argv[5:8])
scenario = sys.argv[8]
def find(d, key):
    """The first value under `key` anywhere in the report."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            x = find(v, key)
            if x is not None:
                return x
    return None
lat = find(j, "deliver_latency") or {}
sent = find(j, "sent") or 0
lost = find(j, "lost")
lg = (j.get("cpu") or {}).get("loadgen_us_per_msg")
unit, n = "msg", sent
if scenario == "large-group":
    unit, n = "copy", find(j, "delivered") or 0
    lg = lg / (n / sent) if lg is not None and sent and n else None
per = lambda t: t / tck * 1e6 / n if n else float("nan")
print(f"rate {rate}/s  load {load}  send->deliver p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} p99.9 {lat.get('p999_ms')} ms"
      f"  sent {sent} lost {lost}  cpu us/{unit}: gates {per(g):.1f} logic {per(l):.1f}"
      f" redis {per(r):.1f} total {per(g + l + r):.1f}"
      + (f"  loadgen {lg:.1f}" if lg is not None else "")
      + (f"  posting: servers {j['cpu']['server_us_per_copy']:.2f} us/copy"
         if scenario == "large-group" and (j.get("cpu") or {}).get("server_us_per_copy") else ""))
PY
done
