#!/usr/bin/env bash
# Regenerate fixtures/ (models, data, expected outputs, README).
#
#   scripts/make_fixtures.sh            # creates .venv-fixtures/ and .venv-tf/ on first use
#   FIXTURE_PYTHON=/path/to/python TF_PYTHON=/path/to/python scripts/make_fixtures.sh
#   scripts/make_fixtures.sh --no-tf    # skip TensorFlow: reuse the .tflite files and CNN weights
#   PYTHON=python3.12 scripts/make_fixtures.sh   # interpreter for new venvs (TensorFlow 2.21: 3.10-3.13)
#
# Any argument is passed on to scripts/make_fixtures.py (see --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_envs.sh"

fixture_python="$(python_env FIXTURE_PYTHON .venv-fixtures requirements-fixtures.txt)"
tf_args=()
case " $* " in
  *" --no-tf "*) ;;
  *) tf_args=(--tf-python "$(python_env TF_PYTHON .venv-tf requirements-tf.txt)") ;;
esac
exec "$fixture_python" "$OUTPOST_REPO/scripts/make_fixtures.py" ${tf_args[@]+"${tf_args[@]}"} "$@"
