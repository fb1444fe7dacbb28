"""The analytic VAE FLOPs (profiling._vae_encoder_flops / _vae_decoder_flops, used for the MFU of
the 'vae' curriculum stage and the frozen-encoder share of the LM step) against XLA's own count:
cost_analysis() of the compiled forward. XLA also counts the elementwise work (GroupNorm, swish,
residuals, softmax), which the convention leaves out, and XLA leaves out the multiply-adds of a
3x3 kernel tap that falls on zero padding, which the convention (2 * k * k * Cin * Cout per output
pixel) counts: a few percent at these sizes, in opposite directions. The bounds catch a wrong
block structure at the full-resolution levels (where most FLOPs are), not every small deep block."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from unimedvl_jax import profiling
from unimedvl_jax.config import default_config
from unimedvl_jax.model.vae import AutoEncoder


def _xla_flops(fn, *args):
  c = jax.jit(fn).lower(*args).compile().cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return float(c['flops'])


@pytest.mark.parametrize('base,mult,nres,size', [(8, (1, 2, 2, 4), 1, 64), (16, (1, 2, 4), 2, 48)])
def test_vae_encoder_decoder_flops_match_xla(base, mult, nres, size):
  cfg = default_config()
  cfg.model.dtype = 'float32'
  cfg.model.vae.update(dict(base_channels=base, channel_mult=mult, num_res_blocks=nres,
                            norm_groups=4))
  vae = AutoEncoder(cfg.model, rngs=nnx.Rngs(0))
  graph, params = nnx.split(vae)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  f = 2 ** (len(mult) - 1)
  z = jnp.zeros((1, size // f, size // f, cfg.model.vae.z_channels), jnp.float32)
  enc = _xla_flops(lambda p, x: nnx.merge(graph, p).encode_moments(x), params, x)
  dec = _xla_flops(lambda p, z: nnx.merge(graph, p).decoder(z), params, z)
  a_enc = profiling._vae_encoder_flops(cfg.model.vae, size)
  a_dec = profiling._vae_decoder_flops(cfg.model.vae, size)
  assert 0.92 < enc / a_enc < 1.03, (enc, a_enc)
  assert 0.92 < dec / a_dec < 1.03, (dec, a_dec)


def test_vae_stage_flops_formula():
  cfg = default_config()
  cfg.data.batch_size, cfg.data.max_vae_images = 3, 8
  cfg.data.vae_buckets = ((64, 64, 5), (32, 48, 1))
  v = cfg.model.vae
  f = lambda h, w: profiling._vae_encoder_flops(v, h, w) + profiling._vae_decoder_flops(v, h, w)
  want = 3 * 3 * (2 * f(64, 64) + 1 * f(32, 48))
  assert profiling.vae_stage_flops_per_step(cfg, slots=2) == want
  # non-square sizes: the encoder of an h x w image is between those of the two squares
  assert profiling._vae_encoder_flops(v, 32) < profiling._vae_encoder_flops(v, 32, 48) < \
      profiling._vae_encoder_flops(v, 48)
