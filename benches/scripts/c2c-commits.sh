#!/usr/bin/env bash
# One c2c run against a fresh single-node release server, then the server's commit and round
# histograms from /metrics (docs/BENCHMARKS.md, "Where a commit's time goes"):
#
#   benches/scripts/c2c-commits.sh BIN_DIR RATE OUT_DIR [more im-server run flags]
#
# Prints the load average before the run, the server's CPU ticks over the loadgen run, the
# loadgen's send->deliver line, and the buckets of im_store_commit_seconds,
# im_store_log_sync_seconds and im_logic_round_seconds; everything is kept in OUT_DIR
# (metrics.txt, lg.txt, server.log). Waits (up to 240 s) for a 1-minute load below 0.5 after
# `sync`, like c2c-rates.sh. Environment: USERS (2000), SECS (10), PORT (7470; the API on PORT+1).
set -euo pipefail
bin=${1:?usage: c2c-commits.sh BIN_DIR RATE OUT_DIR [server flags]}
rate=${2:?rate}
out=${3:?out dir}
shift 3
port=${PORT:-7470}
mkdir -p "$out"
rm -rf "$out/data"
"$bin/im-server" run --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$((port + 1))" \
  --data-dir "$out/data" "$@" >"$out/server.log" 2>&1 &
spid=$!
trap 'kill $spid 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$out/server.log" && break; sleep 0.1; done
sync
for _ in $(seq 48); do awk '{exit !($1 < 0.5)}' /proc/loadavg && break; sleep 5; done
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(awk '{print $14 + $15}' "/proc/$spid/stat")
timeout 300 "$bin/im-loadgen" c2c -n "${USERS:-2000}" --msg-rate "$rate" --secs "${SECS:-10}" \
  --server "127.0.0.1:$port" >"$out/lg.txt" 2>&1
t1=$(awk '{print $14 + $15}' "/proc/$spid/stat")
echo "server cpu ticks $((t1 - t0)) ($(getconf CLK_TCK)/s)"
grep -E "send→deliver|lost" "$out/lg.txt" || true
curl -s --max-time 10 "127.0.0.1:$((port + 1))/metrics" >"$out/metrics.txt" || true
grep -E "^im_(store_commit|store_log_sync|logic_round)_seconds" "$out/metrics.txt" || true
