#!/usr/bin/env bash
# A million logged-in connections on this machine, end to end, in the distributed shape (issue 15):
# a local cluster (deploy/local-cluster.sh: gate processes of one core each, logic nodes with
# their embedded stores, a Redis Cluster as the directory) and the loadgen's worker processes.
#
#   benches/scripts/million.sh            (CONNS=1000000 by default)
#   CONNS=20000 HOLD_SECS=5 C2C_SECS=5 benches/scripts/million.sh      (what CI runs)
#
# Phases (each a loadgen run against the same cluster):
#   1. idle:  CONNS connections log in and hold HOLD_SECS with heartbeats (every heartbeat must
#             be acked); login rate, memory per connection (user space and kernel).
#   2. storm: CONNS connections log in again, c2c at C2C_RATE msgs/s between random users for
#             C2C_SECS, then STORM_FRACTION of them drop at once and log in again; every message
#             is accounted (lost, duplicated, out of order), the storm's time to all back and
#             synced is measured.
# Every SAMPLE_SECS a sampler records each process kind's RSS and CPU time and the kernel's
# socket and slab memory (samples.csv, drawn by million-plot.py as samples.svg). Results: $OUT/idle.json, storm.json,
# summary.json, the loadgen's SVG plots, and every process's log under $OUT/cluster.
#
# Before it starts it checks the machine (open-file limits, memory, port layout) and refuses with
# a clear message if the run cannot fit. Everything it starts is stopped on exit, failure or
# Ctrl-C. Exit status: 0 when both phases passed (nothing lost, every login and heartbeat ok).
#
# Environment: CONNS (1000000), GATES (CONNS / 18000, rounded up), LOGIC_NODES (2),
# REDIS_MASTERS (3), HOLD_SECS (60), C2C_RATE (5000), C2C_SECS (30), STORM_FRACTION (0.1),
# KEEP_DATA (1 keeps the stores and Redis files), RESEND_MS (30000: the loadgen's --resend-ms), LOGIN_RATE (loadgen --rate, 6000), HEARTBEAT_SECS (120: the loadgen's heartbeat period; the
# gates' idle timeout is set to three of them), STORM_RATE (reconnects/s during the storm, 5000:
# phones back off with jitter; 0 = all at once), LOADGEN_NICE (10: the loadgen's 56 processes
# share the 2 cores with the system they load and would otherwise starve its 2 logic threads;
# clients are elsewhere in a real deployment), SAMPLE_SECS (5), BIN_DIR (target/release; built if
# missing), OUT (/tmp/im-million-<time>), BASE_PORT (7000).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
conns=${CONNS:-1000000}
per_gate=18000
gates=${GATES:-$(( (conns + per_gate - 1) / per_gate ))}
logic_nodes=${LOGIC_NODES:-2}
redis_masters=${REDIS_MASTERS:-3}
hold=${HOLD_SECS:-60}
c2c_rate=${C2C_RATE:-5000}
# A send not acknowledged after this long is sent again (same client_msg_id); at the saturated
# c2c rate acks take seconds, and a shorter wait would only add load.
resend_ms=${RESEND_MS:-30000}
c2c_secs=${C2C_SECS:-30}
storm_fraction=${STORM_FRACTION:-0.1}
login_rate=${LOGIN_RATE:-6000}
heartbeat=${HEARTBEAT_SECS:-120}
storm_rate=${STORM_RATE:-5000}
lg_nice=${LOADGEN_NICE:-10}
sample_secs=${SAMPLE_SECS:-5}
bin=${BIN_DIR:-$here/target/release}
# Absolute: the process lookups below match the command lines the cluster was started with (a
# relative BIN_DIR once made them find nothing, and the script stopped without a word).
case $bin in /*) ;; *) bin=$PWD/$bin ;; esac
out=${OUT:-/tmp/im-million-$(date +%Y%m%d-%H%M%S)}
base=${BASE_PORT:-7000}

die() { echo "million: $*" >&2; exit 1; }

# --- can this machine hold it? ---
[ "$gates" -ge 1 ] || die "GATES must be at least 1"
[ $(( (conns + gates - 1) / gates )) -le 19000 ] ||
  die "$conns connections over $gates gates is more than 19 000 sockets per gate process (the open-file limit is $(ulimit -n)); raise GATES"
[ "$gates" -le 99 ] || die "$gates gates do not fit the port layout (gates take BASE_PORT..BASE_PORT+99); at most 99"
file_max=$(cat /proc/sys/fs/file-max)
[ "$file_max" -ge $(( conns * 2 + 100000 )) ] ||
  die "fs.file-max is $file_max: $conns loopback connections need two descriptors each (sysctl -w fs.file-max=$(( conns * 3 )))"
[ "$(ulimit -n)" -ge 19500 ] || die "the open-file limit is $(ulimit -n); gate processes need 19 500 (ulimit -n)"
# Measured (BENCHMARKS.md, issue 15): ~10 KB of kernel memory per loopback connection pair,
# ~2 KB of loadgen and ~1 KB of server user space per connection; 20 % margin on top.
need_kib=$(( conns * 16 ))
avail_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
[ "$avail_kib" -ge "$need_kib" ] ||
  die "$conns connections need about $(( need_kib / 1048576 )) GiB of free memory; $(( avail_kib / 1048576 )) GiB available"
command -v redis-server >/dev/null || [ "$redis_masters" -eq 0 ] ||
  die "redis-server not installed (apt-get install redis-server), or run with REDIS_MASTERS=0"
if [ ! -x "$bin/im-server" ] || [ ! -x "$bin/im-loadgen" ]; then
  [ "$bin" = "$here/target/release" ] || die "$bin has no im-server / im-loadgen"
  (cd "$here" && cargo build --release -q -p im-server -p im-loadgen)
fi

mkdir -p "$out"
echo "million: $conns connections, $gates gates, $logic_nodes logic nodes, $redis_masters Redis masters; results in $out"

# --- start, and stop everything on any exit ---
cluster_pid=
sampler_pid=
lg_pid=
cleanup() {
  trap - EXIT INT TERM
  set +e # every step of the cleanup runs, whatever failed before
  [ -n "$lg_pid" ] && kill -TERM "$lg_pid" 2>/dev/null
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null
  if [ -n "$cluster_pid" ]; then
    kill -TERM "$cluster_pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$cluster_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$cluster_pid" 2>/dev/null || true
  fi
  # Anything of ours still there (a cluster script killed hard leaves its children).
  pkill -KILL -f -- "--data-dir $out/cluster/" 2>/dev/null || true
  pkill -KILL -f -- "^$bin/im-server gate " 2>/dev/null || true
  pkill -KILL -f -- "redis-server 127.0.0.1:$(( (base + 300) / 100 ))[0-9][0-9] " 2>/dev/null || true
  pkill -KILL -f -- "local-cluster.sh $logic_nodes $gates " 2>/dev/null || true
  wait 2>/dev/null || true
  # The stores and Redis files of the run (the logs stay), unless KEEP_DATA=1.
  [ "${KEEP_DATA:-0}" = 1 ] || rm -rf "$out"/cluster/logic*/ "$out"/cluster/redis*/
}
trap cleanup EXIT
trap 'echo "million: interrupted" >&2; exit 130' INT TERM

DIR=$out/cluster IM_BIN=$bin/im-server BASE_PORT=$base READY_TIMEOUT=120 \
  GATE_ARGS="--idle-timeout-secs $(( heartbeat * 3 ))" \
  "$here/deploy/local-cluster.sh" "$logic_nodes" "$gates" "$redis_masters" >"$out/cluster.log" 2>&1 &
cluster_pid=$!
for _ in $(seq 600); do
  grep -q "cluster ready" "$out/cluster.log" 2>/dev/null && break
  kill -0 "$cluster_pid" 2>/dev/null || { cat "$out/cluster.log" >&2; die "the cluster did not start"; }
  sleep 0.2
done
grep -q "cluster ready" "$out/cluster.log" || die "the cluster was not ready after 120 s"

servers=$(seq -s, "$base" $(( base + gates - 1 )) | sed 's/\([0-9][0-9]*\)/127.0.0.1:\1/g')
gate_pids=$(pgrep -f -- "^$bin/im-server gate " | tr '\n' ' ') || die "no gate process of $bin found"
logic_pids=$(pgrep -f -- "im-server logic .*--data-dir $out/cluster/" | tr '\n' ' ') ||
  die "no logic process with a data directory under $out/cluster found"
redis_pids=$(pgrep -f -- "redis-server 127.0.0.1:$(( (base + 300) / 100 ))[0-9][0-9] " | tr '\n' ' ' || true)
server_args=""
for p in $gate_pids $logic_pids; do server_args+=" --server-pid $p"; done

# --- sampler: memory and CPU of each process kind, kernel socket memory ---
sample() {
  local tck; tck=$(getconf CLK_TCK)
  echo "t_s,kind,procs,rss_kib,cpu_s,tcp_inuse,tcp_mem_pages,slab_kib"
  local t0=$SECONDS
  while :; do
    local inuse mem slab
    inuse=$(awk '/^TCP:/ {print $3}' /proc/net/sockstat)
    mem=$(awk '/^TCP:/ {print $NF}' /proc/net/sockstat)
    slab=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
    for kind in gate logic redis loadgen; do
      case $kind in
        gate) pids=$gate_pids ;;
        logic) pids=$logic_pids ;;
        redis) pids=$redis_pids ;;
        loadgen) pids=$(pgrep -f "im-loadgen worker" | tr '\n' ' ' || true) ;;
      esac
      local n=0 rss=0 ticks=0
      for p in $pids; do
        [ -r "/proc/$p/status" ] || continue
        n=$((n + 1))
        # A process that exits meanwhile (a zombie has no VmRSS line) counts 0: an empty value
        # here once ended the sampler with a syntax error at the end of phase 1 (run 8).
        local v
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
        rss=$(( rss + ${v:-0} ))
        v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true)
        ticks=$(( ticks + ${v:-0} ))
      done
      echo "$((SECONDS - t0)),$kind,$n,$rss,$(awk -v t="$ticks" -v h="$tck" 'BEGIN {printf "%.2f", t / h}'),$inuse,$mem,$slab"
    done
    sleep "$sample_secs"
  done
}
sample >"$out/samples.csv" &
sampler_pid=$!

run_loadgen() { # name, args...
  local name=$1; shift
  timeout -k 10 3600 nice -n "$lg_nice" "$bin/im-loadgen" "$@" --server "$servers" --rate "$login_rate" \
    --heartbeat-secs "$heartbeat" --resend-ms "$resend_ms" $server_args \
    --json-out "$out/$name.json" --svg "$out/$name.svg" >"$out/$name.txt" 2>&1 &
  lg_pid=$!
  local rc=0
  wait "$lg_pid" || rc=$?
  lg_pid=
  tail -n 25 "$out/$name.txt"
  return "$rc"
}

status=0
echo "== phase 1: $conns connections log in and hold $hold s =="
run_loadgen idle idle -n "$conns" --hold-secs "$hold" || status=1
msgs_per_user=$(awk -v r="$c2c_rate" -v s="$c2c_secs" -v n="$conns" 'BEGIN {printf "%.6f", r * s / n}')
echo "== phase 2: log in again, c2c $c2c_rate/s for $c2c_secs s, then $storm_fraction of them drop =="
run_loadgen storm storm -n "$conns" --msgs-per-user "$msgs_per_user" --send-secs "$c2c_secs" \
  --storm-fraction "$storm_fraction" --storm-rate "$storm_rate" || status=1
kill "$sampler_pid" 2>/dev/null || true
sampler_pid=

python3 - "$out" "$conns" "$gates" "$logic_nodes" "$redis_masters" "$status" <<'PY'
import csv, json, sys
out, conns, gates, nodes, masters, status = sys.argv[1], *map(int, sys.argv[2:])
def load(name):
    try:
        return json.load(open(f"{out}/{name}.json"))
    except Exception:
        return None
rows = list(csv.DictReader(open(f"{out}/samples.csv")))
peak = {}
for r in rows:
    k = r["kind"]
    if int(r["rss_kib"]) > peak.get(k, {}).get("rss_kib", -1):
        peak[k] = {"rss_kib": int(r["rss_kib"]), "procs": int(r["procs"]), "t_s": int(r["t_s"])}
first = {}
for r in rows:
    first.setdefault(r["kind"], r)
per_conn = {k: round((v["rss_kib"] - int(first[k]["rss_kib"])) * 1024 / conns) for k, v in peak.items()}
tcp = [int(r["tcp_inuse"]) for r in rows]
slab = [int(r["slab_kib"]) for r in rows]
summary = {
    "conns": conns, "gates": gates, "logic_nodes": nodes, "redis_masters": masters,
    "passed": status == 0,
    "peak_rss_kib": peak,
    "rss_growth_bytes_per_conn": per_conn,
    "tcp_sockets_peak": max(tcp) if tcp else None,
    "slab_growth_bytes_per_conn": round((max(slab) - slab[0]) * 1024 / conns) if slab else None,
    "idle": load("idle"), "storm": load("storm"),
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print("peak RSS growth per connection (B):", per_conn)
print("kernel slab growth per connection (B):", summary["slab_growth_bytes_per_conn"],
      " TCP sockets at peak:", summary["tcp_sockets_peak"])
PY
python3 "$here/benches/scripts/million-plot.py" "$out" >/dev/null || echo "million: no plot of the samples" >&2
[ "$status" -eq 0 ] && echo "million: passed" || echo "million: FAILED (see $out)"
exit "$status"
