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
# libtpu (AOT planning only) beside the venv, not in it: the AOT tests find it through
# UNIMEDVL_LIBTPU_PATH (scripts/test.sh), no other python of the venv sees it. Installed with the
# test requirements (the default) unless UNIMEDVL_AOT=0 (the AOT tests then skip).
if [ "${REQUIREMENTS:-requirements-test.txt}" = "requirements-test.txt" ] \
    && [ "${UNIMEDVL_AOT:-1}" != "0" ] && [ ! -d "$ROOT/.libtpu/libtpu" ]; then
  "$ROOT/.venv/bin/pip" install -q --no-deps --target "$ROOT/.libtpu" -r "$ROOT/requirements-aot.txt"
fi
