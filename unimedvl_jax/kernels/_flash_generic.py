"""Generic Pallas kernels of the packed flash attention: GPU (Triton lowering) and CPU interpret.

Layout [B, T, H, D] (no transposes). One program per (batch, head, query block) for the forward
and dq kernels, one per (batch, kv head, key block) for dk/dv; each program walks its compacted
work list (`block_mask.block_lists`): FULL blocks first without any mask arithmetic, then PARTIAL
blocks with the elementwise rule `allowed` evaluated on the block's metadata slices. SKIP blocks
are never visited. K/V (forward, dq) and Q/dO (dk/dv) are whole-sequence refs indexed with
dynamic slices, which on GPU are plain global-memory pointers.

Only Triton-lowerable operations are used: 1-D iotas expanded to 2-D, `lax.dot_general` on 2-D
tiles, fori_loops with dynamic bounds. Block sizes must be powers of two (>= 16) and the head dim
a power of two (the wrapper pads it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from unimedvl_jax.model.attention import allowed

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
EMPTY_ROW_LSE = 1e30  # lse stored for rows with no allowed key: exp(s - lse) == 0

_NT = (((1,), (1,)), ((), ()))  # a [m, d] x b [n, d] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, k] x b [k, n] -> [m, n]


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """Output shape of a pallas_call; under shard_map (check_vma) it varies over the mesh axes that
  any of the inputs `like` varies over."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def _compiler_params(head_dim: int, num_warps: int | None, num_stages: int | None):
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps or (4 if head_dim <= 64 else 8),
                                 num_stages=num_stages or 2)


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(order_ref, counts_ref, qmeta_ref, kmeta_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, scale, bq, bk, precision):
  qi = pl.program_id(2)
  q = q_ref[...]
  q_seg, q_split, q_mode = (qmeta_ref[f, :][:, None] for f in range(3))
  q_idx = (qi * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
  n_full = counts_ref[0]
  n_part = counts_ref[1]

  def body(i, carry, masked):
    acc, m, l = carry
    kb = order_ref[i]
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    k = k_ref[ks, :]
    s = _dot(q, k, _NT, precision) * scale
    if masked:
      mask = allowed(q_seg, q_split, q_mode, q_idx,
                     kmeta_ref[0, ks][None, :], kmeta_ref[1, ks][None, :],
                     kmeta_ref[2, ks][None, :],
                     (kb * bk + jnp.arange(bk, dtype=jnp.int32))[None, :])
      s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    v = v_ref[ks, :]
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, _NN, precision)
    return acc, m_next, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(n_full, n_full + n_part, functools.partial(body, masked=True), carry)
  valid = l > 0.0
  l_safe = jnp.where(valid, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(valid, m + jnp.log(l_safe), EMPTY_ROW_LSE)


def forward(q, k, v, meta, lists, *, scale, bq, bk, interpret, num_warps=None, num_stages=None,
            cost_estimate=None):
  """q [B, Tp, Hq, D], k/v [B, Tp, Hkv, D], meta int32 [B, 3, Tp] -> (o like q, lse f32 [B, Hq, Tp])."""
  B, Tp, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(B, Hq, nq),
      in_specs=[
          pl.BlockSpec((None, None, nk), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, 2), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, 3, bq), lambda b, h, i: (b, 0, i)),
          pl.BlockSpec((None, 3, Tp), lambda b, h, i: (b, 0, 0)),
          pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
          pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
      ],
      out_shape=[out_struct(q.shape, q.dtype, q, k, v, meta),
                 out_struct((B, Hq, Tp), jnp.float32, q, k, v, meta)],
      compiler_params=_compiler_params(D, num_warps, num_stages),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_fwd',
  )(lists.order, lists.counts, meta, meta, q, k, v)


# ---------------------------------------------------------------------------------------- dq

def _dq_kernel(order_ref, counts_ref, qmeta_ref, kmeta_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale, bq, bk, precision):
  qi = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  q_seg, q_split, q_mode = (qmeta_ref[f, :][:, None] for f in range(3))
  q_idx = (qi * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
  n_full = counts_ref[0]
  n_part = counts_ref[1]

  def body(i, dq, masked):
    kb = order_ref[i]
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    s = _dot(q, k, _NT, precision) * scale
    p = jnp.exp(s - lse)
    if masked:
      mask = allowed(q_seg, q_split, q_mode, q_idx,
                     kmeta_ref[0, ks][None, :], kmeta_ref[1, ks][None, :],
                     kmeta_ref[2, ks][None, :],
                     (kb * bk + jnp.arange(bk, dtype=jnp.int32))[None, :])
      p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, _NT, precision)
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k, _NN, precision)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(n_full, n_full + n_part, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, meta, lists, *, scale, bq, bk, interpret,
                num_warps=None, num_stages=None, cost_estimate=None):
  B, Tp, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  kernel = functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(B, Hq, nq),
      in_specs=[
          pl.BlockSpec((None, None, nk), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, 2), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, 3, bq), lambda b, h, i: (b, 0, i)),
          pl.BlockSpec((None, 3, Tp), lambda b, h, i: (b, 0, 0)),
          pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
          pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
          pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
      out_shape=out_struct(q.shape, q.dtype, q, k, v, do, meta),
      compiler_params=_compiler_params(D, num_warps, num_stages),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_dq',
  )(lists.order, lists.counts, meta, meta, q, k, v, do, lse, delta)


# ------------------------------------------------------------------------------------- dk/dv

def _dkv_kernel(order_ref, counts_ref, kmeta_ref, qmeta_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, scale, bq, bk, groups, precision):
  ki = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  k_seg, k_split, k_mode = (kmeta_ref[f, :][:, None] for f in range(3))
  k_idx = (ki * bk + jnp.arange(bk, dtype=jnp.int32))[:, None]
  n_full = counts_ref[0]
  n_part = counts_ref[1]

  def body(i, carry, g, masked):
    dk, dv = carry
    qb = order_ref[i]
    qs = pl.ds(pl.multiple_of(qb * bq, bq), bq)
    q = q_ref[qs, g, :]
    do = do_ref[qs, g, :]
    lse = lse_ref[g, qs][None, :]
    delta = delta_ref[g, qs][None, :]
    st = _dot(k, q, _NT, precision) * scale          # [bk, bq] = s transposed
    pt = jnp.exp(st - lse)
    if masked:
      # allowed(query, key) evaluated in the transposed orientation (keys on rows).
      mask_t = allowed(qmeta_ref[0, qs][None, :], qmeta_ref[1, qs][None, :],
                       qmeta_ref[2, qs][None, :],
                       (qb * bq + jnp.arange(bq, dtype=jnp.int32))[None, :],
                       k_seg, k_split, k_mode, k_idx)
      pt = jnp.where(mask_t, pt, 0.0)
    dv = dv + _dot(pt.astype(do.dtype), do, _NN, precision)
    dpt = _dot(v, do, _NT, precision)
    dst = pt * (dpt - delta)
    dk = dk + _dot(dst.astype(q.dtype), q, _NN, precision)
    return dk, dv

  def head(g, carry):
    carry = lax.fori_loop(0, n_full, functools.partial(body, g=g, masked=False), carry)
    return lax.fori_loop(n_full, n_full + n_part, functools.partial(body, g=g, masked=True),
                         carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, meta, lists_t, *, scale, bq, bk, interpret,
                 num_warps=None, num_stages=None, cost_estimate=None):
  """lists_t: work lists of the transposed classification ([B, nk, nq]). -> (dk, dv) like k, v."""
  B, Tp, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  kernel = functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, groups=G,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(B, Hkv, nk),
      in_specs=[
          pl.BlockSpec((None, None, nq), lambda b, h, j: (b, j, 0)),
          pl.BlockSpec((None, None, 2), lambda b, h, j: (b, j, 0)),
          pl.BlockSpec((None, 3, bk), lambda b, h, j: (b, 0, j)),
          pl.BlockSpec((None, 3, Tp), lambda b, h, j: (b, 0, 0)),
          pl.BlockSpec((None, Tp, G, D), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, Tp, G, D), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0)),
                 pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0))],
      out_shape=[out_struct(k.shape, k.dtype, q, k, v, do, meta),
                 out_struct(v.shape, v.dtype, q, k, v, do, meta)],
      compiler_params=_compiler_params(D, num_warps, num_stages),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_dkv',
  )(lists_t.order, lists_t.counts, meta, meta, q, k, v, do, lse, delta)
