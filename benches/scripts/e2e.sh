#!/usr/bin/env bash
# End-to-end benchmark on one machine: a fresh release im-server, then the loadgen scenarios
# idle, c2c, storm and max against it. Every run is bounded; results (text and JSON) go to
# $OUT (default /tmp/im-e2e-<time>). Numbers are recorded in docs/BENCHMARKS.md.
#
#   benches/scripts/e2e.sh [conns=18000] [users=2000] [rate=5000]
set -euo pipefail
cd "$(dirname "$0")/../.."
conns=${1:-18000}
users=${2:-2000}
rate=${3:-5000}
out=${OUT:-/tmp/im-e2e-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release -q -p im-server -p im-loadgen
bin=target/release
port=7450
"$bin/im-server" run --listen "127.0.0.1:$port" --data-dir "$out/data" >"$out/server.log" 2>&1 &
spid=$!
trap 'kill $spid 2>/dev/null || true; wait 2>/dev/null || true' EXIT
sleep 1
lg() {
  local name=$1
  shift
  echo "== $name: $*"
  timeout 600 "$bin/im-loadgen" "$@" --server "127.0.0.1:$port" --json-out "$out/$name.json" \
    | tee "$out/$name.txt" | tail -12
}
lg idle idle -n "$conns" --hold-secs 10 --server-pid "$spid"
lg c2c c2c -n "$users" --msg-rate "$rate" --secs 10
lg storm storm -n 10000
lg max max -n "$users" --start-rate 1000 --step 1000 --step-secs 4 --p99-bound-ms 10
echo "results in $out"
