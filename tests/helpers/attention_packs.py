"""Helpers of the attention tests: the random packs (unimedvl_jax/kernels/random_packs.py, shared
with the benchmarks) and a forward + backward runner with its error measure."""

from __future__ import annotations

import numpy as np

from unimedvl_jax.kernels.random_packs import (CAUSAL, FULL, NOISE,  # noqa: F401
                                               batch_with_all_modes, fill, random_batch,
                                               random_pack, realistic_batch, realistic_pack,
                                               realistic_sample, unsorted_batch, vit_batch)


def fwd_bwd(attn):
  """jit(q, k, v, meta..., cotangent) -> (out, (dq, dk, dv)): forward and backward, one compile."""
  import jax

  def f(q, k, v, seg, split, mode, ct):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg, split, mode), q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(f)


def rel_err(a, b) -> float:
  """max |a - b| over max(1, max |b|), in float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
