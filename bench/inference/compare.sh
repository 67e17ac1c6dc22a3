#!/usr/bin/env bash
# In-process inference per call, Outpost (tract) vs onnxruntime / LiteRT,
# single thread each, same inputs, same run. Prints a table with the ratio.
#
#   bench/inference/compare.sh                      # every fixture
#   MODELS=bc_mlp.onnx,bc_gb.onnx bench/inference/compare.sh
#   FIXTURE_PYTHON=... TF_PYTHON=... bench/inference/compare.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

models_args=()
[ -n "${MODELS:-}" ] && models_args=(--models ${MODELS//,/ })
echo "== baselines (Python, 1 thread)" >&2
bench/run_python_baselines.sh "${models_args[@]}" > "$out/python.jsonl"

echo "== outpost-runtime (criterion, 1 thread)" >&2
# tract runs single-threaded unless told otherwise; criterion measures the
# same call the HTTP server makes (Model::run, inputs converted each call).
OUTPOST_BENCH_MODELS="${MODELS:-}" cargo bench -q -p outpost-runtime --bench inference -- --noplot >&2

python3 - "$out/python.jsonl" "$repo/target/criterion" <<'PY'
import json, sys, pathlib
base = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        base[(r["model"], r["batch"])] = (r["median_us"], r["runtime"].split(" ")[0])
crit = pathlib.Path(sys.argv[2])
print(f"{'model':28} {'batch':>5} {'outpost µs':>11} {'baseline µs':>12} {'baseline':>12} {'ratio':>7}")
for (model, batch), (b_us, who) in sorted(base.items()):
    est = crit / model / f"batch{batch}" / "new" / "estimates.json"
    if not est.exists():
        print(f"{model:28} {batch:>5} {'n/a':>11} {b_us:>12.1f} {who:>12}")
        continue
    ours = json.load(open(est))["median"]["point_estimate"] / 1000.0
    print(f"{model:28} {batch:>5} {ours:>11.1f} {b_us:>12.1f} {who:>12} {b_us/ours:>6.2f}x")
print("ratio = baseline time / outpost time (> 1: outpost is faster)")
PY
