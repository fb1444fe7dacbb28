#!/usr/bin/env bash
# The README's test command: creates .venv (if missing), installs the pinned requirements and the
# package from this repository's files, then runs the whole test suite (about 10-15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -r requirements-test.txt
.venv/bin/pip install -q --no-deps -e .
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@" tests
