#!/usr/bin/env bash
# Logins per second into a fresh single node with the TCP handshakes outside the window (issue 15:
# ">= 30 000 logins/s into one gate core pair with token verification"): `im-loadgen logins`
# connects N sockets first, then sends N `Login`s at once and reads every `LoginResult`, for
# ROUNDS rounds of new users; the server's CPU per login comes from its /proc over each window.
#
#   benches/scripts/logins.sh BIN_DIR                                               # 2+2
#   SERVER_ARGS="--gate-cores 1 --logic-workers 1" benches/scripts/logins.sh BIN_DIR  # one pair
#
# BIN_DIR holds im-server and im-loadgen. N (18000) logins per round, ROUNDS (5). The server is
# stopped and its data directory removed on exit, also on failure.
set -euo pipefail
bin=${1:?usage: logins.sh BIN_DIR}
n=${N:-18000}
port=${PORT:-7474}
data=$(mktemp -d /tmp/im-logins.XXXXXX)
spid=
cleanup() {
  if [ -n "$spid" ]; then
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
  fi
  rm -rf "$data"
}
trap cleanup EXIT
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg); server ${SERVER_ARGS:-(defaults)}"
# shellcheck disable=SC2086
"$bin/im-server" run --listen 127.0.0.1:$port --api-listen 127.0.0.1:0 --data-dir "$data/db" \
  ${SERVER_ARGS:-} >"$data/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do grep -q listening "$data/server.log" && break; sleep 0.1; done
grep -q listening "$data/server.log" || { echo "server did not start" >&2; exit 1; }
sleep 1
# 40 source addresses: the gate lets one address open 500 connections/s after a burst of 5 000
# (its attack protection), and 8 addresses ran out of that by the fourth round of 18 000.
timeout 600 "$bin/im-loadgen" logins -n "$n" --rounds "${ROUNDS:-5}" --src-ips 127.0.0.2-127.0.0.41 \
  --server 127.0.0.1:$port --server-pid "$spid"
