"""Random packed-sequence metadata (segment_ids, split_ids, split_modes) for the attention tests
and benchmarks (benchmarks/bench_attention.py, gpu_check.py): packs of random items, and
realistic ones of VQA / report / text-to-image / editing / counterfactual samples.

Layout as the packer produces it (unimedvl_jax/batch.py): samples one after another, segment ids
1..n, split ids = item index in the pack (non-decreasing), padding (segment 0) at the end.
"""

from __future__ import annotations

import numpy as np

from unimedvl_jax.batch import MODE_CAUSAL as CAUSAL
from unimedvl_jax.batch import MODE_FULL as FULL
from unimedvl_jax.batch import MODE_NOISE as NOISE


def fill(items_per_sample, T):
  """[[ (mode, length), ... ] per sample] -> int32 (seg, split, mode) of length T (truncated)."""
  seg = np.zeros(T, np.int32)
  split = np.zeros(T, np.int32)
  mode = np.zeros(T, np.int32)
  pos, s_id = 0, 0
  for n, items in enumerate(items_per_sample):
    for m, length in items:
      length = min(length, T - pos)
      if length <= 0:
        return seg, split, mode
      seg[pos:pos + length] = n + 1
      split[pos:pos + length] = s_id
      mode[pos:pos + length] = m
      pos += length
      s_id += 1
  return seg, split, mode


def random_pack(rng: np.random.Generator, T: int, *, max_item: int = 48, pad_frac: float = 0.1):
  """Random samples of random items of all three modes, about pad_frac padding at the end."""
  budget = int(T * (1 - pad_frac * rng.uniform(0.5, 1.5)))
  samples, used = [], 0
  while used < budget:
    items = []
    for _ in range(int(rng.integers(1, 6))):
      m = int(rng.choice([CAUSAL, CAUSAL, FULL, NOISE]))
      items.append((m, int(rng.integers(1, max_item))))
    samples.append(items)
    used += sum(n for _, n in items)
  return _pad(fill(samples, min(budget, T)), T)


def _pad(meta, T):
  return tuple(np.pad(x, (0, T - x.shape[0])) for x in meta)


def random_batch(rng, B, T, **kw):
  metas = [random_pack(rng, T, **kw) for _ in range(B)]
  return tuple(np.stack([m[i] for m in metas]) for i in range(3))


def batch_with_all_modes(seed: int, B, T, **kw):
  """(rng, random_batch) from the first seed >= `seed` whose packs hold all three split modes
  (causal, full, noise) among their non-padding tokens; rng continues after the metadata."""
  for s in range(seed, seed + 1000):
    rng = np.random.default_rng(s)
    meta = random_batch(rng, B, T, **kw)
    if set(np.unique(meta[2][meta[0] > 0]).tolist()) == {CAUSAL, FULL, NOISE}:
      return rng, meta
  raise ValueError(f'no pack with all three modes for T={T} near seed {seed}')


def unsorted_batch(rng, B, T):
  """Arbitrary metadata (not a valid pack layout): exercises the classification's soundness."""
  seg = rng.integers(0, 3, (B, T)).astype(np.int32)
  split = rng.integers(0, 4, (B, T)).astype(np.int32)
  mode = rng.integers(0, 3, (B, T)).astype(np.int32)
  return seg, split, mode


def vit_batch(rng, B, T, max_image: int = 80):
  """ViT attention metadata: segment = image id, split all 0, modes all full; padding at the end."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    pos, img = 0, 1
    while True:
      n = int(rng.integers(8, max_image))
      if pos + n > T - 5:
        break
      seg[b, pos:pos + n] = img
      pos, img = pos + n, img + 1
  return seg, np.zeros((B, T), np.int32), np.where(seg > 0, FULL, 0).astype(np.int32)


# ---------------------------------------------------------------------------- realistic packs

def _text(rng, lo, hi):
  return (CAUSAL, int(rng.integers(lo, hi)) + 2)          # <|im_start|> ids <|im_end|>


def _vit(rng):
  side = lambda: int(rng.integers(224, 981)) // 14        # patches per side, 224..980 px
  return (FULL, side() * side() + 2)


def _vae(rng, mode):
  side = lambda: int(rng.choice([32, 40, 48, 64]))        # 512..1024 px / 16
  return (mode, side() * side() + 2)


def realistic_sample(rng):
  """One sample following the task plans of SPEC section 6."""
  kind = rng.choice(['vqa', 'report', 't2i', 'edit', 'counterfactual'], p=[.3, .2, .2, .2, .1])
  if kind == 'vqa':
    return [_text(rng, 8, 60), _vit(rng), _text(rng, 8, 60), _text(rng, 1, 12)]
  if kind == 'report':
    return [_vit(rng), _text(rng, 10, 40), _text(rng, 80, 400)]
  if kind == 't2i':
    return [_text(rng, 10, 80), _vae(rng, NOISE)]
  if kind == 'edit':
    return [_vae(rng, FULL), _vit(rng), _text(rng, 8, 60), _vae(rng, NOISE)]
  return [_vae(rng, FULL), _vit(rng), _text(rng, 8, 60), _vae(rng, NOISE), _text(rng, 40, 200)]


def realistic_pack(rng, T: int, max_sample: int | None = None):
  """Pack whole realistic samples greedily up to T tokens (the rest is padding)."""
  samples, used = [], 0
  for _ in range(200):
    s = realistic_sample(rng)
    n = sum(length for _, length in s)
    if max_sample and n > max_sample:
      continue
    if used + n > T:
      if used > 0.9 * T:
        break
      continue
    samples.append(s)
    used += n
  return fill(samples, T)


def realistic_batch(rng, B, T, **kw):
  metas = [realistic_pack(rng, T, **kw) for _ in range(B)]
  return tuple(np.stack([m[i] for m in metas]) for i in range(3))
