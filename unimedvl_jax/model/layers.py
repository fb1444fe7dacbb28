"""Basic layers with logical-axis metadata and the reference numerics (HF/PyTorch parity).

Conventions:
- Parameters are stored in `param_dtype` (fp32 masters) and cast to the compute `dtype` at use.
- Linear kernels are [in, out] (torch's [out, in] transposed; interop only transposes).
- Every parameter carries logical axis names (`out_sharding` metadata); `unimedvl_jax.sharding`
  maps them to mesh axes through the rules of the config (`config.mesh.rules`). The attention
  projections also carry `head_dim`, so their [.., heads * head_dim] dims split on heads only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Parameters carry logical names only; mesh placement is decided by unimedvl_jax.sharding.
nnx.use_eager_sharding(False)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def take_rows(x, idx):
  """Per-batch-row gather along axis 1: x [B, n, ...], idx [B, m] -> [B, m, ...] (the MoT
  stream <-> sequence order reorderings of the train forward and of the KV-cache forward)."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, idx)


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """perm [B, T] (a permutation per row) -> inv with inv[b, perm[b, i]] = i."""
  T = perm.shape[1]
  ar = jnp.arange(T, dtype=perm.dtype)
  return jax.vmap(lambda p: jnp.zeros((T,), perm.dtype).at[p].set(ar))(perm)


def to_dtype(name_or_dtype):
  if isinstance(name_or_dtype, str):
    return DTYPES[name_or_dtype]
  return name_or_dtype


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


def make_param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
               param_dtype=jnp.float32, head_dim: int | None = None) -> nnx.Param:
  """head_dim: the size of one head along the head axes ('q_heads', 'kv_heads', 'vit_heads') of
  this parameter, whose dims there are heads * head_dim (sharding splits them on heads only)."""
  assert len(axes) == len(shape), (shape, axes)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  meta = {} if head_dim is None else {'head_dim': int(head_dim)}
  return nnx.Param(init(key, tuple(shape), param_dtype), out_sharding=tuple(axes), **meta)


@jax.custom_vjp
def _dense2d(x, w):
  return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dense2d_fwd(x, w):
  return _dense2d(x, w), (x, w)


def _dense2d_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense2d.defvjp(_dense2d_fwd, _dense2d_bwd)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] -> float32 [..., N]: operands in their (compute) dtype, float32
  accumulation, in the forward AND both backward products.

  Numerically this is `jnp.dot(x, w)` rounded once from a float32 accumulator, like a bf16 dot on
  TPU/GPU and XLA:CPU. JAX's own transpose rule would instead run the two backward products on
  float32-converted operands (XLA:CPU executes bf16 natively only as bf16 x bf16 -> f32), about
  2x slower on CPU; here the cotangent is cast to the operand dtype first (as a bf16 network's
  cotangents are), so all three products are native bf16 x bf16 -> f32 dots.
  """
  if x.dtype != w.dtype:
    raise TypeError(f'dense: operand dtypes differ ({x.dtype} vs {w.dtype}); cast first')
  lead = x.shape[:-1]
  y = _dense2d(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(lead + (w.shape[1],))


class Linear(nnx.Module):
  """y = x @ W + b with W [in, out] and logical axes (in_axis, out_axis)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
               axes: tuple[str | None, str | None] = ('embed', 'mlp'), dtype='float32',
               param_dtype='float32', init_std: float = 0.02, zero_init: bool = False,
               head_dim: int | None = None):
    pdt = to_dtype(param_dtype)
    init = jax.nn.initializers.zeros if zero_init else normal_init(init_std)
    self.kernel = make_param(rngs, init, (in_features, out_features), axes, pdt, head_dim)
    self.bias = (make_param(rngs, jax.nn.initializers.zeros, (out_features,), (axes[1],), pdt,
                            head_dim) if use_bias else None)
    self.dtype = to_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype)).astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, THEN multiply by the weight."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = 'norm',
               param_dtype='float32', dtype='float32', rngs: nnx.Rngs | None = None,
               init: float = 1.0):
    self.weight = nnx.Param(jnp.full((dim,), init, to_dtype(param_dtype)),
                            out_sharding=(axis_name,))
    self.eps = eps
    self.dtype = to_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps, self.dtype)


def rms_norm(x, weight, eps, dtype):
  in_dtype = x.dtype
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = (xf * jax.lax.rsqrt(var + eps)).astype(in_dtype)
  return (weight.astype(dtype) * y.astype(dtype))


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm: statistics in fp32, affine in the compute dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = 'norm',
               param_dtype='float32', dtype='float32', rngs: nnx.Rngs | None = None):
    pdt = to_dtype(param_dtype)
    self.weight = nnx.Param(jnp.ones((dim,), pdt), out_sharding=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((dim,), pdt), out_sharding=(axis_name,))
    self.eps = eps
    self.dtype = to_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """HF Qwen2: 1 / theta ** (arange(0, D, 2) / D), computed in float32 like transformers."""
  return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
          ).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
  """positions int [...] -> (cos, sin) float32 [..., head_dim] in the rotate_half layout."""
  inv = jnp.asarray(rope_inv_freq(head_dim, theta))
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, D]; cos/sin [B, T, D] (float32) -> x*cos + rotate_half(x)*sin in x's dtype.

  Like transformers, cos/sin are cast to x's dtype before the products.
  """
  c = cos[:, :, None, :].astype(x.dtype)
  s = sin[:, :, None, :].astype(x.dtype)
  return x * c + rotate_half(x) * s


# ----------------------------------------------------------------------------------------- MLPs

class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases (Qwen2 MLP)."""

  def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype='float32',
               param_dtype='float32', init_std=0.02):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype, init_std=init_std)
    self.gate_proj = Linear(hidden, intermediate, axes=('embed', 'mlp'), **kw)
    self.up_proj = Linear(hidden, intermediate, axes=('embed', 'mlp'), **kw)
    self.down_proj = Linear(intermediate, hidden, axes=('mlp', 'embed'), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


class GeluMLP(nnx.Module):
  """fc2(gelu_tanh(fc1(x))) with biases (SigLIP MLP, BAGEL connector)."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs, dtype='float32',
               param_dtype='float32', init_std=0.02, axes_in=('embed', 'mlp'),
               axes_out=('mlp', 'embed')):
    kw = dict(rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype, init_std=init_std)
    self.fc1 = Linear(d_in, d_hidden, axes=axes_in, **kw)
    self.fc2 = Linear(d_hidden, d_out, axes=axes_out, **kw)

  def __call__(self, x):
    return self.fc2(gelu_tanh(self.fc1(x)))
