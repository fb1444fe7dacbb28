#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements + this package from the repo's
# own files. Sourced by scripts/test.sh and launch/local_demo.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PYTHON:-python3}
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
"$ROOT/.venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
"$ROOT/.venv/bin/pip" install -q -r "$ROOT/${REQUIREMENTS:-requirements-test.txt}"
"$ROOT/.venv/bin/pip" install -q --no-deps -e "$ROOT"
