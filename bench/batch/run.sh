#!/usr/bin/env bash
# Batch mode throughput: `outpost-runtime batch` against onnxruntime + pandas
# doing the same job the way a Python user would (bench/batch/ort_batch.py:
# read_csv in chunks, session.run per chunk, to_csv), on the same generated
# CSV, alternately, in the same run. Reports rows/s, CPU time and peak RSS
# of both, and checks they wrote the same predictions.
#
#   bench/batch/run.sh                              # 1,000,000 rows, 2 threads, 3 rounds
#   ROWS=5000000 THREADS=4 REPEAT=5 bench/batch/run.sh
#   CPUS=0,1 bench/batch/run.sh                     # pin both to two cores (taskset)
#   PROBABILITY=none bench/batch/run.sh             # Python fetches the label only (its fastest path)
#   FIXTURE_PYTHON=/path/to/python bench/batch/run.sh   # a python with onnxruntime + pandas
#   MODEL=fixtures/bc_gb.onnx bench/batch/run.sh
#
# The input is fixtures/data/bc_test.csv's rows repeated (header + label
# column, ~212 bytes a row). Without FIXTURE_PYTHON a venv is made in
# .venv-bench-batch/ from bench/batch/requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../../scripts/python_envs.sh
source "$repo/scripts/python_envs.sh"

rows="${ROWS:-1000000}"
threads="${THREADS:-2}"
repeat="${REPEAT:-3}"
model="${MODEL:-$repo/fixtures/bc_mlp.onnx}"
python="$(python_env FIXTURE_PYTHON .venv-bench-batch ../bench/batch/requirements.txt)"

echo "== building outpost-runtime (release)" >&2
(cd "$repo" && cargo build --release -q -p outpost-runtime)
bin="${CARGO_TARGET_DIR:-$repo/target}/release/outpost-runtime"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== generating $rows rows" >&2
"$python" - "$repo/fixtures/data/bc_test.csv" "$work/rows.csv" "$rows" <<'PY'
import sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [l for l in open(src).read().splitlines() if l.strip()]
header, rows = lines[0], lines[1:]
with open(dst, "w") as f:
    f.write(header + "\n")
    block = "\n".join(rows) + "\n"
    full, rest = divmod(n, len(rows))
    for _ in range(full):
        f.write(block)
    f.write("".join(r + "\n" for r in rows[:rest]))
PY

echo "== $repeat rounds, $threads threads each" >&2
"$python" "$here/compare.py" --bin "$bin" --python "$python" --script "$here/ort_batch.py" \
  --model "$model" --input "$work/rows.csv" --work "$work" --rows "$rows" --threads "$threads" \
  --repeat "$repeat" --probability "${PROBABILITY:-zipmap}" --cpus "${CPUS:-}"
