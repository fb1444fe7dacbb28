"""Figures for the evaluation report, drawn with PIL only (no matplotlib in the environment).

* ``line_plot``     -- one or more (x, y) series on linear axes with ticks, a title and a legend;
                       ``PlotGeometry`` maps data to pixels (tests check the drawn lines land
                       where the mapping says);
* ``loss_curves``   -- one PNG per training stage from WORKDIR/metrics.jsonl (loss, ce, mse);
* ``labelled_grid`` -- rows of image tiles under column headers (input | target | generated).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (23, 190, 207)]


def _font(size: int = 12):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except TypeError:          # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """About n round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return []
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / max(n - 1, 1)
  mag = 10 ** math.floor(math.log10(raw))
  # the 1 / 2 / 5 / 10 x 10^k step whose number of intervals is closest to n - 1 (ties: larger)
  step = min((m * mag for m in (10, 5, 2, 1)),
             key=lambda st: abs((hi - lo) / st - (n - 1)))
  start = math.ceil(lo / step - 1e-9) * step
  out = []
  v = start
  while v <= hi + 1e-9 * step:
    out.append(round(v, 12))
    v += step
  return out


def _fmt(v: float) -> str:
  if v == 0:
    return '0'
  a = abs(v)
  if a >= 1e4 or a < 1e-3:
    return f'{v:.1e}'
  if a >= 100 or float(v).is_integer():
    return f'{v:.0f}'
  return f'{v:.3g}'


@dataclasses.dataclass
class PlotGeometry:
  """Data -> pixel mapping of the plot area [left, right] x [top, bottom] (y grows down)."""
  left: int
  top: int
  right: int
  bottom: int
  x0: float
  x1: float
  y0: float
  y1: float

  def px(self, x: float, y: float) -> tuple[float, float]:
    fx = (x - self.x0) / (self.x1 - self.x0) if self.x1 > self.x0 else 0.5
    fy = (y - self.y0) / (self.y1 - self.y0) if self.y1 > self.y0 else 0.5
    return (self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top))


def line_plot(series: 'OrderedDict[str, tuple[Sequence[float], Sequence[float]]] | dict', *,
              title: str = '', xlabel: str = 'step', ylabel: str = '', width: int = 480,
              height: int = 300, return_geometry: bool = False):
  """uint8 RGB [height, width, 3] image of the series (non-finite points skipped). The y range
  is the finite data's [min, max] padded by 5%."""
  from PIL import Image, ImageDraw
  f = _font(12)
  im = Image.new('RGB', (width, height), 'white')
  d = ImageDraw.Draw(im)
  xs = [float(v) for s in series.values() for v in s[0]]
  ys = [float(v) for s in series.values() for v in s[1] if math.isfinite(float(v))]
  x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
  if ys:
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * (y1 - y0) if y1 > y0 else max(abs(y0) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
  else:
    y0, y1 = 0.0, 1.0
  g = PlotGeometry(left=58, top=26, right=width - 12, bottom=height - 40, x0=x0, x1=x1, y0=y0,
                   y1=y1)
  d.rectangle([g.left, g.top, g.right, g.bottom], outline=(0, 0, 0))
  for t in nice_ticks(y0, y1):
    _, py = g.px(x0, t)
    d.line([(g.left - 4, py), (g.left, py)], fill=(0, 0, 0))
    d.line([(g.left + 1, py), (g.right - 1, py)], fill=(232, 232, 232))
    lab = _fmt(t)
    w = d.textlength(lab, font=f)
    d.text((g.left - 6 - w, py - 7), lab, fill=(0, 0, 0), font=f)
  for t in nice_ticks(x0, x1):
    px, _ = g.px(t, y0)
    d.line([(px, g.bottom), (px, g.bottom + 4)], fill=(0, 0, 0))
    lab = _fmt(t)
    w = d.textlength(lab, font=f)
    d.text((px - w / 2, g.bottom + 6), lab, fill=(0, 0, 0), font=f)
  if title:
    d.text((g.left, 6), title, fill=(0, 0, 0), font=_font(13))
  if xlabel:
    w = d.textlength(xlabel, font=f)
    d.text(((g.left + g.right) / 2 - w / 2, height - 18), xlabel, fill=(0, 0, 0), font=f)
  if ylabel:
    d.text((4, 6), ylabel, fill=(80, 80, 80), font=f)
  lx = g.right - 8
  for k, (name, (sx, sy)) in enumerate(series.items()):
    col = COLORS[k % len(COLORS)]
    pts = [g.px(float(a), float(b)) for a, b in zip(sx, sy) if math.isfinite(float(b))]
    if len(pts) == 1:
      x, y = pts[0]
      d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
    elif pts:
      d.line(pts, fill=col, width=2)
    w = d.textlength(name, font=f)
    yy = g.top + 6 + 15 * k
    d.line([(lx - w - 26, yy + 7), (lx - w - 6, yy + 7)], fill=col, width=2)
    d.text((lx - w, yy), name, fill=col, font=f)
  arr = np.asarray(im, np.uint8)
  return (arr, g) if return_geometry else arr


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl (unparsable lines skipped)."""
  out = []
  if not os.path.isfile(path):
    return out
  with open(path, encoding='utf-8') as fh:
    for line in fh:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def stage_series(records: Sequence[dict], keys=('loss', 'ce', 'mse')) -> 'OrderedDict':
  """{stage: {key: (steps, values)}} in order of first appearance; a key whose values are all
  zero or non-finite within the stage is left out (e.g. mse of a text-only stage)."""
  by: OrderedDict = OrderedDict()
  for r in records:
    st = r.get('stage') or 'train'
    by.setdefault(st, []).append(r)
  out: OrderedDict = OrderedDict()
  for st, rs in by.items():
    rs = sorted(rs, key=lambda r: r.get('step', 0))
    ser = OrderedDict()
    for k in keys:
      vals = [float(r.get(k, float('nan'))) for r in rs]
      if any(math.isfinite(v) and v != 0.0 for v in vals):
        ser[k] = ([int(r['step']) for r in rs], vals)
    out[st] = ser
  return out


def loss_curves(metrics_path: str, out_dir: str) -> 'OrderedDict[str, dict]':
  """Writes out_dir/loss_<stage>.png per stage; returns {stage: {'png', 'steps': (first, last),
  'first': {key: value}, 'last': {key: value}}}."""
  from unimedvl_jax.data.images import save_png
  os.makedirs(out_dir, exist_ok=True)
  res: OrderedDict = OrderedDict()
  for st, ser in stage_series(read_metrics(metrics_path)).items():
    if not ser:
      continue
    steps = next(iter(ser.values()))[0]
    img = line_plot(ser, title=f'stage {st}: training loss (steps {steps[0]}-{steps[-1]})',
                    ylabel='loss')
    name = f'loss_{"".join(c if c.isalnum() or c in "-_" else "_" for c in st)}.png'
    save_png(img, os.path.join(out_dir, name))
    res[st] = dict(png=name, steps=(steps[0], steps[-1]),
                   first={k: v[1][0] for k, v in ser.items()},
                   last={k: v[1][-1] for k, v in ser.items()})
  return res


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], headers: Sequence[str], *,
                  tile: int = 128, pad: int = 4, row_labels: Sequence[str] | None = None
                  ) -> np.ndarray:
  """uint8 RGB image: column headers, then one row of tiles per entry of `rows` (each tile
  resized with nearest-neighbour to fit tile x tile, keeping its aspect; grey images repeated
  to RGB); optional row labels on the left."""
  from PIL import Image, ImageDraw
  f = _font(13)
  ncol = max(len(headers), max((len(r) for r in rows), default=0))
  lab_w = 0
  if row_labels:
    lab_w = int(max(ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength(s, font=f)
                    for s in row_labels)) + 2 * pad
  head_h = 20
  W = lab_w + ncol * (tile + pad) + pad
  H = head_h + len(rows) * (tile + pad) + pad
  im = Image.new('RGB', (W, H), 'white')
  d = ImageDraw.Draw(im)
  for j, h in enumerate(headers):
    x = lab_w + pad + j * (tile + pad)
    w = d.textlength(h, font=f)
    d.text((x + (tile - w) / 2, 3), h, fill=(0, 0, 0), font=f)
  for i, row in enumerate(rows):
    y = head_h + i * (tile + pad)
    if row_labels:
      d.text((pad, y + tile / 2 - 7), row_labels[i], fill=(0, 0, 0), font=f)
    for j, t in enumerate(row):
      a = np.asarray(t, np.uint8)
      if a.ndim == 2:
        a = a[..., None]
      if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
      s = tile / max(a.shape[0], a.shape[1])
      hw = (max(1, int(round(a.shape[1] * s))), max(1, int(round(a.shape[0] * s))))
      ti = Image.fromarray(np.ascontiguousarray(a[..., :3])).resize(hw, Image.NEAREST)
      im.paste(ti, (lab_w + pad + j * (tile + pad), y))
  return np.asarray(im, np.uint8)
