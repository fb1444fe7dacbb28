"""`python -m unimedvl_jax.data check --data FILE.jsonl [--root DIR] [--tokenizer PATH] [--config CFG]`.

Reads every line of the given JSONL file(s) through the training pipeline's own per-sample path
(parse -> plan -> load and resize images -> encode text -> token arrays -> budget check) and
packs the usable samples with the training packer, then reports as JSON: samples read, usable,
skipped by reason (every reason of jsonl.SAMPLE_ERROR_REASONS, documented in
jsonl.SAMPLE_ERROR_DOCS and repeated in the report's `reasons`) with example locations
(file:line), the task families and token counts seen, and the packing efficiency under the
config's budgets. One bad line, image or file never stops the check; an empty or unreadable file
is listed under `file_errors` (and the data is not ok).

The tokenizer, first found: `--tokenizer PATH` (a SentencePiece `.model`, or a Hugging Face
`tokenizer.json` / a directory holding one), config.data.tokenizer_path, a `tokenizer.model` at
the data root or beside the JSONL, else the embedded dataset's tokenizer (generated once into
the embedded dataset's cache directory when absent, see data/synthetic/writer.py `ensure_dataset`).
Without --root the data root is config.data.root, else the JSONL's (`jsonl_root`). These rules
are data/locate.py's.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Sequence

import numpy as np

from unimedvl_jax.data import locate, packing
from unimedvl_jax.data.jsonl import (SAMPLE_ERROR_DOCS, SAMPLE_ERROR_REASONS, DataError,
                                     JsonlSource, SampleError, parse_record)
from unimedvl_jax.data.locate import embedded_tokenizer_path
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
                       max_vae_images=8, vae_buckets=((32, 32, 2), (64, 64, 6)),
                       max_label_tokens=256, max_sample_tokens=512,
                       vit_max_size=64, vit_min_size=32, vae_max_size=64, vae_min_size=32))
  return cfg


def _load_tokenizer(cfg, root: str, files: Sequence[str], tokenizer: str | None,
                    tokenizer_kind_: str | None):
  """(tokenizer, path, notes): the first usable tokenizer in the order of the module docstring."""
  from unimedvl_jax.data import tokenizer as toklib
  if tokenizer or cfg.data.tokenizer_path:
    src = locate.tokenizer_source(cfg, root, tokenizer)
    if tokenizer_kind_:
      src = src._replace(kind=tokenizer_kind_)
    try:
      return locate.read_tokenizer(src), src.path, []
    except toklib.TokenizerError as e:
      raise DataError(f'{src.where} {src.path!r}: {e} (give a SentencePiece .model or an HF '
                      'tokenizer.json with --tokenizer PATH)') from None
  notes = []
  for c in locate.tokenizer_candidates(root, files):
    if os.path.isfile(c):
      try:
        return toklib.load_tokenizer('sentencepiece', c), c, notes
      except toklib.TokenizerError as e:
        notes.append(f'skipped {c}: {e}')
  path = embedded_tokenizer_path()
  try:
    return toklib.load_tokenizer('sentencepiece', path), path, notes
  except toklib.TokenizerError as e:
    raise DataError(f'the embedded tokenizer {path} cannot be loaded ({e}); pass '
                    '--tokenizer PATH (a SentencePiece .model or an HF tokenizer.json)') from None


def check(files: Sequence[str] | str, root: str | None = None, cfg=None, *,
          tokenizer: str | None = None, tokenizer_kind: str | None = None,
          fit_vocab: bool | None = None) -> dict:
  """The check report (a JSON-able dict) of the given JSONL file(s).

  cfg: None = builtin_config(). tokenizer: a path (SentencePiece .model or HF tokenizer.json),
  overriding cfg.data.tokenizer_path; its kind is inferred from the name unless tokenizer_kind
  ('sentencepiece' | 'hf') is given. fit_vocab (default: cfg is None): grow the config's
  vocabulary to fit the tokenizer (the built-in shapes fit any tokenizer); else a tokenizer too
  large for config.model.llm.vocab_size is an error.
  """
  from unimedvl_jax.data.pipeline import Bad, SampleProcessor, check_tokenizer
  t0 = time.time()
  files = [files] if isinstance(files, str) else list(files)
  builtin = cfg is None if fit_vocab is None else fit_vocab
  cfg = builtin_config() if cfg is None else cfg
  root = (os.path.abspath(os.path.expanduser(root)) if root else
          locate.data_root(cfg) if cfg.data.root else locate.jsonl_root(files[0]))
  geom = Geometry.from_config(cfg)
  tok, tok_path, tok_notes = _load_tokenizer(cfg, root, files, tokenizer, tokenizer_kind)
  if builtin:   # the check's own shapes: any tokenizer fits
    cfg.model.llm.vocab_size = max(int(cfg.model.llm.vocab_size), int(tok.vocab_size),
                                   *(int(getattr(tok, n)) + 1 for n in (
                                       'im_start', 'im_end', 'vision_start', 'vision_end')))
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
        el = proc(raw)          # never raises for a sample (SampleProcessor's contract)
        if isinstance(el, Bad):
          skip(el.reason, el.loc, el.detail)
          continue
        try:
          s = tokenize(el.items, specials, geom, loc=el.loc)
          why = s.budget_problem(geom)
        except Exception as e:  # noqa: BLE001  (as the training packer: never stop on one sample)
          skip('processing_error', el.loc, f'{type(e).__name__}: {e}')
          continue
        if why:
          skip('too_long', s.loc, why)
          continue
        try:
          families[task_family(parse_record(raw, root, allow_outside_root=True))] += 1
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
      tokenizer=tok_path, tokenizer_notes=tok_notes, file_errors=file_errors,
      samples_read=read, usable=usable, skipped_total=bad,
      skipped={r: c for r, c in skipped.items()},
      examples={r: ex for r, ex in examples.items() if ex},
      reasons=dict(SAMPLE_ERROR_DOCS),
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
