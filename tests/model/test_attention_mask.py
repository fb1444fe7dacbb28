"""Mask semantics of SPEC section 3 on hand-built packs, against a literal python reading."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.attention_rule import C, F, N, literal_rule
from unimedvl_jax.model.attention import attention_mask, masked_attention, reference_attention


def pack(items):
  """items: list of (segment, mode, length) -> seg, split, mode arrays (one split per item)."""
  seg, split, mode = [], [], []
  for i, (s, m, n) in enumerate(items):
    seg += [s] * n
    split += [i] * n
    mode += [m] * n
  return np.array(seg), np.array(split), np.array(mode)


def mask_of(seg, split, mode):
  return np.asarray(attention_mask(jnp.asarray(seg)[None], jnp.asarray(split)[None],
                                   jnp.asarray(mode)[None]))[0]


def test_text_after_noised_image_cannot_see_it():
  seg, split, mode = pack([(1, C, 3), (1, F, 4), (1, N, 4), (1, C, 3)])
  m = mask_of(seg, split, mode)
  txt2 = slice(15, 18)
  noise = slice(7, 11)
  clean = slice(3, 7)
  assert not m[txt2, noise].any()
  assert m[txt2, clean].all() and m[txt2, 0:3].all()
  # the noised image sees itself fully and everything before it
  assert m[noise, noise].all() and m[noise, 0:7].all()
  # the clean image is bidirectional inside, cannot see the future
  assert m[clean, clean].all() and not m[clean, 7:].any()
  np.testing.assert_array_equal(m, literal_rule(seg, split, mode))


def test_two_noised_images_cannot_see_each_other():
  seg, split, mode = pack([(1, C, 2), (1, N, 3), (1, N, 3), (1, C, 2)])
  m = mask_of(seg, split, mode)
  assert not m[2:5, 5:8].any() and not m[5:8, 2:5].any()
  assert m[2:5, 2:5].all() and m[5:8, 5:8].all()
  np.testing.assert_array_equal(m, literal_rule(seg, split, mode))


def test_padding_sees_nothing_and_is_seen_by_nothing():
  seg, split, mode = pack([(1, C, 4), (2, C, 3), (0, C, 5)])
  m = mask_of(seg, split, mode)
  assert not m[7:].any() and not m[:, 7:].any()
  # samples never see each other; text is causal
  assert not m[4:7, 0:4].any() and not m[0:4, 4:7].any()
  np.testing.assert_array_equal(m[0:4, 0:4], np.tril(np.ones((4, 4), bool)))


@pytest.mark.parametrize('seed', range(5))
def test_random_packs_match_literal_rule(seed):
  rng = np.random.default_rng(seed)
  items = []
  for s in range(1, 4):
    for _ in range(rng.integers(1, 5)):
      items.append((s, int(rng.integers(0, 3)), int(rng.integers(1, 5))))
  items.append((0, C, int(rng.integers(0, 4))))
  seg, split, mode = pack(items)
  np.testing.assert_array_equal(mask_of(seg, split, mode), literal_rule(seg, split, mode))


def test_reference_attention_matches_float64_softmax_and_zero_rows():
  rng = np.random.default_rng(0)
  seg, split, mode = pack([(1, C, 3), (1, N, 4), (1, C, 3), (0, C, 2)])
  T, Hq, Hkv, D = len(seg), 4, 2, 8
  q = rng.normal(size=(1, T, Hq, D))
  k = rng.normal(size=(1, T, Hkv, D))
  v = rng.normal(size=(1, T, Hkv, D))
  out = np.asarray(reference_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                       jnp.asarray(v, jnp.float32), jnp.asarray(seg)[None],
                                       jnp.asarray(split)[None], jnp.asarray(mode)[None]))
  m = literal_rule(seg, split, mode)
  ref = np.zeros((T, Hq, D))
  for h in range(Hq):
    kh = h // (Hq // Hkv)    # grouped-query: consecutive query heads share a kv head
    for i in range(T):
      allowed = np.where(m[i])[0]
      if len(allowed) == 0:
        continue
      logits = q[0, i, h] @ k[0, allowed, kh].T / np.sqrt(D)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      ref[i, h] = p @ v[0, allowed, kh]
  np.testing.assert_allclose(out[0], ref, atol=1e-5)
  assert np.all(out[0, -2:] == 0)
