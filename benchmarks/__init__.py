"""Benchmarks, run from the repository root as modules: `python -m benchmarks.<name> [--help]`
(e.g. `python -m benchmarks.bench_decode`). They import `unimedvl_jax` as installed
(`pip install -e .`, scripts/setup.sh) and each other as `benchmarks.<name>`; nothing edits
sys.path. Results and the commands that produced them: benchmarks/RESULTS.md."""
