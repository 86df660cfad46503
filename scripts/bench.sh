#!/usr/bin/env bash
# Load test of the release binary on this machine, driven by `flexbridge simulate` over
# $CONCURRENCY connections (load generator, broker and daemon share the machine). In one run it
# measures a bare hyper server (crates/flexbridge-ingress/examples/bare_hyper.rs) as the
# reference, then one row per entry of $ROWS, and reports for each: requests per second at full
# load, latency at full and at half load, flexbridge's own CPU time per event (user + system,
# from /proc) and its peak RSS. Absolute figures on a shared 2-core machine are noisy, and a
# VM's host can slow it down for minutes, so a ratio only divides figures measured next to
# each other: bare hyper runs again for $PROBE (3 s) before every row (and after the last),
# and a row's "x bare" divides by the mean of the probes just before and just after it, not
# by the reference measured minutes earlier. $ROUNDS runs the whole
# row list that many times: every figure is then the median over the rounds, shown with its
# range, and a ratio is taken within a round (a broker row over its plain client's ceiling of
# the same round) before the median.
#   DURATION=10s ROWS="file ceiling-rabbitmq rabbitmq" scripts/bench.sh
#   ROUNDS=3 OUT=docs/bench scripts/bench.sh      # refresh the published results and plots
#   FLEXBRIDGE_BIN=/tmp/before/flexbridge ROWS=spool-file scripts/bench.sh   # A/B: another build
# Rows:
#   file, nats, rabbitmq, kafka   confirm mode: the webhook is answered once the sink confirmed.
#                                 nats: JetStream on $NATS_URL, a bounded stream ($NATS_STORAGE);
#                                 rabbitmq: $AMQP_URL, a durable topic exchange and a bounded
#                                 durable queue; kafka: tansu (scripts/kafka.sh), 3 partitions.
#   ceiling-rabbitmq, ceiling-nats, ceiling-kafka  the broker's own ceiling: a plain client (the
#                                 sink crates' `*_ceiling` examples) with $CONCURRENCY publishes
#                                 awaiting their acknowledgement, same message properties (Kafka:
#                                 the sink's producer settings), no HTTP; its CPU per
#                                 message is what the client crate itself costs. Then again at
#                                 half its rate: the broker's own latency at half load.
#   delay-rabbitmq, delay-nats, delay-kafka  confirm mode through the testkit proxy adding
#                                 $DELAY_MS to every broker-to-client packet (a broker in another
#                                 zone). delay-kafka runs a tansu of its own that advertises the
#                                 proxy's address: a Kafka client goes to the address the
#                                 broker's metadata names, so it would go around the proxy.
#   spool-<sink>                  delivery.mode = "spool", broker healthy: answered once durable
#                                 in the spool; CPU counts until the spool delivered everything.
#   spooldown-<sink>              spool mode with the broker unreachable: what the spool takes in.
# Results: a table on stdout, and $OUT/results.json plus plots, table.md and targets.md (the
# run judged against the performance targets; scripts/bench_plot.py) in $OUT (default
# $CARGO_TARGET_DIR/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
ROUNDS=${ROUNDS:-1}
ROWS=${ROWS:-${SINKS:-file spool-file rabbitmq ceiling-rabbitmq delay-rabbitmq spool-rabbitmq spooldown-rabbitmq nats ceiling-nats delay-nats spool-nats spooldown-nats kafka ceiling-kafka delay-kafka spool-kafka spooldown-kafka}}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
NATS_ADDR=${NATS_ADDR:-127.0.0.1:4222}
NATS_STORAGE=${NATS_STORAGE:-file}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
AMQP_ADDR=${AMQP_ADDR:-127.0.0.1:5672}
DELAY_MS=${DELAY_MS:-5}
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/bench}
seconds=${DURATION%s}

cargo build --release --locked -p flexbridge >&2
cargo build --release --locked -p flexbridge-ingress -p flexbridge-sink-rabbitmq -p flexbridge-sink-nats \
  -p flexbridge-sink-kafka -p flexbridge-testkit --example bare_hyper --example rabbitmq_ceiling --example nats_ceiling \
  --example kafka_ceiling --example delay_proxy >&2
BIN=${FLEXBRIDGE_BIN:-$TARGET/release/flexbridge}
BARE="$TARGET/release/examples/bare_hyper"
work=$(mktemp -d)
pid=
proxy=
delay_broker=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  [ -n "$proxy" ] && kill "$proxy" 2>/dev/null
  [ -n "$delay_broker" ] && kill "$delay_broker" 2>/dev/null
  [ -d "$work/kafka" ] && FLEXBRIDGE_KAFKA_STATE="$work/kafka" scripts/kafka.sh stop
  wait 2>/dev/null; rm -rf "$work"
}
trap cleanup EXIT

. scripts/lib/daemon.sh
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
simulate_to() { local port=$1; shift; "$BIN" --log-level error simulate --url "http://127.0.0.1:$port/flex/interactions" \
  --auth-token bench-token --concurrency "$CONCURRENCY" --no-progress --json-summary "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
start_proxy() { # upstream; sets $proxy (its pid) and $proxy_port. Not in $(...): the pid must reach this shell.
  "$TARGET/release/examples/delay_proxy" "$1" "$DELAY_MS" > "$work/proxy.port" &
  proxy=$!
  for _ in $(seq 1 100); do [ -s "$work/proxy.port" ] && break; sleep 0.05; done
  proxy_port=$(head -1 "$work/proxy.port")
  rm -f "$work/proxy.port"
}

# Bare hyper under the same load, after a warm-up: sets $bare_out (the load generator's
# summary) and $bare_ticks (its CPU time). Not in $(...): the pid must reach this shell.
bare_hyper() { # warm-up, duration
  local port before
  port=$(free_port)
  "$BARE" "127.0.0.1:$port" &
  pid=$!
  wait_port "$port"
  simulate_to "$port" --duration "$1" >/dev/null || true
  before=$(ticks)
  bare_out=$(simulate_to "$port" --duration "$2")
  bare_ticks=$(( $(ticks) - before ))
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

# The reference.
bare_hyper 2s "$DURATION"
bare=$bare_out bare_cpu=$bare_ticks
results=()
# A ceiling row: the plain client's figures and its own CPU time (user + system, in clock
# ticks, from GNU time), so its CPU per message stands beside flexbridge's per event.
# Then a second run paced at half its own rate, as the sink rows' half-load run is, so each
# sink's half-load latency stands beside what the broker gives a plain client at that load.
ceiling() {
  local row=$1; shift
  local out half cpu
  out=$(/usr/bin/time -f "%U %S" -o "$work/ceiling.time" "$@")
  cpu=$(awk -v tck="$(getconf CLK_TCK)" '{print int(($1 + $2) * tck)}' "$work/ceiling.time")
  half=$("$@" --rate "$(python3 -c "print(round($(field "$out" rate)/2))")")
  results+=("$round|$row|$out|$half|$cpu|$(field "$out" sent)|0|$near")
}

# The Kafka rows' broker, started once: $FLEXBRIDGE_KAFKA_BROKERS if set, else a tansu of the
# bench's own (its own pid file), so a test suite running beside it keeps the one it started.
kafka_started() {
  [ -n "${FLEXBRIDGE_KAFKA_BROKERS:-}" ] || eval "$(FLEXBRIDGE_KAFKA_STATE="$work/kafka" scripts/kafka.sh start)"
}

# Bare hyper again, briefly, before each row: a row's "x bare" divides by the mean of this
# probe and the next one, so a host whose speed changes during the run (a busy neighbour on
# the same physical machine) does not change the ratio, and the change shows in the table's
# "bare before" column.
probe() {
  bare_hyper 1s "${PROBE:-3s}"
  near="$bare_out|$bare_ticks"
}

# One row of one round: appends "round|row|full|half|cpu ticks|events|rss|probe|probe ticks"
# to $results.
measure() {
  local row=$1
  # The previous row's dirty pages (a spool row writes gigabytes) are written back now, not
  # during this row's measurement, where they would slow the brokers' own fsyncs.
  sync
  probe
  case "$row" in
    ceiling-rabbitmq)
      ceiling "$row" "$TARGET/release/examples/rabbitmq_ceiling" --url "$AMQP_URL" --duration "$seconds" --in-flight "$CONCURRENCY"
      return ;;
    ceiling-nats)
      ceiling "$row" "$TARGET/release/examples/nats_ceiling" --url "$NATS_URL" --duration "$seconds" --in-flight "$CONCURRENCY" --storage "$NATS_STORAGE"
      return ;;
    ceiling-kafka) # the kafka row's tansu; a topic of its own, deleted at its end
      kafka_started
      ceiling "$row" "$TARGET/release/examples/kafka_ceiling" --brokers "$FLEXBRIDGE_KAFKA_BROKERS" --duration "$seconds" --in-flight "$CONCURRENCY"
      return ;;
  esac
  mode=${row%%-*}; sink=${row#*-}
  [ "$mode" = "$row" ] && mode=confirm
  amqp_url=$AMQP_URL nats_url=$NATS_URL kafka_brokers=
  if [ "$sink" = kafka ]; then
    kafka_started
    kafka_brokers=$FLEXBRIDGE_KAFKA_BROKERS
  fi
  case "$mode" in
    delay)
      case "$sink" in
        rabbitmq) start_proxy "$AMQP_ADDR"; amqp_url="amqp://guest:guest@127.0.0.1:$proxy_port/%2f" ;;
        nats) start_proxy "$NATS_ADDR"; nats_url="nats://127.0.0.1:$proxy_port" ;;
        kafka)
          kafka_port=$(free_port)
          start_proxy "127.0.0.1:$kafka_port"
          tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" --advertised-listener-url "tcp://127.0.0.1:$proxy_port" \
            --storage-engine memory://tansu/ >"$work/tansu-delay.log" 2>&1 &
          delay_broker=$!
          wait_port "$kafka_port" || { cat "$work/tansu-delay.log" >&2; exit 1; }
          kafka_brokers=127.0.0.1:$proxy_port ;;
        *) echo "delay-$sink: the proxy row exists for rabbitmq, nats and kafka" >&2; exit 64 ;;
      esac ;;
    spooldown) # nothing listens there
      dead=$(free_port)
      amqp_url="amqp://guest:guest@127.0.0.1:$dead/%2f" nats_url="nats://127.0.0.1:$dead" kafka_brokers="127.0.0.1:$dead" ;;
    confirm|spool) ;;
    *) echo "unknown row $row" >&2; exit 64 ;;
  esac
  port=$(free_port); admin=$(free_port)
  config="$work/$row.toml"
  # Every round of a row starts from nothing: no spool left by the previous round (its
  # segments to reuse, its backlog), no file to append to.
  rm -rf "$work/spool-$row" "$work/$row.jsonl"
  daemon_config "$config" "$port" "$admin"
  if [ "$mode" = spool ] || [ "$mode" = spooldown ]; then
    printf '[delivery]\nmode = "spool"\n[spool]\ndir = "%s/spool-%s"\n' "$work" "$row" >> "$config"
  fi
  case "$sink" in
    file) printf '[[sinks]]\nname = "file"\ntype = "file"\npath = "%s/%s.jsonl"\n' "$work" "$row" >> "$config" ;;
    nats) printf '[[sinks]]\nname = "nats"\ntype = "nats"\nurl = "%s"\nsubject = "flexbridge.bench.{account}.{event}"\n[sinks.stream]\nname = "FLEXBRIDGE_BENCH"\nstorage = "%s"\nmax_messages = 200000\n' "$nats_url" "$NATS_STORAGE" >> "$config" ;;
    rabbitmq) printf '[[sinks]]\nname = "rabbitmq"\ntype = "rabbitmq"\nuri = "%s"\nexchange = "flexbridge.bench"\n[sinks.declare]\n[[sinks.declare.queues]]\nname = "flexbridge.bench"\n[sinks.declare.queues.arguments]\nx-max-length = 200000\n' "$amqp_url" >> "$config" ;;
    kafka)
      [ "$mode" = spooldown ] || tansu topic create --broker "tcp://$kafka_brokers" --partitions 3 flexbridge-bench >/dev/null 2>&1 || true
      printf '[[sinks]]\nname = "kafka"\ntype = "kafka"\nbrokers = "%s"\ntopic = "flexbridge-bench"\n' "$kafka_brokers" >> "$config" ;;
    *) echo "unknown sink $sink (file, nats, rabbitmq, kafka)" >&2; exit 64 ;;
  esac
  # Every broker row starts with an empty queue or stream, as the ceilings do: a full bounded
  # queue drops its head on each publish, which costs the broker more per message.
  empty() {
    case "$sink" in
      rabbitmq) "$TARGET/release/examples/rabbitmq_ceiling" --url "$AMQP_URL" --delete flexbridge.bench ;;
      nats) "$TARGET/release/examples/nats_ceiling" --url "$NATS_URL" --delete FLEXBRIDGE_BENCH ;;
    esac
  }
  # Emptied again between the full-load and the half-load run, the queue or stream kept.
  purge() {
    case "$sink" in
      rabbitmq) "$TARGET/release/examples/rabbitmq_ceiling" --url "$AMQP_URL" --purge flexbridge.bench ;;
      nats) "$TARGET/release/examples/nats_ceiling" --url "$NATS_URL" --purge FLEXBRIDGE_BENCH ;;
    esac
  }
  empty
  "$BIN" --log-level error run --config "$config" 2>"$work/$row.log" &
  pid=$!
  wait_port "$port"
  metric() { curl -s "http://127.0.0.1:$admin/metrics" | awk -v m="$1" '$0 ~ "^"m {s += $2} END {print s + 0}'; }
  confirmed() { metric 'flexbridge_sink_publish_duration_seconds_count.*outcome="success"'; }
  acknowledged() { metric 'flexbridge_http_requests_total.*status="200"'; }
  drained() { for _ in $(seq 1 1200); do [ "$(metric flexbridge_spool_depth)" = "0" ] && return 0; sleep 0.1; done; return 1; }
  simulate_to "$port" --duration 2s >/dev/null # warm-up
  [ "$mode" = spool ] && drained
  # Events counted: confirmed by the sink, except with the broker down (what the spool took).
  count() { if [ "$mode" = spooldown ]; then acknowledged; else confirmed; fi; }
  events_before=$(count); before=$(ticks)
  full=$(simulate_to "$port" --duration "$DURATION")
  # Spool mode: the background delivery of what was acknowledged counts too.
  [ "$mode" = spool ] && { drained || echo "bench: $row did not drain in 120 s" >&2; }
  cpu=$(( $(ticks) - before )); events=$(( $(count) - events_before ))
  [ "$mode" = spool ] && drained
  purge
  half=$(simulate_to "$port" --duration "$DURATION" --rate "$(python3 -c "print(round($(field "$full" rate)/2))")")
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  if [ -n "$proxy" ]; then kill "$proxy"; wait "$proxy" 2>/dev/null || true; proxy=; fi
  if [ -n "$delay_broker" ]; then kill "$delay_broker"; wait "$delay_broker" 2>/dev/null || true; delay_broker=; fi
  empty
  results+=("$round|$row|$full|$half|$cpu|$events|$rss|$near")
}

for round in $(seq 1 "$ROUNDS"); do
  for row in $ROWS; do measure "$row"; done
done
# The probe after the last row: a row is compared with bare hyper before and after it.
probe

mkdir -p "$OUT"
python3 scripts/bench_results.py "$OUT/results.json" "$bare" "$bare_cpu" "$(getconf CLK_TCK)" "$CONCURRENCY" "$DURATION" "$DELAY_MS" "$near" "${results[@]}"
if python3 -c 'import matplotlib' 2>/dev/null || pip install -q matplotlib >&2; then
  python3 scripts/bench_plot.py "$OUT/results.json" "$OUT"
else
  echo "bench: matplotlib is not available; no plots" >&2
fi
