"""Programs and tasks: the CFG context rule, and think mode (the generated plan joins the full
context before the image; the CFG contexts do not see it) checked against a manual run."""

import dataclasses

import numpy as np
import pytest

from tests.helpers.infer_ref import SPECIALS, StubTokenizer, tiny_model
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import tasks
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.runner import Item, Program, Runner, cfg_text_cut, run_programs


def test_cfg_text_cut():
  t, v = Item.text([1]), Item('vit', grid=(1, 1))
  assert cfg_text_cut([t]) == 0                  # text-to-image: the empty context
  assert cfg_text_cut([v, t]) == 1               # editing: the image without the instruction
  assert cfg_text_cut([t, v, t, t]) == 3         # before the LAST text item
  assert cfg_text_cut([t, v]) == 2               # an image after the last text: everything
  assert cfg_text_cut([v]) == 1


def test_think_mode_plan_joins_the_context():
  cfg, model = tiny_model()
  tok = StubTokenizer()
  runner = Runner(model, tok, cfg)
  fs = dataclasses.replace(I.TEXT_TO_IMAGE, num_steps=2)
  ts = T.TextSettings(max_new_tokens=3)
  res = tasks.text_to_image(model, tok, cfg, ['a lesion'], sizes=(32, 32), think=True,
                            flow_settings=fs, text_settings=ts, seeds=[4])[0]
  assert isinstance(res['plan'], str) and res['image'].shape == (32, 32, 3)
  # the same by hand: [system, prompt] -> plan (decoded into the context) -> image
  system, prompt = tok.encode(tasks.THINK_GEN_SYSTEM), tok.encode('a lesion')
  e = C.new_context(model, 1, 64)
  cfg_text = C.add_text(model, e, system, SPECIALS)
  full = C.add_text(model, cfg_text, prompt, SPECIALS)
  plan = T.generate_text(model, full, SPECIALS, ts, seeds=[4000])
  assert tok.decode(plan.tokens[0]) == res['plan']
  lat = I.generate_latents(model, plan.ctx, SPECIALS, [(2, 2)], cfg_text_ctx=cfg_text,
                           settings=fs, seeds=[4001])[0]
  np.testing.assert_array_equal(I.decode_latents(model, lat, (2, 2)), res['image'])
  # without the plan in the context the image differs
  lat2 = I.generate_latents(model, full, SPECIALS, [(2, 2)], cfg_text_ctx=cfg_text,
                            settings=fs, seeds=[4001])[0]
  assert not np.allclose(lat, lat2)


def test_program_batches_need_equal_steps():
  cfg, model = tiny_model()
  runner = Runner(model, StubTokenizer(), cfg)
  with pytest.raises(ValueError, match='same steps'):
    run_programs(runner, [Program([Item.text([10])], ['text']),
                          Program([Item.text([10])], [('image', (1, 1))])])
