"""JAX's own TPU splash attention on packed multimodal sequences: the baseline TPU backend.

    splash_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None, block=None,
                     layout='bthd', interpret=None, use_segment_ids=True)

Same contract as `flash_attention` (kernels/flash_attention.py): layout 'bthd' q [B, T, Hq, D],
k, v [B, T, Hkv, D], or 'bhtd' [B, H, T, D]; metadata int32 [B, T]; returns q's shape, layout
and dtype, equal to `reference_attention` on every query with an allowed key and zero on padding.

How the packed rule reaches splash (jax.experimental.pallas.ops.tpu.splash_attention): splash's
masks are either static (numpy, known at trace time) or a dynamic dense bool array. Our mask
depends on the pack's metadata, which are traced in the train step, so each pack gets a DYNAMIC
mask built from the same rule (`kernels.mask.attention_mask`, i.e. `batch.allowed`): its
[T/bq, T/bk] grid of [bq, bk] tiles (T^2 bytes per pack, and a transposed copy for the dk/dv
kernel) is splash's `partial_mask_blocks`. The block map (SKIP / PARTIAL / FULL) and the
prefetch tables are not reduced from the dense mask: they come from our O(T) block classification
(`block_mask.classify_blocks`), with skipped steps pointing at the next computed block (no extra
DMA). Segment ids (`SegmentIds(q=seg, kv=seg)`) are passed as well, as splash's packing
mechanism (redundant with the mask; `use_segment_ids=False` drops the per-block compare).

Splash requires every query row to have an allowed key (it divides by the softmax sum). Padding
queries have none in our rule, so here they attend to themselves (the mask diagonal on padding,
and the diagonal blocks that contain padding are computed), and their outputs are set to zero
afterwards; their cotangents are therefore zero and they contribute nothing to any gradient.

Scale: splash has no softmax scale, so q is multiplied by `scale` (default D**-0.5) first, in q's
dtype. Blocks: one size for the forward, dq and dk/dv kernels (multiples of 128; default 512,
shrunk for short sequences); T is padded to a multiple of it (segment 0) and the result sliced.
The batch is a `jax.vmap` over packs. `interpret=None` means interpret mode iff
jax.default_backend() == 'cpu' (splash's kernels then run in the Pallas TPU interpreter).
Splash's pallas_calls carry no CostEstimate, so XLA's cost analysis counts them as 0 FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as _mi

from unimedvl_jax.kernels._flash_generic import LAYOUTS, dims
from unimedvl_jax.kernels.block_mask import PARTIAL, SKIP, classify_blocks
from unimedvl_jax.kernels.mask import attention_mask

__all__ = ['splash_attention', 'DEFAULT_BLOCK', 'seq_multiple']

DEFAULT_BLOCK = 512
LANES = 128


def seq_multiple(T: int, block: int | None = None) -> int:
  """The multiple T is padded to (the block after shrinking it for short sequences)."""
  return min(block or DEFAULT_BLOCK, -(-T // LANES) * LANES)


def _next_along(computed, axis):
  """For every entry: index of the next True at or after it along `axis`; past the last True,
  the last True; 0 in an all-False line. (Splash's prefetch rule: skipped steps keep or advance
  to a block that is computed anyway, so they trigger no extra DMA.)"""
  n = computed.shape[axis]
  shape = [1] * computed.ndim
  shape[axis] = n
  idx = jnp.arange(n, dtype=jnp.int32).reshape(shape)
  big = jnp.int32(n)
  nxt = jax.lax.cummin(jnp.where(computed, idx, big), axis=axis, reverse=True)
  last = jax.lax.cummax(jnp.where(computed, idx, -1), axis=axis)
  return jnp.where(nxt < n, nxt, jnp.maximum(last, 0)).astype(jnp.int32)


def _mask_infos(seg, split, mode, bq: int, bk: int):
  """Per-pack splash MaskInfo arrays (leading batch dim, one mask shared by all heads)."""
  B, Tp = seg.shape
  nq, nk = Tp // bq, Tp // bk
  idx = jnp.arange(Tp, dtype=jnp.int32)
  pad = seg == 0
  mask = attention_mask(seg, split, mode) | (pad[:, :, None] & (idx[:, None] == idx[None, :]))
  tiles = mask.reshape(B, nq, bq, nk, bk).swapaxes(2, 3)             # [B, nq, nk, bq, bk]

  cls = classify_blocks(seg, split, mode, bq, bk)                    # [B, nq, nk]
  pad_blocks = jnp.any(pad.reshape(B, nq, bq), axis=-1)              # bq == bk: diagonal blocks
  diag = jnp.eye(nq, nk, dtype=bool)[None]
  cls = jnp.where(diag & pad_blocks[:, :, None] & (cls == SKIP), PARTIAL, cls)
  computed, partial = cls != SKIP, cls == PARTIAL
  flat = lambda i, j: i * nk + j                                     # tile index in the grid

  qi = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
  kj = jnp.arange(nk, dtype=jnp.int32)[None, None, :]
  head = lambda x: x[:, None]                                        # [B, 1, nq, nk]
  fwd = dict(data_next=head(_next_along(computed, 2)),
             mask_next=head(flat(qi, _next_along(partial, 2))),
             block_mask=head(cls.astype(jnp.int8)),
             partial_mask_blocks=tiles.reshape(B, nq * nk, bq, bk))
  dkv = dict(data_next=head(_next_along(computed, 1)),
             mask_next=head(flat(_next_along(partial, 1), kj)),
             block_mask=head(cls.astype(jnp.int8)),
             partial_mask_blocks=tiles.swapaxes(-1, -2).reshape(B, nq * nk, bk, bq))
  return fwd, dkv


def _info(d):
  return _mi.MaskInfo(data_next=d['data_next'], mask_next=d['mask_next'],
                      block_mask=d['block_mask'], partial_mask_blocks=d['partial_mask_blocks'],
                      q_sequence=None, is_dynamic_mask=True)


def splash_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None,
                     block: int | None = None, layout: str = 'bthd',
                     interpret: bool | None = None, use_segment_ids: bool = True):
  """Packed-sequence attention through splash (see the module docstring). Differentiable."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be 'bthd' or 'bhtd', got {layout!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'q, k, v must be 4-D ({layout}) with k.shape == v.shape, got '
                     f'{q.shape}, {k.shape}, {v.shape}')
  B, T, Hq, D = dims(q, layout)
  kd = dims(k, layout)
  if kd[:2] != (B, T) or kd[3] != D or Hq % kd[2]:
    raise ValueError(f'k, v {k.shape} do not match q {q.shape} ({layout}; Hq must be a multiple '
                     f'of Hkv)')
  for name, x in (('segment_ids', segment_ids), ('split_ids', split_ids),
                  ('split_modes', split_modes)):
    if tuple(x.shape) != (B, T):
      raise ValueError(f'{name} must be [B, T] = [{B}, {T}], got {tuple(x.shape)}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  bq = bk = seq_multiple(T, block)
  if bq % LANES:
    raise ValueError(f'splash block={bq} must be a multiple of {LANES}')
  scale = float(D ** -0.5 if scale is None else scale)

  if layout == 'bthd':
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))       # splash is head-major
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  Tp = -(-T // bq) * bq
  meta = [jnp.asarray(x, jnp.int32) for x in (segment_ids, split_ids, split_modes)]
  if Tp != T:
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, 0))) for x in (q, k, v))
    meta = [jnp.pad(x, ((0, 0), (0, Tp - T))) for x in meta]
  seg = meta[0]
  fwd, dkv = _mask_infos(*meta, bq, bk)
  sizes = _sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                         block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                         block_kv_dq=bk)

  def one(q, k, v, seg, fwd, dkv):
    fwd_info = _info(fwd)
    kernel = _sk.SplashAttentionKernel(
        fwd_info, fwd_info, _info(dkv), block_sizes=sizes, is_mqa=False, save_residuals=False,
        mask_value=_sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
        residual_checkpoint_name=None, mask_function=None, interpret=bool(interpret))
    ids = _sk.SegmentIds(q=seg, kv=seg) if use_segment_ids else None
    return kernel(q, k, v, segment_ids=ids)

  out = jax.vmap(one)((q * jnp.asarray(scale, q.dtype)), k, v, seg, fwd, dkv)
  out = jnp.where((seg == 0)[:, None, :, None], jnp.zeros((), out.dtype), out)
  out = out[:, :, :T]
  return out.transpose(0, 2, 1, 3) if layout == 'bthd' else out
