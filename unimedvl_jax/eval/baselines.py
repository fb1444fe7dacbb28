"""Trivial baselines fitted on the TRAINING split (pure numpy; no model code).

The evaluation's targets are stated against baselines a model must beat to show it learned
something from the image and the prompt (issue 13):

* ``majority_by_group``      -- VQA: per question kind, the most frequent normalised training
                                answer, and its accuracy on the evaluated references; also the
                                best constant answer of the evaluated set itself (optimistic:
                                it is fitted on the test references);
* ``medoid_text`` / ``template_by_group`` -- report / caption: the modality template, the
                                training text of the same modality and prompt with the highest
                                mean ROUGE-L to the others (it knows what kind of image it is,
                                not what is in it);
* ``nearest_template``       -- report / caption: the reference text of the training sample
                                whose image is nearest (L2 on ``thumb_feature``, an 8x8 RGB box
                                thumbnail) among the training samples with the same prompt (a
                                non-learned retrieval baseline);
* ``other_modality_indices`` -- text-to-image: for each evaluated prompt a random training
                                image of ANOTHER modality (a Frechet distance the generated set
                                must beat); ``same_modality`` gives the real-image reference.

Each function states its tie-breaking so the numbers are reproducible.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np

from .metrics_text import rouge_l
from .metrics_vqa import exact_match, normalize_answer

__all__ = ['thumb_feature', 'nearest_indices', 'nearest_template', 'medoid_text',
           'template_by_group', 'majority_by_group',
           'best_constant_accuracy', 'other_modality_indices', 'blank_like']

GREY = 128


def blank_like(img: np.ndarray) -> np.ndarray:
  """A constant grey (128) uint8 image/patch array of the same shape (the ablation input)."""
  return np.full(np.shape(img), GREY, np.uint8)


def thumb_feature(img: np.ndarray, size: int = 8) -> np.ndarray:
  """[H, W, C] uint8 -> float64 [size*size*3]: PIL BOX resize to size x size of the RGB image
  (a grey image is repeated to 3 channels), scaled to [0, 1], flattened row-major (HWC)."""
  from PIL import Image
  x = np.asarray(img)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image [H, W, C], got {x.dtype} {x.shape}')
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  x = x[..., :3]
  t = np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((size, size), Image.BOX),
                 np.float64) / 255.0
  return t.reshape(-1)


def nearest_indices(query: np.ndarray, pool: np.ndarray) -> np.ndarray:
  """Index into `pool` [N, D] of the nearest row (squared L2) for each `query` row [M, D]; ties
  go to the lowest index."""
  q = np.asarray(query, np.float64)
  p = np.asarray(pool, np.float64)
  if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1] or len(p) == 0:
    raise ValueError(f'query {q.shape} and pool {p.shape} must be [M, D] and [N>0, D]')
  d = (q * q).sum(1)[:, None] - 2.0 * q @ p.T + (p * p).sum(1)[None, :]
  return np.argmin(np.round(d, 12), axis=1)   # rounding: exact ties stay ties (first wins)


def nearest_template(query_feats, query_keys: Sequence[Hashable], pool_feats,
                     pool_keys: Sequence[Hashable], pool_texts: Sequence[str]) -> list[str]:
  """For each query: the text of the nearest pool sample with the same key (e.g. the prompt),
  or of the nearest pool sample overall when no pool sample has that key."""
  pool_feats = np.asarray(pool_feats, np.float64)
  by_key: dict = defaultdict(list)
  for i, k in enumerate(pool_keys):
    by_key[k].append(i)
  out = []
  for f, k in zip(np.asarray(query_feats, np.float64), query_keys):
    idx = np.asarray(by_key.get(k) or range(len(pool_feats)))
    j = idx[int(nearest_indices(f[None], pool_feats[idx])[0])]
    out.append(pool_texts[j])
  return out


def medoid_text(texts: Sequence[str], k: int = 40) -> str:
  """The text among the first k (file order) with the highest mean ROUGE-L (rouge_l, beta 1.2)
  against those k texts themselves included; ties -> the earliest."""
  if not texts:
    raise ValueError('no texts')
  cand = list(texts[:k])
  scores = [float(np.mean([rouge_l(a, b) for b in cand])) for a in cand]
  return cand[int(np.argmax(scores))]


def template_by_group(query_groups: Sequence[tuple], pool_groups: Sequence[tuple],
                      pool_texts: Sequence[str], k: int = 40) -> list[str]:
  """For each query group (a tuple of keys, most specific first, e.g. (modality, prompt)): the
  medoid_text of the pool texts of the same full group; when the pool has none, of the pool
  texts agreeing on the keys after dropping the first one, and so on (the last fallback is the
  medoid of the whole pool). Medoids are computed once per group."""
  cache: dict = {}

  def med(n_drop: int, key: tuple):
    ck = (n_drop, key)
    if ck not in cache:
      sel = [t for t, g in zip(pool_texts, pool_groups) if tuple(g[n_drop:]) == key]
      cache[ck] = medoid_text(sel, k) if sel else None
    return cache[ck]

  out = []
  for g in query_groups:
    g = tuple(g)
    for n_drop in range(len(g) + 1):
      t = med(n_drop, g[n_drop:])
      if t is not None:
        out.append(t)
        break
  return out


def best_constant_accuracy(refs: Sequence[str]) -> tuple[str, float]:
  """The constant answer with the highest accuracy on `refs` (normalised exact match) and that
  accuracy; ties -> lexicographically smallest normalised answer. Fitted on the references
  themselves: an upper bound on any constant answer's accuracy."""
  if not refs:
    return '', float('nan')
  c = Counter(normalize_answer(r) for r in refs)
  ans = min(c, key=lambda a: (-c[a], a))
  return ans, c[ans] / len(refs)


def majority_by_group(train_answers: Sequence[str], train_groups: Sequence[Hashable],
                      test_refs: Sequence[str], test_groups: Sequence[Hashable]) -> dict:
  """Per group of the evaluated set: {'n', 'train_answer', 'train_n', 'train_accuracy' (the
  training majority answer's accuracy on the group's references; nan when the group has no
  training answers), 'best_constant_answer', 'best_constant_accuracy'}. Training majority ties
  -> lexicographically smallest normalised answer."""
  tr: dict = defaultdict(Counter)
  for a, g in zip(train_answers, train_groups):
    tr[g][normalize_answer(a)] += 1
  te: dict = defaultdict(list)
  for r, g in zip(test_refs, test_groups):
    te[g].append(r)
  out = {}
  for g, refs in te.items():
    c = tr.get(g)
    if c:
      ans = min(c, key=lambda a: (-c[a], a))
      acc = float(np.mean([exact_match(ans, r) for r in refs]))
      n_tr = int(sum(c.values()))
    else:
      ans, acc, n_tr = None, float('nan'), 0
    best, best_acc = best_constant_accuracy(refs)
    out[g] = dict(n=len(refs), train_answer=ans, train_n=n_tr, train_accuracy=acc,
                  best_constant_answer=best, best_constant_accuracy=best_acc)
  return out


def other_modality_indices(query_modalities: Sequence[str], pool_modalities: Sequence[str],
                           seed: int = 0, same: bool = False) -> np.ndarray:
  """For query i, a pool index drawn uniformly (numpy default_rng(seed), one draw per query in
  order) among the pool items whose modality differs from the query's (or equals it with
  same=True). Raises ValueError if a query has no candidate."""
  pm = np.asarray(list(pool_modalities), dtype=object)
  rng = np.random.default_rng(seed)
  out = []
  for i, m in enumerate(query_modalities):
    cand = np.flatnonzero((pm == m) if same else (pm != m))
    if len(cand) == 0:
      raise ValueError(f'query {i} (modality {m!r}): no pool image of '
                       f'{"the same" if same else "another"} modality')
    out.append(int(cand[rng.integers(len(cand))]))
  return np.asarray(out, np.int64)
