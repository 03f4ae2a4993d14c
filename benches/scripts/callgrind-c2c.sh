#!/usr/bin/env bash
# User-space instructions per c2c message of the single node, counted by callgrind (repeatable
# whatever else the machine does; the kernel's work is not counted). docs/BENCHMARKS.md, "User-space
# instructions per c2c message".
#
#   benches/scripts/callgrind-c2c.sh BIN_DIR OUT_PREFIX      (release binaries with debuginfo)
#
# Starts BIN_DIR/im-server under callgrind, runs `im-loadgen c2c -n 200 --msg-rate 500 --secs 25`,
# zeroes the counters once the sends run, dumps them 15 s later, and prints the dump's
# instructions divided by the new messages in it (calls of `stored_dedup`, one per new message: the
# largest count among the lines that name it, since its callees name it too).
# The profile stays in OUT_PREFIX.cg.* for callgrind_annotate. Everything started is killed on exit.
# `--fair-sched=yes`: with valgrind's default lock a thread that keeps running (a gate core's loop)
# starved the others, and the second gate core came up minutes after the first (2026-12-06);
# counts taken with and without it are not comparable: compare builds with the same script.
set -u
bin=${1:?usage: callgrind-c2c.sh BIN_DIR OUT_PREFIX}
out=${2:?usage: callgrind-c2c.sh BIN_DIR OUT_PREFIX}
mkdir -p "$(dirname "$out")"
port=${PORT:-7471}
d=$(mktemp -d /tmp/im-callgrind.XXXXXX)
vpid= lpid=
cleanup() {
  [ -n "$lpid" ] && kill "$lpid" 2>/dev/null
  [ -n "$vpid" ] && kill -9 "$vpid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$d"
}
trap cleanup EXIT
valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$out.cg" --dump-instr=no "$bin/im-server" run \
  --listen "127.0.0.1:$port" --api-listen 127.0.0.1:0 --data-dir "$d/data" >"$d/server.log" 2>&1 &
vpid=$!
for _ in $(seq 120); do grep -q listening "$d/server.log" && break; sleep 1; done
grep -q listening "$d/server.log" || { echo "the server did not start:" >&2; tail -5 "$d/server.log" >&2; exit 1; }
"$bin/im-loadgen" c2c -n 200 --msg-rate 500 --secs 25 --server "127.0.0.1:$port" >"$out.lg" 2>&1 &
lpid=$!
for _ in $(seq 120); do grep -q "sent  *[1-9]" "$out.lg" && break; sleep 0.5; done
sleep 2
callgrind_control -z "$vpid" >/dev/null 2>&1
sleep 15
callgrind_control -d "$vpid" >/dev/null 2>&1
wait "$lpid"
lpid=
f=$(ls -t "$out".cg* | head -1)
total=$(callgrind_annotate --threshold=100 "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
msgs=$(callgrind_annotate --tree=caller --threshold=100 "$f" 2>/dev/null |
  grep "stored_dedup::{{closure}} (" | sed 's/.*(\([0-9,]*\)x).*/\1/' | tr -d , | sort -n | tail -1)
[ -n "$total" ] && [ -n "$msgs" ] && [ "$msgs" -gt 0 ] || { echo "no profile in $f" >&2; exit 1; }
echo "$out: $total instructions, $msgs new messages: $(( total / msgs )) per message"
grep -E "lost|sent [0-9]" "$out.lg" | head -2
