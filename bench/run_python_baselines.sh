#!/usr/bin/env bash
# Python baselines for the fixtures: onnxruntime (bench/ort_inference.py) and
# TFLite/LiteRT (bench/tflite_inference.py), JSON lines on stdout.
#
#   bench/run_python_baselines.sh                 # venvs .venv-fixtures/ and .venv-tf/ (created if missing)
#   FIXTURE_PYTHON=/path/to/python TF_PYTHON=/path/to/python bench/run_python_baselines.sh
#   bench/run_python_baselines.sh --min-time 5    # extra arguments go to both scripts
#   SKIP_TFLITE=1 bench/run_python_baselines.sh   # onnxruntime only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/python_envs.sh"

fixture_python="$(python_env FIXTURE_PYTHON .venv-fixtures requirements-fixtures.txt)"
"$fixture_python" "$OUTPOST_REPO/bench/ort_inference.py" "$@"
if [ -z "${SKIP_TFLITE:-}" ]; then
  tf_python="$(python_env TF_PYTHON .venv-tf requirements-tf.txt)"
  "$tf_python" "$OUTPOST_REPO/bench/tflite_inference.py" "$@" 2> >(grep -v -e '^W0000' -e '^INFO: Created TensorFlow Lite' >&2)
fi
