"""`python -m unimedvl_jax.data check --data FILE.jsonl [--root DIR] [--config CFG]`.

Reads every line of the given JSONL file(s) through the training pipeline's own per-sample path
(parse -> plan -> load and resize images -> encode text -> token arrays -> budget check) and
packs the usable samples with the training packer, then reports as JSON: samples read, usable,
skipped by reason (malformed_json, missing_fields, missing_file, undecodable_image,
unsupported_dicom, too_long) with example locations (file:line), the task families and token
counts seen, and the packing efficiency under the config's budgets. One bad line, image or file
never stops the check.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Sequence

import numpy as np

from unimedvl_jax.data import packing
from unimedvl_jax.data.jsonl import (SAMPLE_ERROR_REASONS, DataError, JsonlSource, SampleError,
                                     parse_record)
from unimedvl_jax.data.plans import Geometry, Specials, task_family, tokenize

_EXAMPLES = 5


def builtin_config():
  """The default check config: the tiny shapes (configs/tiny.py's data and model sizes)."""
  from unimedvl_jax.config import default_config
  cfg = default_config()
  cfg.name = 'tiny-check'
  cfg.model.llm.vocab_size = 1024
  cfg.model.vit.update(dict(patch_size=8, grid_size=8))
  cfg.model.max_latent_size = 4
  cfg.data.update(dict(batch_size=4, seq_len=512, max_latent_tokens=128, max_vit_patches=256,
                       max_vae_images=8, vae_buffer_size=64, max_sample_tokens=512,
                       vit_max_size=64, vit_min_size=32, vae_max_size=64, vae_min_size=32))
  return cfg


def _find_tokenizer(cfg, root: str, files: Sequence[str]) -> str:
  cands = [cfg.data.tokenizer_path] if cfg.data.tokenizer_path else []
  cands.append(os.path.join(root, 'tokenizer.model'))
  for f in files:
    d = os.path.dirname(os.path.abspath(f))
    cands += [os.path.join(d, 'tokenizer.model'), os.path.join(os.path.dirname(d),
                                                                'tokenizer.model')]
  for c in cands:
    if c and os.path.exists(os.path.expanduser(c)):
      return os.path.expanduser(c)
  raise DataError(f'no tokenizer found (tried {cands}); pass --config with data.tokenizer_path')


def default_root(files: Sequence[str]) -> str:
  """Without --root: the directory holding the data, i.e. the JSONL's directory, or its parent
  when the JSONL sits in a split directory (train/ val/ test/) as in the embedded dataset."""
  d = os.path.dirname(os.path.abspath(files[0]))
  return os.path.dirname(d) if os.path.basename(d) in ('train', 'val', 'test') else d


def check(files: Sequence[str] | str, root: str | None = None, cfg=None) -> dict:
  """The check report (a JSON-able dict) of the given JSONL file(s)."""
  from unimedvl_jax.data import tokenizer as toklib
  from unimedvl_jax.data.pipeline import Bad, SampleProcessor, check_tokenizer
  t0 = time.time()
  files = [files] if isinstance(files, str) else list(files)
  cfg = builtin_config() if cfg is None else cfg
  root = os.path.abspath(root or cfg.data.root or default_root(files))
  geom = Geometry.from_config(cfg)
  tok_path = _find_tokenizer(cfg, root, files)
  tok = toklib.load_tokenizer(cfg.data.tokenizer_kind, tok_path)
  check_tokenizer(tok, cfg)
  specials = Specials.from_tokenizer(tok)
  proc = SampleProcessor(cfg, '', root)
  proc._tok = tok   # share the loaded tokenizer

  skipped = collections.Counter({r: 0 for r in SAMPLE_ERROR_REASONS})
  examples = collections.defaultdict(list)
  families = collections.Counter()
  file_errors = {}
  ntok, nlat, npatch = [], [], []
  read = 0

  def skip(reason, loc, detail):
    skipped[reason] += 1
    if len(examples[reason]) < _EXAMPLES:
      examples[reason].append(f'{loc}: {detail}'[:300])

  def stream():
    nonlocal read
    for f in files:
      try:
        src = JsonlSource([f])
      except (DataError, OSError) as e:
        file_errors[f] = str(e)
        continue
      for i in range(len(src)):
        read += 1
        raw = src[i]
        try:
          el = proc(raw)
        except Exception as e:  # pylint: disable=broad-except  (never stop on one sample)
          skip('other', raw.loc, f'{type(e).__name__}: {e}')
          continue
        if isinstance(el, Bad):
          skip(el.reason, el.loc, el.detail)
          continue
        s = tokenize(el.items, specials, geom, loc=el.loc)
        why = s.budget_problem(geom)
        if why:
          skip('too_long', s.loc, why)
          continue
        try:
          families[task_family(parse_record(raw, root))] += 1
        except SampleError:
          pass
        ntok.append(s.n_tokens), nlat.append(s.n_lat), npatch.append(s.n_patches)
        yield packing.Entry(s.loc, s)

  it = stream()
  draw = lambda: next(it, None)
  B = cfg.data.batch_size
  pending, packs_n, fill = [], 0, collections.Counter()
  while True:
    packs, pending = packing.fill_batch(B, geom, pending, draw, lookahead=cfg.data.pack_lookahead)
    packs = [p for p in packs if p.samples]
    if not packs:
      break
    packs_n += len(packs)
    fill['tokens'] += sum(p.n_tokens for p in packs)
    fill['latent'] += sum(p.n_lat for p in packs)
    fill['patches'] += sum(p.n_patches for p in packs)
    fill['vae'] += sum(p.n_vae for p in packs)
    fill['samples'] += sum(len(p.samples) for p in packs)
  usable = len(ntok)
  bad = sum(skipped.values())
  stat = lambda a: ({} if not a else dict(mean=round(float(np.mean(a)), 1), max=int(np.max(a)),
                                          min=int(np.min(a))))
  per = lambda x, cap: round(x / (packs_n * cap), 4) if packs_n and cap else 0.0
  return dict(
      files=[os.path.abspath(f) for f in files], root=root, config=cfg.get('name', ''),
      tokenizer=tok_path, file_errors=file_errors,
      samples_read=read, usable=usable, skipped_total=bad,
      skipped={r: c for r, c in skipped.items()},
      examples={r: ex for r, ex in examples.items() if ex},
      bad_fraction=round(bad / read, 4) if read else 0.0,
      ok=not file_errors and (bad / read if read else 0.0) <= cfg.data.max_bad_fraction,
      task_families=dict(families),
      tokens_per_sample=stat(ntok), latent_tokens_per_sample=stat(nlat),
      vit_patches_per_sample=stat(npatch),
      packing=dict(
          budgets=dict(seq_len=geom.T, max_latent_tokens=geom.L, und_tokens=geom.U,
                       max_vit_patches=geom.P, max_vae_images=geom.N),
          packs=packs_n, samples_per_pack=round(fill['samples'] / packs_n, 2) if packs_n else 0,
          token_fill=per(fill['tokens'], geom.T),
          padding_fraction=round(1 - per(fill['tokens'], geom.T), 4) if packs_n else 0.0,
          latent_fill=per(fill['latent'], geom.L), vit_fill=per(fill['patches'], geom.P),
          vae_slot_fill=per(fill['vae'], geom.N)),
      seconds=round(time.time() - t0, 2))
