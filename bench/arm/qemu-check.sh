#!/usr/bin/env bash
# ARM check for CI, on an x86 machine: cross-compiles for
# aarch64-unknown-linux-musl and runs under qemu-aarch64-static
#   1. parity: the fixture tests (runtime/tests/model_fixtures.rs, tflite.rs)
#      — the aarch64 build, with tract's NEON kernels, reproduces the
#      reference outputs within the same tolerances as on x86;
#   2. serve-and-predict: `outpost-runtime serve` on bc_mlp.onnx becomes
#      ready and answers POST /predict with the fixture's expected label.
# Times printed here are emulated: a sanity check that nothing is absurdly
# slow, never a measure of ARM performance.
#
#   bench/arm/qemu-check.sh [--profile dev|device] [--no-parity] [--no-serve]
#
# The default `dev` profile (the workspace's dev settings: dependencies at
# opt-level 1) builds fastest; `device` checks the exact flashed build.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=aarch64-unknown-linux-musl
profile=dev
parity=1
serve=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) [ $# -ge 2 ] || { echo "qemu-check: --profile needs a value" >&2; exit 2; }; profile="$2"; shift 2 ;;
    --no-parity) parity=0; shift ;;
    --no-serve) serve=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "qemu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
dir=$profile
case "$profile" in dev|test) dir=debug ;; bench) dir=release ;; esac

# --- tools: emulator, cross C compiler (tract-linalg's assembly), Rust std.
need_apt=()
command -v qemu-aarch64-static >/dev/null 2>&1 || need_apt+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
# cargo runs the cross-compiled test binaries through the emulator. Set here,
# not in .cargo/config.toml, so a machine without qemu can still build.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static

# --- 1. parity on the fixtures.
if [ "$parity" -eq 1 ]; then
  start=$SECONDS
  cargo test --profile "$profile" --target "$target" -p outpost-runtime \
    --test model_fixtures --test tflite --no-run
  echo "qemu-check: test build ($profile) took $((SECONDS - start)) s" >&2
  start=$SECONDS
  # --nocapture: the tests print the largest error per model output.
  cargo test --profile "$profile" --target "$target" -p outpost-runtime \
    --test model_fixtures --test tflite -- --nocapture
  echo "qemu-check: parity tests under qemu took $((SECONDS - start)) s" >&2
fi

# --- 2. serve and predict over HTTP.
if [ "$serve" -eq 1 ]; then
  start=$SECONDS
  # Built the way the parity step built it: cargo builds a package's binaries
  # for its integration tests, and a plain `cargo build` would resolve
  # features without the dev-dependencies and recompile tract (minutes).
  cargo test --profile "$profile" --target "$target" -p outpost-runtime --test model_fixtures --no-run
  echo "qemu-check: server build ($profile) took $((SECONDS - start)) s" >&2
  bin="${CARGO_TARGET_DIR:-target}/$target/$dir/outpost-runtime"
  model=fixtures/bc_mlp.onnx

  # Features: the first test row (30 values, label dropped). It is also the
  # first row of the fixture's expected outputs, so the label must match.
  features=$(sed -n 2p fixtures/data/bc_test.csv | awk -F, '{ s = $1; for (i = 2; i < NF; i++) s = s "," $i; print s }')
  [ "$(awk -F, '{ print NF }' <<<"$features")" -eq 30 ] || { echo "qemu-check: expected 30 features" >&2; exit 1; }
  # The first value of output_label in the expected outputs.
  want=$(tr -d ' \n' < "$model.expected.json" | sed -n 's/.*"output_label":{[^}]*"data":\[\([-0-9]*\).*/\1/p')
  [ -n "$want" ] || { echo "qemu-check: no output_label in $model.expected.json" >&2; exit 1; }

  log=$(mktemp)
  pid=""
  cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -f "$log"; }
  trap cleanup EXIT
  # A port unlikely to be taken; retried with another one if it is.
  for attempt in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 20000))
    qemu-aarch64-static "$bin" serve --model "$model" --listen "127.0.0.1:$port" --threads 2 >"$log" 2>&1 &
    pid=$!
    start=$SECONDS
    ready=0
    # Loading, optimizing and the warm-up run are emulated: give it time.
    while [ $((SECONDS - start)) -lt 180 ]; do
      kill -0 "$pid" 2>/dev/null || break
      if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready" || true)" = 200 ]; then
        ready=1; break
      fi
      sleep 0.5
    done
    [ "$ready" -eq 1 ] && break
    if kill -0 "$pid" 2>/dev/null; then
      echo "qemu-check: server not ready after 180 s" >&2; cat "$log" >&2; exit 1
    fi
    # Exited: a taken port is worth another try, anything else is a failure.
    if ! grep -qi 'in use' "$log"; then
      echo "qemu-check: server exited:" >&2; cat "$log" >&2; exit 1
    fi
    pid=""
  done
  [ "$ready" -eq 1 ] || { echo "qemu-check: no free port found" >&2; exit 1; }
  echo "qemu-check: ready after $((SECONDS - start)) s (emulated)" >&2

  body=$(mktemp)
  code=$(curl -s -o "$body" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data "{\"features\":[$features]}" "http://127.0.0.1:$port/predict")
  answer=$(cat "$body"); rm -f "$body"
  echo "qemu-check: POST /predict -> $code $answer" >&2
  [ "$code" = 200 ] || { echo "qemu-check: /predict answered $code" >&2; cat "$log" >&2; exit 1; }
  got=$(sed -n 's/.*"prediction":[[:space:]]*"\{0,1\}\([-0-9.]*\).*/\1/p' <<<"$answer")
  [ "$got" = "$want" ] || { echo "qemu-check: prediction $got, expected label $want" >&2; exit 1; }

  # Sanity timing: sequential round trips, emulated CPU and all.
  n=20
  t0=$(date +%s%N)
  for _ in $(seq "$n"); do
    curl -sf -o /dev/null -H 'Content-Type: application/json' \
      --data "{\"features\":[$features]}" "http://127.0.0.1:$port/predict"
  done
  t1=$(date +%s%N)
  echo "qemu-check: $n predictions, mean round trip $(( (t1 - t0) / n / 1000 )) us under qemu (sanity check only)" >&2
  echo "qemu-check: serve-and-predict ok (prediction $got)"
fi
