"""Reproducibility API (issue 14): the flow sampler starts from a given initial noise, so a
reference's own draw can be replayed. Reference: the numpy Euler loop over velocities of the
whole-sequence reference forward (tests/helpers/infer_ref.py), started from the same noise."""

import numpy as np
import pytest

from tests.helpers.infer_ref import SPECIALS, reference_forward, tiny_model
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer import image as I


def test_sampler_starts_from_the_given_noise():
  model = tiny_model()[1]
  prompt = [40, 41, 42]
  grid = (1, 3)
  x0 = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
  s = I.FlowSettings(num_steps=3, shift=3.0, s_text=1.0, s_img=1.0)
  ctx = C.add_text(model, C.new_context(model, 1, 64), prompt, SPECIALS)
  got = I.generate_latents(model, ctx, SPECIALS, [grid], settings=s, noise=[x0])[0]
  x = x0.copy()
  ts, dts = I.timesteps(3, 3.0)
  for t, dt in zip(ts, dts):
    v = reference_forward(model, [('text', prompt), ('noise', x, grid, float(t))])['velocity'][-3:]
    x = x - v * dt
  np.testing.assert_allclose(got, x, atol=1e-4, rtol=1e-4)
  # a None entry keeps the row's seeded draw
  seeded = I.generate_latents(model, ctx, SPECIALS, [grid], settings=s, seeds=[7])[0]
  again = I.generate_latents(model, ctx, SPECIALS, [grid], settings=s, seeds=[7], noise=[None])[0]
  np.testing.assert_array_equal(seeded, again)
  assert not np.allclose(seeded, got)
  with pytest.raises(C.ContextError, match=r'initial noise has shape \(2, 64\)'):
    I.generate_latents(model, ctx, SPECIALS, [grid], settings=s, noise=[x0[:2]])
  with pytest.raises(C.ContextError, match='2 initial noises for a context of 1 rows'):
    I.generate_latents(model, ctx, SPECIALS, [grid], settings=s, noise=[x0, x0])
