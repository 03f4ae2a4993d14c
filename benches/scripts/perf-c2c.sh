#!/usr/bin/env bash
# Where the single node's CPU goes during c2c: `perf record` of the server while the loadgen runs.
# docs/BENCHMARKS.md, "The apply on a thread of its own".
#
#   benches/scripts/perf-c2c.sh BIN_DIR RATE OUT_DIR      (release binaries with debuginfo; root)
#
# Starts BIN_DIR/im-server on a fresh data directory, runs `im-loadgen c2c -n 2000` at RATE for
# SECS (12) seconds, records the server for PERF_SECS (6) seconds from the 5th second with
# PERF_ARGS (default "-F 299 --call-graph dwarf,32768": no frame pointers in the release build),
# and prints the loadgen's summary and the top of the report by thread and by symbol. The profile
# stays in OUT_DIR/perf.data (`perf report -i OUT_DIR/perf.data --no-children`). Software events
# only on the project's VM (no hardware counters). Everything started is killed on exit.
set -u
bin=${1:?usage: perf-c2c.sh BIN_DIR RATE OUT_DIR}
rate=${2:?usage: perf-c2c.sh BIN_DIR RATE OUT_DIR}
out=${3:?usage: perf-c2c.sh BIN_DIR RATE OUT_DIR}
secs=${SECS:-12}
port=${PORT:-7490}
mkdir -p "$out"
d=$(mktemp -d /tmp/im-perf.XXXXXX)
spid= lpid=
cleanup() {
  [ -n "$lpid" ] && kill "$lpid" 2>/dev/null
  [ -n "$spid" ] && kill "$spid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$d"
}
trap cleanup EXIT
"$bin/im-server" run --listen "127.0.0.1:$port" --api-listen 127.0.0.1:0 --data-dir "$d/data" \
  >"$out/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do
  grep -q listening "$out/server.log" 2>/dev/null && break
  sleep 0.1
done
grep -q listening "$out/server.log" || { echo "server did not start" >&2; exit 1; }
"$bin/im-loadgen" c2c -n 2000 --msg-rate "$rate" --secs "$secs" --server "127.0.0.1:$port" \
  >"$out/loadgen.txt" 2>&1 &
lpid=$!
sleep 5
# shellcheck disable=SC2086
perf record ${PERF_ARGS:--F 299 --call-graph dwarf,32768} -p "$spid" -o "$out/perf.data" \
  -- sleep "${PERF_SECS:-6}" 2>"$out/perf.err"
timeout $((secs + 60)) tail --pid="$lpid" -f /dev/null
wait "$lpid"
lpid=
tail -4 "$out/loadgen.txt"
perf report -i "$out/perf.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -12
perf report -i "$out/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -25
