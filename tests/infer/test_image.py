"""The flow sampler: CFG combination + renorm against a numpy transcription of SPEC 7, the Euler
loop with three contexts against a loop over full-sequence reference forwards, and a batch of two
requests equal to two single requests with the same seeds."""

import numpy as np
import pytest
import jax.numpy as jnp

from tests.helpers.infer_ref import SPECIALS, reference_forward, tiny_model
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer import image as I


# ------------------------------------------------------------------ numpy transcription of SPEC 7

def np_norm(x, axis):
  return np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=axis, keepdims=True))


def np_guidance(v, v_txt, v_img, s_text, s_img, renorm, renorm_min):
  """ONE image [n, C]. SPEC 7 literally (with BAGEL's +1e-8 in the norm ratio)."""
  if renorm == 'text_channel':
    vp = v_txt + s_text * (v - v_txt)
    if s_text > 1:
      vp = vp * np.clip(np_norm(v, -1) / (np_norm(vp, -1) + 1e-8), renorm_min, 1.0)
    if s_img > 1:
      vp = v_img + s_img * (vp - v_img)
    return vp
  vp = v_txt + s_text * (v - v_txt)
  if s_img > 1:
    vp = v_img + s_img * (vp - v_img)
  if s_text <= 1 and s_img <= 1:
    return v
  axis = None if renorm == 'global' else -1
  return vp * np.clip(np_norm(v, axis) / (np_norm(vp, axis) + 1e-8), renorm_min, 1.0)


@pytest.mark.parametrize('renorm', ['global', 'channel', 'text_channel'])
@pytest.mark.parametrize('s_text,s_img,renorm_min', [(4.0, 1.0, 0.0), (4.0, 2.0, 0.0),
                                                     (3.0, 1.5, 0.5), (1.0, 2.0, 0.0)])
def test_cfg_combine_matches_numpy(renorm, s_text, s_img, renorm_min):
  rs = np.random.RandomState(0)
  B, n, Cc = 2, 6, 64
  v, v_txt, v_img = (rs.normal(size=(B, n, Cc)).astype(np.float32) for _ in range(3))
  v_txt = v + 0.5 * v_txt          # guidance deltas of moderate size
  lengths = [6, 4]                 # row 1 has two padding tokens
  mask = np.zeros((B, n), np.float32)
  for b, l in enumerate(lengths):
    mask[b, :l] = 1
    v[b, l:] = 100.0               # padding must not leak into the global norm
  got = np.asarray(I.cfg_combine(jnp.asarray(v), jnp.asarray(v_txt), jnp.asarray(v_img),
                                 jnp.asarray(mask), s_text=s_text, s_img=s_img, renorm=renorm,
                                 renorm_min=renorm_min))
  for b, l in enumerate(lengths):
    want = np_guidance(v[b, :l], v_txt[b, :l], v_img[b, :l], s_text, s_img, renorm, renorm_min)
    np.testing.assert_allclose(got[b, :l], want, rtol=2e-5, atol=2e-5)


def test_timesteps_shifted_linspace():
  t, dt = I.timesteps(5, 3.0)
  base = np.linspace(1, 0, 5)
  full = 3 * base / (1 + 2 * base)
  np.testing.assert_allclose(t, full[:-1], rtol=1e-6)
  np.testing.assert_allclose(dt, full[:-1] - full[1:], rtol=1e-6)
  assert len(t) == 4 and abs(dt.sum() - 1.0) < 1e-6


# -------------------------------------------------------------------- the sampler end to end

@pytest.fixture(scope='module')
def model():
  return tiny_model()[1]


def _patch(model):
  return int(round((model.vit.embeddings.patch_embedding.kernel.shape[0] // 3) ** 0.5))


def test_sampler_matches_reference_loop(model):
  """Editing-like request: full = [VAE img, ViT img, instruction]; cfg_text = [VAE img, ViT img];
  cfg_img = [instruction]. 3 timesteps (2 model calls); the interval (0.8, 1] makes the first
  step guided (3 contexts) and the second plain. Reference: numpy Euler over velocities from the
  whole-sequence reference forward with the noised image appended."""
  rs = np.random.RandomState(1)
  img = rs.uniform(-1, 1, (16, 32, 3)).astype(np.float32)
  tok, g_in = C.encode_vae_tokens(model, img)
  p, g_vit = C.vit_patches(img, _patch(model))
  instr = [30, 31, 32, 33]
  e = C.new_context(model, 1, 64)
  cfg_text = C.add_image(model, e, SPECIALS, vit=img, vae_tokens=(tok, g_in))
  full = C.add_text(model, cfg_text, instr, SPECIALS)
  cfg_img = C.add_text(model, e, instr, SPECIALS)
  s = I.FlowSettings(num_steps=3, shift=3.0, s_text=4.0, s_img=2.0, interval=(0.8, 1.0),
                     renorm='text_channel', renorm_min=0.0)
  grid = (2, 3)
  got = I.generate_latents(model, full, SPECIALS, [grid], cfg_text_ctx=cfg_text,
                           cfg_img_ctx=cfg_img, settings=s, seeds=[11])[0]

  items_full = [('vae', tok, g_in), ('vit', p, g_vit), ('text', instr)]
  items_txt = items_full[:2]
  items_img = [('text', instr)]
  x = I.initial_noise(11, 6)
  ts, dts = I.timesteps(3, 3.0)
  for t, dt in zip(ts, dts):
    vel = lambda items: reference_forward(
        model, items + [('noise', x, grid, float(t))])['velocity'][-6:]
    v = vel(items_full)
    if 0.8 < t <= 1.0:
      v = np_guidance(v, vel(items_txt), vel(items_img), 4.0, 2.0, 'text_channel', 0.0)
    x = x - v * dt
  np.testing.assert_allclose(got, x, atol=1e-4, rtol=1e-4)


def test_batched_cfg_velocity_equals_per_context_and_reference(model):
  """One guided flow step with the three contexts (full, cfg_text, cfg_img) of different lengths,
  two rows of different image sizes: the batched model call (the sampler's default), one call
  per context, and the numpy guidance over whole-sequence reference velocities agree."""
  rs = np.random.RandomState(2)
  img = rs.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
  tok, g_in = C.encode_vae_tokens(model, img)
  instr = [[30, 31, 32], [40, 41, 42, 43, 44]]
  e = C.new_context(model, 2, 64)
  cfg_text = C.add_image(model, e, SPECIALS, vae_tokens=[(tok, g_in), None])
  full = C.add_text(model, cfg_text, instr, SPECIALS)
  cfg_img = C.add_text(model, e, instr, SPECIALS)
  s = I.FlowSettings(num_steps=3, s_text=3.0, s_img=1.5, interval=(0.0, 1.0), renorm='global')
  grids = [(2, 2), (1, 3)]
  x = [rs.normal(size=(4, 64)).astype(np.float32), rs.normal(size=(3, 64)).astype(np.float32)]
  t = 0.7
  kw = dict(cfg_text_ctx=cfg_text, cfg_img_ctx=cfg_img, settings=s)
  batched = I.step_velocity(model, full, SPECIALS, grids, x, t, cfg_batched=True, **kw)
  single = I.step_velocity(model, full, SPECIALS, grids, x, t, cfg_batched=False, **kw)
  items = [[('vae', tok, g_in), ('text', instr[0])], [('text', instr[1])]]
  for r in range(2):
    np.testing.assert_allclose(batched[r], single[r], atol=2e-5, rtol=2e-5)
    n = grids[r][0] * grids[r][1]
    vel = lambda its: reference_forward(model, its + [('noise', x[r], grids[r], t)])['velocity'][-n:]
    v_full = vel(items[r])
    v_txt = vel(items[r][:-1])
    v_img = vel([it for it in items[r] if it[0] == 'text'])
    want = np_guidance(v_full, v_txt, v_img, 3.0, 1.5, 'global', 0.0)
    np.testing.assert_allclose(batched[r], want, atol=1e-4, rtol=1e-4)


def test_given_noise_equals_seeded_noise(model):
  s = I.FlowSettings(num_steps=3, s_text=1.0, s_img=1.0)
  e = C.new_context(model, 1, 64)
  ctx = C.add_text(model, e, [40, 41], SPECIALS)
  seeded = I.generate_latents(model, ctx, SPECIALS, [(1, 2)], settings=s, seeds=[9])[0]
  given = I.generate_latents(model, ctx, SPECIALS, [(1, 2)], settings=s,
                             noise=[I.initial_noise(9, 2)])[0]
  np.testing.assert_array_equal(seeded, given)
  other = I.generate_latents(model, ctx, SPECIALS, [(1, 2)], settings=s,
                             noise=[I.initial_noise(10, 2)])[0]
  assert not np.allclose(seeded, other)
  with pytest.raises(C.ContextError, match='initial noise'):
    I.generate_latents(model, ctx, SPECIALS, [(1, 2)], settings=s, noise=[np.zeros((3, 64))])


def test_batch_of_two_equals_two_singles(model):
  """Text-to-image with global renorm: two requests of different prompt lengths and image sizes
  batched vs alone, same seeds -> the same latents; decoded to uint8 images of the right size."""
  s = I.FlowSettings(num_steps=3, s_text=4.0, s_img=1.0, interval=(0.4, 1.0), renorm='global')
  prompts = [[40, 41, 42], [50, 51, 52, 53, 54, 55]]
  grids = [(2, 2), (1, 3)]
  e2 = C.new_context(model, 2, 64)
  both = I.generate_latents(model, C.add_text(model, e2, prompts, SPECIALS), SPECIALS, grids,
                            cfg_text_ctx=e2, settings=s, seeds=[5, 6])
  e1 = C.new_context(model, 1, 64)
  for b in range(2):
    one = I.generate_latents(model, C.add_text(model, e1, prompts[b], SPECIALS), SPECIALS,
                             [grids[b]], cfg_text_ctx=e1, settings=s, seeds=[5 + b])[0]
    assert one.shape == (grids[b][0] * grids[b][1], 64)
    np.testing.assert_allclose(both[b], one, atol=2e-5, rtol=2e-5)
  assert not np.allclose(both[0][:3], both[1][:3])
  img = I.decode_latents(model, both[1], grids[1])
  assert img.shape == (16, 48, 3) and img.dtype == np.uint8


def test_sampler_errors(model):
  e = C.new_context(model, 1, 64)
  with pytest.raises(C.ContextError, match='cfg_text_ctx'):
    I.generate_latents(model, e, SPECIALS, [(1, 1)], settings=I.FlowSettings(num_steps=2))
  with pytest.raises(C.ContextError, match='max_latent_size'):
    I.generate_latents(model, e, SPECIALS, [(9, 1)], cfg_text_ctx=e,
                       settings=I.FlowSettings(num_steps=2))
  with pytest.raises(ValueError, match='renorm'):
    I.FlowSettings(renorm='nope')
