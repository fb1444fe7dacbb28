"""RoPE, RMSNorm, sin-cos tables and timestep embedding against float64 numpy and torch references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unimedvl_jax.model.embeddings import sincos_2d_table, timestep_frequencies, TimestepEmbedder
from unimedvl_jax.model.layers import RMSNorm, apply_rope, rope_cos_sin


def np_rope(x, pos, theta):
  """float64 rotate_half RoPE, written from the HF formula."""
  D = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
  f = pos[..., None] * inv
  emb = np.concatenate([f, f], -1)
  cos, sin = np.cos(emb)[:, :, None], np.sin(emb)[:, :, None]
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  rot = np.concatenate([-x2, x1], -1)
  return x * cos + rot * sin


@pytest.mark.parametrize('theta', [1e4, 1e6])
def test_rope_matches_float64(theta):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 3, 16))
  pos = rng.integers(0, 300, size=(2, 7))
  cos, sin = rope_cos_sin(jnp.asarray(pos), 16, theta)
  out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), cos, sin))
  np.testing.assert_allclose(out, np_rope(x, pos.astype(np.float64), theta), atol=2e-4, rtol=1e-4)


def test_rope_matches_transformers_qwen2():
  torch = pytest.importorskip('torch')
  from transformers.models.qwen2 import modeling_qwen2 as q2
  from transformers import Qwen2Config
  cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                    head_dim=16)
  rot = q2.Qwen2RotaryEmbedding(cfg)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 9, 16)).astype(np.float32)      # torch layout [B, H, T, D]
  pos = np.array([[0, 1, 2, 2, 2, 3, 10, 11, 5000]])
  cos, sin = rot(torch.tensor(x), torch.tensor(pos))
  ref, _ = q2.apply_rotary_pos_emb(torch.tensor(x), torch.tensor(x), cos, sin)
  c, s = rope_cos_sin(jnp.asarray(pos), 16, 1e6)
  ours = np.asarray(apply_rope(jnp.asarray(x.transpose(0, 2, 1, 3)), c, s)).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_rmsnorm_float64_and_cast_back_before_weight():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 32)).astype(np.float32) * 3
  w = rng.normal(size=(32,)).astype(np.float32)
  norm = RMSNorm(32, eps=1e-6, dtype='float32')
  norm.weight[...] = jnp.asarray(w)
  out = np.asarray(norm(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  ref = w * (x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # bf16: normalise in fp32, cast to bf16, THEN multiply by the (bf16) weight
  xb = x.astype(ml_dtypes.bfloat16)
  norm_b = RMSNorm(32, eps=1e-6, dtype='bfloat16')
  norm_b.weight[...] = jnp.asarray(w)
  outb = np.asarray(norm_b(jnp.asarray(xb))).astype(np.float32)
  xf = xb.astype(np.float32).astype(np.float64)
  y = (xf / np.sqrt(np.mean(xf ** 2, -1, keepdims=True) + 1e-6)).astype(ml_dtypes.bfloat16)
  refb = (w.astype(ml_dtypes.bfloat16) * y).astype(np.float32)
  np.testing.assert_array_equal(outb, refb)


def test_rmsnorm_init_scales_the_output():
  x = np.random.default_rng(2).normal(size=(4, 16)).astype(np.float32)
  ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(RMSNorm(16, init=2.5)(jnp.asarray(x))), 2.5 * ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(RMSNorm(16).weight[...]), np.ones(16, np.float32))


def test_rmsnorm_matches_torch_qwen2_in_bf16():
  torch = pytest.importorskip('torch')
  from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 48)).astype(np.float32)
  w = rng.normal(size=(48,)).astype(np.float32)
  tn = Qwen2RMSNorm(48, eps=1e-6).to(torch.bfloat16)
  with torch.no_grad():
    tn.weight.copy_(torch.tensor(w))
  ref = tn(torch.tensor(x).to(torch.bfloat16)).float().detach().numpy()
  ours = RMSNorm(48, eps=1e-6, dtype='bfloat16')
  ours.weight[...] = jnp.asarray(w)
  out = np.asarray(ours(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
  np.testing.assert_array_equal(out, ref)


def mae_2d_sincos(embed_dim, grid_size):
  """The MAE/BAGEL reference code, transcribed (float64)."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])

  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64)
    omega /= d / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb_h = one_d(embed_dim // 2, grid[0])
  emb_w = one_d(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


@pytest.mark.parametrize('dim,grid', [(16, 5), (64, 7), (3584, 3)])
def test_sincos_table_matches_mae_reference(dim, grid):
  ours = sincos_2d_table(dim, grid)
  np.testing.assert_allclose(ours, mae_2d_sincos(dim, grid), atol=1e-12)
  # entry r*G + c = concat(S(c), S(r)): check one entry by hand
  r, c = grid - 1, 1 % grid
  w = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
  S = lambda p: np.concatenate([np.sin(p * w), np.cos(p * w)])
  np.testing.assert_allclose(ours[r * grid + c], np.concatenate([S(c), S(r)]), atol=1e-12)


def test_timestep_embedding_no_x1000():
  t = np.array([0.0, 0.25, 0.5, 1.0])
  f = np.exp(-np.log(10000.0) * np.arange(128) / 128)
  ref = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], -1)
  np.testing.assert_allclose(np.asarray(timestep_frequencies(jnp.asarray(t), 256)), ref, atol=1e-6)
  from flax import nnx
  te = TimestepEmbedder(8, 256, rngs=nnx.Rngs(0))
  w1, b1 = np.asarray(te.fc1.kernel[...]), np.asarray(te.fc1.bias[...])
  w2, b2 = np.asarray(te.fc2.kernel[...]), np.asarray(te.fc2.bias[...])
  h = ref @ w1 + b1
  h = h / (1 + np.exp(-h))
  np.testing.assert_allclose(np.asarray(te(jnp.asarray(t))), h @ w2 + b2, atol=1e-5)
