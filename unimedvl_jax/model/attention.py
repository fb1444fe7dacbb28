"""The attention rule of packed multimodal sequences (SPEC section 3) and the reference attention.

A query in split a may see a key in split b iff they are in the same (non-padding) sample, and
b < a, or b == a and (the split is full/noise, or the key is not after the query), and the key's
split is not a noised image other than the query's own. `allowed` is written once, elementwise, so
that the dense mask, the reference attention, the KV-cache decode and the Pallas kernels (per
block) share it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2


def allowed(q_seg, q_split, q_mode, q_idx, k_seg, k_split, k_mode, k_idx):
  """Elementwise (broadcasting) attention rule. *_idx are sequence indices (for causality)."""
  same = (q_seg == k_seg) & (q_seg != 0)
  earlier = k_split < q_split
  same_split = k_split == q_split
  inside = same_split & ((q_mode != MODE_CAUSAL) | (k_idx <= q_idx))
  hidden_noise = (k_mode == MODE_NOISE) & ~same_split
  return same & (earlier | inside) & ~hidden_noise


def attention_mask(segment_ids: jax.Array, split_ids: jax.Array, split_modes: jax.Array) -> jax.Array:
  """int32 [B, T] metadata -> bool [B, T, T] (query, key): True where the query may see the key."""
  T = segment_ids.shape[-1]
  idx = jnp.arange(T, dtype=jnp.int32)
  q = lambda a: a[:, :, None]
  k = lambda a: a[:, None, :]
  return allowed(q(segment_ids), q(split_ids), q(split_modes), idx[None, :, None],
                 k(segment_ids), k(split_ids), k(split_modes), idx[None, None, :])


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None) -> jax.Array:
  """Grouped-query softmax attention with an explicit mask, computed in float32.

  q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; mask bool [B, Tq, Tk]. KV heads are not repeated in
  memory: queries are grouped [B, Tq, Hkv, G, D]. Rows with no allowed key return zeros.
  Returns [B, Tq, Hq, D] in q's dtype.
  """
  B, Tq, Hq, D = q.shape
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f'query heads ({Hq}) must be a multiple of key/value heads ({Hkv})')
  G = Hq // Hkv
  scale = D ** -0.5 if scale is None else scale
  qg = q.reshape(B, Tq, Hkv, G, D).astype(jnp.float32)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', qg, k.astype(jnp.float32)) * scale
  m = mask[:, None, None, :, :]
  logits = jnp.where(m, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', p, v.astype(jnp.float32))
  return out.reshape(B, Tq, Hq, D).astype(q.dtype)


def reference_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None):
  """The reference (XLA) attention of a packed sequence; the kernels are checked against it.

  q [B, T, Hq, D]; k, v [B, T, Hkv, D]; metadata int32 [B, T]. Returns [B, T, Hq, D].
  """
  return masked_attention(q, k, v, attention_mask(segment_ids, split_ids, split_modes), scale)


def resolve_impl(impl: str) -> str:
  if impl == 'auto':
    return 'pallas' if jax.default_backend() in ('tpu', 'gpu') else 'xla'
  return impl


def attention(q, k, v, segment_ids, split_ids, split_modes, *, impl: str = 'xla', scale=None):
  """Dispatch: 'xla' (reference), 'pallas' (fused kernel), 'auto' (best for the backend)."""
  impl = resolve_impl(impl)
  if impl == 'xla':
    return reference_attention(q, k, v, segment_ids, split_ids, split_modes, scale=scale)
  if impl == 'pallas':
    from unimedvl_jax import sharding
    from unimedvl_jax.kernels.flash_attention import flash_attention
    interpret = jax.default_backend() == 'cpu'

    def kernel(q, k, v, seg, split, mode):
      return flash_attention(q, k, v, seg, split, mode, scale=scale, interpret=interpret)
    # XLA cannot partition a Pallas (Mosaic/Triton) call: on a multi-device mesh each device runs
    # the kernel on its own packs (and heads under 'tensor') through jax.shard_map
    return sharding.shard_map_attention(kernel, q, k, v, segment_ids, split_ids, split_modes)
  raise ValueError(f'unknown attention_impl {impl!r}')
