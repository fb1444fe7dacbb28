#!/usr/bin/env bash
# The README's test command: sets up .venv from the repo's files, then runs the whole suite
# (20-25 min on 2 idle cores from a fresh clone, by CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export JAX_PLATFORMS=cpu
if [ -d .libtpu/libtpu ]; then export UNIMEDVL_LIBTPU_PATH="${UNIMEDVL_LIBTPU_PATH:-$PWD/.libtpu}"; fi
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@" tests
