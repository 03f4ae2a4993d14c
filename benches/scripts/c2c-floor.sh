#!/usr/bin/env bash
# The system against the c2c floor of this machine, alternating, in one sitting (issue 13):
#
#   benches/scripts/c2c-floor.sh BIN_DIR ROUNDS [rate...]     (default rates: 5000 20000)
#
# BIN_DIR holds im-server and im-loadgen (release); the floor is loadgen/examples/c2c_floor.rs,
# built here (release) unless FLOOR names a binary. Per round and rate: the floor (2 000 users,
# a 2-thread broker: the five frames of a c2c message over loopback TCP with no server logic),
# then the system (`c2c-rates.sh BIN_DIR RATE`: fresh single node, c2c 2 000 users). Before each
# run: `sync` and a 1-minute load average below 0.5 (waits up to 240 s). Prints one line per run;
# the system's outputs stay in OUT (default /tmp/im-c2c-floor-<time>), data directories removed.
# docs/BENCHMARKS.md, "What loopback TCP alone allows for c2c".
set -euo pipefail
bin=${1:?usage: c2c-floor.sh BIN_DIR ROUNDS [rate...]}
rounds=${2:?usage: c2c-floor.sh BIN_DIR ROUNDS [rate...]}
shift 2
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(5000 20000)
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/im-c2c-floor-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
floor=${FLOOR:-}
if [ -z "$floor" ]; then
  (cd "$root" && cargo build --release -q -p im-loadgen --example c2c_floor)
  floor=$root/target/release/examples/c2c_floor
fi
quiet() {
  for _ in $(seq 240); do
    awk '{exit !($1 < 0.5)}' /proc/loadavg && return
    sleep 1
  done
}
for r in $(seq "$rounds"); do
  for rate in "${rates[@]}"; do
    sync
    quiet
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    res=$(timeout 300 "$floor" 2000 "$rate" "${SECS:-10}" 2 | tail -2 | tr -s ' ' | tr '\n' ' ')
    echo "round $r rate $rate floor  load $load $res"
    OUT=$out/sys-$rate-r$r "$root/benches/scripts/c2c-rates.sh" "$bin" "$rate" | tail -1 | sed "s/^/round $r system /"
    rm -rf "$out/sys-$rate-r$r/data-$rate"
  done
done
