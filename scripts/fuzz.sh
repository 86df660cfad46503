#!/usr/bin/env bash
# Coverage-guided fuzzing of flexbridge's parsers with cargo fuzz (libFuzzer), on the stable
# toolchain: `-s none` builds with coverage instrumentation but no sanitizer (sanitizers need
# nightly, which this project does not use).
#
#   scripts/fuzz.sh                 every target for 10,000,000 executions (outside CI)
#   scripts/fuzz.sh RUNS [TARGET]   RUNS executions, every target or one
#   scripts/fuzz.sh --smoke         20,000 executions each, plus every regression input (CI)
#
# Targets (fuzz/fuzz_targets): form_decode, json_body, signature (every URL variant),
# normalize (and every protocol binding), template (routing templates and broker-safe
# values), config (each section's and sink type's settings and their validation).
# Corpora start from seeds built out of the signature vectors, the golden inputs and the
# shipped configurations; finds stay in fuzz/corpus (not committed). A crash stops the run
# and leaves its input in fuzz/artifacts/<target>/: fix the cause, then add the input under
# fuzz/regressions/<target>/, which every smoke run replays. The figures (executions, time,
# coverage) are printed per target.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=(form_decode json_body signature normalize template config)
runs=10000000
smoke=0
if [ "${1:-}" = "--smoke" ]; then
  smoke=1
  runs=20000
elif [ -n "${1:-}" ]; then
  runs="$1"
  [ -n "${2:-}" ] && TARGETS=("$2")
fi
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/fuzz}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz@0.13.2
fi
(cd fuzz && cargo fuzz build -s none -O)
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

# Seeds, rebuilt each run from what the repository holds.
python3 - <<'PY'
import json, os, pathlib, urllib.parse
root = pathlib.Path("fuzz/corpus")
def seed(target, name, data):
    d = root / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
vectors = json.load(open("fixtures/twilio-signature-vectors.json"))["vectors"]
for i, v in enumerate(vectors):
    params = [tuple(p) for p in v.get("params") or []]
    form = urllib.parse.urlencode(params)
    seed("form_decode", f"vector{i}", form)
    seed("normalize", f"vector{i}", form + "&EventType=onChannelStatusUpdated&AccountSid=AC00000000000000000000000000000000")
    seed("signature", f"vector{i}", f"{v['url']}\n{v.get('signature') or ''}\n{v.get('settings_header') or ''}\n{v.get('body') or form}")
    seed("json_body", f"vector{i}", json.dumps(dict(params)))
    if v.get("body"):
        seed("json_body", f"vector{i}-body", v["body"])
for name in sorted(os.listdir("crates/flexbridge-core/tests/golden")):
    data = json.load(open(f"crates/flexbridge-core/tests/golden/{name}")).get("data", {})
    params = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in data.items() if not isinstance(v, dict)]
    seed("normalize", f"golden-{name}", urllib.parse.urlencode(params))
    seed("json_body", f"golden-{name}", json.dumps(data))
for i, t in enumerate(["flex.interactions.{event}", "{account}.{instance}.{interaction}", "x.{channel_type}.{event_type}", "{{literal}}.{event}", "a{event}b"]):
    seed("template", f"t{i}", t + "\nInteractionSid=KD1&ChannelType=web&InstanceSid=GO1")
for path in pathlib.Path("deploy").glob("*.toml"):
    text = path.read_text()
    for j, part in enumerate(text.split("[[sinks]]")[1:]):
        seed("config", f"{path.stem}-{j}", part.split("[[")[0])
    seed("config", path.stem, text)
PY

for target in "${TARGETS[@]}"; do
  mkdir -p "fuzz/artifacts/$target"
  echo "== $target: $runs executions"
  "$bin/$target" "fuzz/corpus/$target" -runs="$runs" -max_len=8192 -timeout=10 \
    -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 2>&1 \
    | grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|#[0-9]+ +DONE|ERROR|panicked|SUMMARY' || true
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz.sh: $target crashed; inputs in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  if [ "$smoke" = 1 ] && [ -d "fuzz/regressions/$target" ]; then
    # Every input that once crashed runs again.
    "$bin/$target" fuzz/regressions/"$target"/* 2>&1 | tail -1
  fi
done
