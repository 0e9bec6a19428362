#!/usr/bin/env bash
# API fuzzing of the switch with schemathesis against its own OpenAPI document (GET /openapi.json):
# no 5xx, and every answer conforms to the document. Builds nothing.
#
#   tests/api-fuzz/run.sh [CLEARHOUSE_BINARY] [fuzz_api.py options...]
#
# CLEARHOUSE_BINARY defaults to target/release/clearhouse. Creates the Python venv on first use
# (target/schemathesis-venv, or $API_FUZZ_VENV; packages pinned in requirements.txt), inits a
# temporary data dir, starts the switch on a free loopback port, runs fuzz_api.py (which onboards
# its participants), stops the switch. Exits non-zero on any failure. Bounded: 60 s for the
# switch to come up, 240 s for the fuzzer (its own time budget is 150 s).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/release/clearhouse}"
[ "$#" -gt 0 ] && shift
[ -x "$bin" ] || { echo "api-fuzz: no clearhouse binary at $bin (build it first)" >&2; exit 2; }
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

venv="${API_FUZZ_VENV:-$root/target/schemathesis-venv}"
if ! cmp -s "$here/requirements.txt" "$venv/.requirements.txt" 2>/dev/null; then
    echo "== api-fuzz: Python venv at $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/.requirements.txt"
fi
py="$venv/bin/python"

work="$(mktemp -d "${TMPDIR:-/tmp}/clearhouse-api-fuzz.XXXXXX")"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

"$bin" init --data-dir "$work/data" >/dev/null
: >"$work/server.log"
# A short synchronous wait: a payment whose creditor agent decides later (the fuzzer's stub bank
# does so for instruction ids LATER-...) is answered 202 PDNG after 1 s, and stays open for a
# decision for the whole run.
CLEARHOUSE_SYNC_WAIT_MS=1000 CLEARHOUSE_SETTLE_DEADLINE_MS=120000 CLEARHOUSE_HARD_TIMEOUT_MS=150000 \
    "$bin" serve --data-dir "$work/data" --config "$work/data/switch.toml" --listen 127.0.0.1:0 \
    >"$work/server.log" 2>&1 &
pid=$!

url=""
for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "api-fuzz: the switch exited at start:" >&2; cat "$work/server.log" >&2; exit 2
    fi
    url="$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*$/\1/p' "$work/server.log" | head -n1 || true)"
    if [ -n "$url" ] && "$py" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1] + '/ready', timeout=2).status != 200)" "$url" 2>/dev/null; then
        break
    fi
    url=""
    sleep 0.1
done
[ -n "$url" ] || { echo "api-fuzz: the switch was not ready (/ready) within 60 s" >&2; cat "$work/server.log" >&2; exit 2; }
echo "== api-fuzz: switch at $url ($bin)"

status=0
timeout -k 10 240 "$py" "$here/fuzz_api.py" --base-url "$url" --operator-key "$work/data/operator.key" "$@" || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
    echo "api-fuzz: the switch died during the run:" >&2; tail -50 "$work/server.log" >&2; status=1
elif grep -qi "panicked" "$work/server.log"; then
    echo "api-fuzz: the switch logged a panic:" >&2; grep -i -A5 "panicked" "$work/server.log" | head -40 >&2; status=1
fi
[ "$status" -eq 0 ] && echo "api-fuzz: passed" || echo "api-fuzz: FAILED (exit $status)" >&2
exit "$status"
