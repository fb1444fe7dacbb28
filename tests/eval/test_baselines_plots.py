"""The training-fitted trivial baselines (eval/baselines.py) and the PIL figures (eval/plots.py)
against hand-computed values on tiny inputs. No model code."""

import json
import math
import os

import numpy as np
import pytest

from unimedvl_jax.eval import baselines as B
from unimedvl_jax.eval import plots as P


# ------------------------------------------------------------------------------- baselines

def test_blank_like():
  x = np.zeros((3, 5, 3), np.float32)
  b = B.blank_like(x)
  assert b.shape == (3, 5, 3) and b.dtype == np.uint8 and (b == 128).all()


def test_thumb_feature_is_the_block_mean():
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
  img = np.kron(small, np.ones((3, 3, 1), np.uint8))       # 24x24, constant 3x3 blocks
  f = B.thumb_feature(img)
  np.testing.assert_allclose(f, small.astype(np.float64).reshape(-1) / 255.0, atol=1e-12)
  # a grey (single-channel) image is repeated to RGB
  g = B.thumb_feature(img[..., :1])
  np.testing.assert_allclose(g.reshape(8, 8, 3), np.repeat(small[..., :1] / 255.0, 3, -1))
  with pytest.raises(ValueError, match='uint8'):
    B.thumb_feature(img.astype(np.float32))


def test_nearest_indices_hand_computed():
  pool = np.array([[0., 0.], [1., 0.], [0., 2.]])
  q = np.array([[0.9, 0.1],     # nearest (1, 0)
                [0.0, 1.2],     # d^2 to (0,0) 1.44, to (0,2) 0.64 -> 2
                [0.5, 0.0]])    # tie between 0 and 1 -> the lower index
  assert B.nearest_indices(q, pool).tolist() == [1, 2, 0]
  with pytest.raises(ValueError):
    B.nearest_indices(q, np.zeros((0, 2)))


def test_nearest_template_respects_the_prompt_key():
  pool = np.array([[0.], [1.], [5.]])
  keys = ['a', 'b', 'a']
  texts = ['A0', 'B1', 'A5']
  # query 0.9 with key 'a': nearest overall is B1 (key b); within key a it is A0
  # query 4 with key 'b': only B1 has key b
  # query 4 with key 'c': no pool sample has key c -> nearest overall, A5
  out = B.nearest_template(np.array([[0.9], [4.], [4.]]), ['a', 'b', 'c'], pool, keys, texts)
  assert out == ['A0', 'B1', 'A5']


def test_medoid_text_hand_computed():
  # ROUGE-L F (beta 1.2) by hand: 'red green blue' vs 'red green blue pink': LCS 3;
  #   as prediction P=1, R=3/4 -> 2.44*0.75/(0.75+1.44) = 0.8356
  #   reverse P=3/4, R=1 -> 2.44*0.75/(1+1.44*0.75) = 0.8798; both vs 'cat dog': 0
  # means (self = 1): t0 (1+0.8356)/3 = 0.612, t1 (0.8798+1)/3 = 0.627, t2 1/3 -> t1
  texts = ['red green blue', 'red green blue pink', 'cat dog']
  assert B.medoid_text(texts) == 'red green blue pink'
  assert B.medoid_text(texts, k=1) == 'red green blue'          # only the first k compete
  with pytest.raises(ValueError):
    B.medoid_text([])


def test_template_by_group_falls_back_key_by_key():
  groups = [('ct', 'p1'), ('ct', 'p1'), ('mri', 'p1'), ('us', 'p2'), ('us', 'p2')]
  texts = ['red green blue', 'red green blue pink', 'cat dog', 'one two', 'one two three']
  q = [('ct', 'p1'), ('xr', 'p1'), ('xr', 'p9'), ('us', 'p2')]
  out = B.template_by_group(q, groups, texts)
  # (ct, p1): medoid of texts 0, 1 -> the tie-free pair: t1 scores (0.8798+1)/2 > t0
  assert out[0] == 'red green blue pink'
  # (xr, p1): no xr -> the p1 texts 0, 1, 2 -> as in test_medoid_text_hand_computed
  assert out[1] == 'red green blue pink'
  # (xr, p9): nothing -> medoid of all five: means t0 (1+0.8356)/5 = 0.367, t1 0.376,
  # t3 'one two' (1+0.7722)/5 = 0.354, t4 'one two three' (1+0.8299)/5 = 0.366 -> t1
  assert out[2] == 'red green blue pink'
  # (us, p2): texts 3, 4 -> t4 (0.8299 + 1) / 2 beats t3 (0.7722 + 1) / 2
  assert out[3] == 'one two three'


def test_majority_by_group_hand_computed():
  tr_a = ['Yes', 'yes.', 'no', 'beta', 'alpha', 'three']
  tr_g = ['g1', 'g1', 'g1', 'g2', 'g2', 'g4']
  te_r = ['no', 'No', 'yes', 'alpha', 'beta', 'Beta', 'x']
  te_g = ['g1', 'g1', 'g1', 'g2', 'g2', 'g2', 'g3']
  r = B.majority_by_group(tr_a, tr_g, te_r, te_g)
  assert set(r) == {'g1', 'g2', 'g3'}
  g1 = r['g1']     # training majority 'yes' (2 of 3): right on 1 of 3 test questions
  assert g1['train_answer'] == 'yes' and g1['train_n'] == 3
  assert g1['train_accuracy'] == pytest.approx(1 / 3)
  assert g1['best_constant_answer'] == 'no' and g1['best_constant_accuracy'] == pytest.approx(2 / 3)
  g2 = r['g2']     # training tie beta / alpha -> 'alpha' (lexicographic); test alpha, beta x2
  assert g2['train_answer'] == 'alpha' and g2['train_accuracy'] == pytest.approx(1 / 3)
  assert g2['best_constant_answer'] == 'beta'
  assert g2['best_constant_accuracy'] == pytest.approx(2 / 3)
  g3 = r['g3']     # no training answers of that kind
  assert g3['train_answer'] is None and math.isnan(g3['train_accuracy']) and g3['n'] == 1
  assert B.best_constant_accuracy(['two', '2', 'one']) == ('2', pytest.approx(2 / 3))


def test_other_modality_indices():
  pool = ['ct', 'ct', 'mri', 'xray', 'mri']
  q = ['ct'] * 3000 + ['mri', 'xray']
  idx = B.other_modality_indices(q, pool, seed=1)
  assert all(pool[j] != m for j, m in zip(idx, q))
  # uniform over the 3 non-ct pool images: each about 1000 of 3000
  counts = np.bincount(idx[:3000], minlength=5)
  assert counts[0] == counts[1] == 0
  assert np.all(np.abs(counts[2:] - 1000) < 120), counts
  assert (B.other_modality_indices(q, pool, seed=1) == idx).all()       # reproducible
  same = B.other_modality_indices(['mri', 'ct'], pool, seed=0, same=True)
  assert pool[same[0]] == 'mri' and pool[same[1]] == 'ct'
  with pytest.raises(ValueError, match='no pool image'):
    B.other_modality_indices(['ct'], ['ct', 'ct'])
  with pytest.raises(ValueError, match='no pool image'):
    B.other_modality_indices(['us'], pool, same=True)


# ---------------------------------------------------------------------------------- plots

def test_nice_ticks():
  assert P.nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
  assert P.nice_ticks(3, 97) == [20, 40, 60, 80]
  assert P.nice_ticks(0.9, 3.1) == [1.0, 1.5, 2.0, 2.5, 3.0]
  assert P.nice_ticks(2, 2) == [2]


def test_line_plot_draws_where_the_axes_say():
  H, W = 300, 480
  xs = list(range(0, 11))
  img, g = P.line_plot({'a': (xs, [1.0] * 11), 'b': (xs, [3.0] * 11)}, width=W, height=H,
                       return_geometry=True)
  assert img.shape == (H, W, 3) and img.dtype == np.uint8
  # documented mapping: y range = data [1, 3] padded by 5% -> [0.9, 3.1]; x range [0, 10]
  def row(y):
    return int(round(g.bottom - (y - 0.9) / (3.1 - 0.9) * (g.bottom - g.top)))
  col = int(round(g.left + 0.5 * (g.right - g.left)))      # x = 5
  near = lambda y, c: any(tuple(img[row(y) + d, col]) == c for d in (-1, 0, 1))
  assert near(1.0, P.COLORS[0]) and near(3.0, P.COLORS[1])
  assert tuple(img[row(2.25), col]) in ((255, 255, 255), (232, 232, 232))   # between: blank
  # non-finite points are skipped, an empty plot still renders
  P.line_plot({'a': ([0, 1, 2], [1.0, float('nan'), 2.0])})
  P.line_plot({})


def test_stage_series_and_loss_curves(tmp_path):
  recs = [dict(step=10, stage='vae', loss=0.5, ce=0.0, mse=0.5),
          dict(step=20, stage='vae', loss=0.3, ce=0.0, mse=0.3),
          dict(step=30, stage='foundation', loss=6.0, ce=6.0, mse=0.0),
          dict(step=40, stage='foundation', loss=4.0, ce=3.5, mse=0.5)]
  ser = P.stage_series(recs)
  assert list(ser) == ['vae', 'foundation']
  assert list(ser['vae']) == ['loss', 'mse']           # ce is zero throughout the vae stage
  assert ser['foundation']['ce'] == ([30, 40], [6.0, 3.5])
  path = tmp_path / 'metrics.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in recs) + '\nnot json\n')
  res = P.loss_curves(str(path), str(tmp_path / 'out'))
  assert res['foundation']['steps'] == (30, 40) and res['foundation']['last']['loss'] == 4.0
  for st in ('vae', 'foundation'):
    from PIL import Image
    im = Image.open(tmp_path / 'out' / res[st]['png'])
    assert im.size == (480, 300)


def test_labelled_grid_layout():
  red = np.zeros((16, 16, 3), np.uint8)
  red[..., 0] = 255
  grey = np.full((8, 8), 77, np.uint8)           # single channel, smaller: scaled to the tile
  tile, pad = 32, 4
  g = P.labelled_grid([[red, grey], [grey, red]], ['input', 'target'], tile=tile, pad=pad)
  assert g.shape == (20 + 2 * (tile + pad) + pad, pad + 2 * (tile + pad), 3)
  c = lambda i, j: tuple(g[20 + i * (tile + pad) + tile // 2, pad + j * (tile + pad) + tile // 2])
  assert c(0, 0) == (255, 0, 0) and c(0, 1) == (77, 77, 77)
  assert c(1, 0) == (77, 77, 77) and c(1, 1) == (255, 0, 0)


def test_eval_sampler_settings_from_config():
  """config.eval overrides the SPEC 7 samplers field by field; a config without the section (an
  older checkpoint's) gets them at 20 steps; a wrong field is a ConfigError naming it."""
  import pytest
  from ml_collections import ConfigDict
  from unimedvl_jax.config import ConfigError, default_config
  from unimedvl_jax.config_validate import validate_eval
  from unimedvl_jax.infer.image import eval_flow_settings
  cfg = default_config()
  t2i, edit = eval_flow_settings(cfg)
  # SPEC 7 / BAGEL: t2i cfg_text 4, img 1, interval (0.4, 1], shift 3, global renorm;
  # editing text 4, img 2, interval (0, 1], text_channel renorm
  assert (t2i.num_steps, t2i.shift, t2i.s_text, t2i.s_img, t2i.interval, t2i.renorm) == (
      20, 3.0, 4.0, 1.0, (0.4, 1.0), 'global')
  assert (edit.num_steps, edit.s_text, edit.s_img, edit.interval, edit.renorm) == (
      20, 4.0, 2.0, (0.0, 1.0), 'text_channel')
  cfg.eval.editing = ConfigDict(dict(s_text=1.0, s_img=1.0, num_steps=5))
  cfg.eval.image_steps = 8
  t2i, edit = eval_flow_settings(cfg)
  assert (t2i.num_steps, edit.num_steps, edit.s_text, edit.s_img, edit.renorm) == (
      8, 5, 1.0, 1.0, 'text_channel')
  assert [s.num_steps for s in eval_flow_settings(cfg, num_steps=3)] == [3, 3]
  old = ConfigDict({k: v for k, v in cfg.items() if k != 'eval'})
  assert [s.num_steps for s in eval_flow_settings(old)] == [20, 20]
  cfg.eval.editing = ConfigDict(dict(guidance=2.0))
  with pytest.raises(ConfigError, match='eval.editing.guidance'):
    eval_flow_settings(cfg)
  cfg.eval.editing = ConfigDict(dict(renorm='nope'))
  with pytest.raises(ConfigError, match='eval.editing'):
    eval_flow_settings(cfg)
  cfg.eval.image_steps = 1
  with pytest.raises(ConfigError, match='eval.image_steps'):
    validate_eval(cfg.eval)
