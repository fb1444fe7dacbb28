"""Sequence plans per task family and their token arrays, against hand-written expectations
(SPEC section 3 and section 6 "Task plans")."""

import dataclasses

import numpy as np
import pytest

from unimedvl_jax.data.jsonl import ImageRef, Sample, SampleError, Turn
from unimedvl_jax.data.plans import (Geometry, PlanItem, Specials, plan_sample, task_family,
                                     tokenize)

SP = Specials(im_start=100, im_end=101, vision_start=102, vision_end=103)
# vit patch 2 (K = 12), vit grid 4; 16 px per latent token; latent position table 3 wide
GEOM = Geometry(T=64, L=16, P=16, N=4, vit_patch=2, vit_grid=4, latent_px=16, max_latent_size=3,
                buckets=((16, 16, 2), (32, 32, 2)))


def _sample(message, inp=(), out=(), sub=''):
  return Sample(file='f.jsonl', line=7, main_task_type='', sub_task_type=sub, dataset='d',
                input_img=tuple(ImageRef(p) for p in inp),
                output_img=tuple(ImageRef(p) for p in out),
                message=tuple(Turn(r, t) for r, t in message), meta={})


def _desc(items):
  return [(it.describe(), it.text if it.kind == 'text' else it.image.path) for it in items]


# ---------------------------------------------------------------------------------------------
# plans


def test_plan_vqa_splits_human_text_at_image():
  s = _sample([('human', '<image>\nWhat organ is shown?'), ('gpt', 'Liver')], inp=['a.png'])
  assert task_family(s) == 'understanding'
  assert _desc(plan_sample(s)) == [('vit[]', 'a.png'), ('text[]', 'What organ is shown?'),
                                   ('text[L]', 'Liver')]


def test_plan_two_images_in_the_middle_and_multi_turn():
  s = _sample([('human', 'Compare <image> with <image>.'), ('gpt', 'Same.'),
               ('human', 'Sure?'), ('gpt', 'Yes.')], inp=['a.png', 'b.png'])
  assert _desc(plan_sample(s)) == [
      ('text[]', 'Compare'), ('vit[]', 'a.png'), ('text[]', 'with'), ('vit[]', 'b.png'),
      ('text[]', '.'), ('text[L]', 'Same.'), ('text[]', 'Sure?'), ('text[L]', 'Yes.')]


def test_plan_images_without_placeholder_go_first():
  s = _sample([('human', 'Write the report.'), ('gpt', 'No acute findings.')], inp=['x.png'])
  assert _desc(plan_sample(s)) == [('vit[]', 'x.png'), ('text[]', 'Write the report.'),
                                   ('text[L]', 'No acute findings.')]


def test_plan_text_to_image():
  s = _sample([('human', 'A chest X-ray with pneumonia.'), ('gpt', 'Plan: opacity, right.')],
              out=['t.png'])
  assert task_family(s) == 'text_to_image'
  assert _desc(plan_sample(s)) == [('text[C]', 'A chest X-ray with pneumonia.'),
                                   ('text[L]', 'Plan: opacity, right.'), ('vae[LN]', 't.png')]
  s2 = _sample([('human', 'An OCT scan.')], out=['t.png'])
  assert _desc(plan_sample(s2)) == [('text[C]', 'An OCT scan.'), ('vae[LN]', 't.png')]


@pytest.mark.parametrize('sub', ['segmentation', 'super_resolution', 'modality_translation',
                                 'virtual_staining'])
def test_plan_editing_family(sub):
  s = _sample([('human', '<image>\nPlease segment the lesion.'), ('gpt', 'Here it is.')],
              inp=['in.png'], out=['out.png'], sub=sub)
  assert task_family(s) == 'editing'
  assert _desc(plan_sample(s)) == [('vae[C]', 'in.png'), ('vit[C]', 'in.png'),
                                   ('text[C]', 'Please segment the lesion.'),
                                   ('text[L]', 'Here it is.'), ('vae[LN]', 'out.png')]
  s2 = _sample([('human', '<image>\nUpscale 4x.')], inp=['in.png'], out=['out.png'], sub=sub)
  assert _desc(plan_sample(s2)) == [('vae[C]', 'in.png'), ('vit[C]', 'in.png'),
                                    ('text[C]', 'Upscale 4x.'), ('vae[LN]', 'out.png')]


def test_plan_counterfactual_explanation_after_target():
  s = _sample([('human', '<image>\nWhat would this chest X-ray look like without pneumonia?'),
               ('gpt', 'The opacity resolves.')], inp=['in.png'], out=['cf.png'],
              sub='counterfactual')
  assert task_family(s) == 'counterfactual'
  assert _desc(plan_sample(s)) == [
      ('vae[C]', 'in.png'), ('vit[C]', 'in.png'),
      ('text[C]', 'What would this chest X-ray look like without pneumonia?'),
      ('vae[LN]', 'cf.png'), ('text[L]', 'The opacity resolves.')]


def test_plan_errors():
  with pytest.raises(SampleError) as e:
    plan_sample(_sample([('human', '<image> <image> hi'), ('gpt', 'x')], inp=['a.png']))
  assert e.value.reason == 'missing_fields' and e.value.loc == 'f.jsonl:7'
  assert '2 <image> placeholder(s) but input_img has 1' in str(e.value)
  with pytest.raises(SampleError, match='nothing to learn'):
    plan_sample(_sample([('human', 'hello')]))


# ---------------------------------------------------------------------------------------------
# tokens: hand-written expected arrays


def _text(ids, loss=False, cfg=False):
  return PlanItem('text', loss=loss, enable_cfg=cfg, ids=np.array(ids, np.int32))


def _vit(nh, nw, cfg=False):
  return PlanItem('vit', enable_cfg=cfg, grid=(nh, nw),
                  patches=(np.arange(nh * nw * 12) % 256).astype(np.uint8).reshape(nh * nw, 12))


def _vae(gh, gw, noised=False, cfg=False):
  return PlanItem('vae', enable_cfg=cfg, noised=noised, loss=noised, grid=(gh, gw),
                  pixels=np.full((16 * gh, 16 * gw, 3), 128, np.uint8))


def _arrays(ts):
  return dict(ids=ts.input_ids.tolist(), pos=ts.positions.tolist(), split=ts.split.tolist(),
              mode=ts.modes.tolist(), tt=ts.token_type.tolist(), lab=ts.label_ids.tolist(),
              mask=ts.loss_mask.tolist())


def test_tokens_vqa():
  ts = tokenize([_vit(1, 2), _text([5, 6]), _text([7], loss=True)], SP, GEOM)
  assert _arrays(ts) == dict(
      ids=[102, 0, 0, 103, 100, 5, 6, 101, 100, 7, 101],
      pos=[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7],
      split=[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2],
      mode=[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
      tt=[1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1],
      lab=[0, 0, 0, 0, 0, 0, 0, 0, 7, 101, 0],
      mask=[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
  (patches, pos_ids, tok), = ts.vit
  assert pos_ids.tolist() == [0, 1] and tok.tolist() == [1, 2] and patches.shape == (2, 12)
  assert (ts.n_tokens, ts.n_und, ts.n_lat, ts.n_patches, ts.n_vae) == (11, 11, 0, 2, 0)


def test_tokens_vit_grid_positions():
  ts = tokenize([_vit(2, 3), _text([9], loss=True)], SP, GEOM)
  assert ts.vit[0][1].tolist() == [0, 1, 2, 4, 5, 6]     # row * vit_grid(4) + col
  assert ts.n_tokens == 2 * 3 + 2 + 3


def test_tokens_text_to_image():
  ts = tokenize([_text([5], cfg=True), _text([6], loss=True), _vae(2, 2, noised=True)], SP, GEOM)
  assert _arrays(ts) == dict(
      ids=[100, 5, 101, 100, 6, 101, 102, 0, 0, 0, 0, 103],
      pos=[0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6],
      split=[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2],
      mode=[0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2],
      tt=[1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 1],
      lab=[0, 0, 0, 6, 101, 0, 0, 0, 0, 0, 0, 0],
      mask=[0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  v, = ts.vae
  assert v.noised and v.pixels.shape == (32, 32, 3) and v.pixels.dtype == np.uint8
  assert v.size == (32, 32) and v.moments is None
  assert v.tok.tolist() == [7, 8, 9, 10]
  assert v.lpos.tolist() == [0, 1, 3, 4]        # row * max_latent_size(3) + col
  assert (ts.n_tokens, ts.n_und, ts.n_lat, ts.n_vae) == (12, 8, 4, 1)


def test_tokens_editing():
  items = [_vae(2, 2, cfg=True), _vit(1, 1, cfg=True), _text([5], cfg=True),
           _text([6], loss=True), _vae(2, 2, noised=True)]
  ts = tokenize(items, SP, GEOM)
  assert _arrays(ts) == dict(
      ids=[102, 0, 0, 0, 0, 103, 102, 0, 103, 100, 5, 101, 100, 6, 101,
           102, 0, 0, 0, 0, 103],
      pos=[0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8],
      split=[0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4],
      mode=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2],
      tt=[1, 3, 3, 3, 3, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 1],
      lab=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 101, 0, 0, 0, 0, 0, 0, 0],
      mask=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  assert [v.noised for v in ts.vae] == [False, True]
  assert ts.vae[0].tok.tolist() == [1, 2, 3, 4] and ts.vae[1].tok.tolist() == [16, 17, 18, 19]
  assert ts.vit[0][2].tolist() == [7]


def test_tokens_counterfactual_text_after_noised_target_keeps_position():
  items = [_vae(1, 1, cfg=True), _vit(1, 1, cfg=True), _text([5], cfg=True),
           _vae(1, 1, noised=True), _text([6, 7], loss=True)]
  ts = tokenize(items, SP, GEOM)
  assert _arrays(ts) == dict(
      ids=[102, 0, 103, 102, 0, 103, 100, 5, 101, 102, 0, 103, 100, 6, 7, 101],
      pos=[0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 5, 5, 5, 6, 7, 8],
      split=[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4],
      mode=[1, 1, 1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0],
      tt=[1, 3, 1, 1, 2, 1, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1],
      lab=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 7, 101, 0],
      mask=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0])


class _FixedRng:
  """rng.random() returns the given values in order."""

  def __init__(self, values):
    self.values = list(values)

  def random(self):
    return self.values.pop(0)


def test_cfg_dropout_image_advances_text_does_not():
  items = [_vae(2, 2, cfg=True), _vit(1, 1, cfg=True), _text([5], cfg=True),
           _text([6], loss=True), _vae(2, 2, noised=True)]
  # one draw per enable_cfg item: vae (dropped), vit (kept), text (dropped)
  ts = tokenize(items, SP, GEOM, _FixedRng([0.1, 0.9, 0.1]), dropout=(0.5, 0.5, 0.5))
  assert _arrays(ts) == dict(
      ids=[102, 0, 103, 100, 6, 101, 102, 0, 0, 0, 0, 103],
      pos=[1, 1, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5],
      split=[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2],
      mode=[1, 1, 1, 0, 0, 0, 2, 2, 2, 2, 2, 2],
      tt=[1, 2, 1, 1, 1, 1, 1, 3, 3, 3, 3, 1],
      lab=[0, 0, 0, 6, 101, 0, 0, 0, 0, 0, 0, 0],
      mask=[0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  assert len(ts.vae) == 1 and ts.vae[0].noised


def test_cfg_dropout_is_seeded_and_per_kind():
  items = [_text([5], cfg=True), _text([6], loss=True), _vae(1, 1, noised=True)]
  runs = [tokenize(items, SP, GEOM, np.random.default_rng(s), (0.5, 0.0, 0.0)).n_tokens
          for s in range(40)]
  again = [tokenize(items, SP, GEOM, np.random.default_rng(s), (0.5, 0.0, 0.0)).n_tokens
           for s in range(40)]
  assert runs == again and set(runs) == {6, 9}
  # probability 0 never drops, items without enable_cfg are never dropped
  assert tokenize(items, SP, GEOM, np.random.default_rng(0), (0.0, 1.0, 1.0)).n_tokens == 9
  assert tokenize(items[1:], SP, GEOM, np.random.default_rng(0), (1.0, 1.0, 1.0)).n_tokens == 6


def test_budget_problem():
  g = Geometry(T=16, L=4, P=4, N=1, vit_patch=2, vit_grid=4, latent_px=16, C=9,
               max_latent_size=2, max_sample_tokens=12, buckets=((16, 16, 1),))
  assert tokenize([_text([1] * 8, loss=True)], SP, g).budget_problem(g) is None   # 10 tokens
  assert 'max_sample_tokens' in tokenize([_text([1] * 11, loss=True)], SP, g).budget_problem(g)
  assert 'VAE images' in tokenize([_vae(1, 1), _vae(1, 1, noised=True)], SP, g).budget_problem(g)
  assert 'ViT patches' in tokenize([_vit(1, 5), _text([1], loss=True)], SP, g).budget_problem(g)
  assert 'CE targets' in tokenize([_text([1] * 9, loss=True)], SP, g).budget_problem(g)  # 10 > 9
  assert 'data.vae_buckets' in tokenize([_vae(1, 2, noised=True)], SP, g).budget_problem(g)
  g2 = dataclasses.replace(g, N=2)
  assert '1 slots' in tokenize([_vae(1, 1), _vae(1, 1, noised=True)], SP, g2).budget_problem(g2)


def test_materialize_real_images_token_counts(tmp_path, tokenizer):
  """ViT image: (H/p)*(W/p) + 2 tokens; VAE image: (H/16)*(W/16) + 2 (tiny size rules)."""
  from PIL import Image
  from unimedvl_jax.data.plans import materialize
  Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(tmp_path / 'in.png')
  Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(tmp_path / 'out.png')
  g = Geometry(T=512, L=128, P=256, N=8, vit_patch=8, vit_grid=8, latent_px=16,
               max_latent_size=4, vit_max_size=64, vit_min_size=32, vae_max_size=64,
               vae_min_size=32, buckets=((48, 64, 2), (64, 64, 2)))
  s = Sample('f.jsonl', 3, '', 'segmentation', '', (ImageRef(str(tmp_path / 'in.png')),),
             (ImageRef(str(tmp_path / 'out.png')),),
             (Turn('human', '<image>\nSegment.'), Turn('gpt', 'Done.')), {})
  items = materialize(plan_sample(s), tokenizer, g, s)
  assert [(it.kind, it.grid) for it in items if it.kind != 'text'] == [
      ('vae', (3, 4)), ('vit', (6, 8)), ('vae', (4, 4))]
  assert items[1].patches.shape == (48, 192) and items[0].pixels.shape == (48, 64, 3)
  assert items[0].pixels.dtype == np.uint8 and items[1].patches.dtype == np.uint8
  assert (items[0].pixels == 200).all() and (items[-1].pixels == 10).all()
  # a size without a bucket is a named reason; inference (for_training=False) takes any size
  g1 = dataclasses.replace(g, buckets=((64, 64, 2),))
  with pytest.raises(SampleError) as e:
    materialize(plan_sample(s), tokenizer, g1, s)
  assert e.value.reason == 'vae_size' and '48x64' in str(e.value)
  assert materialize(plan_sample(s), tokenizer, g1, s, for_training=False)[0].grid == (3, 4)
  ts = tokenize(items, Specials.from_tokenizer(tokenizer), g)
  n_text = sum(len(it.ids) + 2 for it in items if it.kind == 'text')
  assert ts.n_tokens == (3 * 4 + 2) + (6 * 8 + 2) + (4 * 4 + 2) + n_text
  assert (ts.n_lat, ts.n_patches, ts.n_vae) == (28, 48, 2)
  missing = dataclasses.replace(s, input_img=(ImageRef(str(tmp_path / 'nope.png')),))
  with pytest.raises(SampleError) as e:
    materialize(plan_sample(missing), tokenizer, g, missing)
  assert e.value.reason == 'missing_file' and e.value.loc == 'f.jsonl:3'
  assert 'nope.png' in str(e.value)
