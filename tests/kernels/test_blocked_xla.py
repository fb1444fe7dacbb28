"""Block-sparse XLA attention (kernels/blocked_xla.py) vs a float64 numpy transcription of SPEC 3.

The reference here is independent of the package: the mask is the literal rule of SPEC section 3
evaluated in numpy, softmax and gradients in float64 (closed-form attention backward). Cases:
random packs of all three split modes (GQA 2:1), ViT-style packs, arbitrary (unsorted) metadata,
a permuted token order with explicit sequence indices (the decoder's expert order), T not a
multiple of the block, and bf16 inputs. One jit per case shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import attention_packs as packs
from unimedvl_jax.kernels.blocked_xla import blocked_attention


def np_mask(seg, split, mode, idx):
  """SPEC 3, literally: q sees k iff same sample and (earlier split, or same split and (not
  causal or k <= q)) and not (k's split is noise and not q's split)."""
  q = lambda a: a[:, :, None]
  k = lambda a: a[:, None, :]
  same = (q(seg) == k(seg)) & (q(seg) != 0)
  earlier = k(split) < q(split)
  same_split = k(split) == q(split)
  inside = same_split & ((q(mode) != 0) | (k(idx) <= q(idx)))
  hidden = (k(mode) == 2) & ~same_split
  return same & (earlier | inside) & ~hidden


def np_attention_and_grads(q, k, v, ct, mask):
  """float64 attention (GQA) and its closed-form VJP. q [B,T,Hq,D], k/v [B,T,Hkv,D]."""
  q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
  B, T, Hq, D = q.shape
  G = Hq // k.shape[2]
  ke, ve = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum('bqhd,bkhd->bhqk', q, ke) / np.sqrt(D)
  m = mask[:, None]
  s = np.where(m, s, -np.inf)
  mx = np.max(s, -1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0)
  p = np.where(m, np.exp(s - mx), 0)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1)
  out = np.einsum('bhqk,bkhd->bqhd', p, ve)
  dp = np.einsum('bqhd,bkhd->bhqk', ct, ve)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  dq = np.einsum('bhqk,bkhd->bqhd', ds, ke) / np.sqrt(D)
  dke = np.einsum('bhqk,bqhd->bkhd', ds, q) / np.sqrt(D)
  dve = np.einsum('bhqk,bqhd->bkhd', p, ct)
  sumg = lambda a: a.reshape(B, T, -1, G, D).sum(3)
  return out, dq, sumg(dke), sumg(dve)


@jax.jit
def _fwd_bwd(q, k, v, seg, split, mode, idx, ct):
  out, vjp = jax.vjp(lambda q, k, v: blocked_attention(q, k, v, seg, split, mode, idx,
                                                       block_q=32, block_k=32), q, k, v)
  return (out,) + vjp(ct.astype(out.dtype))


def _check(meta, idx=None, *, Hq=4, Hkv=2, D=16, dtype=jnp.float32, tol=2e-5, seed=0):
  seg, split, mode = (np.asarray(a, np.int32) for a in meta)
  B, T = seg.shape
  idx_np = np.broadcast_to(np.arange(T), (B, T)) if idx is None else np.asarray(idx)
  rng = np.random.default_rng(seed)
  mk = lambda *s: rng.standard_normal(s).astype(np.float32)
  q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
  cast = lambda a: jnp.asarray(a).astype(dtype)
  got = _fwd_bwd(cast(q), cast(k), cast(v), seg, split, mode, jnp.asarray(idx_np, jnp.int32),
                 jnp.asarray(ct))
  # the reference sees the same (rounded) inputs
  rq, rk, rv = (np.asarray(cast(a), np.float64) for a in (q, k, v))
  want = np_attention_and_grads(rq, rk, rv, ct, np_mask(seg, split, mode, idx_np))
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    g = np.asarray(g, np.float64)
    err = np.max(np.abs(g - w)) / max(1.0, np.max(np.abs(w)))
    assert err <= tol, f'{name}: relative error {err:.2e} > {tol}'
  # rows that see nothing are exactly zero (padding and fully hidden queries)
  none = ~np_mask(seg, split, mode, idx_np).any(-1)
  assert np.all(np.asarray(got[0], np.float32)[none] == 0)


def test_random_packs_all_modes():
  rng = np.random.default_rng(1)
  _check(packs.random_batch(rng, 2, 192, max_item=40))


def test_vit_packs_and_unaligned_length():
  rng = np.random.default_rng(2)
  _check(packs.vit_batch(rng, 2, 200, max_image=60))      # 200 is not a multiple of 32


def test_unsorted_metadata_is_still_exact():
  rng = np.random.default_rng(3)
  _check(packs.unsorted_batch(rng, 2, 96))


@pytest.mark.parametrize('order', ['expert', 'random'])
def test_permuted_order_with_sequence_indices(order):
  """Tokens permuted, causality by the given sequence indices: the decoder's expert order (a
  stable partition: understanding tokens, then the latents) and an arbitrary permutation (which
  reorders causal splits, so a kernel comparing array positions instead of indices fails)."""
  rng = np.random.default_rng(4)
  seg, split, mode = packs.random_batch(rng, 2, 160, max_item=30)
  perms = []
  for b in range(2):
    if order == 'expert':
      perms.append(np.concatenate([np.flatnonzero(mode[b] != 2), np.flatnonzero(mode[b] == 2)]))
    else:
      perms.append(rng.permutation(160))
  perm = np.stack(perms)
  take = lambda a: np.take_along_axis(a, perm, 1)
  _check((take(seg), take(split), take(mode)), idx=perm)


def test_bf16_inputs():
  rng = np.random.default_rng(5)
  _check(packs.random_batch(rng, 2, 128, max_item=40), dtype=jnp.bfloat16, tol=3e-2)


def test_chunk_flops_is_what_xla_counts_per_loop_body():
  """blocked_xla.chunk_flops (used to add the data-dependent loop iterations to XLA's
  cost_analysis, which counts a while body once) against cost_analysis of the fwd+bwd program:
  the matmuls of one forward and one backward chunk are nearly all of its FLOPs."""
  from unimedvl_jax.kernels import blocked_xla as bx
  B, T, Hq, Hkv, D = 2, 128, 4, 2, 64     # head_dim 64: dots dominate the elementwise ops
  seg = jnp.ones((B, T), jnp.int32)
  z = jnp.zeros((B, T), jnp.int32)
  q, k = jnp.ones((B, T, Hq, D)), jnp.ones((B, T, Hkv, D))
  f = jax.grad(lambda q, k, v: jnp.sum(bx.blocked_attention(q, k, v, seg, z, z, block_q=32,
                                                            block_k=32)), argnums=(0, 1, 2))
  ca = jax.jit(f).lower(q, k, k).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  per = bx.chunk_flops(B, T, Hq, Hkv, D, 32, 32)
  assert 1.0 <= ca['flops'] / (per['fwd'] + per['bwd']) < 1.1
  # causal text: 4x4 blocks per pack, 10 computed (the lower triangle), 8 pairs per chunk
  assert bx.chunks(seg, z, z, block_q=32, block_k=32) == -(-2 * 10 // 8)
