"""Import parity against PyTorch: a BAGEL-layout torch module (tests/interop/bagel_torch_ref.py:
MoT decoder transcription + transformers' SiglipVisionModel + FLUX autoencoder transcription) ->
its state_dict() -> `import_state_dict` -> our UniMedVL; then the ViT, the VAE, the MoT hidden
states, the flow head and one full packed training loss agree in fp32 within 1e-4."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'model'))
from packs import build_batch, mixed_samples  # noqa: E402

from bagel_torch_ref import BagelRef, FluxAE  # noqa: E402
from unimedvl_jax.config import load_config_file  # noqa: E402
from unimedvl_jax.interop import keymap as km  # noqa: E402
from unimedvl_jax.interop.import_torch import import_state_dict  # noqa: E402
from unimedvl_jax.model.vit import patchify_image  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')
OVERRIDES = ['data.batch_size=2', 'data.seq_len=96', 'data.max_latent_tokens=16',
             'data.max_vit_patches=32', 'data.max_vae_images=3', 'data.vae_buffer_size=32',
             'data.vae_max_size=32', 'data.vae_min_size=16', 'data.max_sample_tokens=96',
             'model.llm.num_layers=2', 'model.llm.vocab_size=256', 'model.attention_impl=xla']
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def setup():
  torch.manual_seed(0)
  cfg = load_config_file(TINY, OVERRIDES)
  ref = BagelRef(cfg.model).randomize(0).eval()
  ae = FluxAE(cfg.model.vae).randomize(1).eval()
  sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
  ae_sd = {k: v.detach().clone() for k, v in ae.state_dict().items()}
  model = import_state_dict(cfg, sd, ae_sd)
  return cfg, ref, ae, sd, ae_sd, model


def test_torch_module_key_set_is_the_expected_one(setup):
  """The torch module tree's state_dict() (real module names) is exactly our expected key set."""
  cfg, _, _, sd, ae_sd, _ = setup
  want = km.expected_torch_keys(cfg)
  assert {k: tuple(v.shape) for k, v in sd.items()} == want
  want_vae = km.expected_torch_keys(cfg, km.VAE_FILE)
  assert {k: tuple(v.shape) for k, v in ae_sd.items()} == want_vae
  assert want_vae == km.flux_ae_keys(cfg.model.vae)


def test_vit_through_import_variable_sizes(setup):
  """transformers SiglipVisionModel (Linear patch embedding) vs our ViT after import, on images
  of several shapes packed NaViT-style in one row."""
  cfg, ref, _, _, _, model = setup
  p, G = cfg.model.vit.patch_size, cfg.model.vit.grid_size
  rng = np.random.default_rng(3)
  shapes = [(3, 5), (1, 1), (4, 2), (8, 8)]
  P = sum(h * w for h, w in shapes) + 3
  patches = np.zeros((P, 3 * p * p), np.float32)
  seg = np.zeros((P,), np.int32)
  pos = np.zeros((P,), np.int32)
  spans, o = [], 0
  for i, (h, w) in enumerate(shapes):
    x, r, c = patchify_image(rng.uniform(-1, 1, (h * p, w * p, 3)).astype(np.float32), p)
    n = len(x)
    patches[o:o + n], seg[o:o + n], pos[o:o + n] = x, i + 1, r * G + c
    spans.append((o, o + n))
    o += n
  out = np.asarray(jax.jit(lambda a, b, c: model.vit(a, b, c))(
      jnp.asarray(patches[None]), jnp.asarray(seg[None]), jnp.asarray(pos[None])))[0]
  with torch.no_grad():
    for a, b in spans:
      want = ref.vit_image(torch.from_numpy(patches[a:b]), torch.from_numpy(pos[a:b]).long()).numpy()
      np.testing.assert_allclose(out[a:b], want, **TOL)


def test_vae_through_import(setup):
  """FLUX autoencoder (ae.safetensors layout, OIHW) -> our NHWC/HWIO VAE: moments, sampled and
  scaled latents, and decoding agree with the torch transcription."""
  cfg, _, ae, _, _, model = setup
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  key = jax.random.key(7)

  @jax.jit
  def run(x, z):
    mean, logvar = model.vae.encode_moments(x)
    return mean, logvar, model.vae.encode(x, key), model.vae.decode(z)

  z = rng.standard_normal((2, 4, 6, cfg.model.vae.z_channels)).astype(np.float32)
  mean, logvar, zs, dec = (np.asarray(a) for a in run(jnp.asarray(x), jnp.asarray(z)))
  noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    tm, tl = ae.moments(nchw(x))
    tz = ae.scale_factor * (tm + torch.exp(0.5 * tl) * nchw(noise) - ae.shift_factor)
    td = ae.decode(nchw(z))
  np.testing.assert_allclose(mean, nhwc(tm), **TOL)
  np.testing.assert_allclose(logvar, nhwc(tl), **TOL)
  np.testing.assert_allclose(zs, nhwc(tz), **TOL)
  np.testing.assert_allclose(dec, nhwc(td), **TOL)


@pytest.fixture(scope='module')
def loss_run(setup):
  cfg, ref, _, _, _, model = setup
  s1, s2 = mixed_samples()
  batch_np = build_batch(cfg, [[s2], [s1, s2]], seed=5)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  rng = jax.random.key(11)

  @jax.jit
  def run(batch, rng):
    out = model(batch, rng, ce_weight=0.25, mse_weight=1.0)
    h_u, h_g, target = model.forward(batch, rng)
    # the noise the model draws inside forward (same keys, same order)
    k_vae, k_t, k_eps = jax.random.split(rng, 3)
    x0 = model.encode_latent_tokens(batch['vae_images'], batch['latent_image'],
                                    batch['latent_patch'], k_vae)
    B, N = batch['vae_images'].shape[:2]
    t_img = jax.nn.sigmoid(jax.random.normal(k_t, (B, N), jnp.float32))
    t_tok = jnp.take_along_axis(t_img, batch['latent_image'], axis=1) * batch['latent_noised']
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    return out, h_u, h_g, target, x0, t_tok, eps, model.velocity(h_g)

  res = jax.tree.map(np.asarray, run(batch, rng))
  out, h_u, h_g, target, x0, t_tok, eps, pred = res
  np.testing.assert_allclose(target, eps - x0, rtol=1e-6, atol=1e-6)   # same noise as the model
  with torch.no_grad():
    t_loss, t_ce, t_mse, t_h, t_pred = ref.loss(batch_np, x0, t_tok, eps, ce_weight=0.25)
  return dict(batch=batch_np, out=out, h_u=h_u, h_g=h_g, pred=pred, t_loss=float(t_loss),
              t_ce=float(t_ce), t_mse=float(t_mse), t_h=[h.numpy() for h in t_h],
              t_pred=[p.numpy() for p in t_pred])


def test_mot_hidden_states(loss_run):
  """Both experts, token routing, the SPEC mask, per-expert final norms: every real token's
  final hidden state equals the torch transcription's."""
  b = loss_run['batch']
  for r in range(b['input_ids'].shape[0]):
    und, gen = b['und_idx'][r], b['gen_idx'][r]
    real_u = b['segment_ids'][r][und] > 0
    real_g = b['latent_mask'][r] > 0
    assert real_u.sum() > 10 and real_g.sum() >= 4
    np.testing.assert_allclose(loss_run['h_u'][r][real_u], loss_run['t_h'][r][und][real_u], **TOL)
    np.testing.assert_allclose(loss_run['h_g'][r][real_g], loss_run['t_h'][r][gen][real_g], **TOL)


def test_flow_head(loss_run):
  """llm2vae velocity at the latent tokens and the flow-matching MSE."""
  b = loss_run['batch']
  for r in range(b['input_ids'].shape[0]):
    real_g = b['latent_mask'][r] > 0
    np.testing.assert_allclose(loss_run['pred'][r][real_g], loss_run['t_pred'][r][real_g], **TOL)
  assert b['latent_noised'].sum() > 0
  np.testing.assert_allclose(float(loss_run['out'].mse), loss_run['t_mse'], **TOL)


def test_full_packed_loss(loss_run):
  """One full packed training loss (0.25 * CE + 1.0 * MSE) equals the torch reference."""
  out = loss_run['out']
  np.testing.assert_allclose(float(out.ce), loss_run['t_ce'], **TOL)
  np.testing.assert_allclose(float(out.loss), loss_run['t_loss'], **TOL)
  assert float(out.ce_tokens) == loss_run['batch']['loss_mask'].sum()
