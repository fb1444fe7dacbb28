"""What a task's evaluation leaves on disk: every sample's texts and the image samples' tiles.

`write_samples` writes `<samples_dir>/<task>/outputs.jsonl` (prompt, references, generated
texts of every sample), `NNNN.png` (input | target | generated of the first image samples) and a
labelled grid of the first four (`task_grid`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

from unimedvl_jax.eval.tasks import Prepared


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'task'


def _grid(images: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  h = max(im.shape[0] for im in images)
  out = [np.pad(im, ((0, h - im.shape[0]), (0, pad), (0, 0)), constant_values=255)
         for im in images]
  return np.concatenate(out, axis=1)


def _tiles(p: Prepared, o) -> tuple[list, list]:
  tiles, layout = [], []
  if p.input_image is not None:
    tiles.append(p.input_image)
    layout.append('input')
  tiles += p.ref_images[:1]
  layout += ['target'] * len(p.ref_images[:1])
  gen = [s.image for s in o if s.kind == 'image']
  tiles += gen
  layout += ['generated'] * len(gen)
  return [np.asarray(t, np.uint8) for t in tiles], layout


def task_grid(preps, outs, n: int = 4, tile: int = 128) -> np.ndarray | None:
  """One labelled PNG-ready grid of the first n samples with an image output: a row per
  sample, columns input | target | generated (image tasks); None without image outputs."""
  from unimedvl_jax.eval.plots import labelled_grid
  rows, layout = [], None
  for p, o in zip(preps, outs):
    if not any(s.kind == 'image' for s in o):
      continue
    t, lay = _tiles(p, o)
    rows.append(t)
    layout = layout or lay
    if len(rows) == n:
      break
  if not rows:
    return None
  labels = [f'#{i}' for i in range(len(rows))]
  return labelled_grid(rows, layout, tile=tile, row_labels=labels)


def write_samples(samples_dir, key, preps, outs, n_keep, grid_name='grid.png',
                  outputs_name='outputs.jsonl'):
  """samples_dir/<task>/: outputs.jsonl (every sample's prompt, references, generated texts),
  NNNN.png (input | target | generated of the first n_keep image samples) and grid_name (the
  first 4 of them, labelled). Returns (directory, grid file name or None)."""
  from unimedvl_jax.data import images as imlib
  d = os.path.join(samples_dir, _safe(key))
  os.makedirs(d, exist_ok=True)
  prefix = '' if outputs_name == 'outputs.jsonl' else outputs_name.split('.')[0] + '_'
  with open(os.path.join(d, outputs_name), 'w', encoding='utf-8') as f:
    for i, (p, o) in enumerate(zip(preps, outs)):
      rec = dict(index=i, sample=p.sample.loc, prompt=p.prompt_text,
                 reference_texts=p.ref_texts,
                 generated_texts=[s.text for s in o if s.kind == 'text'])
      if i < n_keep and any(s.kind == 'image' for s in o):
        tiles, layout = _tiles(p, o)
        name = f'{prefix}{i:04d}.png'
        imlib.save_png(_grid(tiles), os.path.join(d, name))
        rec['grid_png'] = name
        rec['grid_layout'] = layout
      f.write(json.dumps(rec, ensure_ascii=False) + '\n')
  g = task_grid(preps, outs)
  if g is not None:
    imlib.save_png(g, os.path.join(d, grid_name))
  return d, (grid_name if g is not None else None)
