#!/usr/bin/env bash
# The demo. Until the fleet server and agent land, it serves a fixture model
# with outpost-runtime and sends it predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p outpost-runtime
bin=target/debug/outpost-runtime
# A free port: a fixed one may belong to something else on this machine.
port=${PORT:-}
while [ -z "$port" ] || (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; do
  port=$((20000 + RANDOM % 20000))
done
$bin serve --model fixtures/bc_mlp.onnx --listen 127.0.0.1:$port &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  kill -0 $pid 2>/dev/null || { echo "demo: outpost-runtime exited" >&2; exit 1; }
  curl -sf http://127.0.0.1:$port/ready >/dev/null && break
  sleep 0.1
done
echo "== /ready";   curl -sf http://127.0.0.1:$port/ready; echo
echo "== /v1/model"; curl -sf http://127.0.0.1:$port/v1/model; echo
row=$(sed -n 2p fixtures/data/bc_test.csv | awk -F, 'BEGIN{OFS=","} {NF--; print}')
echo "== /predict (first test row)"
curl -sf -H 'content-type: application/json' -d "{\"features\":[$row]}" http://127.0.0.1:$port/predict; echo
echo "== /predict with 3 features instead of 30 (expect 422)"
curl -s -H 'content-type: application/json' -d '{"features":[1,2,3]}' http://127.0.0.1:$port/predict; echo
echo "demo: ok"
