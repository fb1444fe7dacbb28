"""TPU (Mosaic) kernels of the packed flash attention.

Layout [B, H, T, D] (head-major; the head dim is the lane dim). `flash_attention` transposes
token-major inputs once, outside the custom VJP; head-major inputs are used in place. Grids:
  forward, dq   (B, Hkv, nq, nk)        one program row per (KV head, query block) holds the G
                                        query heads of the group ([G, bq, D] blocks, accumulators
                                        in VMEM); the last axis is sequential ("arbitrary"). Each
                                        K/V block is DMA'd once per group and reused from VMEM by
                                        the G heads, and the mask of a PARTIAL block is evaluated
                                        once for the group.
  dk/dv         (B, Hkv, nk, G, nq)     the G query heads of a KV group and the query blocks are
                                        the sequential axes, so dk/dv of a group accumulate in
                                        VMEM and K/V blocks are fetched once per group.
The sequential axis does not walk blocks in order: step j processes the j-th entry of the row's
compacted work list (scalar-prefetched into SMEM: `order`, flattened, and `counts`), FULL blocks
first. Steps past the list length re-use the last block index (no new DMA) and do no compute.

Metadata are lane-dense rows [B, 3, T] (segment, split, mode). The side that stays fixed across a
row of steps (queries in forward/dq, keys in dk/dv) is transposed once, at the row's first step,
into lane-replicated columns in VMEM; the side that changes each step is used as rows. The
log-sum-exp and delta vectors travel as rows [B, H, 1, T] and are turned into columns the same
way. Block sizes must be multiples of 128 on hardware; interpret mode accepts any.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unimedvl_jax.kernels._flash_generic import EMPTY_ROW_LSE, MASK_VALUE, out_struct
from unimedvl_jax.batch import allowed

LANES = 128
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _lanes(x, n: int):
  """x [rows, 128] with all lanes equal -> [rows, n] (same value on every lane)."""
  if n == LANES:
    return x
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _row_to_col(row):
  """[1, n] -> [n, 128] lane-replicated column (one 2-D transpose)."""
  return jnp.broadcast_to(row, (LANES, row.shape[1])).T


def _work_index(order_ref, counts_ref, row, j, width):
  """Block index processed at step j of work-list `row`, clamped so idle steps repeat a block."""
  n = counts_ref[2 * row] + counts_ref[2 * row + 1]
  jj = jnp.maximum(jnp.minimum(j, n - 1), 0)
  return order_ref[row * width + jj]


# Scoped VMEM limit of the kernels. XLA's default (16 MiB) is just too small for the forward and dq
# kernels with the 7B grouping (G = 7 query heads x 512 rows of accumulators, max and sum in VMEM:
# ~16 MiB). 32 MiB fits every generation these kernels target (VMEM per core: v5e and v6e
# 128 MiB, v5p 64 MiB; jax/_src/pallas/mosaic/tpu_info.py), not v4 (16 MiB).
VMEM_LIMIT_BYTES = 32 * 1024 * 1024


def _compiler_params(n_seq_axes):
  """Three parallel grid axes (batch, head, block) then the sequential ones."""
  return pltpu.CompilerParams(dimension_semantics=('parallel',) * 3 + ('arbitrary',) * n_seq_axes,
                              vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _flat(lists):
  return lists.order.reshape(-1), lists.counts.reshape(-1)


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(order_ref, counts_ref, qmeta_ref, kmeta_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, m_scr, l_scr, acc_scr, qcol_scr, *, scale, bq, bk, nq, nk,
                groups, precision):
  b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + qi
  n_full = counts_ref[2 * row]
  n = n_full + counts_ref[2 * row + 1]
  kb = _work_index(order_ref, counts_ref, row, j, nk)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    for f in range(3):
      qcol_scr[f] = _row_to_col(qmeta_ref[f:f + 1, :])

  def step(masked):
    k, v = k_ref[...], v_ref[...]
    mask = None
    if masked:
      qf = [_lanes(qcol_scr[f], bk) for f in range(3)]
      mask = allowed(qf[0], qf[1], qf[2],
                     qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0),
                     kmeta_ref[0:1, :], kmeta_ref[1:2, :], kmeta_ref[2:3, :],
                     kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1))
    for g in range(groups):          # the G query heads of the group share k, v and the mask
      s = _dot(q_ref[g], k, _NT, precision) * scale                    # [bq, bk]
      if masked:
        s = jnp.where(mask, s, MASK_VALUE)
      m_prev, l_prev = m_scr[g], l_scr[g]                               # [bq, 128]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.exp(s - _lanes(m_next, bk))
      if masked:
        p = jnp.where(mask, p, 0.0)
      alpha = jnp.exp(m_prev - m_next)
      m_scr[g] = m_next
      l_scr[g] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
      acc_scr[g] = (_lanes(alpha, acc_scr.shape[2]) * acc_scr[g]
                    + _dot(p.astype(v.dtype), v, _NN, precision))

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _finish():
    for g in range(groups):
      l = l_scr[g]
      valid = l > 0.0
      l_safe = jnp.where(valid, l, 1.0)
      o_ref[g] = (acc_scr[g] * _lanes(1.0 / l_safe, acc_scr.shape[2])).astype(o_ref.dtype)
      lse = jnp.where(valid, m_scr[g] + jnp.log(l_safe), EMPTY_ROW_LSE)  # [bq, 128]
      lse_ref[g] = lse.T[0:1, :]


def _kv_maps(G, nq, nk):
  """Index maps of the K/V blocks and key metadata of step j of work-list row (b, i)."""
  def kv_map(b, h, i, j, order_ref, counts_ref):
    return b, h, _work_index(order_ref, counts_ref, b * nq + i, j, nk), 0

  def kmeta_map(b, h, i, j, order_ref, counts_ref):
    return b, 0, _work_index(order_ref, counts_ref, b * nq + i, j, nk)
  return kv_map, kmeta_map


def forward(q, k, v, meta, lists, *, scale, bq, bk, interpret, cost_estimate=None):
  """q [B, Hq, Tp, D], k/v [B, Hkv, Tp, D] -> (o [B, Hq, Tp, D], lse f32 [B, Hq, Tp])."""
  B, Hq, Tp, D = q.shape
  Hkv = k.shape[1]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  order, counts = _flat(lists)
  kv_map, kmeta_map = _kv_maps(G, nq, nk)
  group = pl.BlockSpec((None, G, bq, D), lambda b, h, i, j, *_: (b, h, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, Hkv, nq, nk),
      in_specs=[
          pl.BlockSpec((None, 3, bq), lambda b, h, i, j, *_: (b, 0, i)),
          pl.BlockSpec((None, 3, bk), kmeta_map),
          group,
          pl.BlockSpec((None, None, bk, D), kv_map),
          pl.BlockSpec((None, None, bk, D), kv_map),
      ],
      out_specs=[
          group,
          pl.BlockSpec((None, G, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
      ],
      scratch_shapes=[pltpu.VMEM((G, bq, LANES), jnp.float32),
                      pltpu.VMEM((G, bq, LANES), jnp.float32),
                      pltpu.VMEM((G, bq, D), jnp.float32),
                      pltpu.VMEM((3, bq, LANES), jnp.int32)])
  kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk, nq=nq, nk=nk, groups=G,
                             precision=_precision(q.dtype))
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[out_struct(q.shape, q.dtype, q, k, v, meta),
                 out_struct((B, Hq, 1, Tp), jnp.float32, q, k, v, meta)],
      compiler_params=_compiler_params(1),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_fwd_tpu',
  )(order, counts, meta, meta, q, k, v)
  return o, lse[:, :, 0, :]


# ---------------------------------------------------------------------------------------- dq

def _dq_kernel(order_ref, counts_ref, qmeta_ref, kmeta_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, acc_scr, lse_scr, delta_scr, qcol_scr,
               *, scale, bq, bk, nq, nk, groups, precision):
  b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + qi
  n_full = counts_ref[2 * row]
  n = n_full + counts_ref[2 * row + 1]
  kb = _work_index(order_ref, counts_ref, row, j, nk)

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    for g in range(groups):
      lse_scr[g] = _row_to_col(lse_ref[g])
      delta_scr[g] = _row_to_col(delta_ref[g])
    for f in range(3):
      qcol_scr[f] = _row_to_col(qmeta_ref[f:f + 1, :])

  def step(masked):
    k, v = k_ref[...], v_ref[...]
    mask = None
    if masked:
      qf = [_lanes(qcol_scr[f], bk) for f in range(3)]
      mask = allowed(qf[0], qf[1], qf[2],
                     qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0),
                     kmeta_ref[0:1, :], kmeta_ref[1:2, :], kmeta_ref[2:3, :],
                     kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1))
    for g in range(groups):
      s = _dot(q_ref[g], k, _NT, precision) * scale
      p = jnp.exp(s - _lanes(lse_scr[g], bk))
      if masked:
        p = jnp.where(mask, p, 0.0)
      dp = _dot(do_ref[g], v, _NT, precision)
      ds = p * (dp - _lanes(delta_scr[g], bk))
      acc_scr[g] += _dot(ds.astype(k.dtype), k, _NN, precision)

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (acc_scr[...] * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, meta, lists, *, scale, bq, bk, interpret,
                cost_estimate=None):
  B, Hq, Tp, D = q.shape
  Hkv = k.shape[1]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  order, counts = _flat(lists)
  kv_map, kmeta_map = _kv_maps(G, nq, nk)
  group = pl.BlockSpec((None, G, bq, D), lambda b, h, i, j, *_: (b, h, i, 0))
  rows = pl.BlockSpec((None, G, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, Hkv, nq, nk),
      in_specs=[
          pl.BlockSpec((None, 3, bq), lambda b, h, i, j, *_: (b, 0, i)),
          pl.BlockSpec((None, 3, bk), kmeta_map),
          group,
          pl.BlockSpec((None, None, bk, D), kv_map),
          pl.BlockSpec((None, None, bk, D), kv_map),
          group, rows, rows,
      ],
      out_specs=group,
      scratch_shapes=[pltpu.VMEM((G, bq, D), jnp.float32),
                      pltpu.VMEM((G, bq, LANES), jnp.float32),
                      pltpu.VMEM((G, bq, LANES), jnp.float32),
                      pltpu.VMEM((3, bq, LANES), jnp.int32)])
  kernel = functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk, nq=nq, nk=nk, groups=G,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_struct(q.shape, q.dtype, q, k, v, do, meta),
      compiler_params=_compiler_params(1),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_dq_tpu',
  )(order, counts, meta, meta, q, k, v, do, lse[:, :, None, :], delta[:, :, None, :])


# ------------------------------------------------------------------------------------- dk/dv

def _dkv_kernel(order_ref, counts_ref, kmeta_ref, qmeta_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, kcol_scr,
                *, scale, bq, bk, nq, nk, groups, precision):
  b, ki, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  row = b * nk + ki
  n_full = counts_ref[2 * row]
  n = n_full + counts_ref[2 * row + 1]
  qb = _work_index(order_ref, counts_ref, row, i, nq)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
    for f in range(3):
      kcol_scr[f] = _row_to_col(kmeta_ref[f:f + 1, :])

  def step(masked):
    q = q_ref[...]
    do = do_ref[...]
    st = _dot(k_ref[...], q, _NT, precision) * scale                   # [bk, bq]
    pt = jnp.exp(st - lse_ref[...])
    if masked:
      kf = [_lanes(kcol_scr[f], bq) for f in range(3)]
      mask_t = allowed(qmeta_ref[0:1, :], qmeta_ref[1:2, :], qmeta_ref[2:3, :],
                       qb * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1),
                       kf[0], kf[1], kf[2],
                       ki * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0))
      pt = jnp.where(mask_t, pt, 0.0)
    dv_scr[...] += _dot(pt.astype(do.dtype), do, _NN, precision)
    dpt = _dot(v_ref[...], do, _NT, precision)
    dst = pt * (dpt - delta_ref[...])
    dk_scr[...] += _dot(dst.astype(q.dtype), q, _NN, precision)

  pl.when(i < n_full)(lambda: step(False))
  pl.when((i >= n_full) & (i < n))(lambda: step(True))

  @pl.when((g == groups - 1) & (i == nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, meta, lists_t, *, scale, bq, bk, interpret,
                 cost_estimate=None):
  """q, do [B, Hq, Tp, D], k, v [B, Hkv, Tp, D]; lists_t: work lists of the transposed
  classification ([B, nk, nq]). -> (dk, dv) like k, v."""
  B, Hq, Tp, D = q.shape
  Hkv = k.shape[1]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  order, counts = _flat(lists_t)

  def q_map(b, h, j, g, i, order_ref, counts_ref):
    return b, h * G + g, _work_index(order_ref, counts_ref, b * nk + j, i, nq), 0

  def row_map(b, h, j, g, i, order_ref, counts_ref):
    return b, h * G + g, 0, _work_index(order_ref, counts_ref, b * nk + j, i, nq)

  def qmeta_map(b, h, j, g, i, order_ref, counts_ref):
    return b, 0, _work_index(order_ref, counts_ref, b * nk + j, i, nq)

  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, j, g, i, *_: (b, h, j, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, Hkv, nk, G, nq),
      in_specs=[
          pl.BlockSpec((None, 3, bk), lambda b, h, j, g, i, *_: (b, 0, j)),
          pl.BlockSpec((None, 3, bq), qmeta_map),
          pl.BlockSpec((None, None, bq, D), q_map),
          kv_spec, kv_spec,
          pl.BlockSpec((None, None, bq, D), q_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
          pl.BlockSpec((None, None, 1, bq), row_map),
      ],
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32),
                      pltpu.VMEM((bk, D), jnp.float32),
                      pltpu.VMEM((3, bk, LANES), jnp.int32)])
  kernel = functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, nq=nq, nk=nk, groups=G,
                             precision=_precision(q.dtype))
  dk, dv = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[out_struct(k.shape, k.dtype, q, k, v, do, meta),
                 out_struct(v.shape, v.dtype, q, k, v, do, meta)],
      compiler_params=_compiler_params(2),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_dkv_tpu',
  )(order, counts, meta, meta, q, k, v, do, lse[:, :, None, :], delta[:, :, None, :])
  return dk, dv
