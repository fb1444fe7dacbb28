"""The packer: a hand-written pack, and invariants over many random samples."""

import numpy as np
import pytest

from unimedvl_jax.batch import check_batch
from unimedvl_jax.config import default_config
from unimedvl_jax.data import packing
from unimedvl_jax.data.plans import Geometry, PlanItem, Specials, tokenize

SP = Specials(im_start=100, im_end=101, vision_start=102, vision_end=103)


ALL_SIZES = ((16, 16), (16, 32), (32, 16), (32, 32))


def _cfg(T=32, L=8, P=4, N=2, B=1, C=0, buckets=None):
  cfg = default_config()
  buckets = tuple((h, w, N) for h, w in ALL_SIZES) if buckets is None else buckets
  cfg.data.update(dict(batch_size=B, seq_len=T, max_latent_tokens=L, max_vit_patches=P,
                       max_vae_images=N, vae_buckets=buckets, max_label_tokens=C,
                       max_sample_tokens=T))
  cfg.model.vit.update(dict(patch_size=2, grid_size=4))
  cfg.model.max_latent_size = 2
  return cfg


def _text(ids, loss=False, cfg=False):
  return PlanItem('text', loss=loss, enable_cfg=cfg, ids=np.array(ids, np.int32))


def _vit(nh, nw, val=1):
  return PlanItem('vit', grid=(nh, nw), patches=np.full((nh * nw, 12), val, np.uint8))


def _vae(gh, gw, noised=False, val=128):
  return PlanItem('vae', noised=noised, loss=noised, grid=(gh, gw),
                  pixels=np.full((16 * gh, 16 * gw, 3), val, np.uint8))


def test_hand_written_pack():
  cfg = _cfg(buckets=((16, 32, 2),))
  g = Geometry.from_config(cfg)
  a = tokenize([_vit(1, 2), _text([5], loss=True)], SP, g, loc='a')
  b = tokenize([_text([6], cfg=True), _vae(1, 2, noised=True)], SP, g, loc='b')
  batch = packing.assemble([[a, b]], cfg)
  check_batch(batch, cfg)
  packing.check_pack_invariants(batch, g)
  pad = [0] * 18
  exp = dict(
      input_ids=[102, 0, 0, 103, 100, 5, 101, 100, 6, 101, 102, 0, 0, 103] + pad,
      segment_ids=[1] * 7 + [2] * 7 + pad,
      split_ids=[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3] + [4] * 18,
      split_modes=[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2] + pad,
      positions=[0, 0, 0, 0, 1, 2, 3, 0, 1, 2, 3, 3, 3, 3] + pad,
      token_type=[1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 1] + pad,
      label_ids=[0, 0, 0, 0, 5, 101, 0, 0, 0, 0, 0, 0, 0, 0] + pad,
      loss_mask=[0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0] + pad,
      label_pos=[4, 5] + [32] * 22,
      und_idx=list(range(11)) + [13] + list(range(14, 26)),
      gen_idx=[11, 12, 26, 27, 28, 29, 30, 31],
      vit_segment_ids=[1, 1, 0, 0],
      vit_pos_ids=[0, 1, 0, 0],
      vit_token_idx=[1, 2, 32, 32],
      vae_image_noised=[1, 0],
      latent_mask=[1, 1, 0, 0, 0, 0, 0, 0],
      latent_image=[0] * 8,
      latent_src=[0, 1, 0, 0, 0, 0, 0, 0],
      vae_16x32_image=[0, -1],
      latent_pos_ids=[0, 1, 0, 0, 0, 0, 0, 0],
      latent_noised=[1, 1, 0, 0, 0, 0, 0, 0])
  for k, v in exp.items():
    assert batch[k][0].tolist() == v, k
  assert (batch['vit_patches'][0, :2] == 1).all() and (batch['vit_patches'][0, 2:] == 0).all()
  img = batch['vae_16x32'][0]
  assert img.shape == (2, 16, 32, 3) and (img[0] == 128).all() and (img[1] == 0).all()


def test_empty_pack_is_all_padding_and_valid():
  cfg = _cfg(B=2)
  g = Geometry.from_config(cfg)
  a = tokenize([_text([5, 6], loss=True)], SP, g)
  batch = packing.assemble([[a]], cfg, batch_size=2)
  check_batch(batch, cfg)
  packing.check_pack_invariants(batch, g)
  assert (batch['segment_ids'][1] == 0).all() and (batch['vit_token_idx'][1] == 32).all()


def _random_items(rng):
  kind = rng.integers(4)
  t = lambda loss=False, cfg=False: _text(rng.integers(1, 90, rng.integers(0, 9)), loss, cfg)
  if kind == 0:   # understanding
    return [_vit(int(rng.integers(1, 3)), int(rng.integers(1, 3))), t(), t(loss=True)]
  if kind == 1:   # text to image
    return [t(cfg=True), _vae(int(rng.integers(1, 3)), int(rng.integers(1, 3)), noised=True)]
  if kind == 2:   # editing
    return [_vae(1, 2), _vit(1, 2), t(cfg=True), t(loss=True), _vae(1, 2, noised=True)]
  return [t(), t(loss=True)] * int(rng.integers(1, 4))   # text only, long-ish


def test_random_stream_invariants():
  cfg = _cfg(T=96, L=24, P=16, N=3, B=3, C=30)
  g = Geometry.from_config(cfg)
  rng = np.random.default_rng(0)
  samples = []
  for i in range(300):
    s = tokenize(_random_items(rng), SP, g, np.random.default_rng(i), (0.3, 0.3, 0.3),
                 loc=f'f:{i}')
    assert s.budget_problem(g) is None
    samples.append(s)
  stream = iter(samples)
  draw = lambda: (lambda s: None if s is None else packing.Entry(s.loc, s))(next(stream, None))
  pending, seen, batches = [], [], 0
  while True:
    packs, pending = packing.fill_batch(3, g, pending, draw, lookahead=4)
    if not any(p.samples for p in packs):
      break
    batch = packing.assemble(packs, cfg)
    batches += 1
    check_batch(batch, cfg)
    packing.check_pack_invariants(batch, g)
    for b, p in enumerate(packs):
      assert p.n_tokens <= g.T and p.n_lat <= g.L and p.n_und <= g.U
      assert p.n_patches <= g.P and p.n_vae <= g.N and p.n_labels <= g.labels
      start = 0
      for i, s in enumerate(p.samples):   # every sample whole, contiguous, unchanged
        sl = slice(start, start + s.n_tokens)
        assert (batch['segment_ids'][b, sl] == i + 1).all()
        assert np.array_equal(batch['input_ids'][b, sl], s.input_ids)
        assert np.array_equal(batch['positions'][b, sl], s.positions)
        assert np.array_equal(batch['label_ids'][b, sl], s.label_ids)
        start += s.n_tokens
        seen.append(s.loc)
      assert (batch['segment_ids'][b, start:] == 0).all()
  assert sorted(seen) == sorted(s.loc for s in samples), 'a sample was lost or duplicated'
  fill = sum(s.n_tokens for s in samples) / (batches * 3 * g.T)
  assert fill > 0.5, fill


def test_mandatory_group_in_every_pack():
  cfg = _cfg(T=64, L=8, P=8, N=2, B=4)
  g = Geometry.from_config(cfg)
  counter = {'k': 0}

  def sample(group, n):
    counter['k'] += 1
    return packing.Entry(counter['k'], tokenize([_text([1] * n, loss=True)], SP, g), group)

  draw = lambda: sample(0, 10)
  draw_group = lambda grp: sample(grp, 5)
  packs, pending = packing.fill_batch(4, g, [], draw, lookahead=3, mandatory=[1, 2],
                                      draw_group=draw_group)
  for p in packs:
    groups = [s.n_tokens for s in p.samples]
    assert groups[:2] == [7, 7]      # one sample of each mandatory group first
    assert groups[2:] and set(groups[2:]) == {12}
  assert len(pending) == 3


def test_first_fit_errors():
  cfg = _cfg()
  g = Geometry.from_config(cfg)
  long = tokenize([_text([1] * 40, loss=True)], SP, g, loc='x:3')
  with pytest.raises(ValueError, match='x:3 can never be packed'):
    packing.first_fit([long], g, 1)
  mid = tokenize([_text([1] * 20, loss=True)], SP, g, loc='y:1')
  with pytest.raises(ValueError, match='does not fit in 1 pack'):
    packing.first_fit([mid, mid], g, 1)
  assert len(packing.first_fit([mid, mid], g, 2)[1].samples) == 1
