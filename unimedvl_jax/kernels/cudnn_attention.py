"""`jax.nn.dot_product_attention` with the packed mask: the GPU baseline backend (cuDNN).

    cudnn_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None,
                    layout='bthd', implementation=None)

Same contract as `flash_attention`: layout 'bthd' q [B, T, Hq, D], k, v [B, T, Hkv, D] (the
layout jax.nn.dot_product_attention takes), or 'bhtd' [B, H, T, D] (transposed around the call);
metadata int32 [B, T]; returns q's shape, layout and dtype, equal to `reference_attention` on
every query with an allowed key and zero on padding rows.

The mask is explicit and dense: `kernels.mask.attention_mask` (the rule `batch.allowed`) as a bool
[B, 1, T, T] array, broadcast over heads (T^2 bytes per pack; cuDNN turns it into an additive
bias). GQA is native (KV heads are not repeated). Padding queries (no allowed key) come out of
the softmax as an average of all values; they are set to zero, so their cotangents are zero too.

`implementation`: 'cudnn' (cuDNN fused attention: GPU only, bf16/fp16, head dim <= 128 and a
multiple of 8), 'xla' (XLA's dense softmax attention, any platform: used on CPU to check the
numbers of the same call), or None (JAX picks). The dispatcher (`model.attention.attention`,
impl 'cudnn') asks for 'cudnn' on GPU and 'xla' elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimedvl_jax.kernels._flash_generic import LAYOUTS, dims
from unimedvl_jax.kernels.mask import attention_mask

__all__ = ['cudnn_attention']


def cudnn_attention(q, k, v, segment_ids, split_ids, split_modes, *, scale=None,
                    layout: str = 'bthd', implementation: str | None = None):
  """Packed-sequence attention through jax.nn.dot_product_attention (module docstring)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be 'bthd' or 'bhtd', got {layout!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'q, k, v must be 4-D ({layout}) with k.shape == v.shape, got '
                     f'{q.shape}, {k.shape}, {v.shape}')
  B, T, Hq, D = dims(q, layout)
  for name, x in (('segment_ids', segment_ids), ('split_ids', split_ids),
                  ('split_modes', split_modes)):
    if tuple(x.shape) != (B, T):
      raise ValueError(f'{name} must be [B, T] = [{B}, {T}], got {tuple(x.shape)}')
  if layout == 'bhtd':
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  meta = [jnp.asarray(x, jnp.int32) for x in (segment_ids, split_ids, split_modes)]
  mask = attention_mask(*meta)[:, None]                              # [B, 1, T, T]
  scale = float(D ** -0.5 if scale is None else scale)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                     implementation=implementation)
  out = jnp.where((meta[0] == 0)[:, :, None, None], jnp.zeros((), out.dtype), out)
  return out.transpose(0, 2, 1, 3) if layout == 'bhtd' else out
