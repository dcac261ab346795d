#!/usr/bin/env bash
# Sets up a virtual environment (CPU torch, the project with its test extras) and runs the whole suite.
# FUSER_MOE_VENV picks the environment's folder (default .venv). pytest's exit code 5 (no tests ran)
# counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FUSER_MOE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
bash tools/check_kernels.sh
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tools/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
