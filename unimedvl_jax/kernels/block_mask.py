"""Block classification of the packed attention mask, from per-block metadata summaries.

The attention kernels tile the (query, key) plane into blocks of block_q x block_k. Each block is
classified, in plain JAX and without ever forming the T x T mask, as

  SKIP (0)     no (query, key) pair of the block is allowed: not computed at all;
  PARTIAL (1)  some pairs may be allowed: computed with the elementwise rule `allowed`;
  FULL (2)     every pair is allowed: computed without any mask arithmetic.

The classification is conservative and exact in the only sense that matters for correctness: a
block marked SKIP has no allowed entry and a block marked FULL has only allowed entries, for ANY
metadata (sorted or not). It is tight for real packs (segment and split ids non-decreasing along
the sequence, padding at the end): PARTIAL blocks are those that straddle an item or sample
boundary, padding, or the causal diagonal of a text item.

How: the rule of SPEC section 3, split by the query's mode (causal or not) and the key's mode
(noise or not), is a conjunction of interval conditions on split ids (and on positions for causal
queries). Each block keeps, over its non-padding tokens, the min/max of the segment id and the
min/max split id of each mode class; comparing those intervals decides emptiness / fullness of
each of the four sub-blocks (a sub-block is also empty when the segment ranges of its two classes
are disjoint), and the block is SKIP iff all four are empty (or the segment ranges are
disjoint), FULL iff all four are full and one segment covers both blocks with no padding.
Cost: O(T) reductions plus O((T/block_q) * (T/block_k)) small integer ops per pack.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from unimedvl_jax.batch import MODE_CAUSAL, MODE_NOISE

SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = 1 << 30  # sentinel: min of an empty set is +BIG, max is -BIG


class _Summary(NamedTuple):
  any_pad: jax.Array   # [B, n] bool
  all_pad: jax.Array
  seg_min: jax.Array   # [B, n] int32, over non-padding tokens
  seg_max: jax.Array
  a_min: jax.Array     # split range of class A tokens (query side: causal; key side: noise)
  a_max: jax.Array
  a_seg_min: jax.Array  # segment range of class A tokens
  a_seg_max: jax.Array
  b_min: jax.Array     # split range of class B tokens (query side: not causal; key side: not noise)
  b_max: jax.Array
  b_seg_min: jax.Array
  b_seg_max: jax.Array


def _summarise(segment_ids, split_ids, split_modes, block: int, class_a_mode: int) -> _Summary:
  B, T = segment_ids.shape
  n = T // block
  r = lambda x: x.reshape(B, n, block)
  seg, split, mode = r(segment_ids), r(split_ids), r(split_modes)
  valid = seg != 0
  in_a = valid & (mode == class_a_mode)
  in_b = valid & (mode != class_a_mode)
  mn = lambda x, m: jnp.min(jnp.where(m, x, _BIG), axis=-1)
  mx = lambda x, m: jnp.max(jnp.where(m, x, -_BIG), axis=-1)
  return _Summary(
      any_pad=jnp.any(~valid, axis=-1), all_pad=jnp.all(~valid, axis=-1),
      seg_min=mn(seg, valid), seg_max=mx(seg, valid),
      a_min=mn(split, in_a), a_max=mx(split, in_a),
      a_seg_min=mn(seg, in_a), a_seg_max=mx(seg, in_a),
      b_min=mn(split, in_b), b_max=mx(split, in_b),
      b_seg_min=mn(seg, in_b), b_seg_max=mx(seg, in_b))


def _idx_range(idx, valid, block):
  """Per block, min / max of the sequence index over its non-padding tokens ([B, n] each)."""
  B, T = idx.shape
  r = lambda x: x.reshape(B, T // block, block)
  i, v = r(idx), r(valid)
  return (jnp.min(jnp.where(v, i, _BIG), axis=-1), jnp.max(jnp.where(v, i, -_BIG), axis=-1))


@functools.partial(jax.jit, static_argnames=('block_q', 'block_k'))
def classify_blocks(segment_ids, split_ids, split_modes, block_q: int, block_k: int,
                    token_idx=None) -> jax.Array:
  """int32 [B, T] metadata (T a multiple of both blocks) -> int32 [B, T/block_q, T/block_k].

  Values SKIP / PARTIAL / FULL, see the module docstring. `token_idx` [B, T]: the sequence index
  of each entry when the arrays are NOT in sequence order (e.g. the decoder's expert order, whose
  causality is by sequence index); None = sequence order (index = position in the array).
  """
  B, T = segment_ids.shape
  if T % block_q or T % block_k:
    raise ValueError(f'sequence length {T} must be a multiple of block_q={block_q} and '
                     f'block_k={block_k} (pad with segment id 0 first)')
  segment_ids, split_ids, split_modes = (jnp.asarray(x, jnp.int32)
                                         for x in (segment_ids, split_ids, split_modes))
  qs = _summarise(segment_ids, split_ids, split_modes, block_q, MODE_CAUSAL)
  ks = _summarise(segment_ids, split_ids, split_modes, block_k, MODE_NOISE)
  q = jax.tree.map(lambda x: x[:, :, None], qs)   # [B, nq, 1]
  k = jax.tree.map(lambda x: x[:, None, :], ks)   # [B, 1, nk]
  nq, nk = T // block_q, T // block_k
  if token_idx is None:
    q_lo = (jnp.arange(nq, dtype=jnp.int32) * block_q)[None, :, None]
    q_hi = q_lo + block_q - 1
    k_lo = (jnp.arange(nk, dtype=jnp.int32) * block_k)[None, None, :]
    k_hi = k_lo + block_k - 1
  else:   # index ranges over the real tokens of each block (empty blocks are SKIP anyway)
    token_idx = jnp.asarray(token_idx, jnp.int32)
    valid = segment_ids != 0
    q_lo, q_hi = (x[:, :, None] for x in _idx_range(token_idx, valid, block_q))
    k_lo, k_hi = (x[:, None, :] for x in _idx_range(token_idx, valid, block_k))
  k_after = k_lo > q_hi          # every key strictly after every query
  k_before = k_hi <= q_lo        # every key at or before every query

  # Query classes: c = causal (a_*), n = not causal (b_*). Key classes: z = noise (a_*),
  # w = not noise (b_*). Per pair of classes, with same segment, `allowed` reduces to:
  #   n,w: k_split <= q_split             n,z: k_split == q_split
  #   c,w: k_split < q_split or (k_split == q_split and k_idx <= q_idx)
  #   c,z: k_split == q_split and k_idx <= q_idx
  qc_min, qc_max, qn_min, qn_max = q.a_min, q.a_max, q.b_min, q.b_max
  kz_min, kz_max, kw_min, kw_max = k.a_min, k.a_max, k.b_min, k.b_max

  # Emptiness (no allowed pair) per sub-block; an empty class is empty through the sentinels.
  # A sub-block is also empty when the segment ranges of its two classes are disjoint.
  seg_apart = lambda qlo, qhi, klo, khi: (klo > qhi) | (qlo > khi)
  e_nw = (kw_min > qn_max) | seg_apart(q.b_seg_min, q.b_seg_max, k.b_seg_min, k.b_seg_max)
  e_nz = ((kz_min > qn_max) | (qn_min > kz_max)
          | seg_apart(q.b_seg_min, q.b_seg_max, k.a_seg_min, k.a_seg_max))
  e_cw = ((kw_min > qc_max) | ((kw_min >= qc_max) & k_after)
          | seg_apart(q.a_seg_min, q.a_seg_max, k.b_seg_min, k.b_seg_max))
  e_cz = ((kz_min > qc_max) | (qc_min > kz_max) | k_after
          | seg_apart(q.a_seg_min, q.a_seg_max, k.a_seg_min, k.a_seg_max))
  seg_disjoint = (q.seg_max < k.seg_min) | (k.seg_max < q.seg_min)
  skip = q.all_pad | k.all_pad | seg_disjoint | (e_nw & e_nz & e_cw & e_cz)

  # Fullness (every pair allowed) per sub-block; an empty class is vacuously full.
  qc_empty, qn_empty = qc_max < qc_min, qn_max < qn_min
  kz_empty = kz_max < kz_min
  f_nw = kw_max <= qn_min
  f_nz = qn_empty | kz_empty | ((kz_min == kz_max) & (qn_min == qn_max) & (kz_min == qn_min))
  f_cw = (kw_max < qc_min) | ((kw_max <= qc_min) & k_before)
  f_cz = qc_empty | kz_empty | ((kz_min == kz_max) & (qc_min == qc_max) & (kz_min == qc_min)
                                & k_before)
  one_seg = ((q.seg_min == q.seg_max) & (k.seg_min == k.seg_max) & (q.seg_min == k.seg_min))
  full = ~q.any_pad & ~k.any_pad & one_seg & f_nw & f_nz & f_cw & f_cz
  return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


class BlockLists(NamedTuple):
  """Per row of blocks, the blocks to compute, FULL ones first then PARTIAL ones.

  order   int32 [B, n_rows, n_cols]: column indices; the first n_full are FULL, the next
          n_partial PARTIAL, the rest SKIP (never read by the kernels past n_full + n_partial).
  counts  int32 [B, n_rows, 2]: (n_full, n_partial).
  """
  order: jax.Array
  counts: jax.Array


def block_lists(block_class: jax.Array) -> BlockLists:
  """[B, n_rows, n_cols] classes -> compacted per-row work lists (stable order within a kind)."""
  key = jnp.where(block_class == FULL, 0, jnp.where(block_class == PARTIAL, 1, 2))
  order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.stack([jnp.sum(block_class == FULL, axis=-1),
                      jnp.sum(block_class == PARTIAL, axis=-1)], axis=-1).astype(jnp.int32)
  return BlockLists(order, counts)


def _pad_to(x, T, value=0):
  return jnp.pad(x, ((0, 0), (0, T - x.shape[1])), constant_values=value)


@functools.partial(jax.jit, static_argnames=('block_q', 'block_k'))
def block_sparsity(segment_ids, split_ids, split_modes, block_q: int, block_k: int) -> dict:
  """Fractions of (query block, key block) pairs that are skipped / partial / full.

  Metadata int32 [B, T] as `attention_mask` takes it; T is padded to a multiple of both blocks
  with padding tokens (segment 0), exactly as `flash_attention` does, and the padded blocks are
  counted. Returns {'skip', 'partial', 'full'} -> float32 scalars (jit-compatible), plus
  'computed' = partial + full, the fraction of the dense work the kernels do.
  """
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  T = segment_ids.shape[1]
  mult = max(block_q, block_k)
  if mult % block_q or mult % block_k:
    raise ValueError(f'block sizes must divide each other, got {block_q} and {block_k}')
  Tp = -(-T // mult) * mult
  meta = [_pad_to(jnp.asarray(x, jnp.int32), Tp) for x in (segment_ids, split_ids, split_modes)]
  cls = classify_blocks(*meta, block_q, block_k)
  frac = lambda c: jnp.mean((cls == c).astype(jnp.float32))
  out = {'skip': frac(SKIP), 'partial': frac(PARTIAL), 'full': frac(FULL)}
  out['computed'] = out['partial'] + out['full']
  return out
