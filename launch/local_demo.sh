#!/usr/bin/env bash
# The README's main job: set up .venv, generate the embedded medical dataset, train the tiny
# curriculum (VAE -> foundation -> instruction -> unified) on this CPU, then evaluate on the
# held-out test split and write the report and sample outputs.
#   bash launch/local_demo.sh [WORKDIR]        (default runs/tiny; re-running resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/tiny}
REQUIREMENTS=requirements.txt bash scripts/setup_env.sh
export JAX_PLATFORMS=cpu
.venv/bin/python -m unimedvl_jax.train --config configs/demo.py --workdir "$WORKDIR" --evaluate
echo "report: $WORKDIR/eval/report.md (and report.json)   samples: $WORKDIR/eval/samples/   TensorBoard: $WORKDIR/tb"
