"""Aggregation with uncertainty: mean and percentile-bootstrap confidence interval."""

from __future__ import annotations

import numpy as np

__all__ = ["aggregate"]


def aggregate(values, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean of per-sample scores with a percentile-bootstrap confidence interval.

    ``n_boot`` resamples of size n with replacement from ``numpy.random.default_rng(seed)``;
    the interval is the (1-ci)/2 and (1+ci)/2 quantiles (numpy "linear") of the resampled
    means.  Fixed seed -> identical numbers on every run.  Per-sample values should be the
    unit the metric is averaged over (e.g. 0/1 correctness per question, PSNR per image);
    corpus-level metrics such as corpus BLEU are not means of per-sample values and need a
    resample-and-recompute bootstrap instead.

    Returns ``{"mean", "ci_low", "ci_high", "std", "n", "ci", "n_boot", "seed"}``; ``std`` is
    the sample standard deviation (ddof=1; 0.0 for n=1).  n=0 gives nan statistics; n=1 a
    degenerate interval.  NaN values raise (filter them explicitly and report how many);
    +/-inf (e.g. PSNR of identical images) propagate into the mean.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError(f"{int(np.isnan(x).sum())} NaN values; filter them and report the count")
    if not 0.0 < ci < 1.0:
        raise ValueError("ci must be in (0, 1)")
    n = x.size
    out = {"n": int(n), "ci": ci, "n_boot": int(n_boot), "seed": int(seed)}
    if n == 0:
        nan = float("nan")
        return {**out, "mean": nan, "ci_low": nan, "ci_high": nan, "std": nan}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    if n == 1:
        return {**out, "mean": mean, "ci_low": mean, "ci_high": mean, "std": std}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return {**out, "mean": mean, "ci_low": float(lo), "ci_high": float(hi), "std": std}
