#!/usr/bin/env bash
# HTTP benchmark: `outpost-runtime serve` against the seed's FastAPI server
# (bench/seed_server: FastAPI + uvicorn, 1 worker, onnxruntime), same
# machine, same run, same request (a breast-cancer test row to /predict).
#
# For each model (bc_mlp.onnx, bc_mlp_int8.onnx) and each server it reports:
# throughput and p50/p99 latency with wrk at 1 and 32 connections, resident
# memory while serving (VmRSS sampled mid-run at 32 connections, and the
# VmHWM peak), and the time from process start to /ready = 200. For
# outpost-runtime it also runs 32 connections with dynamic batching on.
#
#   bench/http/run.sh
#   SEED_PYTHON=/path/to/venv/bin/python DURATION=20s bench/http/run.sh
#
# Environment:
#   SEED_PYTHON      python with fastapi, uvicorn, onnxruntime (default: python3;
#                    bench/seed_server/requirements.txt pins them)
#   DURATION         wrk duration per measurement (default 10s)
#   MODELS           fixtures to serve (default "bc_mlp.onnx bc_mlp_int8.onnx")
#   BATCH_WINDOW_US  dynamic batching window for the "batching on" run (default 500;
#                    the server then defaults to one more worker than cores)
#   OUTPOST_BIN      server binary (default target/release/outpost-runtime,
#                    built with `cargo build --release -p outpost-runtime`)
#   OUTPOST_DEVICE_BIN  the same server built with the `device` profile (what is
#                    flashed: opt-level z, LTO); measured too when it exists
#                    (default target/device/outpost-runtime; build it with
#                    `cargo build --profile device -p outpost-runtime`)
#   SKIP_BUILD=1     do not build
#   OUT              where the markdown table goes too (default bench/http/results.md)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/bench/http"
SEED_PYTHON=${SEED_PYTHON:-python3}
DURATION=${DURATION:-10s}
MODELS=${MODELS:-"bc_mlp.onnx bc_mlp_int8.onnx"}
BATCH_WINDOW_US=${BATCH_WINDOW_US:-500}
OUTPOST_BIN=${OUTPOST_BIN:-$ROOT/target/release/outpost-runtime}
OUTPOST_DEVICE_BIN=${OUTPOST_DEVICE_BIN:-$ROOT/target/device/outpost-runtime}
OUT=${OUT:-$HERE/results.md}
PORT=${PORT:-18181}

die() { echo "run.sh: $*" >&2; exit 1; }
command -v wrk >/dev/null || die "wrk is not installed (apt-get install wrk)"
(( BASH_VERSINFO[0] >= 5 )) || die "bash 5 is needed (EPOCHREALTIME)"
"$SEED_PYTHON" -c 'import fastapi, uvicorn, onnxruntime' 2>/dev/null \
  || die "$SEED_PYTHON lacks fastapi/uvicorn/onnxruntime; set SEED_PYTHON (see bench/seed_server/README.md)"
if [[ -z ${SKIP_BUILD:-} ]]; then
  (cd "$ROOT" && cargo build --release -p outpost-runtime --quiet)
fi
[[ -x $OUTPOST_BIN ]] || die "no server binary at $OUTPOST_BIN"

SERVER_PID=""
cleanup() { [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# GET /ready through bash's /dev/tcp: no process spawn per probe, so the
# readiness time is measured to well under a millisecond.
ready_probe() {
  local fd line
  { exec {fd}<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || return 1
  printf 'GET /ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&"$fd" || { exec {fd}>&-; return 1; }
  read -r -t 2 line <&"$fd" || line=""
  exec {fd}>&-
  [[ $line == *" 200 "* ]]
}

# start_server KIND MODEL [extra args]; sets SERVER_PID and READY_MS.
start_server() {
  local kind=$1 model=$2; shift 2
  local t0=$EPOCHREALTIME
  case $kind in
    outpost-device)
      "$OUTPOST_DEVICE_BIN" serve --model "$ROOT/fixtures/$model" --listen "127.0.0.1:$PORT" "$@" \
        >"$HERE/.server.log" 2>&1 &
      ;;
    outpost)
      "$OUTPOST_BIN" serve --model "$ROOT/fixtures/$model" --listen "127.0.0.1:$PORT" "$@" \
        >"$HERE/.server.log" 2>&1 &
      ;;
    seed)
      # As the seed writes it: uvicorn, one worker.
      (cd "$ROOT/bench/seed_server" && MODEL_PATH="$ROOT/fixtures/$model" INTRA_OP_THREADS=1 \
        exec "$SEED_PYTHON" -m uvicorn app:app --host 127.0.0.1 --port "$PORT" --workers 1 --log-level warning) \
        >"$HERE/.server.log" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  local deadline=$(( ${EPOCHREALTIME%.*} + 60 ))
  until ready_probe; do
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$HERE/.server.log" >&2; die "$kind server exited"; }
    (( ${EPOCHREALTIME%.*} < deadline )) || die "$kind server not ready after 60 s"
  done
  local t1=$EPOCHREALTIME
  READY_MS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) * 1000 }')
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  sleep 0.3
}

status_kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$SERVER_PID/status"; }

# measure CONNS: wrk at CONNS connections; sets RPS P50 P99 NON2XX (and RSS_KIB mid-run).
measure() {
  local conns=$1 secs
  wrk -t1 -c"$conns" -d2s -s "$HERE/predict.lua" "http://127.0.0.1:$PORT/predict" >/dev/null  # warm-up
  secs=${DURATION%s}
  ( sleep "$(awk -v s="$secs" 'BEGIN { print s / 2 }')"; status_kib VmRSS >"$HERE/.rss" ) &
  local sampler=$!
  local line
  line=$(wrk -t1 -c"$conns" -d"$DURATION" --latency -s "$HERE/predict.lua" "http://127.0.0.1:$PORT/predict" \
    | grep '^WRK_RESULT ' | cut -d' ' -f2-)
  wait "$sampler" || true
  RSS_KIB=$(cat "$HERE/.rss" 2>/dev/null || echo 0)
  RPS=$(jq_num "$line" rps); P50=$(jq_num "$line" p50_us); P99=$(jq_num "$line" p99_us)
  NON2XX=$(( $(jq_num "$line" non2xx) + $(jq_num "$line" socket_errors) ))
}

jq_num() { sed -E "s/.*\"$2\":([0-9.]+).*/\1/" <<<"$1"; }

declare -A R
row() { # server model conns label
  local key="$1|$2|$3"
  R[$key.rps]=$RPS; R[$key.p50]=$P50; R[$key.p99]=$P99; R[$key.err]=$NON2XX
  printf '| %-24s | %-17s | %5s | %10.0f | %9s | %9s | %6s |\n' "$1" "$2" "$3" "$RPS" "$P50" "$P99" "$NON2XX" \
    | tee -a "$OUT"
}

{
  echo "# HTTP benchmark: outpost-runtime vs the seed's FastAPI server"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)),"
  echo "wrk -t1, $DURATION per point, POST /predict with one breast-cancer test row; server and wrk share the machine."
  echo "outpost: \`serve\` (release build) with default threads (= cores); outpost-device: the same built with the"
  echo "\`device\` profile that is flashed (opt-level z, fat LTO); seed: uvicorn, 1 worker, onnxruntime 1 thread."
  echo
  echo "| server | model | conns | req/s | p50 µs | p99 µs | errors |"
  echo "|---|---|---|---|---|---|---|"
} | tee "$OUT"

KINDS="outpost seed"
[[ -x $OUTPOST_DEVICE_BIN ]] && KINDS="outpost outpost-device seed"
declare -A MEM
for model in $MODELS; do
  for kind in $KINDS; do
    start_server "$kind" "$model"
    ready=$READY_MS
    measure 1;  row "$kind" "$model" 1
    measure 32; row "$kind" "$model" 32
    MEM[$kind|$model]="$ready|$RSS_KIB|$(status_kib VmHWM)"
    stop_server
  done
  start_server outpost "$model" --batch-window-us "$BATCH_WINDOW_US" --max-batch 32
  measure 32; row "outpost+batch${BATCH_WINDOW_US}us" "$model" 32
  stop_server
done

{
  echo
  echo "| server | model | ready after start (ms) | VmRSS serving 32 conns (MiB) | VmHWM (MiB) |"
  echo "|---|---|---|---|---|"
  for model in $MODELS; do
    for kind in $KINDS; do
      IFS='|' read -r ready rss hwm <<<"${MEM[$kind|$model]}"
      awk -v k="$kind" -v m="$model" -v r="$ready" -v s="$rss" -v h="$hwm" \
        'BEGIN { printf "| %s | %s | %s | %.1f | %.1f |\n", k, m, r, s / 1024, h / 1024 }'
    done
  done
  echo
  echo "Ratios (outpost / seed) and dynamic batching:"
  echo
  for model in $MODELS; do
    awk -v m="$model" \
      -v o32="${R[outpost|$model|32.rps]}" -v s32="${R[seed|$model|32.rps]}" \
      -v o1="${R[outpost|$model|1.p50]}" -v s1="${R[seed|$model|1.p50]}" \
      -v b32="${R[outpost+batch${BATCH_WINDOW_US}us|$model|32.rps]}" \
      -v b50="${R[outpost+batch${BATCH_WINDOW_US}us|$model|32.p50]}" -v o50="${R[outpost|$model|32.p50]}" \
      'BEGIN {
         printf "- %s: throughput at 32 conns %.1fx the seed (target >= 25x); p50 at 1 conn %.1fx lower (target >= 10x); ", m, o32 / s32, s1 / o1
         printf "batching on: %.0f req/s vs %.0f off (%+.0f%%), p50 %d vs %d us\n", b32, o32, (b32 / o32 - 1) * 100, b50, o50
       }'
  done
} | tee -a "$OUT"
rm -f "$HERE/.rss" "$HERE/.server.log"
