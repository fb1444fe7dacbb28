"""Exact ground truth of the embedded synthetic dataset (`data/synthetic/`) and its checkers.

Every synthetic image is drawn from a record's `meta`:
  {"subject_id": "s000123", "modality": "mri_t1", "image_size": 64,
   "findings": [{"location": "upper left", "size": "large", "shape": "oval",
                 "center": [r, c], "radii": [ry, rx]}, ...],
   optional "target_modality" / "target_findings" (edit tasks: what the output image shows)}
Lesions are filled ellipses ((r - cr)/ry)^2 + ((c - cc)/rx)^2 <= 1 over pixel centres (row r,
column c, in pixels of an image_size x image_size image); at most one per quadrant, never crossing
into another quadrant. Locations are in IMAGE coordinates (viewer's upper/lower, left/right).

Checkers the evaluation uses:
- `lesion_mask(meta, size)`: the exact lesion mask (bool [size, size]).
- `detect_lesions(img, modality)`: threshold + connected components tuned to the generator's
  palettes (one rule per modality, documented in `DETECTION_RULES`).
- `check_generated(img, meta)`: is a generated image's content right (presence, count,
  quadrants, sizes) for the sample's target?
- `findings_vocabulary()`, `findings_from_meta(meta)`, `findings_from_text(text)`: canonical
  finding phrases ("no lesion", "lesion upper left", "large lesion upper left", "round lesion
  upper left", "two lesions") for finding-level precision / recall of generated reports.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

LOCATIONS = ('upper left', 'upper right', 'lower left', 'lower right')
SIZES = ('small', 'large')
SHAPES = ('round', 'oval')
COUNT_WORDS = ('no', 'one', 'two', 'three', 'four')
MODALITIES = ('ct', 'mri_t1', 'mri_t2', 'xray', 'fundus', 'histology_he', 'histology_ihc',
              'ultrasound')
MASK = 'mask'   # a segmentation-mask image (white lesions on black)

# Lesion geometry as fractions of the image side (64 px: small r 5.4-6.1, large r 8.0-8.6).
RADIUS_RANGE = {'small': (0.085, 0.095), 'large': (0.125, 0.135)}
OVAL_AXES = (0.80, 1.25)   # (ry, rx) multipliers of the radius: ovals are wide
QUADRANT_MARGIN = 0.03     # gap kept between a lesion and its quadrant's inner edges
CENTER_JITTER = 0.025      # lesions sit within this distance from the inner edges' limit

# Detection: (rule, minimum area as a fraction of the smallest lesion's area).
DETECTION_RULES = {
    'ct': 'grey > 205 (lesions 235, anatomy <= 190)',
    'mri_t2': 'grey > 205 (lesions 240, CSF 175)',
    'xray': 'grey > 205 (opacities 235, bones <= 180)',
    'mri_t1': 'grey < 45, not touching the border (lesions 25, ventricles 65, background 0 '
              'touches the border)',
    'ultrasound': 'grey < 38, not touching the border (anechoic lesions 12, speckle >= 50)',
    'fundus': 'R > 200 and G > 190 and B > 165 (exudates (255, 245, 210); optic disc B 130)',
    'histology_he': 'R < 150 and G < 100, opened by a 5x5 disk (nests (80, 30, 120); nuclei '
                    'are smaller than the disk)',
    'histology_ihc': 'R - B > 60 and R < 215 and G < 170 (DAB-brown (150, 88, 45); background '
                     'and blue nuclei fail)',
    MASK: 'grey > 127',
}
MIN_AREA_FRACTION = 0.35
# A component larger than this many times the largest lesion is not a lesion (e.g. a blank white
# image, a wrong palette): it is reported with plausible=False and fails check_generated.
MAX_AREA_FACTOR = 2.0


def quadrant_of(r: float, c: float, size: int) -> str:
  return f'{"upper" if r < size / 2 else "lower"} {"left" if c < size / 2 else "right"}'


def ellipse_mask(size: int, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  cr, cc = center
  ry, rx = radii
  return ((yy - cr) / ry) ** 2 + ((xx - cc) / rx) ** 2 <= 1.0


def target_findings(meta: Mapping) -> list[dict]:
  """The findings the sample's TARGET image shows (edit tasks may change them)."""
  if 'target_findings' in meta:
    return list(meta['target_findings'])
  return list(meta.get('findings', []))


def target_modality(meta: Mapping) -> str:
  return str(meta.get('target_modality') or meta.get('modality') or '')


def lesion_mask(meta: Mapping, size: int | None = None, *, target: bool = False) -> np.ndarray:
  """bool [size, size]: the exact lesions of meta (its `findings`; `target_findings` if target)."""
  base = int(meta.get('image_size', size or 64))
  size = base if size is None else int(size)
  s = size / base
  out = np.zeros((size, size), bool)
  for f in (target_findings(meta) if target else meta.get('findings', [])):
    # Pixel centres scale as (p + 0.5) * s - 0.5.
    cr, cc = ((float(v) + 0.5) * s - 0.5 for v in f['center'])
    ry, rx = (float(v) * s for v in f['radii'])
    out |= ellipse_mask(size, (cr, cc), (ry, rx))
  return out


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

def _disk(radius: int) -> np.ndarray:
  yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return (yy * yy + xx * xx) <= radius * radius + 0.5


def candidate_mask(img: np.ndarray, modality: str) -> np.ndarray:
  """bool [H, W]: pixels that look like lesion for `modality` (before component filtering)."""
  from scipy import ndimage
  img = np.asarray(img)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  x = img.astype(np.int32)
  R, G, B = x[..., 0], x[..., 1], x[..., 2]
  grey = x.mean(axis=-1)
  border_free = False
  opening = 0
  if modality in ('ct', 'mri_t2', 'xray'):
    m = grey > 205
  elif modality == 'mri_t1':
    m, border_free = grey < 45, True
  elif modality == 'ultrasound':
    m, border_free, opening = grey < 38, True, 1
  elif modality == 'fundus':
    m = (R > 200) & (G > 190) & (B > 165)
  elif modality == 'histology_he':
    m, opening = (R < 150) & (G < 100), 2
  elif modality == 'histology_ihc':
    m = ((R - B) > 60) & (R < 215) & (G < 170)
  elif modality == MASK:
    m = grey > 127
  else:
    raise ValueError(f'no lesion detector for modality {modality!r}; known: '
                     f'{MODALITIES + (MASK,)}')
  if opening:
    m = ndimage.binary_opening(m, structure=_disk(opening))
  if border_free:
    lab, n = ndimage.label(m)
    if n:
      edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
      m = m & ~np.isin(lab, edge[edge > 0])
  return m


def detect_lesions(img: np.ndarray, modality: str) -> list[dict]:
  """Lesions found in img (uint8 [H, W, 3] or [H, W]) by the modality's rule.

  Returns [{'center': (r, c), 'radius': equivalent-disk radius, 'area': pixels, 'plausible':
  area <= MAX_AREA_FACTOR x the largest lesion, 'location': quadrant of the centroid, 'size':
  'small'|'large'}] sorted by location, ignoring components smaller than MIN_AREA_FRACTION of the
  smallest possible lesion.
  """
  from scipy import ndimage
  img = np.asarray(img)
  H, W = img.shape[:2]
  side = float(min(H, W))
  m = candidate_mask(img, modality)
  lab, n = ndimage.label(m)
  if n == 0:
    return []
  r_small = RADIUS_RANGE['small'][0] * side
  min_area = MIN_AREA_FRACTION * np.pi * (r_small * OVAL_AXES[0]) * r_small
  # Size threshold halfway (in area) between the largest small and the smallest large lesion.
  a_small = np.pi * (RADIUS_RANGE['small'][1] * side) ** 2
  a_large = np.pi * (RADIUS_RANGE['large'][0] * side) ** 2
  size_cut = 0.5 * (a_small + a_large)
  idx = np.arange(1, n + 1)
  areas = ndimage.sum_labels(np.ones_like(lab), lab, idx)
  centers = ndimage.center_of_mass(m, lab, idx)
  max_area = MAX_AREA_FACTOR * np.pi * (RADIUS_RANGE['large'][1] * side) ** 2
  out = []
  for a, (cr, cc) in zip(areas, centers):
    if a < min_area:
      continue
    out.append(dict(center=(float(cr), float(cc)), radius=float(np.sqrt(a / np.pi)),
                    area=int(a), plausible=bool(a <= max_area),
                    location=f'{"upper" if cr < H / 2 else "lower"} {"left" if cc < W / 2 else "right"}',
                    size='large' if a >= size_cut else 'small'))
  out.sort(key=lambda d: (LOCATIONS.index(d['location']), -d['area']))
  return out


def _modality_features(img: np.ndarray) -> np.ndarray:
  from PIL import Image
  img = np.asarray(img, np.uint8)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  x = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR), np.float64) / 255.0
  g = x.mean(-1)
  thumb = g.reshape(8, 4, 8, 4).mean((1, 3)).ravel()
  hist = np.histogram(g, bins=16, range=(0.0, 1.0))[0] / g.size
  chroma = (x - g[..., None]).reshape(-1, 3)
  return np.concatenate([thumb, 4.0 * np.sqrt(hist), 2.0 * x.reshape(-1, 3).mean(0),
                         4.0 * np.abs(chroma).mean(0)])


def _hf_energy(img: np.ndarray) -> float:
  """Mean absolute difference of horizontally / vertically adjacent grey pixels (at 64 px)."""
  from PIL import Image
  g = np.asarray(Image.fromarray(np.asarray(img, np.uint8)).convert('L').resize((64, 64),
                                                                                Image.BILINEAR),
                 np.float64)
  return float(0.5 * (np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()))


_CENTROIDS: dict[str, tuple[np.ndarray, float]] = {}
_HF_MAX: list[float] = []
REJECT_FACTOR = 1.75  # farther than this x the reference spread from every centroid: 'unknown'
MIN_STD = 8.0         # a (near-)constant image is 'unknown'
HF_FACTOR = 2.0       # more high-frequency energy than this x any reference: 'unknown' (noise)


def _centroids() -> dict[str, tuple[np.ndarray, float]]:
  """modality -> (mean features, reference spread) over reference renderings (computed once,
  deterministic; the spread is the largest distance of a reference image to its centroid)."""
  if not _CENTROIDS:
    from unimedvl_jax.data.synthetic.draw import draw_subject, make_subject
    feats: dict[str, list] = {m: [] for m in MODALITIES}
    i = 0
    while min(len(v) for v in feats.values()) < 16 and i < 2000:
      sub = make_subject(12345, i, 64)
      img = draw_subject(sub, 64, with_lesions=(i // len(MODALITIES)) % 2 == 1)
      feats[sub['modality']].append(_modality_features(img))
      _HF_MAX.append(_hf_energy(img))
      i += 1
    _HF_MAX[:] = [max(_HF_MAX)]
    for m, v in feats.items():
      c = np.mean(v, axis=0)
      spread = max(float(np.sqrt(((x - c) ** 2).sum())) for x in v)
      _CENTROIDS[m] = (c, spread)
  return _CENTROIDS


def classify_modality(img: np.ndarray) -> str:
  """The synthetic modality style an image looks like (nearest centroid of simple features: an
  8x8 grey thumbnail, a grey histogram, mean colour, colourfulness), or 'unknown' for a
  (near-)constant image, an image noisier than any reference, or one far from every style. For
  checking generated images."""
  img = np.asarray(img, np.uint8)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  cents = _centroids()
  if img.astype(np.float64).std() < MIN_STD or _hf_energy(img) > HF_FACTOR * _HF_MAX[0]:
    return 'unknown'
  f = _modality_features(img)
  dist = {m: float(np.sqrt(((c - f) ** 2).sum())) for m, (c, _) in cents.items()}
  best = min(MODALITIES, key=lambda m: dist[m])
  return best if dist[best] <= REJECT_FACTOR * cents[best][1] else 'unknown'


def check_generated(img: np.ndarray, meta: Mapping, modality: str | None = None) -> dict:
  """Checks an image meant to be the target of the sample `meta`.

  Modality: `modality`, else meta's target_modality, else its modality. Findings:
  meta['target_findings'] if present, else meta['findings'].
  Returns dict(present_ok, count_ok, location_ok, size_ok, all_ok, modality_ok,
  predicted_modality, detected=[...], expected=[...]):
    present_ok   any lesion detected iff any expected
    count_ok     as many lesions detected as expected
    location_ok  counts match, the detected quadrants are the expected ones and every detected
                 component is lesion-sized (a blank white image is one huge implausible component)
    size_ok      location_ok and each quadrant's size class (small / large) matches
    all_ok       present_ok and count_ok and location_ok
    modality_ok  the image looks like the target modality (`classify_modality`; for a mask: a
                 two-level image); not part of all_ok
  """
  mod = modality or target_modality(meta)
  expected = target_findings(meta)
  det = detect_lesions(img, mod)
  exp_loc = sorted(f['location'] for f in expected)
  det_loc = sorted(d['location'] for d in det)
  present_ok = (len(det) > 0) == (len(expected) > 0)
  count_ok = len(det) == len(expected)
  location_ok = count_ok and det_loc == exp_loc and all(d['plausible'] for d in det)
  size_ok = location_ok and all(
      {d['location']: d['size'] for d in det}[f['location']] == f['size'] for f in expected)
  if mod in MODALITIES:
    predicted = classify_modality(img)
    modality_ok = predicted == mod
  else:   # a mask: white lesions on black
    predicted, modality_ok = mod, bool(np.asarray(img).std() < 127.6)
  return dict(present_ok=bool(present_ok), count_ok=bool(count_ok), location_ok=bool(location_ok),
              size_ok=bool(size_ok), all_ok=bool(present_ok and count_ok and location_ok),
              modality_ok=bool(modality_ok), predicted_modality=predicted,
              detected=det, expected=[dict(location=f['location'], size=f['size'],
                                           shape=f['shape']) for f in expected])


def dice(a: np.ndarray, b: np.ndarray) -> float:
  """Dice of two boolean masks (1.0 when both are empty)."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  s = a.sum() + b.sum()
  return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)


# ----------------------------------------------------------------------------------------------
# Findings vocabulary (reports)
# ----------------------------------------------------------------------------------------------

def findings_vocabulary() -> list[str]:
  """Every canonical finding phrase, in a fixed order."""
  out = ['no lesion']
  out += [f'{w} lesion{"s" if i > 1 else ""}' for i, w in enumerate(COUNT_WORDS) if 1 <= i <= 3]
  for loc in LOCATIONS:
    out.append(f'lesion {loc}')
    out += [f'{s} lesion {loc}' for s in SIZES]
    out += [f'{s} lesion {loc}' for s in SHAPES]
  return out


def findings_from_list(findings: Iterable[Mapping]) -> set[str]:
  findings = list(findings)
  if not findings:
    return {'no lesion'}
  n = len(findings)
  out = {f'{COUNT_WORDS[n]} lesion{"s" if n > 1 else ""}'}
  for f in findings:
    loc = f['location']
    out |= {f'lesion {loc}', f'{f["size"]} lesion {loc}', f'{f["shape"]} lesion {loc}'}
  return out


def findings_from_meta(meta: Mapping, *, target: bool = False) -> set[str]:
  """Canonical phrases of meta's findings (its target's with target=True)."""
  return findings_from_list(target_findings(meta) if target else meta.get('findings', []))


_LESION_RE = re.compile(
    r'\b(?:(small|large)\s+)?(?:(round|oval)\s+)?(?:[\w&-]+\s+)?lesion\s+in\s+the\s+'
    r'(upper|lower)\s+(left|right)\b')
_COUNT_RE = re.compile(r'\b(one|two|three|four)\s+(?:[\w&-]+\s+)?lesions?\b')
_NONE_RE = re.compile(r'\bno\s+(?:focal\s+)?lesions?\b|\bno lesion\b')


def findings_from_text(text: str) -> set[str]:
  """Canonical phrases found in a text written in the generator's template language (reports,
  captions, prompts). Without an explicit count ("two lesions") the count phrase is the number of
  distinct lesion locations mentioned."""
  t = ' '.join(text.lower().split())
  out: set[str] = set()
  for size, shape, ud, lr in _LESION_RE.findall(t):
    loc = f'{ud} {lr}'
    out.add(f'lesion {loc}')
    if size:
      out.add(f'{size} lesion {loc}')
    if shape:
      out.add(f'{shape} lesion {loc}')
  counts = _COUNT_RE.findall(t)
  for w in counts:
    out.add(f'{w} lesion{"s" if w != "one" else ""}')
  locs = {p[len('lesion '):] for p in out if p.startswith('lesion ')}
  if not counts and 1 <= len(locs) < len(COUNT_WORDS):   # no count word: count the locations
    n = len(locs)
    out.add(f'{COUNT_WORDS[n]} lesion{"s" if n > 1 else ""}')
  if _NONE_RE.search(t) and not any(p.startswith('lesion ') for p in out):
    out.add('no lesion')
  return out


def finding_scores(pred: set[str], ref: set[str]) -> dict:
  """Finding-level precision, recall and F1 of predicted phrases against reference phrases."""
  tp = len(pred & ref)
  p = tp / len(pred) if pred else (1.0 if not ref else 0.0)
  r = tp / len(ref) if ref else 1.0
  f = 0.0 if p + r == 0 else 2 * p * r / (p + r)
  return dict(precision=p, recall=r, f1=f, tp=tp, n_pred=len(pred), n_ref=len(ref))
