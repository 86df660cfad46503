#!/usr/bin/env bash
# Load test of the release binary on this machine: the daemon with the file sink, driven by
# `flexbridge simulate` over $CONCURRENCY connections. Reports, from one run: requests per
# second at full load, latency at full and at half load, flexbridge's own CPU time per event
# (from /proc, user + system) and its peak RSS, each next to the same figure for a bare hyper
# server (crates/flexbridge-ingress/examples/bare_hyper.rs) under the same load generator,
# because absolute figures on a shared 2-core machine are noisy and ratios are not.
#   DURATION=10s CONCURRENCY=64 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --locked -p flexbridge >&2
cargo build --release --locked -p flexbridge-ingress --example bare_hyper >&2
BIN="$TARGET/release/flexbridge"
BARE="$TARGET/release/examples/bare_hyper"
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

read -r PORT ADMIN BARE_PORT < <(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')

ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
simulate_to() { local port=$1; shift; "$BIN" --log-level error simulate --url "http://127.0.0.1:$port/flex/interactions" \
  --auth-token bench-token --concurrency "$CONCURRENCY" --no-progress --json-summary "$@"; }

# The reference: bare hyper under the same load.
"$BARE" "127.0.0.1:$BARE_PORT" &
pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$BARE_PORT") 2>/dev/null && break; sleep 0.1; done
simulate_to "$BARE_PORT" --duration 2s >/dev/null || true
bare_before=$(ticks)
bare=$(simulate_to "$BARE_PORT" --duration "$DURATION")
bare_after=$(ticks)
kill "$pid"; wait "$pid" 2>/dev/null || true
cat > "$work/flexbridge.toml" <<TOML
[ingress]
listen = "127.0.0.1:$PORT"
public_url = "http://127.0.0.1:$PORT"
[admin]
listen = "127.0.0.1:$ADMIN"
[twilio]
auth_tokens = ["bench-token"]
[[sinks]]
name = "file"
type = "file"
path = "$work/events.jsonl"
TOML
"$BIN" --log-level warn run --config "$work/flexbridge.toml" &
pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

simulate() { simulate_to "$PORT" "$@"; }

simulate --duration 2s >/dev/null # warm-up
lines_before=$(wc -l < "$work/events.jsonl")
cpu_before=$(ticks)
full=$(simulate --duration "$DURATION")
cpu_after=$(ticks)
lines_after=$(wc -l < "$work/events.jsonl")
rate=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['rate'])" "$full")
half=$(simulate --duration "$DURATION" --rate "$(python3 -c "print(round($rate/2))")")
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")

python3 - "$full" "$half" "$cpu_before" "$cpu_after" "$lines_before" "$lines_after" "$rss_kib" "$(getconf CLK_TCK)" "$CONCURRENCY" "$bare" "$bare_before" "$bare_after" <<'PY'
import json, sys
full, half, bare = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[10])
cpu0, cpu1, l0, l1, rss, tck, conc = (float(x) for x in sys.argv[3:10])
b0, b1 = float(sys.argv[11]), float(sys.argv[12])
events = l1 - l0
cpu_us = (cpu1 - cpu0) / tck / events * 1e6 if events else float("nan")
bare_us = (b1 - b0) / tck / bare["sent"] * 1e6
print(f"file sink, {int(conc)} connections, load generator on the same machine")
print(f"  bare hyper reference: {bare['rate']:.0f} req/s, {bare_us:.1f} us CPU per request, p99 {bare['latency_ms']['p99']:.2f} ms")
print(f"  full load: {full['rate']:.0f} req/s ({full['rate']/bare['rate']:.2f}x bare)  status {full['status']}  p50 {full['latency_ms']['p50']:.2f} ms  p99 {full['latency_ms']['p99']:.2f} ms")
print(f"  half load: {half['rate']:.0f} req/s  status {half['status']}  p50 {half['latency_ms']['p50']:.2f} ms  p99 {half['latency_ms']['p99']:.2f} ms")
print(f"  flexbridge CPU per event at full load: {cpu_us:.1f} us user+system ({cpu_us/bare_us:.2f}x bare hyper's per request)")
print(f"  flexbridge peak RSS: {rss/1024:.1f} MiB")
print(f"  events written during the full-load run: {int(events)} (acknowledged: {full['status'].get('200', 0)})")
PY
