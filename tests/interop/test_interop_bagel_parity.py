"""Import parity against PyTorch: a BAGEL-layout torch module (tests/helpers/bagel_torch_ref.py:
MoT decoder transcription + transformers' SiglipVisionModel + FLUX autoencoder transcription) ->
its state_dict() -> `import_state_dict` -> our UniMedVL; then the ViT, the VAE, the MoT hidden
states, the flow head and one full packed training loss agree in fp32 within 1e-4."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers.bagel_torch_ref import BagelRef, FluxAE
from tests.helpers.model_packs import build_batch, mixed_samples
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.import_stream import import_state_dict
from unimedvl_jax.data.images import patchify_image

TINY = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')
OVERRIDES = ['data.batch_size=2', 'data.seq_len=96', 'data.max_latent_tokens=16',
             'data.max_vit_patches=32', 'data.max_vae_images=3', 'data.vae_buckets=((32, 32, 3),)',
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

  # a given draw (e.g. the reference's own): AutoEncoder.encode(x, noise=...)
  given = rng.standard_normal((2, 4, 6, cfg.model.vae.z_channels)).astype(np.float32)

  @jax.jit
  def run(x, z, given):
    mean, logvar = model.vae.encode_moments(x)
    return mean, logvar, model.vae.encode(x, noise=given), model.vae.decode(z)

  z = rng.standard_normal((2, 4, 6, cfg.model.vae.z_channels)).astype(np.float32)
  mean, logvar, zg, dec = (np.asarray(a) for a in run(jnp.asarray(x), jnp.asarray(z),
                                                      jnp.asarray(given)))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    tm, tl = ae.moments(nchw(x))
    tg = ae.scale_factor * (tm + torch.exp(0.5 * tl) * nchw(given) - ae.shift_factor)
    td = ae.decode(nchw(z))
  np.testing.assert_allclose(mean, nhwc(tm), **TOL)
  np.testing.assert_allclose(logvar, nhwc(tl), **TOL)
  np.testing.assert_allclose(zg, nhwc(tg), **TOL)
  np.testing.assert_allclose(dec, nhwc(td), **TOL)
  with pytest.raises(ValueError, match='noise has shape'):
    model.vae.encode(jnp.asarray(x), noise=jnp.asarray(given[:, :3]))
  # without given noise, encode draws N(0, 1) from rng (the moments stubbed: no second compile)
  from types import SimpleNamespace
  from unimedvl_jax.model.vae import AutoEncoder
  stub = SimpleNamespace(encode_moments=lambda _: (jnp.asarray(mean), jnp.asarray(logvar)),
                         scale_factor=ae.scale_factor, shift_factor=ae.shift_factor)
  zs = np.asarray(AutoEncoder.encode(stub, None, key))
  noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  np.testing.assert_allclose(zs, nhwc(ae.scale_factor * (tm + torch.exp(0.5 * tl) * nchw(noise)
                                                         - ae.shift_factor)), **TOL)


def test_odd_size_latents_crop_like_the_reference(setup):
  """A 24x40 image (multiples of 8, not of 16) has a 3x5 latent: BAGEL keeps
  `latent[:, :h*p, :w*p]` with (h, w) = (24 // 16, 40 // 16) and patchifies it with
  einsum('chpwq->hwpqc'); `encode_vae_tokens` gives the same tokens (posterior mean)."""
  from unimedvl_jax.infer.context import ContextError, encode_vae_tokens
  cfg, _, ae, _, _, model = setup
  x = np.random.default_rng(8).uniform(-1, 1, (24, 40, 3)).astype(np.float32)
  tok, grid = encode_vae_tokens(model, x)
  assert grid == (1, 2)
  p, c = cfg.model.latent_patch_size, cfg.model.vae.z_channels
  with torch.no_grad():
    mean, _ = ae.moments(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
    lat = ae.scale_factor * (mean[0] - ae.shift_factor)                  # [C, 3, 5]
    assert tuple(lat.shape[1:]) == (3, 5)
    h, w = 24 // 16, 40 // 16
    lat = lat[:, :h * p, :w * p].reshape(c, h, p, w, p)
    want = torch.einsum('chpwq->hwpqc', lat).reshape(-1, p * p * c).numpy()
  np.testing.assert_allclose(tok, want, **TOL)
  with pytest.raises(ContextError, match='multiples of 8'):
    encode_vae_tokens(model, x[:20])


def _np_patchify(z, p=2):
  """[h, w, C] latent -> [(h/p)*(w/p), p*p*C] tokens, (patch row, patch col, channel) order."""
  h, w, c = z.shape
  return z.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * c)


@pytest.fixture(scope='module')
def loss_run(setup):
  """The full packed loss with given noise and timesteps (the reproducibility API): the torch
  side encodes every VAE image of the batch at its own size with the FLUX transcription, samples
  its latent tokens with the same noise, and runs the MoT reference on them."""
  cfg, ref, ae, _, _, model = setup
  s1, s2 = mixed_samples()
  batch_np = build_batch(cfg, [[s2], [s1, s2]], seed=5)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  B, L = batch_np['latent_mask'].shape
  N = batch_np['vae_image_noised'].shape[1]
  D = cfg.model.latent_patch_size ** 2 * cfg.model.vae.z_channels
  rng = np.random.default_rng(11)
  noise = {'vae': rng.standard_normal((B, L, D)).astype(np.float32),
           'flow': rng.standard_normal((B, L, D)).astype(np.float32)}
  ts = rng.standard_normal((B, N)).astype(np.float32)

  @jax.jit
  def run(batch, noise, ts):
    key = jax.random.key(0)   # unused: every draw is given
    out = model(batch, key, ce_weight=0.25, mse_weight=1.0, noise=noise, timesteps=ts)
    h_u, h_g, target = model.forward(batch, key, noise=noise, timesteps=ts)
    return out, h_u, h_g, target, model.velocity(h_g)

  out, h_u, h_g, target, pred = jax.tree.map(np.asarray, run(batch, noise, ts))
  # torch: x0 per token from the image's own-size encoding
  x0 = np.zeros((B, L, D), np.float32)
  rows = 0
  with torch.no_grad():
    for r in range(B):
      src = batch_np['latent_src'][r]
      img = batch_np['vae_32x32'][r]          # the one bucket of this config
      tok_per = (32 // 16) ** 2
      for slot in range(img.shape[0]):
        if batch_np['vae_32x32_image'][r, slot] < 0:
          continue
        x = (img[slot].astype(np.float32) / 255.0 - 0.5) / 0.5
        tm, tl = ae.moments(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
        mt = _np_patchify(tm[0].numpy().transpose(1, 2, 0))
        lt = _np_patchify(tl[0].numpy().transpose(1, 2, 0))
        for q in np.flatnonzero((src // tok_per == slot) & (batch_np['latent_mask'][r] > 0)):
          k = src[q] % tok_per
          z = mt[k] + np.exp(0.5 * lt[k]) * noise['vae'][r, q]
          x0[r, q] = ae.scale_factor * (z - ae.shift_factor)
          rows += 1
  assert rows == int(batch_np['latent_mask'].sum()) > 0
  t_img = 1.0 / (1.0 + np.exp(-ts.astype(np.float64)))
  t_tok = (np.take_along_axis(t_img, batch_np['latent_image'], 1)
           * batch_np['latent_noised']).astype(np.float32)
  eps = noise['flow']
  real = batch_np['latent_mask'][..., None] > 0
  np.testing.assert_allclose(np.where(real, target, 0), np.where(real, eps - x0, 0), **TOL)
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
