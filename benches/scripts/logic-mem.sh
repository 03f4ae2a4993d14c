#!/usr/bin/env bash
# A logic node's memory per online user in the distributed shape, with or without CPU starvation
# (issue 15: logic <= 300 B per online user; run 5 of the million measured 4 441 B).
#
#   benches/scripts/logic-mem.sh BIN_DIR [users=18000]
#   GATES=5 BUSY=3 benches/scripts/logic-mem.sh BIN_DIR 90000
#
# Starts deploy/local-cluster.sh with 1 logic node (one worker), GATES gates (18 000 users each at
# most) and a Redis Cluster of 3 + 3 on BASE_PORT 9000, logs USERS in with `im-loadgen idle` at
# RATE (6000) logins/s while BUSY busy loops (0) compete for the CPUs, and prints the logic node's
# VmRSS before the logins, after them and every 5 s for SETTLE_SECS (15) after them, with its
# cache and queue gauges. Stops the cluster on exit.
set -euo pipefail
bin=${1:?usage: logic-mem.sh BIN_DIR [users]}
users=${2:-18000}
gates=${GATES:-$(( (users + 17999) / 18000 ))}
here=$(cd "$(dirname "$0")/../.." && pwd)
dir=$(mktemp -d /tmp/im-logic-mem.XXXXXX)
cpid=
busy=()
cleanup() {
  for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$cpid" ]; then
    kill -TERM "$cpid" 2>/dev/null || true # (SIGINT is ignored by a background job of a script)
    wait "$cpid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
DIR=$dir IM_BIN=$bin/im-server BASE_PORT=9000 "$here/deploy/local-cluster.sh" 1 "$gates" 3 \
  >"$dir/cluster.out" 2>&1 &
cpid=$!
for _ in $(seq 240); do grep -q 'cluster ready' "$dir/cluster.out" && break; sleep 0.5; done
grep -q 'cluster ready' "$dir/cluster.out" || { tail "$dir/cluster.out" >&2; exit 1; }
lpid=$(pgrep -f "im-server logic .*--data-dir $dir" | head -1)
servers=$(seq -s, -f '127.0.0.1:%g' 9000 $((9000 + gates - 1)))
rss() { awk '/VmRSS/{print $2}' "/proc/$lpid/status"; }
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg); $users users, $gates gates, ${BUSY:-0} busy loops"
r0=$(rss)
for _ in $(seq "${BUSY:-0}"); do (while :; do :; done) & busy+=($!); done
timeout 300 "$bin/im-loadgen" idle -n "$users" --hold-secs 5 --rate "${RATE:-6000}" \
  --server "$servers" 2>&1 | grep -E 'logins [0-9]|still logged'
for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done
busy=()
r1=$(rss)
settle=${SETTLE_SECS:-15}
for t in $(seq 5 5 "$settle"); do
  sleep 5
  r2=$(rss)
  echo "  ${t} s after the logins: ${r2} KiB, $(( (r2 - r0) * 1024 / users )) B per user"
done
echo "logic RSS ${r0} KiB -> ${r1} KiB: $(( (r1 - r0) * 1024 / users )) B per user; ${settle} s later ${r2} KiB: $(( (r2 - r0) * 1024 / users )) B per user"
grep VmHWM "/proc/$lpid/status"
curl -s 127.0.0.1:10080/metrics | grep -E '^im_(users_cached|logic_queued|logic_gate_queue_bytes|directory_)' || true
