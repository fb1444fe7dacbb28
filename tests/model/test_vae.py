"""AutoEncoder: parity with a PyTorch reference of black-forest-labs/flux
`src/flux/modules/autoencoder.py` (tests/helpers/torch_flux_vae.py: same module names, so its
state dict has the keys of FLUX's `ae.safetensors`; GroupNorm groups made a parameter), fp32;
sampling, latent patch order, gradients and metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from tests.helpers.torch_flux_vae import TDecoder, TEncoder
from unimedvl_jax.config import model_defaults
from unimedvl_jax.interop.hf_loaders import from_flux_state_dict, load_pure_dict
from unimedvl_jax.model.vae import AutoEncoder, _sdpa_single_head, patchify, unpatchify

BASE, MULT, BLOCKS, GROUPS, Z = 32, (1, 2, 2, 2), 1, 8, 16
SCALE, SHIFT = 0.3611, 0.1159


# ------------------------------------------------------------- PyTorch reference (FLUX layout)

class TAutoEncoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.encoder = TEncoder(BASE, MULT, BLOCKS, Z, GROUPS)
    self.decoder = TDecoder(BASE, MULT, BLOCKS, Z, GROUPS)

  def encode_mean(self, x):
    mean = torch.chunk(self.encoder(x), 2, dim=1)[0]
    return SCALE * (mean - SHIFT)

  def decode(self, z):
    return self.decoder(z / SCALE + SHIFT)


# ------------------------------------------------------------------------------------- tests

def tiny_cfg(dtype='float32'):
  m = model_defaults()
  m.vae.update(base_channels=BASE, channel_mult=MULT, num_res_blocks=BLOCKS, z_channels=Z,
               norm_groups=GROUPS, norm_eps=1e-6, scale_factor=SCALE, shift_factor=SHIFT)
  m.dtype, m.param_dtype = dtype, 'float32'
  return m


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def models():
  torch.manual_seed(0)
  ref = TAutoEncoder().eval()
  with torch.no_grad():   # non-trivial norm affines
    for name, p in ref.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  ours = nnx.eval_shape(lambda: AutoEncoder(tiny_cfg(), rngs=nnx.Rngs(0)))   # no random init
  load_pure_dict(ours, from_flux_state_dict(sd))
  graphdef, state = nnx.split(ours)

  @jax.jit
  def enc(s, x, key):   # one compile serves the parity and the sampling tests (same shapes)
    m = nnx.merge(graphdef, s)
    return m.encode_mean(x), m.encode_moments(x), m.encode(x, key)

  dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  return ref, ours, sd, enc, dec, state


def test_key_set_is_flux(models):
  _, _, sd, *_ = models
  for k in ['encoder.down.0.block.0.norm1.weight', 'encoder.down.1.block.0.nin_shortcut.weight',
            'encoder.down.2.downsample.conv.weight', 'encoder.mid.attn_1.proj_out.bias',
            'decoder.up.3.upsample.conv.weight', 'decoder.up.0.block.1.conv2.weight',
            'decoder.up.0.block.0.nin_shortcut.weight', 'encoder.conv_out.weight']:
    assert k in sd, k
  assert 'encoder.down.3.downsample.conv.weight' not in sd
  assert 'decoder.up.0.upsample.conv.weight' not in sd


def test_encode_decode_parity(models):
  ref, _, _, enc, dec, state = models
  rng = np.random.default_rng(0)
  for H, W in [(24, 40)]:   # non-square; odd latent sizes exercise the asymmetric padding
    x = rng.uniform(-1, 1, size=(2, 3, H, W)).astype(np.float32)
    with torch.no_grad():
      z_ref = ref.encode_mean(torch.from_numpy(x))
      x_ref = ref.decode(z_ref)
    z = enc(state, jnp.asarray(x.transpose(0, 2, 3, 1)), jax.random.key(0))[0]
    assert z.shape == (2, H // 8, W // 8, Z) and z.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(z), nhwc(z_ref), rtol=1e-4, atol=1e-4)
    y = dec(state, jnp.asarray(nhwc(z_ref)))
    assert y.shape == (2, H, W, 3)
    np.testing.assert_allclose(np.asarray(y), nhwc(x_ref), rtol=1e-4, atol=1e-4)


def test_encode_samples(models):
  _, ours, _, enc, _, state = models
  x = jax.random.uniform(jax.random.key(1), (2, 24, 40, 3), minval=-1, maxval=1)
  key = jax.random.key(2)
  zm, (mean, logvar), z = enc(state, x, key)
  expect = SCALE * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape) - SHIFT)
  np.testing.assert_allclose(z, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(zm, SCALE * (mean - SHIFT), rtol=1e-6)
  assert float(jnp.std(z - zm)) > 1e-3
  assert not np.allclose(z, enc(state, x, jax.random.key(3))[2])
  with pytest.raises(ValueError, match='multiples of 8'):
    ours.encode_mean(jnp.zeros((1, 12, 16, 3)))


def test_chunked_mid_attention():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 8)) for i in range(3))
  full = _sdpa_single_head(q, k, v, chunk=16)
  ref = jax.nn.softmax(jnp.einsum('bqc,bkc->bqk', q, k) / np.sqrt(8), axis=-1) @ v
  np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_sdpa_single_head(q, k, v, chunk=4), full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_sdpa_single_head(q, k, v, chunk=4, unroll=True), full,
                             rtol=1e-5, atol=1e-6)
  # unrolled (model.unroll_loops, the AOT cost variants): no while loop, so cost_analysis counts
  # all 4 chunks' matmuls (closed form: QK^T and PV, 2 * 2 * B * T * T * C), the scan only one
  from unimedvl_jax.profiling import cost_analysis
  dot_flops = 2 * 2 * 2 * 16 * 16 * 8
  for unroll, chunks_counted in ((True, 4), (False, 1)):
    c = jax.jit(lambda q, k, v: _sdpa_single_head(q, k, v, 4, unroll)).lower(q, k, v).compile()
    assert ('while' in c.as_text()) == (not unroll)
    assert dot_flops * chunks_counted / 4 <= cost_analysis(c)['flops'] < dot_flops * (chunks_counted + 1) / 4


def test_patchify_order_and_roundtrip():
  rng = np.random.default_rng(3)
  B, H, W, C, p = 2, 6, 10, 16, 2
  z = rng.standard_normal((B, H, W, C)).astype(np.float32)
  t = np.asarray(patchify(jnp.asarray(z), p))
  assert t.shape == (B, (H // p) * (W // p), p * p * C)
  for b in range(B):   # BAGEL's reference on a [C, H, W] latent
    chw = z[b].transpose(2, 0, 1).reshape(C, H // p, p, W // p, p)
    ref = np.einsum('chpwq->hwpqc', chw).reshape(-1, p * p * C)
    np.testing.assert_array_equal(t[b], ref)
  back = unpatchify(jnp.asarray(t), H // p, W // p, p, C)
  np.testing.assert_array_equal(np.asarray(back), z)
  np.testing.assert_array_equal(np.asarray(unpatchify(patchify(jnp.asarray(z[0]), p), H // p, W // p,
                                                      p, C)), z[0])   # unbatched
  with pytest.raises(ValueError):
    unpatchify(jnp.asarray(t), H // p, W // p + 1, p, C)


def test_decode_grads_finite(models):
  """Gradients through the decoder (latent-space guidance / a trainable decoder) are finite and
  reach every decoder parameter. (The encoder is frozen and stop-gradiented in training.)"""
  _, ours, *_, state = models
  graphdef = nnx.graphdef(ours)

  def loss(state, z):
    return jnp.mean(nnx.merge(graphdef, state).decode(z) ** 2)

  z = jax.random.normal(jax.random.key(4), (1, 2, 2, Z))
  gs, gz = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, z)
  assert np.isfinite(np.asarray(gz)).all() and np.abs(np.asarray(gz)).max() > 0
  for path, v in nnx.to_flat_state(gs):
    a = np.asarray(v[...])
    assert np.isfinite(a).all(), path
    if path[0] == 'decoder':
      assert np.abs(a).max() > 0, path


def test_param_metadata_and_bf16(models):
  """bf16 compute with fp32 params: same weights as the fp32 model, close outputs."""
  _, _, sd, _, dec, state = models
  model = nnx.eval_shape(lambda: AutoEncoder(tiny_cfg('bfloat16'), rngs=nnx.Rngs(1)))
  load_pure_dict(model, from_flux_state_dict(sd))
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    meta = v.get_metadata()
    names = meta.get('sharding_names', meta.get('out_sharding'))
    assert names is not None and len(names) == v[...].ndim, path
    assert v[...].dtype == jnp.float32, path
  z = jax.random.normal(jax.random.key(6), (2, 3, 5, Z))   # the parity test's shape: `dec` is cached
  y16 = nnx.jit(lambda m, z: m.decode(z))(model, z)
  y32 = dec(state, z)
  assert y16.dtype == jnp.float32 and y16.shape == (2, 24, 40, 3)
  assert float(jnp.max(jnp.abs(y16 - y32))) < 0.1 * float(jnp.max(jnp.abs(y32))) + 1e-3


def test_random_init_runs():
  """A randomly initialised model (the toy-scale default when no checkpoint is given). One level
  and few distinct shapes: every eager random init compiles once per shape."""
  cfg = tiny_cfg()
  cfg.vae.update(base_channels=8, channel_mult=(1,), norm_groups=4, z_channels=4)
  model = AutoEncoder(cfg, rngs=nnx.Rngs(0))
  k = model.encoder.conv_in.kernel[...]
  assert k.shape == (3, 3, 3, 8) and 0.05 < float(jnp.std(k)) < 0.5   # torch's default scale
  assert not np.allclose(model.encoder.mid.attn_1.q.kernel[...], model.encoder.mid.attn_1.k.kernel[...])
  y = nnx.jit(lambda m, x: m.decode(m.encode(x, jax.random.key(0))))(model, jnp.zeros((1, 4, 4, 3)))
  assert y.shape == (1, 4, 4, 3) and bool(jnp.isfinite(y).all())
