"""The dense attention mask of a packed sequence: the rule `batch.allowed` on every (query, key).

Lives with the kernels (which use it: cuDNN and splash take it as their explicit mask) so that
`kernels/` depends only on the leaf module `batch.py`; `model/attention.py` re-exports it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimedvl_jax.batch import allowed


def attention_mask(segment_ids: jax.Array, split_ids: jax.Array, split_modes: jax.Array,
                   token_idx: jax.Array | None = None) -> jax.Array:
  """int32 [B, T] metadata -> bool [B, T, T] (query, key): True where the query may see the key.
  token_idx [B, T]: sequence index of each entry if the arrays are not in sequence order."""
  T = segment_ids.shape[-1]
  idx = (jnp.arange(T, dtype=jnp.int32)[None] if token_idx is None else token_idx)
  q = lambda a: a[:, :, None]
  k = lambda a: a[:, None, :]
  return allowed(q(segment_ids), q(split_ids), q(split_modes), q(idx),
                 k(segment_ids), k(split_ids), k(split_modes), k(idx))
