"""Where the data and the tokenizer are: the one set of discovery rules every entry point uses.

The data root
    data_root(cfg)            config.data.root (~ expanded, absolute); empty: the embedded
                              synthetic dataset at its default location (data/synthetic/writer.py
                              `default_root`, generated once when absent)
    data_root(cfg, workdir)   the same, except that an empty root means the embedded dataset
                              generated once under WORKDIR/data at config.data.vae_max_size
                              (what training does)
    jsonl_root(path)          the root of a JSONL file given alone (`data check` without --root):
                              the nearest directory at or up to 3 levels above the file holding a
                              manifest.json, else the file's directory -- its parent when that is
                              a split directory (train/ val/ test/)

The tokenizer (a SentencePiece `.model`, or a Hugging Face `tokenizer.json` / a directory
holding one), first found:
    1. an explicit path (the CLIs' `--tokenizer PATH`), its kind read off the name
    2. config.data.tokenizer_path (kind: the name's, else config.data.tokenizer_kind)
    3. `tokenizer.model` under the data root (kind: config.data.tokenizer_kind)
  `tokenizer_source` applies this rule, `load_tokenizer` loads its answer and checks that it fits
  config.model.llm.vocab_size (`check_tokenizer`). `data check`, which must also run on a user's
  JSONL with no config, continues the search (data/check.py): `tokenizer.model` beside each JSONL
  file or in its parent directory (`tokenizer_candidates`), then the embedded dataset's
  (`embedded_tokenizer_path`). A checkpoint carries its tokenizer files in CKPT/tokenizer/ (or
  beside its checkpoints/ folder): `checkpoint_tokenizer_dir`.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple, Sequence

from unimedvl_jax.data.jsonl import DataError

TOKENIZER_FILE = 'tokenizer.model'      # the SentencePiece model at a data root
CHECKPOINT_TOKENIZER_DIR = 'tokenizer'  # a checkpoint's (or an import's) tokenizer files
SPLIT_DIRS = ('train', 'val', 'test')
_MANIFEST = 'manifest.json'             # written at the root of the embedded dataset


# ---------------------------------------------------------------------------------- data root

def data_root(cfg, workdir: str | None = None) -> str:
  """The dataset root: config.data.root, or the embedded synthetic dataset when it is empty (see
  the module docstring; with `workdir`, generated under workdir/data)."""
  if cfg.data.root:
    return os.path.abspath(os.path.expanduser(cfg.data.root))
  from unimedvl_jax.data import synthetic
  if workdir is None:
    return os.path.abspath(synthetic.ensure_dataset())
  root = os.path.abspath(os.path.join(workdir, 'data'))
  if not os.path.exists(os.path.join(root, _MANIFEST)):
    size = int(cfg.data.vae_max_size)
    print(f'generating the embedded dataset in {root} ({size}px) ...', flush=True)
    synthetic.ensure_dataset(root, seed=0, size=size)
  return root


def jsonl_root(path: str) -> str:
  """The data root of a JSONL file given without one (see the module docstring)."""
  d = os.path.dirname(os.path.abspath(path))
  cur = d
  for _ in range(4):
    if os.path.isfile(os.path.join(cur, _MANIFEST)):
      return cur
    parent = os.path.dirname(cur)
    if parent == cur:
      break
    cur = parent
  return os.path.dirname(d) if os.path.basename(d) in SPLIT_DIRS else d


# ---------------------------------------------------------------------------------- tokenizer

class TokenizerSource(NamedTuple):
  path: str
  kind: str     # 'sentencepiece' | 'hf' (data/tokenizer.py load_tokenizer)
  where: str    # what chose it, for messages: '--tokenizer', 'config.data.tokenizer_path', ...


def tokenizer_kind(path: str, default: str = 'sentencepiece') -> str:
  """'hf' for a tokenizer.json (or a directory holding one), else `default`."""
  p = os.path.expanduser(path)
  if p.lower().endswith('.json') or os.path.isfile(os.path.join(p, 'tokenizer.json')):
    return 'hf'
  return default


def tokenizer_source(cfg, root: str | None = None, path: str | None = None) -> TokenizerSource:
  """The tokenizer to use: `path`, else config.data.tokenizer_path, else tokenizer.model under
  `root` (default data_root(cfg)). Nothing is read; `read_tokenizer` loads it."""
  if path:
    p = os.path.expanduser(path)
    return TokenizerSource(p, tokenizer_kind(p), '--tokenizer')
  if cfg.data.get('tokenizer_path'):
    p = os.path.expanduser(cfg.data.tokenizer_path)
    return TokenizerSource(p, tokenizer_kind(p, cfg.data.tokenizer_kind),
                           'config.data.tokenizer_path')
  root = data_root(cfg) if root is None else root
  return TokenizerSource(os.path.join(os.path.expanduser(root), TOKENIZER_FILE),
                         cfg.data.tokenizer_kind, 'tokenizer.model under the data root')


def read_tokenizer(src: TokenizerSource):
  """The tokenizer of `src`. DataError when a configured one (not an explicit path) is missing;
  TokenizerError when it cannot be loaded (an explicit path that is missing included)."""
  from unimedvl_jax.data import tokenizer as toklib
  if src.where != '--tokenizer' and not os.path.exists(src.path):
    raise DataError(f'tokenizer file {src.path!r} not found (config.data.tokenizer_path, or '
                    'tokenizer.model under the data root)')
  return toklib.load_tokenizer(src.kind, src.path)


def check_tokenizer(tok, cfg) -> None:
  """DataError unless the tokenizer's ids (and its special tokens) fit the model's vocabulary."""
  v = cfg.model.llm.vocab_size
  ids = {n: int(getattr(tok, n)) for n in ('im_start', 'im_end', 'vision_start', 'vision_end')}
  if tok.vocab_size > v or max(ids.values()) >= v:
    raise DataError(f'tokenizer vocabulary ({tok.vocab_size} ids, specials {ids}) does not fit '
                    f'config.model.llm.vocab_size = {v}')


def load_tokenizer(cfg, root: str | None = None, path: str | None = None):
  """The tokenizer of `tokenizer_source(cfg, root, path)`, checked to fit the model's vocabulary."""
  tok = read_tokenizer(tokenizer_source(cfg, root, path))
  check_tokenizer(tok, cfg)
  return tok


def tokenizer_candidates(root: str, files: Sequence[str] = ()) -> list[str]:
  """`data check`'s places to look (in order, unique, not checked to exist): tokenizer.model
  under `root`, then beside each JSONL file and in that file's parent directory."""
  cands = [os.path.join(root, TOKENIZER_FILE)]
  for f in files:
    d = os.path.dirname(os.path.abspath(f))
    cands += [os.path.join(d, TOKENIZER_FILE), os.path.join(os.path.dirname(d), TOKENIZER_FILE)]
  return list(dict.fromkeys(cands))


def embedded_tokenizer_path() -> str:
  """The embedded synthetic dataset's SentencePiece model (the dataset is generated once, ~20 s,
  into its default location when absent)."""
  from unimedvl_jax.data import synthetic
  root = synthetic.default_root()
  path = os.path.join(root, TOKENIZER_FILE)
  if not os.path.isfile(path):
    print(f'data check: generating the embedded dataset in {root} for its tokenizer (once)',
          file=sys.stderr, flush=True)
    path = os.path.join(synthetic.ensure_dataset(root), TOKENIZER_FILE)
  return path


def checkpoint_tokenizer_dir(checkpoint: str) -> str | None:
  """The tokenizer files a checkpoint carries: CKPT/tokenizer/, or WORKDIR/tokenizer/ when CKPT
  is a workdir's checkpoints/ folder; None when there is none."""
  c = os.path.normpath(checkpoint)
  cands = [os.path.join(checkpoint, CHECKPOINT_TOKENIZER_DIR)]
  if os.path.basename(c) == 'checkpoints':
    cands.append(os.path.join(os.path.dirname(c), CHECKPOINT_TOKENIZER_DIR))
  for d in cands:
    if os.path.isdir(d):
      return d
  return None
