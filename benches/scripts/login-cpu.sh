#!/usr/bin/env bash
# Logins as fast as the loadgen makes them into a fresh single node, and what one login costs each
# side in CPU (issue 15: ">= 30 000 logins/s into one gate core pair").
#
#   benches/scripts/login-cpu.sh BIN_DIR
#   SERVER_ARGS="--gate-cores 1 --logic-workers 1" benches/scripts/login-cpu.sh BIN_DIR
#
# BIN_DIR holds im-server and im-loadgen. The server's CPU (utime+stime, /proc) and its open
# descriptors are sampled every 100 ms; "server CPU per login" is its CPU from the sample before the
# first new descriptors to the first sample with all of them (accepts, logins, nothing else: the
# hold and the teardown are outside). The loadgen's CPU is its whole run (`/usr/bin/time`), hold
# of 3 s included. N (18000) connections, RATE (0: as fast as it can) connections/s.
set -euo pipefail
bin=${1:?usage: login-cpu.sh BIN_DIR}
n=${N:-18000}
port=${PORT:-7473}
data=$(mktemp -d /tmp/im-login-cpu.XXXXXX)
samples=$data/samples
spid=
sampler=
cleanup() {
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null || true
  if [ -n "$spid" ]; then
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
  fi
  rm -rf "$data"
}
trap cleanup EXIT
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
# shellcheck disable=SC2086
"$bin/im-server" run --listen 127.0.0.1:$port --api-listen 127.0.0.1:0 --data-dir "$data/db" \
  ${SERVER_ARGS:-} >"$data/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do grep -q listening "$data/server.log" && break; sleep 0.1; done
grep -q listening "$data/server.log" || { echo "server did not start" >&2; exit 1; }
sleep 1
(
  for _ in $(seq 60); do
    echo "$(date +%s.%N) $(awk '{print $14+$15}' /proc/$spid/stat) $(ls /proc/$spid/fd | wc -l)"
    sleep 0.1
  done
) >"$samples" &
sampler=$!
/usr/bin/time -f "loadgen cpu %U user %S system (s)" -o "$data/time" \
  timeout 120 "$bin/im-loadgen" idle -n "$n" --hold-secs 3 --rate "${RATE:-0}" \
  --server 127.0.0.1:$port | grep -E 'logins [0-9]'
wait "$sampler" || true
sampler=
python3 - "$samples" "$data/time" "$n" <<'PY'
import re, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 3]
n = int(sys.argv[3])
base = rows[0][2]
top = max(r[2] for r in rows)
first = next(i for i, r in enumerate(rows) if r[2] > base + 50)
last = next(i for i, r in enumerate(rows) if r[2] >= top - 5)
cpu_ms = (rows[last][1] - rows[first - 1][1]) * 10
conns = top - base
print(f"server: {cpu_ms:.0f} ms of CPU for {conns:.0f} logins in {rows[last][0] - rows[first - 1][0]:.2f} s"
      f" = {cpu_ms * 1000 / conns:.1f} µs per login")
u, s_ = map(float, re.findall(r"[\d.]+", open(sys.argv[2]).read())[:2])
print(f"loadgen: {u:.2f} s user + {s_:.2f} s system = {(u + s_) * 1e6 / n:.1f} µs per login (hold included)")
PY
