#!/usr/bin/env bash
# 100 000+ connections end to end on one machine: N single-node servers (each a gate + logic,
# its own data dir and port), one loadgen coordinator per server holding C idle logged-in
# connections each. The per-process open-file limit (20 000 here) is why it takes several
# processes. Prints each loadgen report; bounded by --hold-secs and timeouts.
#
#   benches/scripts/many-gates.sh [servers=6] [conns_per_server=18000] [hold_secs=20]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-6}
c=${2:-18000}
hold=${3:-20}
bin=target/release
cargo build --release -q -p im-server -p im-loadgen
work=$(mktemp -d /tmp/im-many-gates.XXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for i in $(seq 0 $((n - 1))); do
  port=$((7600 + i))
  "$bin/im-server" run --listen "127.0.0.1:$port" --data-dir "$work/d$i" \
    --api-listen "127.0.0.1:$((8600 + i))" --gate-cores 1 --logic-workers 1 >"$work/s$i.log" 2>&1 &
  pids+=($!)
done
sleep 1
lg=()
for i in $(seq 0 $((n - 1))); do
  port=$((7600 + i))
  spid=${pids[$i]}
  # Disjoint source addresses and uid ranges per coordinator.
  a=$((2 + i * 8)); b=$((a + 7))
  timeout $((hold + 300)) "$bin/im-loadgen" idle -n "$c" --hold-secs "$hold" \
    --server "127.0.0.1:$port" --server-pid "$spid" --src-ips "127.0.1.$a-127.0.1.$b" \
    --uid-base $((1000000 + i * 100000)) --rate 20000 >"$work/lg$i.txt" 2>&1 &
  lg+=($!)
done
fail=0
for p in "${lg[@]}"; do wait "$p" || fail=1; done
total=0
for i in $(seq 0 $((n - 1))); do
  echo "== server $i"
  grep -E "logins|still logged in|server RSS|kernel:" "$work/lg$i.txt" || cat "$work/lg$i.txt"
  k=$(grep -oE "still logged in [0-9]+" "$work/lg$i.txt" | grep -oE "[0-9]+$" || echo 0)
  total=$((total + k))
done
echo "== total connections logged in and held: $total (servers: $n)"
exit $fail
