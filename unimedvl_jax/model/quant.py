"""int8 weight-only inference: per-output-channel symmetric int8 kernels, dequantised in the matmul.

For a kernel W [in, out] (our layout; stacked: [layers, in, out]) and each output channel j:

    s_j = max_i |W_ij| / 127,   Q_ij = round(W_ij / s_j) in [-127, 127] (int8),

so |W_ij - s_j * Q_ij| <= s_j / 2 = max_i |W_ij| / 254. The layer computes

    y = (x @ Q) * s + b

with Q converted to the compute dtype inside the dot (float32 accumulation, `layers.dense`) and
the scale applied to the float32 product, so no dequantised copy of the weights is kept. A
channel of zeros gets s = 1 (Q = 0).

`quantize(model, vit=False)` replaces (in place) the Linear layers of the decoder experts
(q/k/v/o projections and the MLPs, 'decoder/layers/...') and, with vit=True, of the ViT encoder
layers. Embeddings, lm_head, the connector, the VAE and the norms stay in their dtype. Merge LoRA
adapters first (model/lora.py `merge`); `python -m unimedvl_jax.infer --int8` and
`python -m unimedvl_jax.evaluate --int8` do both at load time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.model.layers import Linear, dense

QMAX = 127


def quantize_kernel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w [..., in, out] float -> (int8 [..., in, out], float32 scale [..., out])."""
  wf = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(wf), axis=-2)
  scale = jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)
  q = jnp.clip(jnp.round(wf / scale[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
  return q, scale


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:
  return q.astype(jnp.float32) * scale[..., None, :]


class Int8Linear(nnx.Module):
  """A Linear whose kernel is int8 with a float32 per-output-channel scale (same paths: kernel,
  bias, plus scale; same shapes, so code reading kernel.shape is unaffected)."""

  def __init__(self, base: Linear):
    axes = tuple(base.kernel.get_metadata().get('out_sharding') or (None,) * base.kernel.ndim)
    q, s = quantize_kernel(base.kernel[...])
    hd = base.kernel.get_metadata().get('head_dim')     # heads stay whole (sharding.py)
    meta = {} if hd is None else {'head_dim': hd}
    self.kernel = nnx.Param(q, out_sharding=axes, **meta)
    self.scale = nnx.Param(s, out_sharding=axes[:-2] + (axes[-1],), **meta)
    self.bias = base.bias
    self.dtype = base.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    y = (dense(x.astype(dt), self.kernel[...].astype(dt)) * self.scale[...]).astype(dt)
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    return y


def _selected(path: tuple, vit: bool) -> bool:
  return path[:2] == ('decoder', 'layers') or (vit and path[:3] == ('vit', 'encoder', 'layers'))


def quantize(model, *, vit: bool = False) -> list[tuple]:
  """Replaces the selected Linear layers by Int8Linear (in place); returns their module paths.
  Refuses a model that still has LoRA adapters (merge them first)."""
  from unimedvl_jax.model.lora import lora_modules
  if lora_modules(model):
    raise ValueError('quantize: the model has LoRA adapters; merge them first (lora.merge)')
  done = []
  for path, mod in list(nnx.iter_modules(model)):
    path = tuple(str(p) for p in path)
    if type(mod) is Linear and _selected(path, vit):
      parent = model
      for p in path[:-1]:
        parent = getattr(parent, p)
      setattr(parent, path[-1], Int8Linear(mod))
      done.append(path)
  if not done:
    raise ValueError('quantize: no decoder Linear layer found (already quantised?)')
  return done


def weight_bytes(model_or_state) -> dict:
  """{'total': bytes of every parameter, 'int8': bytes of the int8 kernels, 'scales': bytes of
  their scales} (buffers excluded)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  out = {'total': 0, 'int8': 0, 'scales': 0}
  flat = list(nnx.to_flat_state(state))
  quant_parents = {tuple(p[:-1]) for p, v in flat if np.dtype(v.dtype) == np.int8}
  for p, v in flat:
    n = int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    out['total'] += n
    if np.dtype(v.dtype) == np.int8:
      out['int8'] += n
    elif str(p[-1]) == 'scale' and tuple(p[:-1]) in quant_parents:
      out['scales'] += n
  return out
