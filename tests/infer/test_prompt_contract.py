"""One tokenisation contract for training and inference: the prefill of an inference prompt
(tasks.py's programs, laid out by runner.prompt_builders through BlockBuilder.layout) has the
token ids, token kinds, positions and split ids of training's `plans.tokenize` of the same
sample truncated before its first loss item (the answer / the reply and target image), for a
VQA and an editing sample of the embedded synthetic dataset; and a decoded answer continues the
context exactly as the training layout of the sample with that answer."""

import numpy as np
import pytest

from tests.helpers.infer_ref import SPECIALS, StubTokenizer, tiny_model
from unimedvl_jax.batch import Geometry
from unimedvl_jax.data import images as imlib
from unimedvl_jax.data import plans
from unimedvl_jax.data.jsonl import iter_records
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer import tasks
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.runner import Runner, prompt_builders

FIELDS = ('input_ids', 'token_type', 'positions', 'split', 'modes')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  from unimedvl_jax.data import synthetic
  d = str(tmp_path_factory.mktemp('syn'))
  synthetic.generate(d, seed=0, size=32, n_subjects=4, include_real=False, vocab_size=600)
  cfg, model = tiny_model()
  tok = StubTokenizer()
  samples = {g: next(iter_records(f'{d}/train/{g}.jsonl', d)) for g in ('vqa', 'edit')}
  return cfg, model, tok, Runner(model, tok, cfg), samples


def _training_prompt(sample, tok, cfg):
  """plans.tokenize of the whole training sample, truncated before its first loss item."""
  geom = Geometry.from_config(cfg)
  items = plans.materialize(plans.plan_sample(sample), tok, geom, sample, for_training=False)
  first = next(i for i, it in enumerate(items) if it.loss)
  ts = plans.tokenize(items, SPECIALS, geom)
  n = int(np.flatnonzero(ts.split == first)[0])   # no dropout: split j is item j
  return {f: getattr(ts, f)[:n] for f in FIELDS}, items, first


def _assert_tokens_equal(actual, expected):
  for f in FIELDS:
    np.testing.assert_array_equal(actual[f], expected[f], err_msg=f)


def _image(ref):
  return imlib.load_image(ref.path, **ref.load_kwargs())


def test_vqa_prefill_equals_training_tokenize(setup):
  cfg, model, tok, runner, samples = setup
  s = samples['vqa']
  human = s.message[0].text
  head, tail = f'{plans.IMAGE_PLACEHOLDER}\n', f'\n{tasks.VQA_SUFFIX}'
  assert human.startswith(head) and human.endswith(tail)
  question = human[len(head):-len(tail)]
  assert tasks.vqa_prompt(question) == human        # the prompt the training data holds
  prog = tasks.understanding_program(runner, _image(s.input_img[0]), tasks.vqa_prompt(question))
  assert prog.steps == ['text']
  expected, items, first = _training_prompt(s, tok, cfg)
  assert [it.kind for it in items[:first]] == ['vit', 'text']
  b = prompt_builders(runner, [prog])['full']
  _assert_tokens_equal(b.tokens(0), expected)
  assert expected['input_ids'][0] == SPECIALS.vision_start     # the markers are in the contract

  # the decoded answer continues the context as the training layout of (prompt, answer)
  ctx = C.prefill(model, C.new_context(model, 1, 128), b)
  res = T.generate_text(model, ctx, SPECIALS, T.TextSettings(max_new_tokens=3), seeds=[0])
  answer = plans.PlanItem('text', ids=np.asarray(res.tokens[0], np.int32), loss=True)
  ts = plans.tokenize(items[:first] + [answer], SPECIALS, Geometry.from_config(cfg))
  n = ts.n_tokens
  assert int(res.ctx.length[0]) == n
  np.testing.assert_array_equal(np.asarray(res.ctx.split)[0, :n], ts.split)
  np.testing.assert_array_equal(np.asarray(res.ctx.mode)[0, :n], ts.modes)
  assert int(res.ctx.pos[0]) == int(ts.positions[-1]) + 1
  assert int(res.ctx.num_splits[0]) == ts.n_splits


def test_editing_prefill_equals_training_tokenize(setup):
  cfg, model, tok, runner, samples = setup
  s = samples['edit']
  target = _image(s.output_img[0])
  prog = tasks.edit_program(runner, _image(s.input_img[0]), s.message[0].text,
                            size=target.shape[:2], reply_first=True)
  expected, items, first = _training_prompt(s, tok, cfg)
  assert [it.kind for it in items[:first]] == ['vae', 'vit', 'text']
  assert items[first].kind == 'text' and items[first + 1].noised   # reply, then the target
  assert prog.steps == ['text', ('image', items[first + 1].grid)]
  # the whole prompt in one block
  _assert_tokens_equal(prompt_builders(runner, [prog])['full'].tokens(0), expected)
  # the CFG prefill: cfg_text then the rest continuing it (positions and splits from its counters)
  bs = prompt_builders(runner, [prog], cfg=True)
  a, rest = bs['cfg_text'].tokens(0), bs['rest'].tokens(0)
  assert a['input_ids'].size and rest['input_ids'].size
  row = bs['cfg_text'].rows[0]
  joined = {f: np.concatenate([a[f], rest[f] + {'positions': row.pos_adv,
                                                'split': row.n_splits}.get(f, 0)])
            for f in FIELDS}
  _assert_tokens_equal(joined, expected)
  # cfg_img: the prompt's text items alone, laid out by training's tokenize
  text_only = [it for it in items[:first] if it.kind == 'text']
  ts = plans.tokenize(text_only, SPECIALS, Geometry.from_config(cfg))
  _assert_tokens_equal(bs['cfg_img'].tokens(0), {f: getattr(ts, f) for f in FIELDS})
