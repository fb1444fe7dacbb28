"""int8 weight-only inference (model/quant.py): the per-channel error bound max|w|/127/2, an
int8 layer equals its float64 formula, the quantised tiny model stays close to fp32, the weight
bytes drop by the closed-form amount, and `--int8` runs through the inference CLI."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.infer_ref import tiny_cfg  # noqa: E402
from tests.helpers.model_packs import build_batch, mixed_samples  # noqa: E402

from unimedvl_jax.infer.random_init import random_model  # noqa: E402
from unimedvl_jax.model import quant  # noqa: E402
from unimedvl_jax.model.layers import Linear  # noqa: E402


def test_quantize_error_within_closed_form_bound():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((3, 40, 17)) * rng.uniform(0.01, 3.0, (3, 1, 17))).astype(np.float32)
  w[1, :, 5] = 0.0                                   # an all-zero channel
  q, s = (np.asarray(a) for a in quant.quantize_kernel(w))
  assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3, 17)
  w64 = w.astype(np.float64)
  amax = np.abs(w64).max(axis=-2)                    # per output channel
  err = np.abs(w64 - q.astype(np.float64) * s.astype(np.float64)[:, None, :])
  bound = amax / 127 / 2
  assert np.all(err <= bound[:, None, :] * (1 + 1e-5))
  assert np.all(np.abs(q).max(axis=-2)[amax > 0] == 127) and not np.any(q[1, :, 5])
  assert err.max() > 0.5 * bound.max()              # the bound is attained, not loose


def test_int8_linear_equals_float64_formula():
  base = Linear(24, 10, rngs=nnx.Rngs(0), use_bias=True)
  base.bias[...] = jax.random.normal(jax.random.key(1), (10,))
  m = quant.Int8Linear(base)
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 24)), np.float64)
  Q, s, b = (np.asarray(v[...], np.float64) for v in (m.kernel, m.scale, m.bias))
  np.testing.assert_allclose(np.asarray(m(jnp.asarray(x, jnp.float32))), x @ (Q * s) + b,
                             rtol=1e-5, atol=1e-5)
  assert m.kernel[...].dtype == jnp.int8


@functools.partial(jax.jit, static_argnums=3)
def _forward(params, rest, batch, graphdef):
  model = nnx.merge(graphdef, params, rest)
  noise = {k: jax.random.normal(jax.random.key(i), batch['latent_mask'].shape + (64,))
           for i, k in enumerate(('vae', 'flow'))}
  h_u, h_g, _ = model.forward(batch, jax.random.key(0), noise=noise,
                              timesteps=jnp.zeros(batch['vae_image_noised'].shape))
  return h_u, h_g


def _decoder_kernel_elems(cfg) -> int:
  llm = cfg.model.llm
  H, D, I = llm.hidden_size, llm.head_dim, llm.intermediate_size
  attn = H * llm.num_heads * D * 2 + H * llm.num_kv_heads * D * 2      # q, o; k, v
  return 2 * llm.num_layers * (attn + 3 * H * I)                         # 2 experts


def test_quantised_model_close_to_fp32_and_smaller():
  cfg = tiny_cfg('data.batch_size=2', 'data.seq_len=256', 'data.max_latent_tokens=64',
                 'data.max_vit_patches=64', 'data.max_vae_images=4')
  model = random_model(cfg.model, 0, bias_std=0.02)
  batch = build_batch(cfg, [mixed_samples(), mixed_samples()[::-1]], seed=2)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  before = quant.weight_bytes(model)
  g, p, r = nnx.split(model, nnx.Param, ...)
  ref = [np.asarray(a) for a in _forward(p, r, batch, g)]
  paths = quant.quantize(model)
  assert len(paths) == 2 * 7
  after = quant.weight_bytes(model)
  n = _decoder_kernel_elems(cfg)
  L, H = cfg.model.llm.num_layers, cfg.model.llm.hidden_size
  llm = cfg.model.llm
  n_scale = 2 * L * (llm.num_heads * llm.head_dim + 2 * llm.num_kv_heads * llm.head_dim + H
                     + 2 * llm.intermediate_size + H)   # q, k, v, o, gate, up, down outputs
  assert after['int8'] == n and after['scales'] == 4 * n_scale
  assert before['total'] - after['total'] == 4 * n - n - 4 * n_scale   # fp32 kernels -> int8
  g, p, r = nnx.split(model, nnx.Param, ...)
  got = [np.asarray(a) for a in _forward(p, r, batch, g)]
  for a, b in zip(got, ref):
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < 1e-2, rel        # int8 error (~0.3% per weight) stays small through 2 layers


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  from unimedvl_jax.data import synthetic
  from unimedvl_jax.train.model_checkpoint import save_model_checkpoint
  d = str(tmp_path_factory.mktemp('int8'))
  synthetic.generate(os.path.join(d, 'data'), seed=0, size=32, n_subjects=4, include_real=False,
                     vocab_size=600)
  cfg = tiny_cfg(f'data.tokenizer_path={d}/data/tokenizer.model')
  save_model_checkpoint(os.path.join(d, 'ck'), cfg, random_model(cfg.model, 0), step=0)
  return os.path.join(d, 'ck'), os.path.join(d, 'data', 'images', 'train', 's000000.png')


def test_infer_cli_int8(ckpt):
  from unimedvl_jax.infer import cli
  from unimedvl_jax.infer.loading import load_checkpoint
  ck, img = ckpt
  _, model = load_checkpoint(ck, int8=True)
  assert isinstance(model.decoder.layers.und.q_proj, quant.Int8Linear)
  assert model.decoder.layers.gen.mlp.down_proj.kernel[...].dtype == jnp.int8
  r = cli.run('vqa', ck, image=img, question='Is there a lesion?', max_new_tokens=3, int8=True)
  assert isinstance(r['answer'], str) and r['weights'] == 'int8'
