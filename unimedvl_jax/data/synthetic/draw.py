"""Synthetic subjects and their drawing: lesion findings, per-family anatomy, the modality
renderers (pixels of lesions exactly `truth.lesion_mask`'s) and segmentation masks."""

from __future__ import annotations

from typing import Optional

import numpy as np

from unimedvl_jax.data import truth
from unimedvl_jax.data.truth import LOCATIONS, MODALITIES, SHAPES, SIZES


def seeded_rng(*key) -> np.random.Generator:
  """A generator keyed by integers (the seed, subject index, purpose, ...)."""
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def make_findings(rng: np.random.Generator, n: int, size: int) -> list[dict]:
  """n lesions in n distinct quadrants; geometry from truth.RADIUS_RANGE / OVAL_AXES."""
  quads = sorted(rng.choice(4, size=n, replace=False).tolist()) if n else []
  out = []
  for q in quads:
    sz = SIZES[int(rng.integers(2))]
    shape = SHAPES[int(rng.integers(2))]
    r = float(rng.uniform(*truth.RADIUS_RANGE[sz])) * size
    ry, rx = (r * truth.OVAL_AXES[0], r * truth.OVAL_AXES[1]) if shape == 'oval' else (r, r)
    m = truth.QUADRANT_MARGIN * size
    jr, jc = rng.uniform(0.0, truth.CENTER_JITTER * size, 2)
    upper, left = q < 2, q % 2 == 0
    # Pixel rows 0..size/2-1 are the upper half: the ellipse stays m pixels inside its quadrant.
    cr = (size / 2 - 1 - m - ry - jr) if upper else (size / 2 + m + ry + jr)
    cc = (size / 2 - 1 - m - rx - jc) if left else (size / 2 + m + rx + jc)
    f = dict(location=LOCATIONS[q], size=sz, shape=shape,
             center=[round(float(cr), 3), round(float(cc), 3)],
             radii=[round(float(ry), 3), round(float(rx), 3)])
    assert truth.quadrant_of(cr, cc, size) == f['location']
    out.append(f)
  return out


def _smooth(rng, S, sigma, amp):
  from scipy import ndimage
  g = ndimage.gaussian_filter(rng.standard_normal((S, S)), sigma, mode='wrap')
  return g * (amp / (g.std() + 1e-9))


def _ell(yy, xx, cy, cx, ry, rx):
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_anatomy(rng: np.random.Generator, family: str, S: int) -> dict:
  """Subject-specific shape parameters shared by the modalities of one family (so T1 / T2 and
  H&E / IHC renderings of one subject show the same anatomy)."""
  u = lambda a, b: float(rng.uniform(a, b))
  if family == 'brain':
    return dict(head=(0.5 * S - 0.5 + u(-0.3, 0.3), 0.5 * S - 0.5 + u(-0.3, 0.3),
                      S * u(0.475, 0.485), S * u(0.465, 0.475)),
                scalp=S * u(0.035, 0.042), wm=S * u(0.07, 0.09),
                vent=(S * u(0.08, 0.1), S * u(0.03, 0.04), S * u(0.05, 0.065)),
                tex=int(rng.integers(1 << 30)))
  if family == 'tissue':
    sp = 0.1 * S
    n = int(np.ceil(S / sp)) + 1
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float64) * sp
    gy = gy + rng.uniform(-0.15, 0.15, gy.shape) * sp + (np.arange(n)[None, :] % 2) * sp / 2
    gx = gx + rng.uniform(-0.15, 0.15, gx.shape) * sp
    keep = rng.uniform(size=gy.shape) < 0.8
    nr = S * u(0.017, 0.02)
    nm = np.zeros((S, S), bool)
    k = int(np.ceil(nr)) + 1
    for ny, nx in zip(gy[keep], gx[keep]):
      r0, r1 = max(0, int(ny) - k), min(S, int(ny) + k + 1)
      c0, c1 = max(0, int(nx) - k), min(S, int(nx) + k + 1)
      if r0 >= r1 or c0 >= c1:
        continue
      ly, lx = np.mgrid[r0:r1, c0:c1]
      nm[r0:r1, c0:c1] |= ((ly - ny) ** 2 + (lx - nx) ** 2) <= nr * nr
    return dict(nuclei_mask=nm, tex=int(rng.integers(1 << 30)))
  if family == 'ct':
    return dict(body=(S * u(0.39, 0.41), S * u(0.465, 0.48)), liver=S * u(0.15, 0.17),
                tex=int(rng.integers(1 << 30)))
  if family == 'xray':
    return dict(lung=(S * u(0.29, 0.31), S * u(0.15, 0.16)), heart=S * u(0.14, 0.17),
                tex=int(rng.integers(1 << 30)))
  if family == 'fundus':
    return dict(disc_side=int(rng.integers(2)), vessels=rng.uniform(-1, 1, (4, 2)).tolist(),
                tex=int(rng.integers(1 << 30)))
  if family == 'ultrasound':
    return dict(capsule=S * u(0.55, 0.8), tex=int(rng.integers(1 << 30)))
  raise ValueError(family)


FAMILY = {'ct': 'ct', 'mri_t1': 'brain', 'mri_t2': 'brain', 'xray': 'xray', 'fundus': 'fundus',
          'histology_he': 'tissue', 'histology_ihc': 'tissue', 'ultrasound': 'ultrasound'}


def render(modality: str, anatomy: dict, findings: list[dict], S: int, noise_seed: int,
           lesion_seed: int, with_lesions: bool = True) -> np.ndarray:
  """Draws one image uint8 [S, S, 3]. Lesion pixels are exactly truth.lesion_mask's."""
  yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
  trng = seeded_rng(anatomy['tex'])            # anatomy texture: shared across a family's modalities
  nrng = seeded_rng(noise_seed)                # acquisition noise
  lrng = seeded_rng(lesion_seed)               # lesion texture
  grey = None
  rgb = None
  if modality in ('mri_t1', 'mri_t2'):
    cy, cx, hy, hx = anatomy['head']
    head = _ell(yy, xx, cy, cx, hy, hx)
    sc = anatomy['scalp']
    brain = _ell(yy, xx, cy, cx, hy - sc, hx - sc)
    wm = _ell(yy, xx, cy, cx, hy - sc - anatomy['wm'], hx - sc - anatomy['wm'])
    vry, vrx, voff = anatomy['vent']
    vy = cy - 0.02 * S
    vent = _ell(yy, xx, vy, cx - voff, vry, vrx) | _ell(yy, xx, vy, cx + voff, vry, vrx)
    t1 = modality == 'mri_t1'
    vals = (165, 110, 135, 65) if t1 else (115, 120, 90, 175)
    grey = np.zeros((S, S))
    grey[head] = vals[0]
    grey[brain] = vals[1]
    grey[wm] = vals[2]
    grey[vent] = vals[3]
    tex = _smooth(trng, S, 1.5, 4.0)
    grey = np.where(head, grey + tex, grey) + nrng.normal(0, 3.0, (S, S))
    grey[~head] = np.abs(nrng.normal(0, 2.0, (S, S)))[~head]
    lesion_val, lesion_sd = (25.0, 3.0) if t1 else (240.0, 3.0)
  elif modality == 'ct':
    by, bx = anatomy['body']
    c = 0.5 * S
    body = _ell(yy, xx, c, c, by, bx)
    inner = _ell(yy, xx, c, c, by - 0.035 * S, bx - 0.035 * S)
    grey = np.full((S, S), 5.0)
    grey[body] = 70.0                      # subcutaneous fat rim
    grey[inner] = 100.0
    lv = anatomy['liver']
    grey[_ell(yy, xx, 0.42 * S, 0.34 * S, lv, lv * 1.05) & inner] = 125.0
    grey[_ell(yy, xx, 0.40 * S, 0.72 * S, 0.08 * S, 0.07 * S) & inner] = 118.0
    for kx in (0.33, 0.67):
      grey[_ell(yy, xx, 0.64 * S, kx * S, 0.07 * S, 0.05 * S)] = 140.0
    grey[_ell(yy, xx, 0.63 * S, 0.5 * S, 0.035 * S, 0.035 * S)] = 150.0
    grey[_ell(yy, xx, 0.77 * S, 0.5 * S, 0.06 * S, 0.06 * S)] = 175.0
    grey = grey + np.where(body, _smooth(trng, S, 1.2, 4.0), 0.0) + nrng.normal(0, 3.0, (S, S))
    lesion_val, lesion_sd = 235.0, 3.0
  elif modality == 'xray':
    grey = np.full((S, S), 25.0)
    torso = _ell(yy, xx, 0.58 * S, 0.5 * S, 0.55 * S, 0.47 * S)
    grey[torso] = 150.0
    ly, lx = anatomy['lung']
    lungs = (_ell(yy, xx, 0.45 * S, 0.29 * S, ly, lx) | _ell(yy, xx, 0.45 * S, 0.71 * S, ly, lx))
    grey[lungs] = 55.0
    grey = grey + np.where(lungs, _smooth(trng, S, 0.8, 7.0), 0.0)
    # ribs: gently curved bright lines inside the lungs
    for k in range(6):
      r0 = (0.2 + 0.11 * k) * S
      rib = np.abs(yy - (r0 + 0.25 * ((xx - 0.5 * S) ** 2) / S)) < 0.7 * S / 64
      grey[rib & lungs] += 18.0
    hr = anatomy['heart']
    heart = _ell(yy, xx, 0.62 * S, 0.55 * S, hr, hr * 0.9)
    grey[heart] = 160.0
    grey[(np.abs(xx - 0.5 * S) < 0.035 * S) & torso & ~lungs] = 170.0     # spine
    for side in (-1, 1):                                                   # clavicles
      clav = (np.abs(yy - (0.12 * S + 0.15 * np.abs(xx - 0.5 * S))) < 0.9 * S / 64) & \
             (np.abs(xx - 0.5 * S) > 0.05 * S) & (np.abs(xx - 0.5 * S) < 0.4 * S) & \
             (np.sign(xx - 0.5 * S) == side)
      grey[clav] = 175.0
    grey = grey + nrng.normal(0, 3.0, (S, S))
    lesion_val, lesion_sd = 235.0, 3.0
  elif modality == 'ultrasound':
    ay, ax = -0.35 * S, 0.5 * S
    dy, dx = yy - ay, xx - ax
    rho = np.hypot(dy, dx)
    ang = np.degrees(np.arctan2(dx, dy))
    sector = (np.abs(ang) <= 50.0) & (rho >= 0.42 * S) & (rho <= 1.45 * S)
    speck = seeded_rng(anatomy['tex'] + 1).rayleigh(1.0, (S, S))
    from scipy import ndimage
    speck = ndimage.gaussian_filter(speck, 0.6)
    speck = (speck - speck.mean()) / (speck.std() + 1e-9)
    depth = (rho - 0.42 * S) / S
    grey = (105.0 + _smooth(trng, S, 3.0, 14.0) + 16.0 * speck) * (1.0 - 0.25 * depth)
    capsule = np.abs(rho - anatomy['capsule'] - 0.42 * S) < 0.8 * S / 64
    grey[capsule] += 60.0
    grey = np.clip(grey + nrng.normal(0, 2.0, (S, S)), 55.0, 200.0)
    if with_lesions:   # posterior acoustic enhancement below each anechoic lesion
      for f in findings:
        (cr, cc), (ry, rx) = f['center'], f['radii']
        band = (np.abs(xx - cc) <= rx * 0.8) & (yy > cr) & (yy < cr + ry + 0.25 * S)
        grey[band] = np.minimum(grey[band] + 25.0, 200.0)
    grey[~sector] = 0.0
    lesion_val, lesion_sd = 12.0, 3.0
  elif modality == 'fundus':
    c = 0.5 * S
    R = 0.49 * S
    rr = np.hypot(yy - c, xx - c)
    disc = rr <= R
    shade = 1.0 - 0.35 * (rr / R) ** 2
    tex = _smooth(trng, S, 1.5, 7.0)
    rgb = np.zeros((S, S, 3))
    rgb[..., 0] = 200.0 * shade + tex
    rgb[..., 1] = 85.0 * shade + 0.5 * tex
    rgb[..., 2] = 35.0 * shade
    mac = _ell(yy, xx, c, c + (0.04 if anatomy['disc_side'] else -0.04) * S, 0.07 * S, 0.07 * S)
    rgb[mac] = rgb[mac] * 0.8
    ox = (0.8 if anatomy['disc_side'] else 0.2) * S
    for a, b in anatomy['vessels']:   # vessels: arcs leaving the optic disc
      curve = c + (0.5 + 0.15 * a) * S * np.sign(b) * (np.abs(xx - ox) / S) ** 0.5
      ves = (np.abs(yy - curve) < 0.6 * S / 64) & disc
      rgb[ves] = (130.0, 30.0, 20.0)
    od = _ell(yy, xx, c, ox, 0.075 * S, 0.075 * S)
    rgb[od] = (245.0, 200.0, 125.0)
    rgb = rgb + nrng.normal(0, 3.0, (S, S, 3))
    rgb[~disc] = 0.0
    lesion_rgb, lesion_sd = (255.0, 245.0, 210.0), 3.0
  elif modality in ('histology_he', 'histology_ihc'):
    he = modality == 'histology_he'
    base = (232.0, 180.0, 210.0) if he else (238.0, 233.0, 228.0)
    nuc = (120.0, 70.0, 165.0) if he else (95.0, 110.0, 180.0)
    tex = _smooth(trng, S, 2.0, 6.0 if he else 4.0)
    rgb = np.empty((S, S, 3))
    for k in range(3):
      rgb[..., k] = base[k] + tex * (1.0 if k != 1 else 1.3)
    rgb[anatomy['nuclei_mask']] = nuc
    rgb = rgb + nrng.normal(0, 3.0, (S, S, 3))
    lesion_rgb, lesion_sd = ((80.0, 30.0, 120.0) if he else (150.0, 88.0, 45.0)), 5.0
  else:
    raise ValueError(f'unknown modality {modality!r}; known: {MODALITIES}')

  if grey is not None:
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    lesion_rgb = (lesion_val,) * 3
  if with_lesions:
    for f in findings:
      m = truth.ellipse_mask(S, f['center'], f['radii'])
      noise = lrng.normal(0.0, lesion_sd, (S, S))
      for k in range(3):
        rgb[..., k][m] = lesion_rgb[k] + (noise[m] if grey is not None or k == 0 else
                                          noise[m] * 0.8)
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def render_mask(findings: list[dict], S: int) -> np.ndarray:
  m = np.zeros((S, S), bool)
  for f in findings:
    m |= truth.ellipse_mask(S, f['center'], f['radii'])
  return np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=-1)


def make_subject(seed: int, index: int, size: int) -> dict:
  """Synthetic subject `index` of dataset `seed`: modality, edit task, findings, anatomy and the
  noise / lesion seeds its renderings use (deterministic)."""
  rng = seeded_rng(seed, index, 1)
  # Modalities cycle in a seed-dependent order, so any 8 consecutive subjects cover all of them
  # (and every edit task shows up in small datasets too).
  order = seeded_rng(seed, 0).permutation(len(MODALITIES))
  modality = MODALITIES[int(order[index % len(MODALITIES)])]
  if modality == 'mri_t1':
    task = 'modality_translation'
  elif modality == 'histology_he':
    task = 'virtual_staining'
  else:
    task = ('segmentation', 'super_resolution', 'counterfactual')[(index // 8 + index % 8) % 3]
  n = int(rng.integers(1, 4)) if task == 'counterfactual' else int(rng.integers(0, 4))
  findings = make_findings(rng, n, size)
  anatomy = make_anatomy(seeded_rng(seed, index, 2), FAMILY[modality], size)
  return dict(index=index, subject_id=f's{index:06d}', modality=modality, task=task,
              findings=findings, anatomy=anatomy, noise_seed=(seed, index, 3),
              lesion_seed=(seed, index, 4))


def draw_subject(sub: dict, size: int, modality: Optional[str] = None, with_lesions: bool = True):
  """The subject rendered uint8 [size, size, 3] in its own modality (or `modality`, same anatomy);
  with_lesions=False: the counterfactual, lesions left out."""
  mod = modality or sub['modality']
  key = MODALITIES.index(mod)
  ns = int(np.random.SeedSequence(list(sub['noise_seed']) + [key]).generate_state(1)[0])
  ls = int(np.random.SeedSequence(list(sub['lesion_seed']) + [key]).generate_state(1)[0])
  return render(mod, sub['anatomy'], sub['findings'], size, ns, ls, with_lesions)
