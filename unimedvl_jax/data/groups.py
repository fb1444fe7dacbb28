"""Configuration -> the weighted JSONL groups of a stage.

    resolve_groups(cfg, stage, split) [{name, files, weight, mandatory}], CFG dropout

The data root (and the tokenizer) are found by data/locate.py.
"""

from __future__ import annotations

import glob as globlib
import os

from unimedvl_jax.data.jsonl import DataError
from unimedvl_jax.data.locate import data_root


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
