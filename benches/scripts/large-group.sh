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
# OUT (results dir), SERVER_ARGS (more `im-server run` flags), LOADGEN_ARGS (more loadgen flags).
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
spid=
cleanup() {
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
"$bin/im-server" run --listen "127.0.0.1:$port" --api-listen 127.0.0.1:0 --data-dir "$data" ${SERVER_ARGS:-} \
  >"$out/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do
  grep -q "listening" "$out/server.log" 2>/dev/null && break
  sleep 0.1
done
status=0
"$bin/im-loadgen" large-group -n "$users" -m "$members" --msg-rate "$rate" --secs "$secs" \
  --add-batch "$batch" --server "127.0.0.1:$port" --server-pid "$spid" \
  --json-out "$out/large-group.json" --svg "$out/large-group.svg" ${LOADGEN_ARGS:-} \
  2>"$out/progress.txt" | tee "$out/large-group.txt" || status=$?
echo "server log warnings/errors:"
grep -E " (WARN|ERROR) " "$out/server.log" | head -20 || true
echo "results in $out (loadgen exit status $status)"
exit "$status"
