"""Training latents equal inference latents: the packed step encodes each VAE image at its own
size (a pixel size bucket, never a padded slot), so for the same image and the same noise the
clean latent tokens of the training forward equal those `infer` computes (encode_vae_tokens)."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers.infer_ref import tiny_model
from unimedvl_jax.data.images import to_unit_range
from unimedvl_jax.infer.context import encode_vae_tokens


def test_training_and_inference_latents_agree():
  cfg, model = tiny_model()
  rng = np.random.default_rng(0)
  imgs = {(32, 32): rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
          (32, 48): rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)}
  D = model.latent_dim
  for (h, w), px in imgs.items():
    k = (h // 16) * (w // 16)
    # a training batch holding this one image in its own bucket, next to an empty slot
    batch = {f'vae_{h}x{w}': np.zeros((1, 2, h, w, 3), np.uint8),
             f'vae_{h}x{w}_image': np.array([[0, -1]], np.int32),
             'latent_src': np.arange(k, dtype=np.int32)[None]}
    batch[f'vae_{h}x{w}'][0, 0] = px
    noise = rng.standard_normal((1, k, D)).astype(np.float32)
    train = np.asarray(jax.jit(model.clean_latents)({kk: jnp.asarray(v) for kk, v in batch.items()},
                                                    jnp.asarray(noise)))[0]
    infer, grid = encode_vae_tokens(model, to_unit_range(px), sample=True, noise=noise[0])
    assert grid == (h // 16, w // 16)
    np.testing.assert_allclose(train, infer, rtol=1e-5, atol=1e-5)
    # and the deterministic (mean) conditioning is the noise-free sample
    mean, _ = encode_vae_tokens(model, to_unit_range(px))
    zero = np.asarray(jax.jit(model.clean_latents)(
        {kk: jnp.asarray(v) for kk, v in batch.items()}, jnp.zeros((1, k, D))))[0]
    np.testing.assert_allclose(mean, zero, rtol=1e-5, atol=1e-5)
