#!/usr/bin/env bash
# A real Kafka-protocol broker for the test suite and the README: tansu (Rust, Apache-2.0),
# built once with `cargo install` (about 10 minutes on 2 cores) and cached in ~/.cargo/bin,
# started on a free loopback port with in-memory storage.
#   eval "$(scripts/kafka.sh start)"   # prints export FLEXBRIDGE_KAFKA_BROKERS=127.0.0.1:PORT
#   scripts/kafka.sh stop
set -euo pipefail
TANSU_VERSION=0.6.0
STATE=${FLEXBRIDGE_KAFKA_STATE:-/tmp/flexbridge-kafka}
mkdir -p "$STATE"

install() {
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return
  fi
  echo "kafka: building tansu $TANSU_VERSION once (about 10 minutes)" >&2
  # A build directory of its own, kept between runs like the project's.
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flexbridge}/tansu" \
    cargo install --locked tansu --version "$TANSU_VERSION" --features dynostore >&2
}

start() {
  install
  stop >/dev/null 2>&1 || true
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  nohup tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 &
  echo $! >"$STATE/tansu.pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "export FLEXBRIDGE_KAFKA_BROKERS=127.0.0.1:$port"
      return
    fi
    sleep 0.1
  done
  echo "kafka: tansu did not start; its log:" >&2
  cat "$STATE/tansu.log" >&2
  return 1
}

stop() {
  [ -f "$STATE/tansu.pid" ] && kill "$(cat "$STATE/tansu.pid")" 2>/dev/null || true
  rm -f "$STATE/tansu.pid"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  install) install ;;
  *) echo "usage: scripts/kafka.sh start|stop|install" >&2; exit 64 ;;
esac
