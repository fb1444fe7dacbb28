"""Packing whole samples into the static budgets of `batch.py`.

A pack holds whole samples only (never split, never truncated) within its budgets: T tokens,
U = T - L understanding tokens (text, markers, ViT patches), L latent tokens, C CE targets, P ViT
patches, N VAE images, and (pixel path) the slots of each VAE size bucket. `OpenPack.fits`
checks them all; `assemble` turns B lists of `TokenSample`s into the batch dict of
`batch.batch_spec` (the only description of the batch: arrays are allocated from it);
`first_fit` places samples into packs in order (the pipeline adds a lookahead buffer and
mandatory groups on top, see pipeline.py).

Layout of one pack: the samples' tokens in placement order from position 0, then padding up to
T. und_idx = the understanding tokens in ascending order, then the first U - n_und padding
positions; gen_idx = the latent tokens in ascending order, then the remaining padding positions.
Padding tokens have segment id 0, split id one past the last real split (so split_ids stay
non-decreasing), mode 0, position 0, token type 0.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from unimedvl_jax.batch import TOKEN_PAD, TOKEN_VAE, bucket_key, empty_batch
from unimedvl_jax.data.plans import Geometry, TokenSample


@dataclasses.dataclass
class OpenPack:
  samples: list = dataclasses.field(default_factory=list)
  n_tokens: int = 0
  n_lat: int = 0
  n_labels: int = 0
  n_patches: int = 0
  n_vae: int = 0
  buckets: dict = dataclasses.field(default_factory=dict)   # bucket index -> slots used

  @property
  def n_und(self) -> int:
    return self.n_tokens - self.n_lat

  def fits(self, s: TokenSample, geom: Geometry) -> bool:
    if not (self.n_tokens + s.n_tokens <= geom.T
            and self.n_und + s.n_und <= geom.U
            and self.n_lat + s.n_lat <= geom.L
            and self.n_labels + s.n_labels <= geom.labels
            and self.n_patches + s.n_patches <= geom.P
            and self.n_vae + s.n_vae <= geom.N):
      return False
    vb = geom.vae_buckets
    return all(self.buckets.get(j, 0) + n <= vb[j][2] for j, n in s.bucket_counts(geom).items())

  def add(self, s: TokenSample, geom: Geometry | None = None) -> None:
    self.samples.append(s)
    self.n_tokens += s.n_tokens
    self.n_lat += s.n_lat
    self.n_labels += s.n_labels
    self.n_patches += s.n_patches
    self.n_vae += s.n_vae
    if geom is not None:
      for j, n in s.bucket_counts(geom).items():
        self.buckets[j] = self.buckets.get(j, 0) + n


def place_first_fit(packs: Sequence[OpenPack], s: TokenSample, geom: Geometry) -> bool:
  for p in packs:
    if p.fits(s, geom):
      p.add(s, geom)
      return True
  return False


def first_fit(samples: Iterable[TokenSample], geom: Geometry, n_packs: int) -> list[OpenPack]:
  """Places `samples` first-fit into `n_packs` packs; raises ValueError if one does not fit."""
  packs = [OpenPack() for _ in range(n_packs)]
  for s in samples:
    why = s.budget_problem(geom)
    if why:
      raise ValueError(f'sample {s.loc or "?"} can never be packed: {why}')
    if not place_first_fit(packs, s, geom):
      raise ValueError(f'sample {s.loc or "?"} does not fit in {n_packs} pack(s); pass fewer '
                       'samples or a larger batch')
  return packs


def _pack_arrays(samples: Sequence[TokenSample], geom: Geometry, out: dict, b: int) -> None:
  """Writes pack `b` of the batch `out` (allocated from batch_spec: zeros, empty_batch fills)."""
  T, U, L = geom.T, geom.U, geom.L
  n = sum(s.n_tokens for s in samples)
  if samples:
    cat = lambda f: np.concatenate([getattr(s, f) for s in samples])
    out['input_ids'][b, :n] = cat('input_ids')
    out['split_modes'][b, :n] = cat('modes')
    out['positions'][b, :n] = cat('positions')
    out['token_type'][b, :n] = cat('token_type')
    out['label_ids'][b, :n] = cat('label_ids')
    out['loss_mask'][b, :n] = cat('loss_mask')
    seg, spl = [], []
    split_off = 0
    for i, s in enumerate(samples):
      seg.append(np.full(s.n_tokens, i + 1, np.int32))
      spl.append(s.split + split_off)
      split_off += s.n_splits
    out['segment_ids'][b, :n] = np.concatenate(seg)
    out['split_ids'][b, :n] = np.concatenate(spl)
    out['split_ids'][b, n:] = split_off
  labels = np.flatnonzero(out['loss_mask'][b] > 0)
  assert labels.size <= out['label_pos'].shape[1], 'label budget exceeded (packer bug)'
  out['label_pos'][b, :labels.size] = labels
  out['label_pos'][b, labels.size:] = T
  tt = out['token_type'][b]
  is_lat = tt == TOKEN_VAE
  real = np.arange(T) < n
  und_real = np.flatnonzero(real & ~is_lat)
  gen_real = np.flatnonzero(is_lat)
  pad = np.arange(n, T)
  n_und_pad = U - und_real.size
  assert n_und_pad >= 0 and L - gen_real.size >= 0, 'budget exceeded (packer bug)'
  out['und_idx'][b] = np.concatenate([und_real, pad[:n_und_pad]])
  out['gen_idx'][b] = np.concatenate([gen_real, pad[n_und_pad:]])

  # ViT patches
  start, p, img = 0, 0, 0
  out['vit_token_idx'][b] = T
  for s in samples:
    for patches, pos_ids, tok in s.vit:
      m = patches.shape[0]
      img += 1
      out['vit_patches'][b, p:p + m] = patches
      out['vit_segment_ids'][b, p:p + m] = img
      out['vit_pos_ids'][b, p:p + m] = pos_ids
      out['vit_token_idx'][b, p:p + m] = tok + start
      p += m
    start += s.n_tokens

  # VAE images and latent tokens
  buckets = geom.vae_buckets
  offsets = geom.bucket_offsets()
  used = [0] * len(buckets)
  if not geom.latent_cache:
    for h, w, _ in buckets:
      out[bucket_key(h, w) + '_image'][b] = -1
  start, q, image = 0, 0, 0
  for s in samples:
    for v in s.vae:
      k = v.tok.shape[0]
      assert np.array_equal(gen_real[q:q + k], v.tok + start), 'latent order (packer bug)'
      out['vae_image_noised'][b, image] = int(v.noised)
      out['latent_mask'][b, q:q + k] = 1.0
      out['latent_image'][b, q:q + k] = image
      out['latent_pos_ids'][b, q:q + k] = v.lpos
      out['latent_noised'][b, q:q + k] = float(v.noised)
      if geom.latent_cache:
        if v.moments is None:
          raise ValueError(f'{s.loc}: a VAE image has no cached moments (data.latent_cache is set)')
        out['latent_mean'][b, q:q + k], out['latent_logvar'][b, q:q + k] = v.moments
      else:
        if v.pixels is None:
          raise ValueError(f'{s.loc}: a VAE image has no pixels (data.latent_cache is not set)')
        h, w = v.size
        j = geom.bucket_index(h, w)
        slot = used[j]
        used[j] += 1
        out[bucket_key(h, w)][b, slot] = v.pixels
        out[bucket_key(h, w) + '_image'][b, slot] = image
        out['latent_src'][b, q:q + k] = offsets[j] + slot * geom.bucket_tokens(h, w) + np.arange(k)
      q += k
      image += 1
    start += s.n_tokens


def assemble(packs: Sequence[Sequence[TokenSample] | OpenPack], cfg_or_geom, batch_size=None
             ) -> dict[str, np.ndarray]:
  """The batch dict (exactly batch_spec with batch dim len(packs) or batch_size; missing packs
  are all padding) holding `packs`."""
  geom = cfg_or_geom if isinstance(cfg_or_geom, Geometry) else Geometry.from_config(cfg_or_geom)
  B = len(packs) if batch_size is None else batch_size
  if len(packs) > B:
    raise ValueError(f'{len(packs)} packs for a batch of {B}')
  out = empty_batch(geom, B)
  for b in range(B):
    pk = packs[b] if b < len(packs) else []
    _pack_arrays(pk.samples if isinstance(pk, OpenPack) else list(pk), geom, out, b)
  return out


def batch_fill(batch: dict, geom: Geometry) -> dict:
  """Budget use of a batch: fractions of real tokens, latent tokens, CE targets, ViT patches,
  VAE images."""
  B = batch['segment_ids'].shape[0]
  real = float((batch['segment_ids'] != 0).sum())
  images = int(sum(len(np.unique(r[m > 0])) for r, m in zip(batch['latent_image'],
                                                             batch['latent_mask'])))
  return dict(
      packs=B,
      samples=int(sum(len(np.unique(s[s != 0])) for s in batch['segment_ids'])),
      token_fill=real / (B * geom.T),
      padding_fraction=1.0 - real / (B * geom.T),
      latent_fill=float(batch['latent_mask'].sum()) / max(1, B * geom.L),
      label_fill=float(batch['loss_mask'].sum()) / max(1, B * geom.labels),
      vit_fill=float((batch['vit_segment_ids'] != 0).sum()) / max(1, B * geom.P),
      vae_image_fill=images / max(1, B * geom.N),
  )


def check_pack_invariants(batch: dict, geom: Geometry) -> None:
  """Asserts the structural invariants of a packed batch (used by tests and `check`)."""
  B, T = batch['segment_ids'].shape
  for b in range(B):
    seg, spl = batch['segment_ids'][b], batch['split_ids'][b]
    tt, lm = batch['token_type'][b], batch['loss_mask'][b]
    n = int((seg != 0).sum())
    assert (seg[:n] != 0).all() and (seg[n:] == 0).all(), 'padding not at the end'
    if n:
      assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all(), \
          'segment ids not 1..n contiguous'
    assert (np.diff(spl) >= 0).all(), 'split_ids decreasing'
    assert (tt[n:] == TOKEN_PAD).all() and (tt[:n] != TOKEN_PAD).all()
    perm = np.concatenate([batch['und_idx'][b], batch['gen_idx'][b]])
    assert np.array_equal(np.sort(perm), np.arange(T)), 'und_idx/gen_idx not a permutation'
    lat = np.flatnonzero(tt == TOKEN_VAE)
    k = lat.size
    assert np.array_equal(batch['gen_idx'][b][:k], lat), 'gen_idx is not the latent tokens'
    assert (batch['latent_mask'][b][:k] == 1).all() and (batch['latent_mask'][b][k:] == 0).all()
    assert not np.isin(batch['und_idx'][b], lat).any()
    assert ((lm == 0) | (lm == 1)).all()
    assert (batch['label_ids'][b][lm == 0] == 0).all(), 'labels outside the loss mask'
    assert (tt[lm == 1] == 1).all(), 'loss on a non-text token'
    li = np.flatnonzero(lm == 1)
    lp = batch['label_pos'][b]
    assert np.array_equal(lp[:li.size], li) and (lp[li.size:] == T).all(), 'label_pos'
    assert (li < T - 1).all() and np.array_equal(batch['label_ids'][b][li],
                                                 batch['input_ids'][b][li + 1]), \
        'a label is not the next token id'
    vt = batch['vit_token_idx'][b]
    vs = batch['vit_segment_ids'][b]
    assert (vt[vs == 0] == T).all() and (tt[vt[vs != 0]] == 2).all()
    assert int((tt == 2).sum()) == int((vs != 0).sum())
    assert (batch['latent_noised'][b] <= batch['latent_mask'][b]).all()
    assert np.array_equal(batch['split_modes'][b][lat] == 2, batch['latent_noised'][b][:k] == 1)
    assert (batch['latent_pos_ids'][b] >= 0).all()
    if not geom.latent_cache:
      rows = sum(n * geom.bucket_tokens(h, w) for h, w, n in geom.vae_buckets)
      src = batch['latent_src'][b][:k]
      assert (src >= 0).all() and (src < max(rows, 1)).all() and len(np.unique(src)) == k, \
          'latent_src'


# ----------------------------------------------------------------------------------------------
# the streaming first-fit with a lookahead buffer (used by the pipeline and by `check`)


class Entry:
  """A sample on its way into a pack: `ref` identifies it for checkpoints, `group` its group."""
  __slots__ = ('ref', 'sample', 'group')

  def __init__(self, ref, sample: TokenSample, group: int = 0):
    self.ref, self.sample, self.group = ref, sample, group


def fill_batch(n_packs: int, geom: Geometry, pending: list, draw, *, lookahead: int = 8,
               mandatory: Sequence[int] = (), draw_group=None, max_mandatory_tries: int = 16
               ) -> tuple[list[OpenPack], list]:
  """Fills `n_packs` empty packs with whole samples, deterministically.

  1. mandatory groups: each pack first gets one sample of every group in `mandatory` (from
     `pending` if one there fits, else `draw_group(g)`; a drawn one that does not fit joins
     `pending`);
  2. `pending` (samples held from earlier batches, oldest first) first-fit;
  3. `draw()` more samples first-fit until `lookahead` samples are pending (or `draw()` returns
     None: the stream has ended).
  Every sample must fit an empty pack (the caller skips the others as 'too_long'). Returns the
  packs and the new pending list (carried into the next batch, in order).
  """
  packs = [OpenPack() for _ in range(n_packs)]
  pending = list(pending)
  for p in packs:
    for g in mandatory:
      for e in pending:
        if e.group == g and p.fits(e.sample, geom):
          pending.remove(e)
          p.add(e.sample, geom)
          break
      else:
        for _ in range(max_mandatory_tries):
          e = draw_group(g)
          if p.fits(e.sample, geom):
            p.add(e.sample, geom)
            break
          pending.append(e)
        else:
          raise ValueError(f'{max_mandatory_tries} samples of mandatory group #{g} in a row do '
                           'not fit in a pack beside the other mandatory samples; enlarge the '
                           'pack budgets or make fewer groups mandatory')
  still = []
  for e in pending:
    if not place_first_fit(packs, e.sample, geom):
      still.append(e)
  pending = still
  while len(pending) < lookahead:
    e = draw()
    if e is None:
      break
    if not place_first_fit(packs, e.sample, geom):
      pending.append(e)
  return packs, pending
