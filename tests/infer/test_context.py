"""The KV-cache context: metadata bookkeeping (SPEC 3 positions / splits / modes), ragged rows,
copy semantics for the CFG contexts, capacity errors, and that cached prefill equals the
full-sequence reference forward (hidden states via the logits of the last text token)."""

import jax
import numpy as np
import pytest

from tests.helpers.infer_ref import SPECIALS, reference_forward, tiny_model
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer.context import ContextError
from unimedvl_jax.model.attention import MODE_CAUSAL, MODE_FULL


@pytest.fixture(scope='module')
def model():
  return tiny_model()[1]


def _img(seed, h, w):
  return np.random.RandomState(seed).uniform(-1, 1, (h, w, 3)).astype(np.float32)


def test_metadata_positions_splits_modes(model):
  ctx0 = C.new_context(model, 2, 64)
  ctx1 = C.add_text(model, ctx0, [[11, 12, 13], [21]], SPECIALS)
  ctx2 = C.add_image(model, ctx1, SPECIALS, vae=[_img(0, 32, 16), None], vit=[_img(1, 16, 24), None])
  # copy semantics: earlier contexts are untouched
  assert list(ctx0.lengths()) == [0, 0]
  assert list(ctx1.lengths()) == [5, 3]
  # row 0: text (5 tokens, pos 0..4), VAE 2x1 latents (+2 markers, pos 5), ViT 2x3 (+2, pos 6)
  assert list(ctx2.lengths()) == [5 + 4 + 8, 3]
  assert list(ctx2.positions()) == [7, 3]
  assert list(np.asarray(ctx2.num_splits)) == [3, 1]
  seg, split, mode = (np.asarray(a) for a in (ctx2.seg, ctx2.split, ctx2.mode))
  assert seg[0, :17].all() and not seg[0, 17:].any()
  assert seg[1, :3].all() and not seg[1, 3:].any()
  assert list(split[0, :17]) == [0] * 5 + [1] * 4 + [2] * 8
  assert list(mode[0, :17]) == [MODE_CAUSAL] * 5 + [MODE_FULL] * 12
  # empty slots hold zeros in the cache (per layer [B, Hkv, C, D])
  assert not np.asarray(ctx2.k)[:, 1, :, 3:].any()


def test_prefill_in_pieces_equals_one_block(model):
  """Items prefilled one call at a time give the same cache as one multi-item block."""
  ids_a, ids_b = [7, 8, 9, 10], [12, 13]
  img = _img(2, 16, 16)
  ctx = C.new_context(model, 1, 64)
  c1 = C.add_text(model, ctx, ids_a, SPECIALS)
  c1 = C.add_image(model, c1, SPECIALS, vit=img)
  c1 = C.add_text(model, c1, ids_b, SPECIALS)
  b = C.make_builder(model, 1, SPECIALS)
  patch = model.vit.embeddings.patch_embedding.kernel.shape[0] // 3
  p, grid = C.vit_patches(img, int(round(patch ** 0.5)))
  b.text(0, ids_a).vit_image(0, p, grid).text(0, ids_b)
  c2 = C.prefill(model, ctx, b)
  for f in ('seg', 'split', 'mode', 'length', 'pos', 'num_splits'):
    np.testing.assert_array_equal(np.asarray(getattr(c1, f)), np.asarray(getattr(c2, f)), f)
  np.testing.assert_allclose(np.asarray(c1.k), np.asarray(c2.k), atol=1e-5)
  np.testing.assert_allclose(np.asarray(c1.v), np.asarray(c2.v), atol=1e-5)


def test_ragged_rows_equal_single_rows_and_reference(model):
  """Two conversations of different lengths in one batch: each row's cache equals the row built
  alone, and the new tokens' outputs equal the full-sequence reference forward."""
  img = _img(3, 16, 32)
  tok, grid = C.encode_vae_tokens(model, _img(4, 16, 32))
  rows = [[5, 9, 17, 33], [40, 41]]
  ctx = C.new_context(model, 2, 64)
  ctx = C.add_text(model, ctx, rows, SPECIALS)
  ctx = C.add_image(model, ctx, SPECIALS, vit=[img, None], vae_tokens=[(tok, grid), None])
  single = C.new_context(model, 1, 64)
  single = C.add_text(model, single, rows[0], SPECIALS)
  single = C.add_image(model, single, SPECIALS, vit=img, vae_tokens=(tok, grid))
  row0 = C.take_rows(ctx, [0])
  n = int(single.lengths()[0])
  np.testing.assert_allclose(np.asarray(row0.k)[..., :n, :], np.asarray(single.k)[..., :n, :],
                             atol=1e-5)
  # a final text item's logits through the cache vs the reference forward of the whole sequence
  last = [[60, 61, 62], [70, 71, 72, 73]]
  b = C.make_builder(model, 2, SPECIALS)
  for r in range(2):
    b.text(r, last[r])
  _, h_u, _ = C.run_block(model, ctx, b, write=False)
  logits = np.asarray(model.logits(h_u))
  patch = int(round((model.vit.embeddings.patch_embedding.kernel.shape[0] // 3) ** 0.5))
  p, vg = C.vit_patches(img, patch)
  items = [[('text', rows[0]), ('vae', tok, grid), ('vit', p, vg), ('text', last[0])],
           [('text', rows[1]), ('text', last[1])]]
  for r in range(2):
    ref = reference_forward(model, items[r])
    m = len(last[r]) + 2
    np.testing.assert_allclose(logits[r, :m], ref['logits'][-m:], atol=1e-4, rtol=1e-4)


def test_capacity_and_input_errors(model):
  ctx = C.new_context(model, 1, 8)
  with pytest.raises(ContextError, match='capacity'):
    C.add_text(model, ctx, list(range(10, 20)), SPECIALS)
  with pytest.raises(ContextError, match='multiple'):
    C.add_image(model, ctx, SPECIALS, vit=_img(0, 10, 16))
  with pytest.raises(ContextError, match='too large'):
    C.add_image(model, C.new_context(model, 1, 256), SPECIALS, vit=_img(0, 8 * 9, 8))
  with pytest.raises(ContextError, match='rows'):
    C.add_text(model, C.new_context(model, 2, 16), [[1, 2]], SPECIALS)


def test_concat_take_pad(model):
  a = C.add_text(model, C.new_context(model, 1, 64), [10, 11], SPECIALS)
  b = C.pad_capacity(C.add_text(model, C.new_context(model, 1, 64), [12], SPECIALS), 80)
  ab = C.concat_contexts([a, b])
  assert ab.capacity == 80 and ab.batch_size == 2
  assert list(ab.lengths()) == [4, 3]
  back = C.take_rows(ab, [1])
  np.testing.assert_array_equal(np.asarray(back.k), np.asarray(b.k))
  np.testing.assert_array_equal(np.asarray(C.take_rows(ab, [0]).k)[..., :64, :], np.asarray(a.k))


def test_prepare_cuts_the_layer_stack_once(model):
  """prepare: one module per decoder layer holding that layer's slice of the stacked weights,
  sharding names without the 'layers' axis; the original module is untouched; idempotent."""
  from flax import nnx
  p = C.prepare(model)
  assert C.prepare(p) is p
  layers = p.module.decoder.layers
  stacked = model.decoder.layers
  assert isinstance(layers, nnx.List) and not isinstance(stacked, nnx.List)
  n = stacked.und.q_proj.kernel.shape[0]
  assert len(layers) == n == C.layer_count(p) == C.layer_count(model)
  for i in range(n):
    np.testing.assert_array_equal(np.asarray(layers[i].gen.mlp.up_proj.kernel[...]),
                                  np.asarray(stacked.gen.mlp.up_proj.kernel[...])[i])
  meta = layers[0].und.q_proj.kernel.get_metadata()['out_sharding']
  assert tuple(meta) == ('embed', 'q_heads')
  assert p.has_vae == model.has_vae and p.head_dim == model.head_dim   # attribute fall-through
