"""The grain input pipeline: JSONL groups -> processed samples -> packed batches of batch.py.

    it = make_train_iterator(cfg, stage='stage1', process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)          # numpy dict, exactly batch_spec(cfg) with B = batch_size // hosts
    it.stats()                # samples read / skipped by reason / packing efficiency
    state = it.get_state()    # JSON-able dict; it.set_state(state) resumes exactly
    # in an Orbax CheckpointManager: args=ocp.args.Composite(
    #     data=grain.checkpoint.CheckpointSave(it))    / CheckpointRestore(it)

Per group (cfg.data.groups[name].jsonl: paths relative to the data root, comma separated, `{split}`
substituted, globs allowed): `grain.MapDataset.source(JsonlSource)` -> this host's slice
`[process_index::process_count]` -> shuffle (reshuffled every epoch) -> repeat -> map(process:
parse, plan, load images, encode text). `PackIterDataset` draws groups by weight with a
counter-seeded generator, applies CFG dropout (seeded per sample), skips and counts bad samples,
and packs whole samples first-fit with a lookahead buffer (packing.fill_batch), one sample of
every mandatory group in each pack. `mp_prefetch` runs it in cfg.data.num_workers processes
(each on a slice of every group); with 0 workers it runs in-process. Batches are a deterministic
function of (cfg.seed, stage, process_index, process_count, num_workers, data).

The packer's state is a few integers per group plus the refs of held-back samples (re-read on
restore) and the skip counters; it is the whole iterator state, so a restored iterator yields
exactly the batches the original would have, and the counters survive a resume.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import sys
import zlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

import grain
from absl import logging

from unimedvl_jax.batch import latent_cache_path
from unimedvl_jax.data import latent_cache as latent_cache_lib
from unimedvl_jax.data import packing
from unimedvl_jax.data.jsonl import (SAMPLE_ERROR_REASONS, DataError, JsonlSource, RawLine, Sample,
                                     SampleError, iter_records, parse_record)
from unimedvl_jax.data.plans import (Geometry, PlanItem, Specials, TokenSample, materialize,
                                     plan_sample, tokenize)

_STATE_KEY = '__unimedvl_packer__'
_MAX_EXAMPLES = 3


# ----------------------------------------------------------------------------------------------
# configuration -> groups, root, tokenizer


def data_root(cfg) -> str:
  """The dataset root: cfg.data.root, or the embedded synthetic dataset when empty."""
  if cfg.data.root:
    return os.path.abspath(os.path.expanduser(cfg.data.root))
  from unimedvl_jax.data import synthetic
  for fn in ('ensure_dataset', 'default_root'):
    if hasattr(synthetic, fn):
      return os.path.abspath(getattr(synthetic, fn)())
  raise DataError('config.data.root is empty and data/synthetic/ offers no default dataset; '
                  'set --config.data.root=DIR')


def load_tokenizer(cfg, root: str | None = None):
  """The configured tokenizer; checks it fits the model's vocabulary."""
  from unimedvl_jax.data import tokenizer as toklib
  root = data_root(cfg) if root is None else root
  path = cfg.data.tokenizer_path or os.path.join(root, 'tokenizer.model')
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise DataError(f'tokenizer file {path!r} not found (config.data.tokenizer_path, or '
                    'tokenizer.model under the data root)')
  tok = toklib.load_tokenizer(cfg.data.tokenizer_kind, path)
  check_tokenizer(tok, cfg)
  return tok


def check_tokenizer(tok, cfg) -> None:
  v = cfg.model.llm.vocab_size
  ids = {n: int(getattr(tok, n)) for n in ('im_start', 'im_end', 'vision_start', 'vision_end')}
  if tok.vocab_size > v or max(ids.values()) >= v:
    raise DataError(f'tokenizer vocabulary ({tok.vocab_size} ids, specials {ids}) does not fit '
                    f'config.model.llm.vocab_size = {v}')


def _expand(paths: str, root: str, split: str, group: str) -> list[str]:
  out = []
  for p in (x.strip() for x in paths.split(',')):
    if not p:
      continue
    if '{split}' in p:
      p = p.replace('{split}', split)
    elif split != 'train':
      parts = p.split('/')
      if 'train' not in parts:
        raise DataError(f'config.data.groups.{group}.jsonl = {paths!r}: cannot find split '
                        f'{split!r}; write the path with a {{split}} placeholder')
      parts[parts.index('train')] = split
      p = '/'.join(parts)
    p = os.path.join(root, os.path.expanduser(p))
    hits = sorted(globlib.glob(p)) if any(c in p for c in '*?[') else [p]
    if not hits or not all(os.path.isfile(h) for h in hits):
      raise DataError(f'config.data.groups.{group}.jsonl: {p!r} not found')
    out += hits
  if not out:
    raise DataError(f'config.data.groups.{group}.jsonl is empty')
  return out


def resolve_groups(cfg, stage: str | None = None, split: str = 'train', root: str | None = None
                   ) -> tuple[list[dict], tuple[float, float, float]]:
  """[{name, files, weight, mandatory}] and the CFG dropout (text, vit, vae) for `stage`.

  Groups come from cfg.data.groups; with none configured, every `ROOT/{split}/*.jsonl` is a group
  named by its file stem, weight 1. A curriculum stage picks groups and weights with its
  `mixture`, its `mandatory` tuple, and may override cfg_dropout_* in its `data`.
  """
  d = cfg.data
  root = data_root(cfg) if root is None else root
  if len(d.groups):
    avail = {n: dict(jsonl=g.jsonl, weight=float(g.get('weight', 1.0)),
                     mandatory=bool(g.get('mandatory', False))) for n, g in d.groups.items()}
  else:
    files = sorted(globlib.glob(os.path.join(root, split, '*.jsonl')))
    if not files:
      raise DataError(f'no dataset groups: config.data.groups is empty and {root}/{split}/ has no '
                      '*.jsonl files')
    avail = {os.path.splitext(os.path.basename(f))[0]:
             dict(jsonl='{split}/' + os.path.basename(f), weight=1.0, mandatory=False)
             for f in files}
  dropout = [d.cfg_dropout_text, d.cfg_dropout_vit, d.cfg_dropout_vae]
  if stage is not None:
    if stage not in cfg.curriculum:
      raise DataError(f'curriculum stage {stage!r} not in config.curriculum '
                      f'({list(cfg.curriculum.keys())})')
    st = cfg.curriculum[stage]
    mix = dict(st.get('mixture', None) or {})
    mand = tuple(st.get('mandatory', None) or ())
    if not mix:
      mix = {n: g['weight'] for n, g in avail.items()}
    unknown = sorted((set(mix) | set(mand)) - set(avail))
    if unknown:
      raise DataError(f'curriculum.{stage}: groups {unknown} are not in config.data.groups '
                      f'({sorted(avail)})')
    chosen = {n: dict(avail[n], weight=float(mix.get(n, 0.0)), mandatory=n in mand)
              for n in list(mix) + [m for m in mand if m not in mix]}
    sd = st.get('data', None)
    if sd is not None:
      names = ('cfg_dropout_text', 'cfg_dropout_vit', 'cfg_dropout_vae')
      bad = sorted(set(sd.keys()) - set(names))
      if bad:
        raise DataError(f'curriculum.{stage}.data: {bad} cannot change per stage (pack budgets '
                        f'are static); allowed: {list(names)}')
      for i, k in enumerate(names):
        if k in sd:
          dropout[i] = float(sd[k])
  else:
    chosen = avail
  groups = []
  for name in sorted(chosen):
    g = chosen[name]
    if g['weight'] < 0:
      raise DataError(f'group {name!r}: weight must be >= 0, got {g["weight"]}')
    if g['weight'] == 0 and not g['mandatory']:
      continue
    groups.append(dict(name=name, files=_expand(g['jsonl'], root, split, name),
                       weight=g['weight'], mandatory=g['mandatory']))
  if not groups or sum(g['weight'] for g in groups) <= 0:
    raise DataError(f'no group with a positive weight (stage {stage!r})')
  for p in dropout:
    if not 0.0 <= p <= 1.0:
      raise DataError(f'cfg dropout probabilities must be in [0, 1], got {dropout}')
  return groups, tuple(dropout)


# ----------------------------------------------------------------------------------------------
# per-sample processing (runs inside grain, possibly in worker processes)


class Bad:
  """A sample that cannot be used, as an element of the dataset (counted, never raised)."""
  __slots__ = ('reason', 'loc', 'detail')

  def __init__(self, reason, loc, detail=''):
    self.reason, self.loc, self.detail = reason, loc, detail


class Good:
  __slots__ = ('items', 'loc', 'group')

  def __init__(self, items, loc, group):
    self.items, self.loc, self.group = items, loc, group


def _exception_text(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'[:300]


def sample_pixel_cap(cfg) -> int:
  """The pixel cap applied to the training images of `cfg` (images.source_pixel_cap)."""
  from unimedvl_jax.data.images import source_pixel_cap
  d = cfg.data
  return source_pixel_cap(vit_max_size=d.vit_max_size, vae_max_size=d.vae_max_size,
                          vit_max_pixels=d.vit_max_pixels or None)


class SampleProcessor:
  """RawLine -> Good(materialized plan items) | Bad(reason). Picklable; loads its tokenizer
  lazily in whatever process runs it. Never raises for a sample: any failure becomes a Bad with
  a reason of SAMPLE_ERROR_REASONS ('processing_error' with the exception type and text for an
  exception no other reason covers)."""

  def __init__(self, cfg, group: str, root: str):
    self.group, self.root = group, root
    self.geom = Geometry.from_config(cfg)
    self.tok_kind = cfg.data.tokenizer_kind
    self.tok_path = cfg.data.tokenizer_path or os.path.join(root, 'tokenizer.model')
    self.allow_outside_root = bool(cfg.data.get('allow_outside_root', False))
    self.max_pixels = sample_pixel_cap(cfg)
    self._tok = None
    # VAE images from the latent cache (moments) instead of pixels; opened once per process
    path = latent_cache_path(cfg.data)
    self.latent_cache = latent_cache_lib.LatentCache(path, root, cfg) if path else None

  @property
  def tokenizer(self):
    if self._tok is None:
      from unimedvl_jax.data import tokenizer as toklib
      self._tok = toklib.load_tokenizer(self.tok_kind, os.path.expanduser(self.tok_path))
    return self._tok

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_tok'] = None
    return d

  def __call__(self, raw: RawLine):
    tok = self.tokenizer    # a missing/corrupt tokenizer is not a per-sample problem: raise
    loc = getattr(raw, 'loc', '?')
    try:
      sample = parse_record(raw, self.root, self.group, allow_outside_root=self.allow_outside_root,
                            max_image_pixels=self.max_pixels)
      items = materialize(plan_sample(sample), _CheckedTokenizer(tok), self.geom, sample,
                          latent_cache=self.latent_cache)
      return Good(items, sample.loc, self.group)
    except SampleError as e:
      return Bad(e.reason, e.loc, e.detail)
    except latent_cache_lib.LatentCacheError:
      raise     # a stale or incomplete cache is not a per-sample problem: rebuild it
    except _TextError as e:
      return Bad('invalid_text', loc, str(e))
    except Exception as e:  # noqa: BLE001  (one bad sample never stops the pipeline)
      return Bad('processing_error', loc, _exception_text(e))


class _TextError(Exception):
  pass


class _CheckedTokenizer:
  """The tokenizer, with `encode` failures told apart from other errors (-> 'invalid_text')."""
  __slots__ = ('_tok',)

  def __init__(self, tok):
    self._tok = tok

  def encode(self, text):
    try:
      return self._tok.encode(text)
    except Exception as e:  # noqa: BLE001  (sentencepiece raises RuntimeError, tokenizers ...)
      raise _TextError(f'the tokenizer cannot encode a text of {len(text)} characters '
                       f'({_exception_text(e)}): {text[:60]!r}') from None

  def __getattr__(self, name):
    return getattr(self._tok, name)


# ----------------------------------------------------------------------------------------------
# the packer as a grain IterDataset


def _seed_words(*xs) -> list[int]:
  return [int(x) & 0xFFFFFFFF for x in xs]


_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
  """splitmix64's finalizer."""
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return z ^ (z >> 31)


class CounterRng:
  """A counter-based generator keyed by integers: `random()` -> floats in [0, 1) (splitmix64).
  Stateless per key, so a sample's draws depend only on (seed, group, index), and ~50x cheaper
  to create than a numpy Generator."""
  __slots__ = ('_key', '_i')

  def __init__(self, *words: int):
    h = 0x9E3779B97F4A7C15
    for w in words:
      h = _mix64((h ^ (int(w) & _M64)) + 0x9E3779B97F4A7C15 & _M64)
    self._key, self._i = h, 0

  def random(self) -> float:
    self._i += 1
    return (_mix64((self._key + self._i * 0x9E3779B97F4A7C15) & _M64) >> 11) * (1.0 / (1 << 53))


def _name_hash(s: str | None) -> int:
  return zlib.crc32((s or '').encode())


class EpochShuffleRepeat(grain.MapDataset):
  """parent[perm_e[i % n]] with e = i // n: an infinite stream reshuffled every epoch (a fresh
  numpy permutation per epoch from (seed, e), cached). grain's index_shuffle is slow on small
  datasets (milliseconds per element below ~100 elements)."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._n, self._seed = len(parent), int(seed)
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def _perm(self, epoch: int) -> np.ndarray:
    p = self._cache.get(epoch)
    if p is None:
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      dt = np.int32 if self._n < 2 ** 31 else np.int64
      p = self._cache[epoch] = np.random.default_rng([self._seed, epoch]).permutation(
          self._n).astype(dt)
    return p

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, pos = divmod(int(index), self._n)
    return self._parent[int(self._perm(epoch)[pos])]

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_cache'] = {}
    return d

  def __str__(self):
    return f'EpochShuffleRepeat(n={self._n}, seed={self._seed})'


class PackIterDataset(grain.IterDataset):
  """Packs samples drawn from per-group MapDatasets into batches of `packs_per_batch` packs."""

  def __init__(self, group_datasets: Sequence[grain.MapDataset], *, names, weights, mandatory,
               geom: Geometry, specials: Specials, packs_per_batch: int, dropout, seed_words,
               lookahead: int, max_bad_fraction: float, bad_check_min: int):
    super().__init__(list(group_datasets))
    self.names, self.geom, self.specials = list(names), geom, specials
    w = np.asarray(weights, np.float64)
    self.cum_weights = np.cumsum(w / w.sum())
    self.mandatory = [i for i, m in enumerate(mandatory) if m]
    self.packs_per_batch, self.dropout = packs_per_batch, tuple(dropout)
    self.seed_words, self.lookahead = list(seed_words), lookahead
    self.max_bad_fraction, self.bad_check_min = max_bad_fraction, bad_check_min
    self.slice_start, self.slice_step = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Called by mp_prefetch in each worker: read elements start, start+step, ... of every group."""
    del sequential_slice
    self.slice_start, self.slice_step = sl.start or 0, sl.step or 1

  def __iter__(self):
    return PackIterator(self)

  def __str__(self):
    return f'PackIterDataset(groups={self.names}, packs_per_batch={self.packs_per_batch})'


def _new_stats(names) -> dict:
  return dict(read=0, usable=0, skipped={r: 0 for r in SAMPLE_ERROR_REASONS},
              examples={r: [] for r in SAMPLE_ERROR_REASONS}, read_by_group={n: 0 for n in names},
              batches=0, packs=0, samples_packed=0, tokens=0, token_capacity=0, latent_tokens=0,
              latent_capacity=0, vit_patches=0, vit_capacity=0)


class PackIterator(grain.DatasetIterator):

  def __init__(self, ds: PackIterDataset):
    super().__init__()
    self._ds = ds
    self._groups = list(ds.parents)
    self._cursors = [0] * len(self._groups)
    self._draws = 0
    self._pending: list[packing.Entry] = []
    self._counts = _new_stats(ds.names)

  # --- sample access -------------------------------------------------------------------------

  def _fetch(self, g: int, k: int):
    """The element k of this worker's slice of group g: (Good | Bad, global index)."""
    idx = self._ds.slice_start + self._ds.slice_step * k
    return self._groups[g][idx], idx

  def _tokenize(self, good: Good, g: int, idx: int) -> TokenSample:
    rng = CounterRng(*self._ds.seed_words, 2, g, idx)
    return tokenize(good.items, self._ds.specials, self._ds.geom, rng, self._ds.dropout,
                    loc=good.loc, group=self._ds.names[g])

  def _skip(self, reason: str, loc: str, detail: str) -> None:
    st = self._counts
    st['skipped'][reason] = st['skipped'].get(reason, 0) + 1
    ex = st['examples'].setdefault(reason, [])
    if len(ex) < _MAX_EXAMPLES:
      ex.append(f'{loc}: {detail}'[:300])
    bad = sum(st['skipped'].values())
    if st['read'] >= self._ds.bad_check_min and bad > self._ds.max_bad_fraction * st['read']:
      worst = max(st['skipped'], key=lambda r: st['skipped'][r])
      raise DataError(
          f'{bad} of {st["read"]} samples read were unusable ({bad / st["read"]:.1%} > '
          f'config.data.max_bad_fraction = {self._ds.max_bad_fraction}); most are '
          f'{worst!r} ({st["skipped"][worst]}), e.g. {st["examples"][worst][0]}. Skipped by '
          f'reason: { {r: c for r, c in st["skipped"].items() if c} }. Run `python -m '
          'unimedvl_jax.data check --data FILE.jsonl` for a full report.')

  def _draw_from(self, g: int) -> packing.Entry:
    """The next usable sample of group g (skipping and counting bad ones)."""
    while True:
      k = self._cursors[g]
      self._cursors[g] += 1
      self._counts['read'] += 1
      self._counts['read_by_group'][self._ds.names[g]] += 1
      el, idx = self._fetch(g, k)
      if isinstance(el, Bad):
        self._skip(el.reason, el.loc, el.detail)
        continue
      try:
        s = self._tokenize(el, g, idx)
        why = s.budget_problem(self._ds.geom)
      except Exception as e:  # noqa: BLE001  (one bad sample never stops the pipeline)
        self._skip('processing_error', el.loc, _exception_text(e))
        continue
      if why:
        self._skip('too_long', s.loc, why)
        continue
      self._counts['usable'] += 1
      return packing.Entry((g, k), s, g)

  def _draw(self) -> packing.Entry:
    rng = CounterRng(*self._ds.seed_words, 1, self._ds.slice_start, self._draws)
    self._draws += 1
    g = int(np.searchsorted(self._ds.cum_weights, rng.random(), side='right'))
    return self._draw_from(min(g, len(self._groups) - 1))

  # --- iteration -----------------------------------------------------------------------------

  def __next__(self) -> dict[str, np.ndarray]:
    ds = self._ds
    try:
      packs, self._pending = packing.fill_batch(
          ds.packs_per_batch, ds.geom, self._pending, self._draw, lookahead=ds.lookahead,
          mandatory=ds.mandatory, draw_group=self._draw_from)
    except ValueError as e:
      raise DataError(f'{e} (mandatory groups: {[ds.names[g] for g in ds.mandatory]})') from None
    batch = packing.assemble(packs, ds.geom)
    st, g = self._counts, ds.geom
    st['batches'] += 1
    st['packs'] += len(packs)
    st['samples_packed'] += sum(len(p.samples) for p in packs)
    st['tokens'] += sum(p.n_tokens for p in packs)
    st['token_capacity'] += len(packs) * g.T
    st['latent_tokens'] += sum(p.n_lat for p in packs)
    st['latent_capacity'] += len(packs) * g.L
    st['vit_patches'] += sum(p.n_patches for p in packs)
    st['vit_capacity'] += len(packs) * g.P
    return batch

  def get_state(self) -> dict[str, Any]:
    return {_STATE_KEY: 1, 'cursors': list(self._cursors), 'draws': self._draws,
            'pending': [list(e.ref) for e in self._pending],
            'stats': json.loads(json.dumps(self._counts))}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or _STATE_KEY not in state:
      raise ValueError(f'not a packer state: {str(state)[:200]}')
    if len(state['cursors']) != len(self._groups):
      raise ValueError(f'packer state has {len(state["cursors"])} groups, the pipeline has '
                       f'{len(self._groups)} ({self._ds.names})')
    self._cursors = [int(c) for c in state['cursors']]
    self._draws = int(state['draws'])
    self._counts = json.loads(json.dumps(state['stats']))
    pending = []
    for g, k in state['pending']:
      el, idx = self._fetch(int(g), int(k))
      if isinstance(el, Bad):
        raise DataError(f'restoring the data iterator: held-back sample {el.loc} is now '
                        f'unreadable ({el.reason}: {el.detail})')
      pending.append(packing.Entry((int(g), int(k)), self._tokenize(el, int(g), idx), int(g)))
    self._pending = pending


# ----------------------------------------------------------------------------------------------
# the trainer's iterator


def _find_packer_states(state) -> list[dict]:
  out = []
  if isinstance(state, dict):
    if _STATE_KEY in state:
      return [state]
    for v in state.values():
      out += _find_packer_states(v)
  elif isinstance(state, (list, tuple)):
    for v in state:
      out += _find_packer_states(v)
  return out


def summarize_stats(packer_stats: Sequence[dict]) -> dict:
  """Sums the counters of one or more packers (workers) and derives rates."""
  tot = _new_stats([])
  tot['read_by_group'] = {}
  for s in packer_stats:
    for k, v in s.items():
      if k == 'skipped':
        for r, c in v.items():
          tot['skipped'][r] = tot['skipped'].get(r, 0) + c
      elif k == 'examples':
        for r, ex in v.items():
          tot['examples'].setdefault(r, [])
          tot['examples'][r] = (tot['examples'][r] + ex)[:_MAX_EXAMPLES]
      elif k == 'read_by_group':
        for n, c in v.items():
          tot['read_by_group'][n] = tot['read_by_group'].get(n, 0) + c
      else:
        tot[k] += v
  tot['examples'] = {r: ex for r, ex in tot['examples'].items() if ex}
  tot['bad'] = sum(tot['skipped'].values())
  tot['bad_fraction'] = tot['bad'] / tot['read'] if tot['read'] else 0.0
  tot['token_fill'] = tot['tokens'] / tot['token_capacity'] if tot['token_capacity'] else 0.0
  tot['padding_fraction'] = 1.0 - tot['token_fill'] if tot['token_capacity'] else 0.0
  tot['latent_fill'] = tot['latent_tokens'] / tot['latent_capacity'] if tot['latent_capacity'] \
      else 0.0
  tot['vit_fill'] = tot['vit_patches'] / tot['vit_capacity'] if tot['vit_capacity'] else 0.0
  tot['samples_per_pack'] = tot['samples_packed'] / tot['packs'] if tot['packs'] else 0.0
  return tot


def state_stats(state: dict) -> dict:
  """The data counters (summarize_stats) recorded in a TrainIterator state: the statistics as
  of the batch that state belongs to (the trainer keeps the state of each consumed batch)."""
  return summarize_stats([s['stats'] for s in _find_packer_states(state.get('pipeline', state))])


class TrainIterator(grain.DatasetIterator):
  """Numpy batch dicts (exactly batch_spec with B = batch_size // process_count), plus
  `get_state()` / `set_state()` (JSON-able; grain.checkpoint.CheckpointSave/Restore work on it
  inside an Orbax CheckpointManager) and `stats()`."""

  def __init__(self, parent: grain.DatasetIterator, signature: dict):
    super().__init__(parent)
    self._signature = signature

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {'signature': self._signature, 'pipeline': self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    sig = state.get('signature')
    if sig != self._signature:
      diff = {k: (sig.get(k) if isinstance(sig, dict) else None, v)
              for k, v in self._signature.items() if not isinstance(sig, dict) or sig.get(k) != v}
      raise ValueError(f'data iterator state is for a different pipeline; (saved, now): {diff}')
    self._parent.set_state(state['pipeline'])

  def stats(self) -> dict:
    return state_stats(self.get_state())

  def __str__(self):
    return f'TrainIterator({self._signature})'


def _ensure_absl_flags_parsed():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def build_dataset(cfg, stage: str | None = None, *, split: str = 'train', process_index: int = 0,
                  process_count: int = 1, root: str | None = None):
  """The grain IterDataset of per-host batches, and the iterator signature."""
  d = cfg.data
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} / process_count {process_count} invalid')
  if d.batch_size % process_count:
    raise DataError(f'config.data.batch_size ({d.batch_size}) must be a multiple of the number '
                    f'of hosts ({process_count})')
  root = data_root(cfg) if root is None else root
  groups, dropout = resolve_groups(cfg, stage, split, root)
  tok = load_tokenizer(cfg, root)   # also checks it fits the model's vocabulary
  specials = Specials.from_tokenizer(tok)
  geom = Geometry.from_config(cfg)
  stage_h = _name_hash(stage)
  seeds = _seed_words(cfg.seed, stage_h, process_index, process_count)
  dsets = []
  for gi, g in enumerate(groups):
    src = JsonlSource(g['files'])
    n = len(range(process_index, len(src), process_count))
    if n == 0:
      raise DataError(f'group {g["name"]!r} has no samples for host {process_index} of '
                      f'{process_count} ({len(src)} lines in {g["files"]})')
    ds = grain.MapDataset.source(src)
    if process_count > 1:
      ds = ds.slice(slice(process_index, None, process_count))
    ds = EpochShuffleRepeat(ds, seed=int(np.random.SeedSequence(
        seeds + [3, _name_hash(g['name'])]).generate_state(1)[0]))
    ds = ds.map(SampleProcessor(cfg, g['name'], root))
    dsets.append(ds)
  packer = PackIterDataset(
      dsets, names=[g['name'] for g in groups], weights=[g['weight'] for g in groups],
      mandatory=[g['mandatory'] for g in groups], geom=geom, specials=specials,
      packs_per_batch=d.batch_size // process_count, dropout=dropout, seed_words=seeds,
      lookahead=d.pack_lookahead, max_bad_fraction=d.max_bad_fraction,
      bad_check_min=d.bad_check_min_samples)
  ds = packer
  if d.num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=d.prefetch))
  signature = dict(groups=[g['name'] for g in groups], stage=stage, split=split,
                   seed=int(cfg.seed), process_index=process_index, process_count=process_count,
                   num_workers=int(d.num_workers), packs_per_batch=d.batch_size // process_count,
                   budgets=[geom.T, geom.L, geom.labels, geom.P, geom.N,
                            [list(b) for b in geom.vae_buckets], geom.latent_cache])
  return ds, signature


def make_train_iterator(cfg, stage: str | None = None, *, split: str = 'train',
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """The trainer's batch iterator for this host (see the module docstring)."""
  ds, sig = build_dataset(cfg, stage, split=split, process_index=process_index,
                          process_count=process_count)
  return TrainIterator(iter(ds), sig)


# ----------------------------------------------------------------------------------------------
# evaluation and hand-built batches


def iter_eval_samples(cfg, split: str = 'val', groups: Iterable[str] | None = None
                      ) -> Iterator[Sample]:
  """Every valid sample of `split` (file and line order), with its `meta`, group by group.
  Bad lines are logged and skipped."""
  root = data_root(cfg)
  gs, _ = resolve_groups(cfg, None, split, root)
  want = None if groups is None else set(groups)
  if want is not None:
    missing = want - {g['name'] for g in gs}
    if missing:
      raise DataError(f'groups {sorted(missing)} not found; have {[g["name"] for g in gs]}')
  for g in gs:
    if want is not None and g['name'] not in want:
      continue
    for f in g['files']:
      for rec in iter_records(f, root, g['name'],
                              allow_outside_root=bool(cfg.data.get('allow_outside_root', False))):
        if isinstance(rec, SampleError):
          logging.warning('skipping %s', rec)
          continue
        yield rec


def prepare_sample(cfg, sample: Sample, tokenizer=None) -> list[PlanItem]:
  """A sample's plan with text encoded and images loaded (for evaluation / inference)."""
  tok = tokenizer or load_tokenizer(cfg)
  return materialize(plan_sample(sample), tok, Geometry.from_config(cfg), sample)


def pack_samples(cfg, samples: Iterable, *, tokenizer=None, batch_size: int | None = None,
                 seed: int | None = None, root: str | None = None) -> dict[str, np.ndarray]:
  """One batch (B = batch_size or cfg.data.batch_size) holding `samples` first-fit.

  `samples`: Sample objects, raw record dicts (image paths relative to `root` / the data root)
  or TokenSamples. No CFG dropout unless `seed` is given (then the configured probabilities).
  Raises SampleError for a bad sample and ValueError if they do not fit.
  """
  geom = Geometry.from_config(cfg)
  tok = tokenizer
  toks = []
  cache = None
  if latent_cache_path(cfg.data):
    cache = latent_cache_lib.LatentCache(latent_cache_path(cfg.data),
                                         data_root(cfg) if root is None else root, cfg)
  for i, s in enumerate(samples):
    if isinstance(s, TokenSample):
      toks.append(s)
      continue
    if tok is None:
      tok = load_tokenizer(cfg, root)
    if isinstance(s, dict):
      raw = RawLine('<pack_samples>', i + 1, json.dumps(s))
      s = parse_record(raw, data_root(cfg) if root is None else root,
                       allow_outside_root=bool(cfg.data.get('allow_outside_root', False)))
    items = materialize(plan_sample(s), tok, geom, s, latent_cache=cache)
    rng = None if seed is None else np.random.default_rng([seed, i])
    d = cfg.data
    toks.append(tokenize(items, Specials.from_tokenizer(tok), geom, rng,
                         (d.cfg_dropout_text, d.cfg_dropout_vit, d.cfg_dropout_vae),
                         loc=s.loc, group=s.group))
  B = batch_size or cfg.data.batch_size
  return packing.assemble(packing.first_fit(toks, geom, B), geom, B)
