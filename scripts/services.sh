#!/usr/bin/env bash
# Makes sure the brokers the test suite talks to are running on this machine, starting them
# when they are down: RabbitMQ on 127.0.0.1:5672 and NATS with JetStream on 127.0.0.1:4222.
# A broker that cannot be started is an error: tests never skip a missing broker.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
  for _ in $(seq 1 "$3"); do up "$2" && return 0; sleep 1; done
  echo "services: $1 did not come up on port $2" >&2
  return 1
}

if ! up 5672; then
  echo "services: starting RabbitMQ"
  command -v rabbitmq-server >/dev/null || { apt-get update -qq && apt-get install -y -qq rabbitmq-server; }
  rabbitmq-server -detached
  wait_for RabbitMQ 5672 60
fi

# The NATS auth tests start servers of their own: the binary must exist either way.
command -v nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server; }
if ! up 4222; then
  echo "services: starting NATS with JetStream"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_for NATS 4222 30
fi
echo "services: RabbitMQ and NATS are up"
