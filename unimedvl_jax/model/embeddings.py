"""Position tables, the timestep embedder and the ViT->LLM connector (SPEC section 2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.model.layers import GeluMLP, Linear, to_dtype


class Buffer(nnx.Variable):
  """A frozen array that is part of the checkpoint (the sin-cos tables): never optimised."""


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """S(p) = concat(sin(p*w), cos(p*w)), w_i = 10000^(-i/(dim/2)), i < dim/2; float64."""
  half = dim // 2
  omega = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / half)
  out = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
  """Entry r*grid + c = concat(S(c), S(r)) (column first), each S of width dim/2; float64.

  This is the MAE/BAGEL `get_2d_sincos_pos_embed`: w_i = 10000^(-i/(dim/4)), i < dim/4.
  """
  if dim % 4:
    raise ValueError(f'sin-cos table width must be divisible by 4, got {dim}')
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


class PositionTable(nnx.Module):
  """A frozen 2-D sin-cos table (`vit_pos_embed` / `latent_pos_embed` in the checkpoint)."""

  def __init__(self, dim: int, grid: int, *, param_dtype='float32'):
    self.grid = grid
    self.pos_embed = Buffer(jnp.asarray(sincos_2d_table(dim, grid), to_dtype(param_dtype)),
                            out_sharding=('table', 'embed'))

  def __call__(self, pos_ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.pos_embed[...], pos_ids, axis=0).astype(dtype)


def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """cat(cos(t*f), sin(t*f)), f_i = exp(-ln(max_period) * i / (dim/2)); t used as is (no x1000)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """Linear(freq_dim -> H), SiLU, Linear(H -> H); checkpoint names time_embedder.mlp.{0,2}."""

  def __init__(self, hidden: int, freq_dim: int, *, rngs: nnx.Rngs, dtype='float32',
               param_dtype='float32', init_std=0.02):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, init_std=init_std)
    self.freq_dim = freq_dim
    self.fc1 = Linear(freq_dim, hidden, axes=(None, 'embed'), **kw)
    self.fc2 = Linear(hidden, hidden, axes=('embed', 'mlp'), **kw)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_frequencies(t, self.freq_dim))))


class Connector(GeluMLP):
  """ViT width -> LLM width: fc1, tanh-GELU, fc2 (both with bias)."""

  def __init__(self, vit_hidden: int, llm_hidden: int, *, rngs, dtype='float32',
               param_dtype='float32', init_std=0.02):
    super().__init__(vit_hidden, llm_hidden, llm_hidden, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype, init_std=init_std,
                     axes_in=('vit_embed', 'embed'), axes_out=('mlp', 'embed'))
