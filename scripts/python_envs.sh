# shellcheck shell=bash
# Sourced by scripts/make_fixtures.sh and bench/run_python_baselines.sh.
#
# python_env VAR VENV_DIR REQUIREMENTS
#   Prints the path of a python interpreter for one of the project's Python
#   environments. If $VAR is set (e.g. FIXTURE_PYTHON=/path/to/python) it is
#   used as is. Otherwise VENV_DIR (relative to the repository root) is
#   created with ${PYTHON:-python3} -m venv if needed and REQUIREMENTS
#   (relative to scripts/) is installed whenever that file changed.
#   All progress goes to stderr.

OUTPOST_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

python_env() {
  local var="$1" dir="$OUTPOST_REPO/$2" req="$OUTPOST_REPO/scripts/$3"
  if [ -n "${!var:-}" ]; then
    if ! "${!var}" -c 'import sys' >/dev/null 2>&1; then
      echo "$var=${!var} is not a working python" >&2
      return 1
    fi
    printf '%s\n' "${!var}"
    return 0
  fi
  local base="${PYTHON:-python3}"
  if [ ! -x "$dir/bin/python" ]; then
    echo "creating $2 with $base (set $var to use an existing environment)" >&2
    "$base" -m venv "$dir" >&2 || return 1
  fi
  local want have
  want="$("$dir/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$req")"
  have="$(cat "$dir/.requirements.sha256" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    echo "installing $3 into $2" >&2
    "$dir/bin/python" -m pip install --quiet --upgrade pip >&2 || return 1
    "$dir/bin/python" -m pip install --quiet -r "$req" >&2 || return 1
    printf '%s\n' "$want" > "$dir/.requirements.sha256"
  fi
  printf '%s\n' "$dir/bin/python"
}
