#!/usr/bin/env bash
# The demo. Until the fleet server and agent land, it serves a fixture model
# with outpost-runtime and sends it predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p outpost-runtime
bin=target/debug/outpost-runtime
port=${PORT:-18080}
$bin serve --model fixtures/bc_mlp.onnx --listen 127.0.0.1:$port &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:$port/ready >/dev/null && break
  sleep 0.1
done
echo "== /ready";   curl -sf http://127.0.0.1:$port/ready; echo
echo "== /v1/model"; curl -sf http://127.0.0.1:$port/v1/model; echo
row=$(sed -n 2p fixtures/data/bc_test.csv | awk -F, 'BEGIN{OFS=","} {NF--; print}')
echo "== /predict (first test row)"
curl -sf -H 'content-type: application/json' -d "{\"features\":[$row]}" http://127.0.0.1:$port/predict; echo
echo "== /predict with 29 features (expect 422)"
curl -s -H 'content-type: application/json' -d '{"features":[1,2,3]}' http://127.0.0.1:$port/predict; echo
echo "demo: ok"
