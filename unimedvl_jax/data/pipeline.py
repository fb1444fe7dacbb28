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
parse, plan, load images, encode text) -> the packer. `mp_prefetch` runs it in
cfg.data.num_workers processes (each on a slice of every group); with 0 workers it runs
in-process. Batches are a deterministic function of (cfg.seed, stage, process_index,
process_count, num_workers, data). The packer's state is the whole iterator state, so a restored
iterator yields exactly the batches the original would have, and the counters survive a resume.

The pieces, one job each (their public names are re-exported here):

    locate.py    data_root, load_tokenizer / check_tokenizer (where the data and tokenizer are)
    groups.py    resolve_groups (config -> groups)
    samples.py   SampleProcessor: a JSONL line -> Good(plan items) | Bad(reason), never raising
    packer.py    PackIterDataset / PackIterator (weighted draws, CFG dropout, skips, first-fit
                 packing, state), EpochShuffleRepeat, CounterRng, summarize_stats / state_stats
    pipeline.py  (this file) build_dataset / make_train_iterator (TrainIterator), and the
                 evaluation helpers iter_eval_samples, prepare_sample, pack_samples
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import numpy as np

import grain
from absl import logging

from unimedvl_jax.batch import latent_cache_path
from unimedvl_jax.data import latent_cache as latent_cache_lib
from unimedvl_jax.data import packing
from unimedvl_jax.data.groups import resolve_groups
from unimedvl_jax.data.jsonl import (DataError, JsonlSource, RawLine, Sample,  # noqa: F401
                                     SampleError, iter_records, parse_record)
from unimedvl_jax.data.locate import check_tokenizer, data_root, load_tokenizer  # noqa: F401
from unimedvl_jax.data.packer import (CounterRng, EpochShuffleRepeat, PackIterator,  # noqa: F401
                                      PackIterDataset, name_hash, seed_words, state_stats,
                                      summarize_stats)
from unimedvl_jax.data.plans import (Geometry, PlanItem, Specials, TokenSample, materialize,
                                     plan_sample, tokenize)
from unimedvl_jax.data.samples import Bad, Good, SampleProcessor, sample_pixel_cap  # noqa: F401


# ----------------------------------------------------------------------------------------------
# the trainer's iterator


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
  stage_h = name_hash(stage)
  seeds = seed_words(cfg.seed, stage_h, process_index, process_count)
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
        seeds + [3, name_hash(g['name'])]).generate_state(1)[0]))
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
