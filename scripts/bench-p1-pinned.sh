#!/usr/bin/env bash
# P1 with the switch (the leader, when replicated) on core 0 and everything else on core 1: the
# load generator, the simulated banks and, with --replicated, the three NATS servers and the
# standby. Models a leader whose NATS servers and standby run on other machines.
# Usage: scripts/bench-p1-pinned.sh target/release/clearhouse [--replicated] [more bench args]
set -euo pipefail
bin=$1
shift
out=$(mktemp)
taskset -c 1 "$bin" bench payments --seconds 15 --json "$@" >"$out" 2>/dev/null &
bench=$!
# The switch process is started by the bench (inheriting core 1): move all its threads to core 0.
while kill -0 "$bench" 2>/dev/null; do
    for pid in $(pgrep -f "serve .*--data-dir [^ ]*/switch( |$)" || true); do
        taskset -a -p -c 0 "$pid" >/dev/null 2>&1 || true
    done
    sleep 0.3
done
wait "$bench"
python3 - "$out" "$*" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2] or "single", "settled/s", round(r["settled_per_second"]),
      "cpu s/1000", r.get("cpu_seconds_per_1000_with_replication", r["cpu_seconds_per_1000"]),
      r["cpu_seconds_per_1000_by_process"], "p50/p99 ms", r["latency_ms"]["p50"], r["latency_ms"]["p99"])
PY
rm -f "$out"
