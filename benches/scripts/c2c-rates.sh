#!/usr/bin/env bash
# c2c at several rates against a fresh single-node release server per rate, with the server's
# CPU time per message. For before/after comparisons in one sitting (issue 13):
#
#   benches/scripts/c2c-rates.sh BIN_DIR [rate...]      (default rates: 2000 5000 10000 20000)
#
# BIN_DIR holds im-server and im-loadgen (e.g. target/release, or a copy of an older build).
# Prints one line per rate: load average before the run, send->deliver p50/p99/p99.9, loss,
# server CPU (utime+stime from /proc/PID/stat over the loadgen run) per sent message, and the
# server's fsync + fdatasync calls per sent message (perf stat on syscall tracepoints, as root).
# Before each run it flushes dirty pages (`sync`: a build's writeback would stall the server's
# syncs) and waits (up to QUIET_WAIT=240 s) for a 1-minute load average below QUIET_LOAD (0.5).
# Environment: USERS (2000), SECS (10), OUT (results dir), DATA (data dir parent; default $OUT),
# SERVER_ARGS (more `im-server run` flags, e.g. "--gate-cores 1 --logic-workers 1"),
# SERVER_CPUS / LOADGEN_CPUS (a `taskset -c` CPU list for each process, e.g. 0 and 1; default:
# no pinning, the scheduler shares both CPUs between them).
set -euo pipefail
bin=${1:?usage: c2c-rates.sh BIN_DIR [rate...]}
shift
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(2000 5000 10000 20000)
users=${USERS:-2000}
secs=${SECS:-10}
out=${OUT:-/tmp/im-c2c-$(date +%Y%m%d-%H%M%S)}
data=${DATA:-$out}
mkdir -p "$out"
port=7460
tck=$(getconf CLK_TCK)
spid=
trap '[ -n "$spid" ] && kill "$spid" 2>/dev/null; wait 2>/dev/null || true' EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for rate in "${rates[@]}"; do
  rm -rf "$data/data-$rate"
  ${SERVER_CPUS:+taskset -c "$SERVER_CPUS"} "$bin/im-server" run --listen "127.0.0.1:$port" --api-listen 127.0.0.1:0 --data-dir "$data/data-$rate" ${SERVER_ARGS:-} \
    >"$out/server-$rate.log" 2>&1 &
  spid=$!
  for _ in $(seq 100); do
    grep -q "listening" "$out/server-$rate.log" 2>/dev/null && break
    sleep 0.1
  done
  # A quiet machine: no writeback pending, and (at most QUIET_WAIT s) a 1-minute load average
  # below QUIET_LOAD.
  sync
  for _ in $(seq $(( ${QUIET_WAIT:-240} / 5 ))); do
    awk -v q="${QUIET_LOAD:-0.5}" '{exit !($1 < q)}' /proc/loadavg && break
    sleep 5
  done
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  t0=$(cpu_ticks "$spid")
  # The server's fsync and fdatasync calls during the run (perf's syscall tracepoints).
  perf stat -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -p "$spid" \
    -o "$out/syncs-$rate.csv" 2>/dev/null &
  ppid=$!
  timeout 300 ${LOADGEN_CPUS:+taskset -c "$LOADGEN_CPUS"} "$bin/im-loadgen" c2c -n "$users" --msg-rate "$rate" --secs "$secs" \
    --server "127.0.0.1:$port" --json-out "$out/c2c-$rate.json" >"$out/c2c-$rate.txt" 2>&1
  t1=$(cpu_ticks "$spid")
  kill -INT "$ppid" 2>/dev/null || true
  wait "$ppid" 2>/dev/null || true
  syncs=$(awk -F, '/sys_enter_f/ {s += $1} END {print s + 0}' "$out/syncs-$rate.csv" 2>/dev/null || echo 0)
  kill "$spid"
  wait "$spid" 2>/dev/null || true
  spid=
  python3 - "$out/c2c-$rate.json" "$rate" "$load" "$((t1 - t0))" "$tck" "$syncs" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
rate, load, ticks, tck = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
syncs = int(sys.argv[6] or 0)
def find(d, key):
    """The first value under `key` anywhere in the report."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            r = find(v, key)
            if r is not None:
                return r
    return None
lat = find(j, "deliver_latency") or {}
sent = find(j, "sent") or 0
lg = (j.get("cpu") or {}).get("loadgen_us_per_msg")
print(f"rate {rate}/s  load {load}  send->deliver p50 {lat.get('p50_ms', 0):.2f} "
      f"p99 {lat.get('p99_ms', 0):.2f} p99.9 {lat.get('p999_ms', 0):.2f} max {lat.get('max_ms', 0):.2f} ms  "
      f"sent {sent} acked/s {find(j, 'acked_per_s') or 0:.0f} lost {find(j, 'lost')}  "
      f"server cpu {ticks / tck:.2f} s = {1e6 * ticks / tck / max(sent, 1):.1f} us/msg  "
      f"syncs {syncs} = {syncs / max(sent, 1):.2f}/msg"
      + (f"  loadgen cpu {lg:.1f} us/msg" if lg is not None else ""))
PY
done
