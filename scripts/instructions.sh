#!/usr/bin/env bash
# flexbridge's own CPU instructions per event, counted by valgrind's callgrind: the same count
# for the same binary and load whatever else the machine does, so two builds can be compared
# on a noisy shared machine where a timed A/B moves by ±10 %. User space only (the kernel's
# share, the network and fsync, is not counted), and under valgrind SHA-1/SHA-256 run their
# portable code instead of the CPU's SHA instructions, so hashing weighs more here than on the
# real CPU. Compare builds with it; measure throughput and latency with scripts/bench.sh.
#
#   scripts/instructions.sh                     # the release build, file sink, 10,000 webhooks
#   SINK=nats COUNT=20000 scripts/instructions.sh
#   BIN=/tmp/old-flexbridge scripts/instructions.sh   # another build, for an A/B
#   TOP=25 scripts/instructions.sh              # also the 25 costliest functions
#
# It runs the daemon under callgrind twice, once with no webhook and once with $COUNT signed
# webhooks from `flexbridge simulate` (64 connections, fixed seed), and prints the difference
# divided by $COUNT: start-up and shutdown cancel out.
set -euo pipefail
cd "$(dirname "$0")/.."
SINK=${SINK:-file}
COUNT=${COUNT:-10000}
TOP=${TOP:-0}
TARGET=${CARGO_TARGET_DIR:-target}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed" >&2; exit 69; }
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -p flexbridge >&2
  BIN="$TARGET/release/flexbridge"
fi
# The load generator is never under valgrind: the release build of this checkout, or $BIN.
LOAD=${LOAD:-$BIN}
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
. scripts/lib/daemon.sh

# One daemon under callgrind, $1 webhooks; prints the instructions it executed.
count() {
  local n=$1 port admin
  port=$(free_port); admin=$(free_port)
  daemon_config "$work/config.toml" "$port" "$admin"
  case "$SINK" in
    file) printf '[[sinks]]\nname = "file"\ntype = "file"\npath = "%s/events.jsonl"\n' "$work" >> "$work/config.toml" ;;
    nats) printf '[[sinks]]\nname = "nats"\ntype = "nats"\nurl = "%s"\nsubject = "flexbridge.instructions.{account}.{event}"\n[sinks.stream]\nname = "FLEXBRIDGE_INSTRUCTIONS"\nstorage = "file"\nmax_messages = 100000\n' "$NATS_URL" >> "$work/config.toml" ;;
    rabbitmq) printf '[[sinks]]\nname = "rabbitmq"\ntype = "rabbitmq"\nuri = "%s"\nexchange = "flexbridge.instructions"\n[sinks.declare]\n[[sinks.declare.queues]]\nname = "flexbridge.instructions"\n[sinks.declare.queues.arguments]\nx-max-length = 100000\n' "$AMQP_URL" >> "$work/config.toml" ;;
    *) echo "instructions.sh: SINK is file, nats or rabbitmq" >&2; exit 64 ;;
  esac
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.$n" \
    "$BIN" --log-level error run --config "$work/config.toml" 2>"$work/valgrind.$n" &
  pid=$!
  for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  if [ "$n" -gt 0 ]; then
    if ! "$LOAD" --log-level error simulate --url "http://127.0.0.1:$port/flex/interactions" \
      --auth-token bench-token --concurrency 64 --count "$n" --seed 7 --no-progress --json-summary > "$work/load.json"; then
      echo "instructions.sh: not every webhook was answered 200: $(cat "$work/load.json")" >&2
      exit 1
    fi
  fi
  kill -TERM "$pid"; wait "$pid" || true; pid=
  awk '/Collected/ {gsub(",", "", $4); print $4}' "$work/valgrind.$n"
}

idle=$(count 0)
loaded=$(count "$COUNT")
python3 -c "import sys; i, l, n = map(int, sys.argv[1:4]); print(f'{sys.argv[4]}: {(l - i) / n:,.0f} instructions per event ({n} webhooks; {l:,} in all, {i:,} without load)')" \
  "$idle" "$loaded" "$COUNT" "$SINK"
[ "$SINK" = nats ] && "$TARGET/release/examples/nats_ceiling" --url "$NATS_URL" --delete FLEXBRIDGE_INSTRUCTIONS >/dev/null 2>&1 || true
[ "$SINK" = rabbitmq ] && "$TARGET/release/examples/rabbitmq_ceiling" --url "$AMQP_URL" --delete flexbridge.instructions >/dev/null 2>&1 || true
if [ "$TOP" -gt 0 ]; then
  callgrind_annotate "$work/callgrind.$COUNT" 2>/dev/null | awk '/file:function/ {on=1; next} on && NF' | head -n "$TOP"
fi
