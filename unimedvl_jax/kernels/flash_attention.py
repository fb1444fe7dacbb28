"""Fused (flash) attention of packed multimodal sequences, forward and backward, in Pallas.

    flash_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None,
                    block_q=None, block_k=None, backend='auto', interpret=None, density=None,
                    num_warps=None, num_stages=None, layout='bthd')

layout 'bthd' (token-major): q [B, T, Hq, D]; k, v [B, T, Hkv, D]. layout 'bhtd' (head-major):
q [B, Hq, T, D]; k, v [B, Hkv, T, D]. Hq is a multiple of Hkv (grouped-query attention; KV heads
are never repeated in memory; the G = Hq / Hkv query heads of KV head h are h*G .. h*G + G-1).
Metadata int32 [B, T] exactly as `unimedvl_jax.kernels.mask.attention_mask` takes it
(segment 0 = padding; modes 0 causal, 1 full, 2 noise). Returns q's shape and layout in q's dtype,
equal to `reference_attention` on every query that has at least one allowed key; queries with
none (padding) get zeros.

Algorithm: online-softmax flash attention, f32 accumulation. The mask is never materialised:
(query block, key block) pairs are classified SKIP / PARTIAL / FULL from per-block metadata
summaries in plain JAX (`block_mask.py`); kernels walk compacted per-row work lists, never touch
SKIP blocks, and evaluate `allowed` (batch.py) only on PARTIAL blocks. The backward is a
`jax.custom_vjp` with two Pallas kernels, dq (per query block) and dk/dv (per key block, summed
over the query heads of each KV group), both recomputing probabilities from the saved
log-sum-exp, both block-skipping. Every kernel has one program per KV head that handles all G
query heads of its group: on TPU each K/V block of the forward and dq kernels is DMA'd once per
group and serves its G heads from VMEM; the generic kernel's program walks the same K/V tiles
once per head of its group, back to back (on a GPU the repeat reads hit L2, not HBM).
T is padded internally to a multiple of the blocks (padding segment 0) and the result sliced:
`seq_multiple(T, backend)` is the length that avoids the pad and slice
(config_validate.validate requires data.seq_len to be one when a kernel is selected).

Backends (`backend=`):
  'generic'  either layout in place (no transposes), one program per (batch, KV head, block)
             looping over its work list once per query head of the group; lowers to Triton on
             GPU, runs in interpret mode on CPU. Blocks: powers of two >= 16; the head dim is
             zero-padded to a power of two.
  'tpu'      Mosaic variant, head-major inside (lane dim = head dim): 'bhtd' inputs are used in
             place, 'bthd' inputs are transposed once outside the custom VJP (so the backward
             does not transpose again). The key loop is a grid axis whose block indices come
             from scalar-prefetched work lists (skipped blocks re-use the previous block index,
             so they cost no DMA and no compute); each K/V block fetched serves the G query heads
             of the group from VMEM. Blocks: multiples of 128 (default 512 x 512).
  'auto'     'tpu' when jax.default_backend() == 'tpu', else 'generic'.
`interpret=None` means: interpret mode iff jax.default_backend() == 'cpu'. `num_warps` and
`num_stages` are Triton settings (generic backend on GPU only). k and v are cast to q's dtype.

Cost estimate: each pallas_call carries a `pl.CostEstimate` counting only computed blocks. The
number of computed blocks depends on the metadata, which is traced under jit, so the estimate
uses `density` = the fraction of computed (non-skipped) blocks: exact when the metadata are
concrete arrays at call time; under tracing the caller's `density` if given, else 0.5 (the
causal convention). `block_sparsity` measures it for a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from unimedvl_jax.kernels import _flash_generic, _flash_tpu
from unimedvl_jax.kernels.block_mask import block_lists, block_sparsity, classify_blocks

__all__ = ['flash_attention', 'block_sparsity', 'default_block_sizes', 'resolve_backend',
           'seq_multiple']

DEFAULT_BLOCKS = {'generic': (64, 64), 'tpu': (512, 512)}
MIN_BLOCK = {'generic': 16, 'tpu': 128}


def resolve_backend(backend: str = 'auto') -> str:
  if backend == 'auto':
    return 'tpu' if jax.default_backend() == 'tpu' else 'generic'
  if backend not in ('generic', 'tpu'):
    raise ValueError(f"flash_attention backend must be 'auto', 'generic' or 'tpu', got {backend!r}")
  return backend


def default_block_sizes(backend: str = 'auto') -> tuple[int, int]:
  return DEFAULT_BLOCKS[resolve_backend(backend)]


def seq_multiple(T: int, backend: str, block_q: int | None = None,
                 block_k: int | None = None) -> int:
  """The multiple that a sequence of length T is padded to by `flash_attention` (the larger of
  the two blocks after shrinking them for short sequences); T % seq_multiple(T, ...) == 0 means
  no padding and no slicing. Pure arithmetic (no backend is initialised)."""
  if backend not in DEFAULT_BLOCKS:
    raise ValueError(f"backend must be 'generic' or 'tpu' here, got {backend!r}")
  dbq, dbk = DEFAULT_BLOCKS[backend]
  return max(_fit_block(block_q or dbq, T, backend), _fit_block(block_k or dbk, T, backend))


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block_q: int
  block_k: int
  backend: str
  interpret: bool
  density: float
  num_warps: int | None
  num_stages: int | None
  layout: str        # layout of the arrays the kernels see ('bhtd' always for 'tpu')


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _fit_block(block: int, T: int, backend: str) -> int:
  """Shrink a block to the (rounded-up) sequence length for short sequences."""
  lo = MIN_BLOCK[backend]
  need = max(lo, 1 << max(0, (T - 1).bit_length())) if backend == 'generic' else -(-T // lo) * lo
  return min(block, need)


def _cost(cfg: _Config, kind: str, B, Tp, Hq, Hkv, D, itemsize) -> pl.CostEstimate:
  nq, nk = Tp // cfg.block_q, Tp // cfg.block_k
  blocks = int(math.ceil(cfg.density * nq * nk)) * B     # computed blocks per head
  pairs = blocks * cfg.block_q * cfg.block_k
  mm = {'fwd': 2, 'dq': 3, 'dkv': 4}[kind]                # matmuls per block
  flops = 2 * mm * pairs * D * Hq
  tr = pairs * Hq
  seq = B * Tp * D * itemsize                 # one head of q, k, v, o, do, dq, dk or dv
  rows = blocks * D * itemsize                # x block length: one operand re-read per block
  if kind == 'fwd':     # q, o once; k, v per computed block and KV head (shared by the group)
    by = 2 * seq * Hq + 2 * rows * cfg.block_k * Hkv + 4 * B * Hq * Tp
  elif kind == 'dq':    # q, do, dq once; k, v per computed block and KV head; lse, delta
    by = 3 * seq * Hq + 2 * rows * cfg.block_k * Hkv + 8 * B * Hq * Tp
  else:                 # k, v, dk, dv once; q, do, lse, delta per computed block and query head
    by = 4 * seq * Hkv + 2 * rows * cfg.block_q * Hq + 8 * blocks * cfg.block_q * Hq
  by += 12 * B * Tp     # metadata
  return pl.CostEstimate(flops=int(flops), transcendentals=int(tr), bytes_accessed=int(by))


def _classify(meta, cfg: _Config):
  return classify_blocks(meta[:, 0], meta[:, 1], meta[:, 2], cfg.block_q, cfg.block_k)


def _forward(q, k, v, meta, cfg: _Config):
  B, Tp, Hq, D = _flash_generic.dims(q, cfg.layout)
  Hkv = _flash_generic.dims(k, cfg.layout)[2]
  lists = block_lists(_classify(meta, cfg))
  kw = dict(scale=cfg.scale, bq=cfg.block_q, bk=cfg.block_k, interpret=cfg.interpret,
            cost_estimate=_cost(cfg, 'fwd', B, Tp, Hq, Hkv, D, q.dtype.itemsize))
  if cfg.backend == 'tpu':
    return _flash_tpu.forward(q, k, v, meta, lists, **kw)
  return _flash_generic.forward(q, k, v, meta, lists, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages, layout=cfg.layout, **kw)


def _backward(q, k, v, meta, o, lse, do, cfg: _Config):
  B, Tp, Hq, D = _flash_generic.dims(q, cfg.layout)
  Hkv = _flash_generic.dims(k, cfg.layout)[2]
  spec = 'bthd,bthd->bht' if cfg.layout == 'bthd' else 'bhtd,bhtd->bht'
  delta = jnp.einsum(spec, o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(q.dtype)
  cls = _classify(meta, cfg)
  lists = block_lists(cls)                              # per query block: key blocks
  lists_t = block_lists(jnp.swapaxes(cls, 1, 2))        # per key block: query blocks
  kw = dict(scale=cfg.scale, bq=cfg.block_q, bk=cfg.block_k, interpret=cfg.interpret)
  cost = functools.partial(_cost, cfg, B=B, Tp=Tp, Hq=Hq, Hkv=Hkv, D=D,
                           itemsize=q.dtype.itemsize)
  if cfg.backend == 'tpu':
    mod, extra = _flash_tpu, {}
  else:
    mod, extra = _flash_generic, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                      layout=cfg.layout)
  dq = mod.backward_dq(q, k, v, do, lse, delta, meta, lists, cost_estimate=cost('dq'),
                       **kw, **extra)
  dk, dv = mod.backward_dkv(q, k, v, do, lse, delta, meta, lists_t, cost_estimate=cost('dkv'),
                            **kw, **extra)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, meta, cfg: _Config):
  return _forward(q, k, v, meta, cfg)[0]


def _flash_fwd(q, k, v, meta, cfg: _Config):
  o, lse = _forward(q, k, v, meta, cfg)
  return o, (q, k, v, meta, o, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, meta, o, lse = res
  dq, dk, dv = _backward(q, k, v, meta, o, lse, do, cfg)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def flash_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None,
                    block_q: int | None = None, block_k: int | None = None,
                    backend: str = 'auto', interpret: bool | None = None,
                    density: float | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, layout: str = 'bthd'):
  """Packed-sequence attention (see the module docstring). Differentiable in q, k, v."""
  if layout not in _flash_generic.LAYOUTS:
    raise ValueError(f"layout must be 'bthd' or 'bhtd', got {layout!r}")
  names = '[B, T, H, D]' if layout == 'bthd' else '[B, H, T, D]'
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be {names} ({layout}), got {q.shape}, {k.shape}, {v.shape}')
  B, T, Hq, D = _flash_generic.dims(q, layout)
  kd = _flash_generic.dims(k, layout)
  if k.shape != v.shape or kd[:2] != (B, T) or kd[3] != D:
    raise ValueError(f'k and v must be {names} ({layout}) with B={B}, T={T}, D={D} and Hkv '
                     f'heads, got {k.shape} and {v.shape}')
  Hkv = kd[2]
  if Hq % Hkv:
    raise ValueError(f'query heads ({Hq}) must be a multiple of key/value heads ({Hkv})')
  for name, x in (('segment_ids', segment_ids), ('split_ids', split_ids),
                  ('split_modes', split_modes)):
    if tuple(x.shape) != (B, T):
      raise ValueError(f'{name} must be [B, T] = [{B}, {T}], got {tuple(x.shape)}')
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  backend = resolve_backend(backend)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  dbq, dbk = DEFAULT_BLOCKS[backend]
  bq = _fit_block(block_q or dbq, T, backend)
  bk = _fit_block(block_k or dbk, T, backend)
  lo = MIN_BLOCK[backend]
  for name, b in (('block_q', bq), ('block_k', bk)):
    if backend == 'generic' and (not _is_pow2(b) or b < lo):
      raise ValueError(f'{name}={b}: the generic backend needs a power of two >= {lo}')
    if backend == 'tpu' and b % lo and not interpret:
      raise ValueError(f'{name}={b}: the TPU backend needs a multiple of {lo}')
  if max(bq, bk) % min(bq, bk):
    raise ValueError(f'block_q={bq} and block_k={bk} must divide one another')
  scale = float(D ** -0.5 if scale is None else scale)

  meta = jnp.stack([jnp.asarray(x, jnp.int32) for x in (segment_ids, split_ids, split_modes)],
                   axis=1)                                       # [B, 3, T]
  Tp = -(-T // max(bq, bk)) * max(bq, bk)
  if density is None:
    if _concrete(segment_ids, split_ids, split_modes):
      with jax.ensure_compile_time_eval():
        density = float(block_sparsity(segment_ids, split_ids, split_modes, bq, bk)['computed'])
    else:
      density = 0.5
  # The TPU kernels are head-major: token-major inputs are transposed here, once, outside the
  # custom VJP (autodiff transposes the cotangents once as well).
  to_bhtd = backend == 'tpu' and layout == 'bthd'
  inner = 'bhtd' if backend == 'tpu' else layout
  cfg = _Config(scale=scale, block_q=bq, block_k=bk, backend=backend, interpret=bool(interpret),
                density=float(density), num_warps=num_warps, num_stages=num_stages,
                layout=inner)

  if to_bhtd:
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  Dp = D
  if backend == 'generic' and not _is_pow2(D):
    Dp = 1 << (D - 1).bit_length()
  pad_t, pad_d = Tp - T, Dp - D
  if pad_t or pad_d:
    widths = ((0, 0), (0, pad_t), (0, 0), (0, pad_d))
    if inner == 'bhtd':
      widths = ((0, 0), (0, 0), (0, pad_t), (0, pad_d))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    meta = jnp.pad(meta, ((0, 0), (0, 0), (0, pad_t)))
  out = _flash(q, k, v, meta, cfg)
  if pad_t or pad_d:
    out = out[:, :T, :, :D] if inner == 'bthd' else out[:, :, :T, :D]
  return out.transpose(0, 2, 1, 3) if to_bhtd else out
