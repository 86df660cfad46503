#!/usr/bin/env bash
# Load test of the release binary on this machine, driven by `flexbridge simulate` over
# $CONCURRENCY connections (load generator, broker and daemon share the machine). In one run it
# measures a bare hyper server (crates/flexbridge-ingress/examples/bare_hyper.rs) as the
# reference, then flexbridge with each sink in $SINKS, and reports for each: requests per
# second at full load, latency at full and at half load, flexbridge's own CPU time per
# confirmed event (user + system, from /proc) and its peak RSS. Absolute figures on a shared
# 2-core machine are noisy; the ratios to the reference in the same run are not.
#   DURATION=10s CONCURRENCY=64 SINKS="file nats" scripts/bench.sh
# Sinks: file, nats (JetStream on $NATS_URL, a bounded in-memory stream), rabbitmq ($AMQP_URL,
# a durable topic exchange and a bounded queue that drops the oldest), kafka (tansu started by
# scripts/kafka.sh, one topic of 3 partitions). Prefix a sink with `spool-` (spool-rabbitmq,
# spool-nats, spool-kafka, spool-file) for delivery.mode = "spool": the webhook is answered
# once the event is in the spool; CPU is then counted until the spool has delivered everything
# the run acknowledged, per acknowledged event.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
SINKS=${SINKS:-${SINK:-file}}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --locked -p flexbridge >&2
cargo build --release --locked -p flexbridge-ingress --example bare_hyper >&2
BIN="$TARGET/release/flexbridge"
BARE="$TARGET/release/examples/bare_hyper"
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
simulate_to() { local port=$1; shift; "$BIN" --log-level error simulate --url "http://127.0.0.1:$port/flex/interactions" \
  --auth-token bench-token --concurrency "$CONCURRENCY" --no-progress --json-summary "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# The reference: bare hyper under the same load.
port=$(free_port)
"$BARE" "127.0.0.1:$port" &
pid=$!
wait_port "$port"
simulate_to "$port" --duration 2s >/dev/null || true
before=$(ticks)
bare=$(simulate_to "$port" --duration "$DURATION")
bare_cpu=$(( $(ticks) - before ))
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
results=()

for row_name in $SINKS; do
  sink=${row_name#spool-}
  port=$(free_port); admin=$(free_port)
  config="$work/$row_name.toml"
  cat > "$config" <<TOML
[ingress]
listen = "127.0.0.1:$port"
public_url = "http://127.0.0.1:$port"
[admin]
listen = "127.0.0.1:$admin"
[twilio]
auth_tokens = ["bench-token"]
TOML
  if [ "$sink" != "$row_name" ]; then
    printf '[delivery]\nmode = "spool"\n[spool]\ndir = "%s/spool-%s"\n' "$work" "$sink" >> "$config"
  fi
  case "$sink" in
    file) printf '[[sinks]]\nname = "file"\ntype = "file"\npath = "%s/events.jsonl"\n' "$work" >> "$config" ;;
    nats) printf '[[sinks]]\nname = "nats"\ntype = "nats"\nurl = "%s"\nsubject = "flexbridge.bench.{account}.{event}"\n[sinks.stream]\nname = "FLEXBRIDGE_BENCH"\nstorage = "memory"\nmax_messages = 200000\n' "$NATS_URL" >> "$config" ;;
    rabbitmq) printf '[[sinks]]\nname = "rabbitmq"\ntype = "rabbitmq"\nuri = "%s"\nexchange = "flexbridge.bench"\n[sinks.declare]\n[[sinks.declare.queues]]\nname = "flexbridge.bench"\n[sinks.declare.queues.arguments]\nx-max-length = 200000\n' "$AMQP_URL" >> "$config" ;;
    kafka)
      [ -n "${FLEXBRIDGE_KAFKA_BROKERS:-}" ] || eval "$(scripts/kafka.sh start)"
      tansu topic create --broker "tcp://$FLEXBRIDGE_KAFKA_BROKERS" --partitions 3 flexbridge-bench >/dev/null 2>&1 || true
      printf '[[sinks]]\nname = "kafka"\ntype = "kafka"\nbrokers = "%s"\ntopic = "flexbridge-bench"\n' "$FLEXBRIDGE_KAFKA_BROKERS" >> "$config" ;;
    *) echo "unknown sink $sink (file, nats, rabbitmq, kafka)" >&2; exit 64 ;;
  esac
  "$BIN" --log-level warn run --config "$config" &
  pid=$!
  wait_port "$port"
  confirmed() { curl -s "http://127.0.0.1:$admin/metrics" | awk '/^flexbridge_sink_publish_duration_seconds_count.*outcome="success"/ {print $2}'; }
  depth() { curl -s "http://127.0.0.1:$admin/metrics" | awk '/^flexbridge_spool_depth/ {s += $2} END {print s + 0}'; }
  drained() { for _ in $(seq 1 1200); do [ "$(depth)" = "0" ] && return 0; sleep 0.1; done; return 1; }
  simulate_to "$port" --duration 2s >/dev/null # warm-up
  [ "$sink" = "$row_name" ] || drained
  events_before=$(confirmed); before=$(ticks)
  full=$(simulate_to "$port" --duration "$DURATION")
  # Spool mode: the background delivery of what was acknowledged counts too.
  [ "$sink" = "$row_name" ] || drained || echo "bench: $row_name did not drain in 120 s" >&2
  cpu=$(( $(ticks) - before )); events=$(( $(confirmed) - events_before ))
  [ "$sink" = "$row_name" ] || drained
  half=$(simulate_to "$port" --duration "$DURATION" --rate "$(python3 -c "print(round($(field "$full" rate)/2))")")
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  results+=("$row_name|$full|$half|$cpu|$events|$rss")
done

python3 - "$bare" "$bare_cpu" "$(getconf CLK_TCK)" "$CONCURRENCY" "${results[@]}" <<'PY'
import json, sys
bare, bare_cpu, tck, conc = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
bare_us = bare_cpu / tck / bare["sent"] * 1e6
lat = lambda r: f"p50 {r['latency_ms']['p50']:.2f} ms  p99 {r['latency_ms']['p99']:.2f} ms"
print(f"{conc} connections; load generator, brokers and daemon on this machine")
print(f"bare hyper reference: {bare['rate']:.0f} req/s, {bare_us:.1f} us CPU per request, {lat(bare)}")
for row in sys.argv[5:]:
    sink, full, half, cpu, events, rss = row.split("|")
    full, half, cpu, events, rss = json.loads(full), json.loads(half), float(cpu), float(events), float(rss)
    cpu_us = cpu / tck / events * 1e6 if events else float("nan")
    print(f"{sink} sink:")
    print(f"  full load: {full['rate']:.0f} req/s ({full['rate']/bare['rate']:.2f}x bare)  {lat(full)}  status {full['status']}")
    print(f"  half load: {half['rate']:.0f} req/s  {lat(half)}  status {half['status']}")
    print(f"  CPU per confirmed event: {cpu_us:.1f} us ({cpu_us/bare_us:.2f}x bare per request)  peak RSS {rss/1024:.1f} MiB")
    print(f"  confirmed by the sink during the full-load run: {int(events)}, acknowledged: {full['status'].get('200', 0)}")
PY
