"""Block-sparse attention of packed multimodal sequences in plain XLA (forward + backward).

The fast twin of the reference attention (`model/attention.py`) for backends where the Pallas
kernels do not run (CPU), and a portable fallback elsewhere. It never forms a [T, T] mask or
logits for the whole pack:

- the (query block, key block) plane is classified from the metadata (`block_mask`); every query
  block gets the list of its FULL / PARTIAL key blocks, SKIP blocks are never computed;
- all query blocks of all packs advance together: iteration j gathers, for every query block, the
  j-th key block of its own list, so each iteration is a few large batched matmuls; the loop runs
  max over query blocks of their list length times (a `while_loop`, data dependent);
- inside a block the elementwise rule `allowed` masks the logits; online softmax in float32;
  matmul operands in the input dtype (bf16 on accelerators) with float32 accumulation;
  a query row that may see nothing returns zeros;
- the backward pass (custom_vjp, FlashAttention-2 style) recomputes the probabilities per block
  from the saved log-sum-exp and walks the same lists; key-block gradients are summed back with
  a one-hot contraction (exact, no scatter).

Inputs may be in any token order (the decoder passes its expert order: understanding stream then
generation stream, so no per-layer permutation is needed): `token_idx` gives each entry's
sequence index, which is what causality compares.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from unimedvl_jax.batch import allowed
from unimedvl_jax.kernels import block_mask

DEFAULT_BLOCK = 64


class _Meta(NamedTuple):
  seg: jax.Array     # [B, n_blocks, blk] int32
  split: jax.Array
  mode: jax.Array
  idx: jax.Array


def _allowed(q: _Meta, k: _Meta):
  """q fields [C, bq], k fields [C, bk] -> bool [C, bq, bk]."""
  e = lambda a: a[..., :, None]
  f = lambda a: a[..., None, :]
  return allowed(e(q.seg), e(q.split), e(q.mode), e(q.idx), f(k.seg), f(k.split), f(k.mode),
                 f(k.idx))


def _group_mask(mask, G: int):
  """[C, bq, bk] -> [C, 1, G*bq, bk]: the same mask for the G query heads of a KV group (rows
  are (head, query) in head-major order)."""
  C, bq, bk = mask.shape
  return jnp.broadcast_to(mask[:, None, None], (C, 1, G, bq, bk)).reshape(C, 1, G * bq, bk)


class Plan(NamedTuple):
  """The work lists of one attention call: per pack, every (query block, key block) pair to
  compute, in query-block-major order, padded to whole chunks. Each pack has its own list (a
  batch-sharded step computes and walks its packs' lists locally: no collective); the loop runs
  the longest list's number of chunks. Computed once per step from the metadata and shared by
  every layer that attends over the same tokens."""
  rows: jax.Array      # [B, A] int32 query-block index within the pack
  cols: jax.Array      # [B, A] int32 key-block index within the pack
  valid: jax.Array     # [B, A] bool: a real pair (the tail of each list is padding)
  n_chunks: jax.Array  # scalar int32: chunks of `chunk` pairs that hold real pairs (max over packs)
  q_meta: _Meta        # [B, nq, bq] metadata per query block
  k_meta: _Meta        # [B, nk, bk] metadata per key block


# vmap axes of a Plan: everything per pack except the shared trip count
_PLAN_AXES = Plan(0, 0, 0, None, _Meta(0, 0, 0, 0), _Meta(0, 0, 0, 0))


def make_plan(segment_ids, split_ids, split_modes, token_idx=None, *,
              block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
              chunk: int | None = None) -> tuple[Plan, int]:
  """(plan, chunk) for metadata [B, T] (T padded to the blocks by the caller: see
  `blocked_attention`). `chunk`: pairs per pack per loop iteration (default: the number of query
  blocks of a pack, T / block_q). Work done = B x (longest list rounded up to a chunk) blocks."""
  B, T = segment_ids.shape
  nq, nk = T // block_q, T // block_k
  idx = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if token_idx is None
         else jnp.asarray(token_idx, jnp.int32))
  meta = [jnp.asarray(a, jnp.int32) for a in (segment_ids, split_ids, split_modes)] + [idx]
  cls = block_mask.classify_blocks(*meta[:3], block_q, block_k, token_idx=idx)
  active = (cls != block_mask.SKIP).reshape(B, nq * nk)
  cap = nq * nk
  chunk = int(chunk or nq)
  cap_p = -(-cap // chunk) * chunk
  flat = jax.vmap(lambda a: jnp.nonzero(a, size=cap, fill_value=0)[0])(active).astype(jnp.int32)
  n = jnp.sum(active, axis=1).astype(jnp.int32)                      # [B]
  rows, cols = flat // nk, flat % nk
  valid = jnp.arange(cap, dtype=jnp.int32)[None, :] < n[:, None]
  padn = cap_p - cap
  if padn:
    pad2 = lambda a: jnp.pad(a, ((0, 0), (0, padn)))
    rows, cols, valid = pad2(rows), pad2(cols), pad2(valid)
  blocks = lambda a, blk: a.reshape(B, T // blk, blk)
  plan = Plan(rows, cols, valid, (jnp.max(n) + chunk - 1) // chunk,
              _Meta(*(blocks(a, block_q) for a in meta)), _Meta(*(blocks(a, block_k) for a in meta)))
  return plan, chunk


def _chunk(plan: Plan, c, chunk: int):
  """One pack's c-th chunk: (rows [C], cols [C], mask [C, bq, bk])."""
  sl = lambda a: jax.lax.dynamic_slice_in_dim(a, c * chunk, chunk)
  rows, cols, valid = sl(plan.rows), sl(plan.cols), sl(plan.valid)
  take = lambda a, i: jnp.take(a, i, axis=0)
  qm = _Meta(*(take(a, rows) for a in plan.q_meta))
  km = _Meta(*(take(a, cols) for a in plan.k_meta))
  return rows, cols, _allowed(qm, km) & valid[:, None, None]


def _per_pack(body, n_arrays: int):
  """A loop body over one pack, body(c, carry, plan, *arrays) -> the same body over all packs
  (the chunk index is shared)."""
  return jax.vmap(body, in_axes=(None, 0, _PLAN_AXES) + (0,) * n_arrays)


def _fwd_core(qh, kh, vh, plan: Plan, chunk: int, scale, G):
  """qh [B, nq, Hkv, G*bq, D]; kh, vh [B, nk, Hkv, bk, D]. Returns (o f32 [B, nq, Hkv, M, D],
  lse f32 [B, nq, Hkv, M]). Online softmax over chunks of pairs; the pairs of a chunk are merged
  into their rows with segment max / sum."""
  B, R, Hkv, M, D = qh.shape
  f32 = jnp.float32

  def pack_body(c, carry, pl, qh, kh, vh):
    m, l, acc = carry
    rows, cols, mask = _chunk(pl, c, chunk)
    mask = _group_mask(mask, G)                                       # [C, 1, M, bk]
    qb = jnp.take(qh, rows, axis=0)                                   # [C, Hkv, M, D]
    kb, vb = jnp.take(kh, cols, axis=0), jnp.take(vh, cols, axis=0)   # [C, Hkv, bk, D]
    s = jnp.einsum('chmd,chkd->chmk', qb, kb, preferred_element_type=f32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m_pair = jnp.max(s, axis=-1)                                      # [C, Hkv, M]
    m_new = jnp.maximum(m, jax.ops.segment_max(m_pair, rows, num_segments=R,
                                               indices_are_sorted=True))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(mask, jnp.exp(s - jnp.take(m_safe, rows, axis=0)[..., None]), 0.0)
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    seg = lambda x: jax.ops.segment_sum(x, rows, num_segments=R, indices_are_sorted=True)
    l = l * corr + seg(jnp.sum(p, axis=-1))
    pv = jnp.einsum('chmk,chkd->chmd', p.astype(vh.dtype), vb, preferred_element_type=f32)
    acc = acc * corr[..., None] + seg(pv)
    return m_new, l, acc

  step = _per_pack(pack_body, 3)
  body = lambda c, carry: step(c, carry, plan, qh, kh, vh)
  init = (jnp.full((B, R, Hkv, M), -jnp.inf, f32), jnp.zeros((B, R, Hkv, M), f32),
          jnp.zeros((B, R, Hkv, M, D), f32))
  m, l, acc = jax.lax.fori_loop(0, plan.n_chunks, body, init)
  ok = l > 0
  o = jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), jnp.inf)   # +inf: p = 0 in backward
  return o, lse


def _bwd_core(qh, kh, vh, o, lse, do, plan: Plan, chunk: int, scale, G):
  B, R, Hkv, M, D = qh.shape
  NK = kh.shape[1]
  f32 = jnp.float32
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)          # [B, R, Hkv, M]
  do_c = do.astype(qh.dtype)

  def pack_body(c, carry, pl, qh, kh, vh, do_c, lse_delta):
    dq, dk, dv = carry
    lse, delta = lse_delta
    rows, cols, mask = _chunk(pl, c, chunk)
    mask = _group_mask(mask, G)
    take_r = lambda a: jnp.take(a, rows, axis=0)
    qb, dob, lse_b, delta_b = take_r(qh), take_r(do_c), take_r(lse), take_r(delta)
    kb, vb = jnp.take(kh, cols, axis=0), jnp.take(vh, cols, axis=0)
    s = jnp.einsum('chmd,chkd->chmk', qb, kb, preferred_element_type=f32) * scale
    p = jnp.where(mask, jnp.exp(s - lse_b[..., None]), 0.0)
    dp = jnp.einsum('chmd,chkd->chmk', dob, vb, preferred_element_type=f32)
    ds = (p * (dp - delta_b[..., None])).astype(qh.dtype)
    seg_r = lambda x: jax.ops.segment_sum(x, rows, num_segments=R, indices_are_sorted=True)
    seg_c = lambda x: jax.ops.segment_sum(x, cols, num_segments=NK)
    dq = dq + seg_r(jnp.einsum('chmk,chkd->chmd', ds, kb, preferred_element_type=f32))
    dk = dk + seg_c(jnp.einsum('chmk,chmd->chkd', ds, qb, preferred_element_type=f32))
    dv = dv + seg_c(jnp.einsum('chmk,chmd->chkd', p.astype(vh.dtype), dob,
                               preferred_element_type=f32))
    return dq, dk, dv

  step = _per_pack(pack_body, 5)
  body = lambda c, carry: step(c, carry, plan, qh, kh, vh, do_c, (lse, delta))
  init = (jnp.zeros(qh.shape, f32), jnp.zeros(kh.shape, f32), jnp.zeros(vh.shape, f32))
  dq, dk, dv = jax.lax.fori_loop(0, plan.n_chunks, body, init)
  return dq * scale, dk * scale, dv


def _to_heads(q, k, v, bq, bk):
  """[B, T, Hq, D] / [B, T, Hkv, D] -> head-major blocks per pack:
  q [B, nq, Hkv, G * bq, D], k / v [B, nk, Hkv, bk, D]."""
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  qh = q.reshape(B, T // bq, bq, Hkv, G, D).transpose(0, 1, 3, 4, 2, 5).reshape(
      B, T // bq, Hkv, G * bq, D)
  kv = lambda a: a.reshape(B, T // bk, bk, Hkv, D).transpose(0, 1, 3, 2, 4)
  return qh, kv(k), kv(v)


def _from_q_heads(x, B, T, Hkv, G, bq, D):
  return x.reshape(B, T // bq, Hkv, G, bq, D).transpose(0, 1, 4, 2, 3, 5).reshape(B, T, Hkv * G, D)


def _from_kv_heads(x, B, T, Hkv, bk, D):
  return x.transpose(0, 1, 3, 2, 4).reshape(B, T, Hkv, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, plan, block_q, block_k, chunk, scale):
  return _attention_fwd(q, k, v, plan, block_q, block_k, chunk, scale)[0]


def _attention_fwd(q, k, v, plan, block_q, block_k, chunk, scale):
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  qh, kh, vh = _to_heads(q, k, v, block_q, block_k)
  o, lse = _fwd_core(qh, kh, vh, plan, chunk, scale, G)
  out = _from_q_heads(o.astype(q.dtype), B, T, Hkv, G, block_q, D)
  return out, (q, k, v, out, lse, plan)


def _attention_bwd(block_q, block_k, chunk, scale, res, g):
  with jax.named_scope('attention'):
    q, k, v, out, lse, plan = res
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qh, kh, vh = _to_heads(q, k, v, block_q, block_k)
    oh = _to_heads(out, k, v, block_q, block_k)[0]
    doh = _to_heads(g, k, v, block_q, block_k)[0]
    dq, dk, dv = _bwd_core(qh, kh, vh, oh, lse, doh, plan, chunk, scale, G)
    dq = _from_q_heads(dq, B, T, Hkv, G, block_q, D).astype(q.dtype)
    dk = _from_kv_heads(dk, B, T, Hkv, block_k, D).astype(k.dtype)
    dv = _from_kv_heads(dv, B, T, Hkv, block_k, D).astype(v.dtype)
    zeros_plan = jax.tree.map(lambda a: None, plan)
    return dq, dk, dv, zeros_plan


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_meta(T, block_q, block_k, *meta):
  pad = (-T) % max(block_q, block_k)
  return pad, [None if a is None else jnp.pad(jnp.asarray(a, jnp.int32), ((0, 0), (0, pad)))
               for a in meta]


def blocked_attention(q, k, v, segment_ids, split_ids, split_modes, token_idx=None, *,
                      block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, scale=None,
                      plan: tuple[Plan, int] | None = None):
  """Packed-sequence attention, block-sparse. q [B, T, Hq, D]; k, v [B, T, Hkv, D]; metadata
  int32 [B, T] in the same token order; token_idx [B, T] sequence indices (None: sequence order).
  Returns [B, T, Hq, D] in q's dtype; rows that may see no key are zeros. T need not be a
  multiple of the blocks (padded internally with padding tokens). `plan`: the (plan, chunk) of
  `plan_for` for this metadata, to share one plan between calls (the layers of a decoder)."""
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f'query heads ({Hq}) must be a multiple of key/value heads ({Hkv})')
  if k.shape != v.shape or k.shape[:2] != (B, T):
    raise ValueError(f'k/v shapes {k.shape}/{v.shape} do not match q {q.shape}')
  scale = float(D ** -0.5 if scale is None else scale)
  mult = max(block_q, block_k)
  if mult % block_q or mult % block_k:
    raise ValueError(f'block sizes must divide each other, got {block_q} and {block_k}')
  if plan is None:
    plan = plan_for(segment_ids, split_ids, split_modes, token_idx, block_q=block_q,
                    block_k=block_k)
  pad = (-T) % mult
  if pad:
    p4 = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q, k, v = p4(q), p4(k), p4(v)
  out = _attention(q, k, v, plan[0], block_q, block_k, plan[1], scale)
  return out[:, :T] if pad else out


def plan_for(segment_ids, split_ids, split_modes, token_idx=None, *,
             block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
             chunk: int | None = None) -> tuple[Plan, int]:
  """`make_plan` on metadata [B, T] of any T (padded to the blocks with padding tokens)."""
  B, T = jnp.shape(segment_ids)
  if token_idx is None:
    token_idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  _, meta = _pad_meta(T, block_q, block_k, segment_ids, split_ids, split_modes, token_idx)
  return make_plan(*meta, block_q=block_q, block_k=block_k, chunk=chunk)


# ------------------------------------------------------------------------------ accounting

def chunk_flops(B: int, T: int, Hq: int, Hkv: int, D: int, block_q: int = DEFAULT_BLOCK,
                block_k: int = DEFAULT_BLOCK, chunk: int | None = None) -> dict:
  """Matmul FLOPs of ONE chunk of the forward and of the backward loop (T padded to the
  blocks; `chunk`: pairs per pack, default nq; B packs per iteration). XLA's cost_analysis
  counts a while body once; a call
  that ran n chunks computed `fixed + n * per_chunk`. Forward: QK^T and PV; backward: QK^T,
  dO V^T, dS K, dS^T Q, P^T dO."""
  mult = max(block_q, block_k)
  Tp = -(-T // mult) * mult
  chunk = B * int(chunk or Tp // block_q)
  pair = 2.0 * chunk * Hq * block_q * block_k * D          # one [G*bq, D] x [D, bk] per KV head
  return {'fwd': 2 * pair, 'bwd': 5 * pair}


def chunks(segment_ids, split_ids, split_modes, token_idx=None, *,
           block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> int:
  """The number of loop iterations (chunks) `blocked_attention` runs on this metadata."""
  plan, _ = plan_for(jnp.asarray(segment_ids), jnp.asarray(split_ids), jnp.asarray(split_modes),
                     None if token_idx is None else jnp.asarray(token_idx),
                     block_q=block_q, block_k=block_k)
  return int(plan.n_chunks)
