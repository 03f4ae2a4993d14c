#!/usr/bin/env bash
# Logic memory under receivers that never acknowledge (issue 14, `max_cache_bytes`): a fresh
# single-node release server per budget, c2c where no connection ever sends `DeliverAck` (the
# server keeps a pending notice per message), the server's RSS sampled every second.
#
#   benches/scripts/cache-bytes.sh BIN_DIR [budget-bytes...]     (default: 1073741824 8388608)
#
# Prints per budget: load average before the run, messages acked, the server's RSS after the
# logins and at the end (peak), and from /metrics the estimated user-state bytes and the online
# users trimmed. Environment: USERS (2000), RATE (8000), SECS (30), OUT (results dir).
set -euo pipefail
bin=${1:?usage: cache-bytes.sh BIN_DIR [budget...]}
shift
budgets=("$@")
[ ${#budgets[@]} -gt 0 ] || budgets=(1073741824 8388608)
users=${USERS:-2000}
rate=${RATE:-8000}
secs=${SECS:-30}
out=${OUT:-/tmp/im-cache-bytes-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
port=7470
api=7471
spid=
trap '[ -n "$spid" ] && kill "$spid" 2>/dev/null; wait 2>/dev/null || true' EXIT
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -s "http://127.0.0.1:$api/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
for budget in "${budgets[@]}"; do
  rm -rf "$out/data-$budget"
  printf 'max_cache_bytes = %s\n' "$budget" >"$out/server-$budget.toml"
  "$bin/im-server" run --config "$out/server-$budget.toml" --listen "127.0.0.1:$port" \
    --api-listen "127.0.0.1:$api" --data-dir "$out/data-$budget" >"$out/server-$budget.log" 2>&1 &
  spid=$!
  for _ in $(seq 100); do
    grep -q "listening" "$out/server-$budget.log" 2>/dev/null && break
    sleep 0.1
  done
  sync
  for _ in $(seq 48); do
    awk '{exit !($1 < 0.5)}' /proc/loadavg && break
    sleep 5
  done
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  ( while kill -0 "$spid" 2>/dev/null; do echo "$(date +%s) $(rss_kib "$spid")"; sleep 1; done ) \
    >"$out/rss-$budget.txt" 2>/dev/null &
  timeout 600 "$bin/im-loadgen" c2c -n "$users" --msg-rate "$rate" --secs "$secs" --no-deliver-ack \
    --server "127.0.0.1:$port" --json-out "$out/c2c-$budget.json" >"$out/c2c-$budget.txt" 2>&1 || true
  end_rss=$(rss_kib "$spid")
  peak=$(awk '$2 > m {m = $2} END {print m}' "$out/rss-$budget.txt")
  first=$(awk 'NR == 3 {print $2}' "$out/rss-$budget.txt")
  bytes=$(metric im_users_cached_bytes)
  trimmed=$(metric im_users_trimmed_total)
  acked=$(grep -o '"acked": *[0-9]*' "$out/c2c-$budget.json" | head -1 | tr -dc 0-9)
  lost=$(grep -o '"lost": *[0-9]*' "$out/c2c-$budget.json" | head -1 | tr -dc 0-9)
  kill "$spid"; wait "$spid" 2>/dev/null || true; spid=
  echo "budget $budget load $load acked ${acked:-?} lost ${lost:-?} rss_start_kib ${first:-?} rss_end_kib $end_rss rss_peak_kib $peak cached_bytes ${bytes:-?} trimmed ${trimmed:-?}"
done
