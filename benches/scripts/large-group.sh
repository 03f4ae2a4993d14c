#!/usr/bin/env bash
# Large group (read diffusion) against a fresh single-node release server: ONE group of MEMBERS
# members of which USERS are online (connected), posts at RATE/s for SECS s; every online member
# must get every post once, in the group's seq order. The target this was written for: "a
# 100 000-member group with 10 % of members online: a post reaches every online member with
# p99 <= 50 ms at 10 posts/s" (the defaults).
#
#   benches/scripts/large-group.sh BIN_DIR
#
# BIN_DIR holds im-server and im-loadgen (e.g. target/release). Before the run it flushes dirty
# pages (`sync`) and waits (up to QUIET_WAIT=300 s) for a 1-minute load average below
# QUIET_LOAD (1.0), and prints the load it started at. The server's data dir is a fresh
# temporary directory, removed afterwards (KEEP=1 keeps it).
# Environment: USERS (10000), MEMBERS (100000), RATE (10), SECS (30), ADD_BATCH (2000),
# OUT (results dir), SERVER_ARGS (more `im-server run` flags), LOADGEN_ARGS (more loadgen flags),
# API_PORT (7471, the server's HTTP API: /metrics).
# MENTION_ALL=1: after the posts, the owner posts one @all (loadgen --mention-all: the online
# members' mention latencies), and the script follows the whole fan-out (every member, the
# offline ones too) on /metrics every 0.1 s: from the first mention entry sent to
# im_mention_all_running back at 0, with the server's CPU over that time (mention-all.txt).
# Results in OUT: large-group.txt (the table), large-group.json, large-group.svg, server.log.
set -euo pipefail
bin=${1:?usage: large-group.sh BIN_DIR}
users=${USERS:-10000}
members=${MEMBERS:-100000}
rate=${RATE:-10}
secs=${SECS:-30}
batch=${ADD_BATCH:-2000}
out=${OUT:-/tmp/im-large-group-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
data=$(mktemp -d /tmp/im-large-data.XXXXXX)
port=7470
api=${API_PORT:-7471}
spid=
poller=
cleanup() {
  if [ -n "$poller" ]; then
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
  fi
  if [ -n "$spid" ]; then
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
  fi
  [ "${KEEP:-0}" = 1 ] || rm -rf "$data"
}
trap cleanup EXIT
sync
for _ in $(seq $(( ${QUIET_WAIT:-300} / 5 ))); do
  awk -v q="${QUIET_LOAD:-1.0}" '{exit !($1 < q)}' /proc/loadavg && break
  sleep 5
done
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/load.txt"
"$bin/im-server" run --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$api" --data-dir "$data" ${SERVER_ARGS:-} \
  >"$out/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do
  grep -q "listening" "$out/server.log" 2>/dev/null && break
  sleep 0.1
done
extra=()
if [ "${MENTION_ALL:-0}" = 1 ]; then
  extra+=(--mention-all)
  # time, im_mention_all_running, im_mention_all_entries_total, server utime+stime (ticks)
  (
    while kill -0 "$spid" 2>/dev/null; do
      m=$(curl -s --max-time 1 "http://127.0.0.1:$api/metrics" || true)
      r=$(awk '$1 == "im_mention_all_running" {print $2}' <<<"$m")
      e=$(awk '$1 == "im_mention_all_entries_total" {print $2}' <<<"$m")
      echo "$(date +%s.%N) ${r:-0} ${e:-0} $(awk '{print $14 + $15}' "/proc/$spid/stat")"
      sleep 0.1
    done
  ) >"$out/mention-all.poll" 2>/dev/null &
  poller=$!
fi
status=0
"$bin/im-loadgen" large-group -n "$users" -m "$members" --msg-rate "$rate" --secs "$secs" \
  --add-batch "$batch" --server "127.0.0.1:$port" --server-pid "$spid" \
  --json-out "$out/large-group.json" --svg "$out/large-group.svg" ${extra[@]+"${extra[@]}"} ${LOADGEN_ARGS:-} \
  2>"$out/progress.txt" | tee "$out/large-group.txt" || status=$?
if [ -n "$poller" ]; then
  # The fan-out may still run after the loadgen saw its online members' entries.
  for _ in $(seq 3000); do
    last=$(tail -n 1 "$out/mention-all.poll" 2>/dev/null || true)
    set -- $last
    [ "${3:-0}" -gt 0 ] && [ "${2:-1}" = 0 ] && break
    sleep 0.1
  done
  kill "$poller" 2>/dev/null || true
  wait "$poller" 2>/dev/null || true
  poller=
  awk -v tck="$(getconf CLK_TCK)" '
    $3 > 0 && !t0 { t0 = p_t; c0 = p_c }      # the sample before the first entry was sent
    t0 && $2 == 0 && !t1 { t1 = $1; c1 = $4; n = $3 }
    { p_t = $1; p_c = $4 }
    END {
      if (!t1) { print "@all: the fan-out did not finish while polled"; exit 1 }
      printf "@all: %d mention entries in %.2f s (±0.1 s), server CPU %.2f s, %.1f us per entry\n",
        n, t1 - t0, (c1 - c0) / tck, (c1 - c0) / tck * 1e6 / n
    }' "$out/mention-all.poll" | tee "$out/mention-all.txt" || status=1
fi
echo "server log warnings/errors:"
grep -E " (WARN|ERROR) " "$out/server.log" | head -20 || true
echo "results in $out (loadgen exit status $status)"
exit "$status"
