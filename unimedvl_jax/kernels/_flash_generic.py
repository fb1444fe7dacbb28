"""Generic Pallas kernels of the packed flash attention: GPU (Triton lowering) and CPU interpret.

Layouts: token-major [B, T, H, D] ('bthd') or head-major [B, H, T, D] ('bhtd'), both read in place
through BlockSpecs (no transposes: on GPU a block is a strided pointer). Grouped-query attention:
every kernel has one program per (batch, KV head, block) that handles ALL G = Hq / Hkv query heads
of the group, so the K/V tiles of a work list are streamed by the program that reuses them (the
forward and dq kernels walk the work list once per query head of the group, back to back: the
second and later passes over the same K/V tiles hit the L2 cache instead of HBM, and the grid has
G times fewer programs). Each program walks its compacted work list (`block_mask.block_lists`):
FULL blocks first without any mask arithmetic, then PARTIAL blocks with the elementwise rule
`allowed` evaluated on the block's metadata slices. SKIP blocks are never visited.

Only Triton-lowerable operations are used: 1-D iotas expanded to 2-D, `lax.dot_general` on 2-D
tiles, fori_loops with dynamic bounds, loads/stores of [block, D] tiles (the head index of a
group is a loop index, so G need not be a power of two: 7 for the 28/4 heads of the 7B model).
Block sizes must be powers of two (>= 16) and the head dim a power of two (the wrapper pads it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from unimedvl_jax.batch import allowed

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
EMPTY_ROW_LSE = 1e30  # lse stored for rows with no allowed key: exp(s - lse) == 0
LAYOUTS = ('bthd', 'bhtd')

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


def dims(x, layout: str):
  """(B, T, H, D) of a q/k/v array in `layout`."""
  if layout == 'bthd':
    return x.shape
  B, H, T, D = x.shape
  return B, T, H, D


def _compiler_params(head_dim: int, num_warps: int | None, num_stages: int | None):
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps or (4 if head_dim <= 64 else 8),
                                 num_stages=num_stages or 2)


class _Specs:
  """BlockSpecs and per-head ref indices of one layout; grids are (B, KV heads, blocks)."""

  def __init__(self, layout: str, D: int):
    self.bthd = layout == 'bthd'
    self.D = D

  def __call__(self, rows: int, heads: int | None, where):
    """`rows` tokens x `heads` heads (None: one head, squeezed) of batch b at
    (token block, head block) = where(h, i) for grid point (b, h, i)."""
    if self.bthd:
      return pl.BlockSpec((None, rows, heads, self.D),
                          lambda b, h, i: (b, where(h, i)[0], where(h, i)[1], 0))
    return pl.BlockSpec((None, heads, rows, self.D),
                        lambda b, h, i: (b, where(h, i)[1], where(h, i)[0], 0))

  def at(self, g, rows=slice(None)):
    """Index of (rows, head g) in a group block."""
    return (rows, g, slice(None)) if self.bthd else (g, rows, slice(None))


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(order_ref, counts_ref, qmeta_ref, kmeta_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, scale, bq, bk, groups, at, precision):
  qi = pl.program_id(2)
  q_seg, q_split, q_mode = (qmeta_ref[f, :][:, None] for f in range(3))
  q_idx = (qi * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
  n_full = counts_ref[0]
  n_part = counts_ref[1]

  def head(g, _):
    q = q_ref[at(g)]

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
    acc, m, l = lax.fori_loop(n_full, n_full + n_part, functools.partial(body, masked=True),
                              carry)
    valid = l > 0.0
    l_safe = jnp.where(valid, l, 1.0)
    o_ref[at(g)] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[g, :] = jnp.where(valid, m + jnp.log(l_safe), EMPTY_ROW_LSE)
    return 0

  lax.fori_loop(0, groups, head, 0)


def forward(q, k, v, meta, lists, *, scale, bq, bk, interpret, layout='bthd', num_warps=None,
            num_stages=None, cost_estimate=None):
  """q [B, Tp, Hq, D] ('bthd') or [B, Hq, Tp, D] ('bhtd'), k/v likewise with Hkv heads, meta
  int32 [B, 3, Tp] -> (o like q, lse f32 [B, Hq, Tp])."""
  B, Tp, Hq, D = dims(q, layout)
  Hkv = dims(k, layout)[2]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  sp = _Specs(layout, D)
  group = sp(bq, G, lambda h, i: (i, h))            # the G query heads of KV head h
  whole_kv = sp(Tp, None, lambda h, i: (0, h))     # the whole sequence of KV head h
  kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk, groups=G, at=sp.at,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(B, Hkv, nq),
      in_specs=[
          pl.BlockSpec((None, None, nk), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, 2), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, 3, bq), lambda b, h, i: (b, 0, i)),
          pl.BlockSpec((None, 3, Tp), lambda b, h, i: (b, 0, 0)),
          group,
          whole_kv,
          whole_kv,
      ],
      out_specs=[
          group,
          pl.BlockSpec((None, G, bq), lambda b, h, i: (b, h, i)),
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
               lse_ref, delta_ref, dq_ref, *, scale, bq, bk, groups, at, precision):
  qi = pl.program_id(2)
  q_seg, q_split, q_mode = (qmeta_ref[f, :][:, None] for f in range(3))
  q_idx = (qi * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
  n_full = counts_ref[0]
  n_part = counts_ref[1]

  def head(g, _):
    q = q_ref[at(g)]
    do = do_ref[at(g)]
    lse = lse_ref[g, :][:, None]
    delta = delta_ref[g, :][:, None]

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
    dq_ref[at(g)] = (dq * scale).astype(dq_ref.dtype)
    return 0

  lax.fori_loop(0, groups, head, 0)


def backward_dq(q, k, v, do, lse, delta, meta, lists, *, scale, bq, bk, interpret,
                layout='bthd', num_warps=None, num_stages=None, cost_estimate=None):
  B, Tp, Hq, D = dims(q, layout)
  Hkv = dims(k, layout)[2]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  sp = _Specs(layout, D)
  group = sp(bq, G, lambda h, i: (i, h))
  whole_kv = sp(Tp, None, lambda h, i: (0, h))
  kernel = functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk, groups=G, at=sp.at,
                             precision=_precision(q.dtype))
  row = pl.BlockSpec((None, G, bq), lambda b, h, i: (b, h, i))
  return pl.pallas_call(
      kernel,
      grid=(B, Hkv, nq),
      in_specs=[
          pl.BlockSpec((None, None, nk), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, 2), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, 3, bq), lambda b, h, i: (b, 0, i)),
          pl.BlockSpec((None, 3, Tp), lambda b, h, i: (b, 0, 0)),
          group,
          whole_kv,
          whole_kv,
          group,
          row, row,
      ],
      out_specs=group,
      out_shape=out_struct(q.shape, q.dtype, q, k, v, do, meta),
      compiler_params=_compiler_params(D, num_warps, num_stages),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_dq',
  )(lists.order, lists.counts, meta, meta, q, k, v, do, lse, delta)


# ------------------------------------------------------------------------------------- dk/dv

def _dkv_kernel(order_ref, counts_ref, kmeta_ref, qmeta_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, scale, bq, bk, groups, at, precision):
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
    q = q_ref[at(g, qs)]
    do = do_ref[at(g, qs)]
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
                 layout='bthd', num_warps=None, num_stages=None, cost_estimate=None):
  """lists_t: work lists of the transposed classification ([B, nk, nq]). -> (dk, dv) like k, v."""
  B, Tp, Hq, D = dims(q, layout)
  Hkv = dims(k, layout)[2]
  G = Hq // Hkv
  nq, nk = Tp // bq, Tp // bk
  sp = _Specs(layout, D)
  kernel = functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, groups=G, at=sp.at,
                             precision=_precision(q.dtype))
  whole = sp(Tp, G, lambda h, j: (0, h))           # the whole sequence of the G query heads
  kv = sp(bk, None, lambda h, j: (j, h))
  rows = pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(B, Hkv, nk),
      in_specs=[
          pl.BlockSpec((None, None, nq), lambda b, h, j: (b, j, 0)),
          pl.BlockSpec((None, None, 2), lambda b, h, j: (b, j, 0)),
          pl.BlockSpec((None, 3, bk), lambda b, h, j: (b, 0, j)),
          pl.BlockSpec((None, 3, Tp), lambda b, h, j: (b, 0, 0)),
          whole,
          kv,
          kv,
          whole,
          rows, rows,
      ],
      out_specs=[kv, kv],
      out_shape=[out_struct(k.shape, k.dtype, q, k, v, do, meta),
                 out_struct(v.shape, v.dtype, q, k, v, do, meta)],
      compiler_params=_compiler_params(D, num_warps, num_stages),
      cost_estimate=cost_estimate,
      interpret=interpret,
      name='packed_flash_dkv',
  )(lists_t.order, lists_t.counts, meta, meta, q, k, v, do, lse, delta)
