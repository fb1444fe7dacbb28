"""The embedded default dataset: procedurally drawn medical-style images with exact ground truth.

    python -m unimedvl_jax.data.synthetic --out DIR [--seed 0] [--size 64] [--n-subjects 2400]

writes, deterministically (same bytes for the same arguments), a dataset in the UniMed-5M JSONL
format (SPEC section 6). The default (2400 subjects, 64 px: 12.6K train / 0.7K val / 1.2K test
samples, 67 MB) takes ~16 s of CPU time; the cost grows with size^2 (256 px: ~10x). Layout:

    DIR/manifest.json                 counts per split / group / task, generator version, seed, ...
    DIR/tokenizer.model               SentencePiece model trained on all the text (vocab <= 1000)
    DIR/{train,val,test}/{group}.jsonl
    DIR/images/{split}/*.png          synthetic images (size x size; low-res inputs size/2)
    DIR/real/*                        real sample files shipped in installed packages (DICOM from
                                      pydicom / pydicom-data, NIfTI from nibabel, PNG/JPEG from
                                      scikit-image), copied byte for byte, format kept
Image paths in the JSONL are relative to DIR (the data root).

Groups (contract with the curriculum configs) and their task types (main_task_type /
sub_task_type):
    vqa      understanding / vqa                 closed yes/no and open questions, one-word answers
    report   understanding / report_generation   "Findings: ... Impression: ..."
    caption  understanding / caption             descriptions + modality recognition, incl. real
                                                 DICOM / NIfTI / photographs (captions from tags)
    t2i      image_generation / text_to_image    description -> image
    edit     image_generation / segmentation | super_resolution | modality_translation |
             virtual_staining | counterfactual   (counterfactual: input, instruction, target,
                                                 then the explanation text)

Each synthetic subject (one patient, one modality) has 0-3 lesions, at most one per image
quadrant, each small or large, round or oval (geometry in `truth.py`). Modality styles: CT
(abdomen), MRI T1 / T2 (brain; the same subject in both for modality translation), chest X-ray,
colour fundus, histology H&E / IHC (the same tissue in both for virtual staining), ultrasound.
Every record carries `meta` with the subject id, modality and exact findings, so
`truth.check_generated` and `truth.findings_from_meta` can score generated images and reports.
Splits never share a subject. Per subject: 2 VQA, 1 report, 1 caption, 1 text-to-image and 1 edit
sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import numpy as np
from PIL import Image

from unimedvl_jax.data import truth
from unimedvl_jax.data.truth import COUNT_WORDS, LOCATIONS, SHAPES, SIZES

GENERATOR_VERSION = '1'
DATASET_NAME = 'unimedvl-synthetic'
REAL_DATASET_NAME = 'unimedvl-real-samples'
SPLITS = ('train', 'val', 'test')
GROUPS = ('vqa', 'report', 'caption', 't2i', 'edit')
EDIT_TASKS = ('segmentation', 'super_resolution', 'modality_translation', 'virtual_staining',
              'counterfactual')
GROUP_TASKS = {
    'vqa': ('understanding', 'vqa'),
    'report': ('understanding', 'report_generation'),
    'caption': ('understanding', 'caption'),
    't2i': ('image_generation', 'text_to_image'),
    'edit': ('image_generation', None),   # sub_task_type: one of EDIT_TASKS
}
MODALITIES = truth.MODALITIES
VQA_SUFFIX = 'Answer the question using a single word or phrase.'

# name: (short answer, phrase used in sentences, region, lesion adjective, report kind)
MODALITY_INFO = {
    'ct': ('ct', 'abdominal CT image', 'abdomen', 'hyperdense', 'radiology'),
    'mri_t1': ('t1-weighted mri', 'T1-weighted brain MRI', 'brain', 'hypointense', 'radiology'),
    'mri_t2': ('t2-weighted mri', 'T2-weighted brain MRI', 'brain', 'hyperintense', 'radiology'),
    'xray': ('x-ray', 'chest X-ray', 'chest', 'opaque', 'radiology'),
    'fundus': ('fundus photograph', 'color fundus photograph', 'retina', 'bright', 'ophthalmology'),
    'histology_he': ('h&e histology', 'H&E-stained histology image', 'tissue', 'hypercellular',
                     'pathology'),
    'histology_ihc': ('ihc histology', 'IHC-stained histology image', 'tissue', 'DAB-positive',
                      'pathology'),
    'ultrasound': ('ultrasound', 'abdominal ultrasound image', 'abdomen', 'anechoic', 'radiology'),
}

# Real files shipped inside installed packages: (package, file name, split, description).
REAL_FILES = (
    ('pydicom', 'CT_small.dcm', 'train', None),
    ('pydicom', 'MR_small.dcm', 'train', None),
    ('pydicom', 'examples_overlay.dcm', 'train', None),
    ('pydicom', 'examples_rgb_color.dcm', 'train', None),
    ('pydicom', 'examples_palette.dcm', 'val', None),
    ('pydicom-data', 'RG1_UNCR.dcm', 'train', None),
    ('pydicom-data', 'RG3_UNCR.dcm', 'test', None),
    ('pydicom-data', '693_UNCR.dcm', 'test', None),
    ('pydicom-data', 'US1_UNCR.dcm', 'train', None),
    ('pydicom-data', 'MR-SIEMENS-DICOM-WithOverlays.dcm', 'test', None),
    ('pydicom-data', 'emri_small.dcm', 'train', None),
    ('pydicom-data', 'JPEG2000_UNC.dcm', 'train', None),
    ('pydicom-data', 'OBXXXX1A.dcm', 'test', None),
    ('pydicom-data', 'eCT_Supplemental.dcm', 'val', None),
    ('nibabel', 'anatomical.nii', 'train',
     ('mri', 'An axial slice of a T1-weighted brain MRI volume, stored as NIfTI.', 'brain')),
    ('nibabel', 'example4d.nii.gz', 'test',
     ('mri', 'An axial slice of the first volume of a 4-D functional MRI series, stored as NIfTI.',
      'brain')),
    ('skimage', 'retina.jpg', 'train',
     ('fundus photograph', 'A color fundus photograph of the human retina.', 'retina')),
    ('skimage', 'ihc.png', 'train',
     ('ihc histology', 'An immunohistochemistry (IHC) stained histology image of colonic glands, '
      'DAB-brown on a hematoxylin counterstain.', 'colon')),
    ('skimage', 'microaneurysms.png', 'test',
     ('fundus photograph', 'A grayscale detail of a retinal fundus image showing microaneurysms.',
      'retina')),
    ('skimage', 'phantom.png', 'val',
     ('phantom', 'The Shepp-Logan head phantom, a standard synthetic CT test image.', 'head')),
    ('skimage', 'cell.png', 'test',
     ('microscopy', 'A light microscopy image of a single cell floating in saline.', 'cell')),
)

DICOM_MODALITY = {
    'CT': ('ct', 'computed tomography (CT)'),
    'MR': ('mri', 'magnetic resonance (MR)'),
    'CR': ('x-ray', 'computed radiography (CR) X-ray'),
    'DX': ('x-ray', 'digital radiography (DX) X-ray'),
    'US': ('ultrasound', 'ultrasound (US)'),
    'NM': ('nuclear medicine', 'nuclear medicine (NM) scintigraphy'),
    'PT': ('pet', 'positron emission tomography (PET)'),
    'XA': ('angiography', 'X-ray angiography (XA)'),
    'MG': ('mammography', 'mammography (MG)'),
}


# ----------------------------------------------------------------------------------------------
# Subjects and drawing
# ----------------------------------------------------------------------------------------------

def _rng(*key) -> np.random.Generator:
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
  trng = _rng(anatomy['tex'])            # anatomy texture: shared across a family's modalities
  nrng = _rng(noise_seed)                # acquisition noise
  lrng = _rng(lesion_seed)               # lesion texture
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
    speck = _rng(anatomy['tex'] + 1).rayleigh(1.0, (S, S))
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


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def _lesion_phrase(f: dict, adj: str) -> str:
  return f'a {f["size"]} {f["shape"]} {adj} lesion in the {f["location"]} quadrant'


def describe(modality: str, findings: list[dict]) -> str:
  """One sentence a generated image can be checked against (also the text-to-image prompt)."""
  _, phrase, _, adj, _ = MODALITY_INFO[modality]
  n = len(findings)
  if n == 0:
    return f'A {phrase} with no lesion.'
  parts = [_lesion_phrase(f, adj) for f in findings]
  if n == 1:
    return f'A {phrase} with {parts[0]}.'
  lst = ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return f'A {phrase} with {COUNT_WORDS[n]} lesions: {lst}.'


def report_text(modality: str, findings: list[dict]) -> str:
  _, phrase, region, adj, _ = MODALITY_INFO[modality]
  n = len(findings)
  if n == 0:
    return (f'Findings: No focal lesion is seen. The {region} appears normal. '
            f'Impression: No lesion.')
  sents = [f'There {"is" if n == 1 else "are"} {COUNT_WORDS[n]} '
           f'{adj} lesion{"s" if n > 1 else ""}.']
  for f in findings:
    sents.append(f'A {f["size"]} {f["shape"]} lesion in the {f["location"]} quadrant.')
  sents.append(f'The remaining {region} appears normal.')
  locs = [f['location'] for f in findings]
  where = locs[0] if n == 1 else ', '.join(locs[:-1]) + ' and ' + locs[-1]
  imp = (f'{COUNT_WORDS[n].capitalize()} {adj} lesion{"s" if n > 1 else ""} in the {where} '
         f'quadrant{"s" if n > 1 else ""}.')
  return 'Findings: ' + ' '.join(sents) + ' Impression: ' + imp


# Fraction of subjects without lesions: counts are uniform over 0..3, except counterfactual
# subjects (a third of the 6 modalities without a dedicated edit task) with 1..3.
P_NO_LESION = 0.25 * (1.0 - (6 / 8) / 3)


def _vqa(rng, modality: str, findings: list[dict], closed: bool) -> tuple[str, str, str]:
  """(question kind, question, answer)."""
  _, phrase, _, _, _ = MODALITY_INFO[modality]
  locs = {f['location'] for f in findings}
  n = len(findings)
  if closed:
    # Kind probabilities depend on the lesion count so that every kind is balanced yes / no:
    # P(any_lesion | n = 0) P(n = 0) = P(any_lesion | n > 0) P(n > 0).
    if n == 0:
      probs = (0.0, 0.6, 0.4)
    else:
      p_any = 0.6 * P_NO_LESION / (1.0 - P_NO_LESION)
      probs = (0.6 - p_any, p_any, 0.4)
    kind = ('lesion_in_quadrant', 'any_lesion', 'modality_check')[
        int(rng.choice(3, p=np.asarray(probs) / sum(probs)))]
    if kind == 'lesion_in_quadrant':
      want_yes = bool(locs) and rng.uniform() < 0.5
      pool = sorted(locs) if want_yes else [l for l in LOCATIONS if l not in locs]
      loc = pool[int(rng.integers(len(pool)))]
      return kind, f'Is there a lesion in the {loc} quadrant?', 'yes' if loc in locs else 'no'
    if kind == 'any_lesion':
      return kind, 'Is there any lesion in this image?', 'yes' if n else 'no'
    other = [m for m in MODALITIES if MODALITY_INFO[m][0] != MODALITY_INFO[modality][0]]
    ask = modality if rng.uniform() < 0.5 else other[int(rng.integers(len(other)))]
    return kind, f'Is this a {MODALITY_INFO[ask][1]}?', 'yes' if ask == modality else 'no'
  kinds = ['count', 'modality'] + (['location', 'size', 'shape'] if n == 1 else [])
  kind = kinds[int(rng.integers(len(kinds)))]
  if kind == 'count':
    return kind, 'How many lesions are there?', ('none' if n == 0 else COUNT_WORDS[n])
  if kind == 'modality':
    return kind, 'What is the imaging modality?', MODALITY_INFO[modality][0]
  f = findings[0]
  if kind == 'location':
    return kind, 'Where is the lesion?', f['location']
  if kind == 'size':
    return kind, 'What is the size of the lesion?', f['size']
  return kind, 'What is the shape of the lesion?', f['shape']


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def edit_texts(rng, task: str, modality: str, findings: list[dict]) -> tuple[str, str]:
  """(instruction, gpt text). For counterfactual the gpt text is the explanation."""
  phrase = MODALITY_INFO[modality][1]
  n = len(findings)
  if task == 'segmentation':
    ins = _pick(rng, (f'Please segment the lesions in this {phrase}.',
                      'Please segment the lesion.', 'Segment all lesions and output the mask.'))
    rep = ('Here is the segmentation mask; no lesion is present.' if n == 0 else
           f'Here is the segmentation mask of {COUNT_WORDS[n]} lesion{"s" if n > 1 else ""}.')
    return ins, rep
  if task == 'super_resolution':
    ins = _pick(rng, (f'Please increase the resolution of this {phrase} by a factor of 2.',
                      'Generate a 2x super-resolved version of this image.'))
    return ins, 'Here is the high-resolution image.'
  if task == 'modality_translation':
    ins = _pick(rng, ('Translate this T1-weighted brain MRI into a T2-weighted image.',
                      'Convert this T1-weighted MRI to T2 contrast.'))
    return ins, 'Here is the corresponding T2-weighted image.'
  if task == 'virtual_staining':
    ins = _pick(rng, ('Convert this H&E-stained histology image into an IHC-stained image.',
                      'Virtually stain this H&E slide as IHC.'))
    return ins, 'Here is the virtually stained IHC image.'
  if task == 'counterfactual':
    adj, region = MODALITY_INFO[modality][3], MODALITY_INFO[modality][2]
    ins = f'What would this {phrase} look like without the lesion{"s" if n > 1 else ""}?'
    parts = [f'{f["size"]} {f["shape"]} {adj} lesion in the {f["location"]} quadrant'
             for f in findings]
    exp = (f'Without the lesion{"s" if n > 1 else ""}, the image shows normal {region}: the '
           + ('; the '.join(parts)) + (' was' if n == 1 else ' were')
           + ' removed and the rest of the image is unchanged.')
    return ins, exp
  raise ValueError(task)


# ----------------------------------------------------------------------------------------------
# Real files
# ----------------------------------------------------------------------------------------------

def _package_dir(pkg: str) -> Optional[str]:
  try:
    if pkg == 'pydicom':
      import pydicom.data
      return os.path.join(os.path.dirname(pydicom.data.__file__), 'test_files')
    if pkg == 'pydicom-data':
      import data_store   # the pydicom-data package's module
      return os.path.join(os.path.dirname(data_store.__file__), 'data')
    if pkg == 'nibabel':
      import nibabel
      return os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data')
    if pkg == 'skimage':
      import importlib.util
      spec = importlib.util.find_spec('skimage')
      if spec is None or not spec.submodule_search_locations:
        return None
      return os.path.join(list(spec.submodule_search_locations)[0], 'data')
  except ImportError:
    return None
  return None


def real_sources() -> list[tuple[str, str, str, tuple | None]]:
  """(source path, file name, split, description) of the real files present offline here."""
  out = []
  for pkg, name, split, desc in REAL_FILES:
    d = _package_dir(pkg)
    if d and os.path.isfile(os.path.join(d, name)):
      out.append((os.path.join(d, name), name, split, desc))
  return out


def _real_description(path: str, desc) -> tuple[str, str, str]:
  """(short modality answer, caption, body part or '') of one real file."""
  if desc is not None:
    return desc
  from unimedvl_jax.data.images import dicom_tags
  t = dicom_tags(path)
  short, long = DICOM_MODALITY.get(t['Modality'].upper(), ('medical image', f'{t["Modality"]}'))
  body = t['BodyPartExamined'].strip().lower()
  cap = f'A real {long} image' + (f' of the {body}' if body else '') + ', stored as DICOM'
  details = [f'{t["Rows"]} x {t["Columns"]} pixels']
  try:
    nf = int(t['NumberOfFrames'] or 1)
  except ValueError:
    nf = 1
  if nf > 1:
    details.append(f'{nf} frames, the middle one shown')
  pi = t['PhotometricInterpretation'].upper()
  if pi == 'MONOCHROME1':
    details.append('inverted grayscale (MONOCHROME1)')
  elif pi in ('RGB', 'YBR_FULL', 'YBR_FULL_422', 'PALETTE COLOR'):
    details.append('color')
  return short, cap + ' (' + ', '.join(details) + ').', body


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

def split_sizes(n_subjects: int, val_fraction: float, test_fraction: float) -> dict:
  n_val = int(round(n_subjects * val_fraction))
  n_test = int(round(n_subjects * test_fraction))
  n_val = max(n_val, 1 if n_subjects >= 3 else 0)
  n_test = max(n_test, 1 if n_subjects >= 3 else 0)
  return dict(train=n_subjects - n_val - n_test, val=n_val, test=n_test)


def _img_entry(rel: str, h: int, w: int) -> dict:
  return {'path': rel, 'height': int(h), 'width': int(w)}


def _save(img: np.ndarray, root: str, rel: str) -> None:
  Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(root, rel), format='PNG',
                                                   compress_level=1)


def make_subject(seed: int, index: int, size: int) -> dict:
  """Synthetic subject `index` of dataset `seed`: modality, edit task, findings, anatomy and the
  noise / lesion seeds its renderings use (deterministic)."""
  rng = _rng(seed, index, 1)
  # Modalities cycle in a seed-dependent order, so any 8 consecutive subjects cover all of them
  # (and every edit task shows up in small datasets too).
  order = _rng(seed, 0).permutation(len(MODALITIES))
  modality = MODALITIES[int(order[index % len(MODALITIES)])]
  if modality == 'mri_t1':
    task = 'modality_translation'
  elif modality == 'histology_he':
    task = 'virtual_staining'
  else:
    task = ('segmentation', 'super_resolution', 'counterfactual')[(index // 8 + index % 8) % 3]
  n = int(rng.integers(1, 4)) if task == 'counterfactual' else int(rng.integers(0, 4))
  findings = make_findings(rng, n, size)
  anatomy = make_anatomy(_rng(seed, index, 2), FAMILY[modality], size)
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


def _records_for_subject(sub: dict, split: str, size: int, seed: int, root: str) -> dict:
  """Writes the subject's images; returns {group: [record, ...]}."""
  sid, mod, findings = sub['subject_id'], sub['modality'], sub['findings']
  rng = _rng(seed, sub['index'], 5)
  img_dir = f'images/{split}'
  main = draw_subject(sub, size)
  main_rel = f'{img_dir}/{sid}.png'
  _save(main, root, main_rel)
  main_e = _img_entry(main_rel, size, size)
  base_meta = dict(subject_id=sid, modality=mod, image_size=size, findings=findings, split=split)
  recs: dict[str, list] = {g: [] for g in GROUPS}

  def rec(group, sub_task, inp, out, msgs, **meta_extra):
    main_t, sub_t = GROUP_TASKS[group]
    r = {'id': f'{split}-{group}-{sid}-{len(recs[group])}',
         'main_task_type': main_t, 'sub_task_type': sub_t or sub_task, 'dataset': DATASET_NAME,
         'input_img': inp, 'output_img': out,
         'message': [{'from': 'human', 'value': msgs[0]}] +
                    ([{'from': 'gpt', 'value': msgs[1]}] if msgs[1] else []),
         'meta': dict(base_meta, **meta_extra)}
    recs[group].append(r)

  # VQA: one closed, one open question.
  for closed in (True, False):
    kind, q, a = _vqa(rng, mod, findings, closed)
    rec('vqa', None, [main_e], [], (f'<image>\n{q}\n{VQA_SUFFIX}', a),
        question_type='closed' if closed else 'open', question_kind=kind, answer=a)
  # Report.
  kind = MODALITY_INFO[mod][4]
  prompt = _pick(rng, (f'Generate a concise {kind} report with findings and impression for this '
                       f'{MODALITY_INFO[mod][1]}.',
                       'Write the findings and impression for this image.'))
  rec('report', None, [main_e], [], (f'<image>\n{prompt}', report_text(mod, findings)))
  # Caption / modality recognition.
  if rng.uniform() < 0.5:
    rec('caption', None, [main_e], [], ('<image>\nDescribe this medical image.',
                                       describe(mod, findings)), caption_kind='description')
  else:
    rec('caption', None, [main_e], [],
        ('<image>\nWhat is the imaging modality of this image?',
         f'This is a {MODALITY_INFO[mod][1]}.'), caption_kind='modality', answer=MODALITY_INFO[mod][0])
  # Text to image.
  desc = describe(mod, findings)
  t2i_prompt = _pick(rng, ('Generate ', 'Draw ', 'Create '))
  t2i_prompt += desc[0].lower() + desc[1:]
  rec('t2i', None, [], [main_e], (t2i_prompt, ''))
  # Edit.
  task = sub['task']
  ins, reply = edit_texts(rng, task, mod, findings)
  if task == 'segmentation':
    tgt_rel = f'{img_dir}/{sid}_mask.png'
    _save(render_mask(findings, size), root, tgt_rel)
    rec('edit', task, [main_e], [_img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_modality=truth.MASK)
  elif task == 'super_resolution':
    lo = max(8, size // 2)
    lr = np.asarray(Image.fromarray(main).resize((lo, lo), Image.BICUBIC, reducing_gap=None))
    lr_rel = f'{img_dir}/{sid}_lr.png'
    _save(lr, root, lr_rel)
    rec('edit', task, [_img_entry(lr_rel, lo, lo)], [main_e], (f'<image>\n{ins}', reply),
        input_size=lo)
  elif task == 'modality_translation':
    tgt_rel = f'{img_dir}/{sid}_t2.png'
    _save(draw_subject(sub, size, 'mri_t2'), root, tgt_rel)
    rec('edit', task, [main_e], [_img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_modality='mri_t2')
  elif task == 'virtual_staining':
    tgt_rel = f'{img_dir}/{sid}_ihc.png'
    _save(draw_subject(sub, size, 'histology_ihc'), root, tgt_rel)
    rec('edit', task, [main_e], [_img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_modality='histology_ihc')
  elif task == 'counterfactual':
    tgt_rel = f'{img_dir}/{sid}_cf.png'
    _save(draw_subject(sub, size, with_lesions=False), root, tgt_rel)
    rec('edit', task, [main_e], [_img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_findings=[])
  return recs


def _real_records(root: str, seed: int) -> tuple[dict, list]:
  """Copies the real files into root/real; returns ({split: [caption records]}, file list)."""
  from unimedvl_jax.data.images import ImageError, load_image
  out = {s: [] for s in SPLITS}
  files = []
  os.makedirs(os.path.join(root, 'real'), exist_ok=True)
  for src, name, split, desc in real_sources():
    rel = f'real/{name}'
    shutil.copyfile(src, os.path.join(root, rel))
    try:
      img = load_image(os.path.join(root, rel))
    except ImageError:
      os.remove(os.path.join(root, rel))
      continue
    short, caption, body = _real_description(src, desc)
    e = _img_entry(rel, img.shape[0], img.shape[1])
    sid = 'real-' + name.split('.')[0]
    meta = dict(subject_id=sid, modality=short, source_file=name, real=True, split=split)
    qa = [('<image>\nDescribe this medical image.', caption, 'description', None),
          ('<image>\nWhat is the imaging modality of this image?\n' + VQA_SUFFIX, short,
           'modality', short)]
    if body:
      qa.append(('<image>\nWhich body part or organ is shown?\n' + VQA_SUFFIX, body, 'body_part',
                 body))
    for i, (q, a, kind, ans) in enumerate(qa):
      m = dict(meta, caption_kind=kind)
      if ans is not None:
        m['answer'] = ans
      out[split].append({'id': f'{split}-caption-{sid}-{i}', 'main_task_type': 'understanding',
                         'sub_task_type': 'caption', 'dataset': REAL_DATASET_NAME,
                         'input_img': [e], 'output_img': [],
                         'message': [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}],
                         'meta': m})
    files.append(dict(file=rel, split=split, modality=short,
                      sha256=hashlib.sha256(open(os.path.join(root, rel), 'rb').read()).hexdigest()))
  return out, files


def _text_lines(records) -> list[str]:
  lines = []
  for r in records:
    for t in r['message']:
      v = t['value'].replace('<image>', ' ').strip()
      if v:
        lines.append(v)
  return lines


def generate(out_dir: str, seed: int = 0, size: int = 64, n_subjects: int = 2400,
             val_fraction: float = 0.05, test_fraction: float = 0.08, vocab_size: int = 1000,
             include_real: bool = True, verbose: bool = False) -> dict:
  """Writes the dataset into out_dir (created; existing dataset files are overwritten) and returns
  the manifest. Deterministic: the same arguments give the same bytes."""
  from unimedvl_jax.data.tokenizer import train_sentencepiece
  if size < 32 or size % 16:
    raise ValueError(f'size must be a multiple of 16 and >= 32, got {size}')
  t0 = time.time()
  os.makedirs(out_dir, exist_ok=True)
  for s in SPLITS:
    os.makedirs(os.path.join(out_dir, 'images', s), exist_ok=True)
    os.makedirs(os.path.join(out_dir, s), exist_ok=True)
  sizes = split_sizes(n_subjects, val_fraction, test_fraction)
  bounds, start = {}, 0
  for s in SPLITS:
    bounds[s] = (start, start + sizes[s])
    start += sizes[s]
  all_recs = {s: {g: [] for g in GROUPS} for s in SPLITS}
  for s in SPLITS:
    for i in range(*bounds[s]):
      sub = make_subject(seed, i, size)
      for g, rs in _records_for_subject(sub, s, size, seed, out_dir).items():
        all_recs[s][g].extend(rs)
  real_files = []
  if include_real:
    real, real_files = _real_records(out_dir, seed)
    for s in SPLITS:
      all_recs[s]['caption'].extend(real[s])
  counts = {}
  lines = []
  for s in SPLITS:
    counts[s] = {}
    for g in GROUPS:
      path = os.path.join(out_dir, s, f'{g}.jsonl')
      with open(path, 'w', encoding='utf-8') as f:
        for r in all_recs[s][g]:
          f.write(json.dumps(r, ensure_ascii=False) + '\n')
      per_task = {}
      for r in all_recs[s][g]:
        per_task[r['sub_task_type']] = per_task.get(r['sub_task_type'], 0) + 1
      counts[s][g] = dict(total=len(all_recs[s][g]), tasks=dict(sorted(per_task.items())))
      lines += _text_lines(all_recs[s][g])
  lines += truth.findings_vocabulary()
  tok_path = train_sentencepiece(lines, os.path.join(out_dir, 'tokenizer'), vocab_size, seed=seed)
  from unimedvl_jax.data.tokenizer import SentencePieceTokenizer
  tok = SentencePieceTokenizer(tok_path)
  manifest = dict(
      name=DATASET_NAME, generator='unimedvl_jax.data.synthetic', version=GENERATOR_VERSION,
      seed=seed, image_size=size, n_subjects=n_subjects, subjects=sizes,
      val_fraction=val_fraction, test_fraction=test_fraction, include_real=include_real,
      splits=list(SPLITS), groups=list(GROUPS),
      group_tasks={g: (list(GROUP_TASKS[g][:1]) + [GROUP_TASKS[g][1] or list(EDIT_TASKS)])
                   for g in GROUPS},
      files={s: {g: f'{s}/{g}.jsonl' for g in GROUPS} for s in SPLITS},
      counts=counts, image_root='.', modalities=list(MODALITIES),
      tokenizer=dict(path='tokenizer.model', kind='sentencepiece', vocab_size=tok.vocab_size,
                     requested_vocab_size=vocab_size, im_start=tok.im_start, im_end=tok.im_end,
                     vision_start=tok.vision_start, vision_end=tok.vision_end, pad_id=tok.pad_id),
      real_files=real_files)
  with open(os.path.join(out_dir, 'manifest.json'), 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write('\n')
  if verbose:
    tot = {s: sum(c['total'] for c in counts[s].values()) for s in SPLITS}
    print(f'wrote {out_dir}: samples {tot}, subjects {sizes}, vocab {tok.vocab_size}, '
          f'{time.time() - t0:.1f}s', file=sys.stderr)
  return manifest


# ----------------------------------------------------------------------------------------------
# The default location (used when config.data.root is empty)
# ----------------------------------------------------------------------------------------------

def default_root(seed: int = 0, size: int = 64) -> str:
  """$UNIMEDVL_DATA_DIR, else ~/.cache/unimedvl_jax/synthetic-v{version}-seed{seed}-{size}."""
  env = os.environ.get('UNIMEDVL_DATA_DIR')
  if env:
    return os.path.abspath(os.path.expanduser(env))
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'unimedvl_jax', f'synthetic-v{GENERATOR_VERSION}-seed{seed}-{size}')


def _manifest_matches(out_dir: str, **kw) -> bool:
  p = os.path.join(out_dir, 'manifest.json')
  if not os.path.isfile(p):
    return False
  try:
    with open(p, encoding='utf-8') as f:
      m = json.load(f)
  except (OSError, ValueError):
    return False
  return m.get('version') == GENERATOR_VERSION and all(m.get(k) == v for k, v in kw.items())


def _is_synthetic(out_dir: str) -> bool:
  try:
    with open(os.path.join(out_dir, 'manifest.json'), encoding='utf-8') as f:
      return json.load(f).get('generator') == 'unimedvl_jax.data.synthetic'
  except (OSError, ValueError, AttributeError):
    return False


def ensure_dataset(out_dir: Optional[str] = None, seed: int = 0, size: int = 64,
                   n_subjects: int = 2400, include_real: bool = True) -> str:
  """Returns a directory holding the dataset for these arguments, generating it if needed
  (into a temporary sibling, then renamed, so concurrent callers never see half a dataset). An
  older synthetic dataset there (other arguments or version) is replaced; any other non-empty
  directory is an error."""
  out_dir = os.path.abspath(out_dir or default_root(seed, size))
  kw = dict(seed=seed, image_size=size, n_subjects=n_subjects, include_real=include_real)
  if _manifest_matches(out_dir, **kw):
    return out_dir
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not _is_synthetic(out_dir):
    raise FileExistsError(f'{out_dir} exists and does not hold an embedded synthetic dataset '
                          '(no manifest.json written by unimedvl_jax.data.synthetic); refusing '
                          'to replace it')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-synthetic-', dir=parent)
  try:
    generate(tmp, seed=seed, size=size, n_subjects=n_subjects, include_real=include_real)
    if os.path.exists(out_dir):
      if _manifest_matches(out_dir, **kw):
        return out_dir
      old = tempfile.mkdtemp(prefix='.old-synthetic-', dir=parent)
      os.replace(out_dir, os.path.join(old, 'd'))
      shutil.rmtree(old, ignore_errors=True)
    try:
      os.replace(tmp, out_dir)
    except OSError:
      if not _manifest_matches(out_dir, **kw):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m unimedvl_jax.data.synthetic', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--out', required=True, help='output directory (the data root)')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--size', type=int, default=64, help='image side in pixels (multiple of 16)')
  ap.add_argument('--n-subjects', type=int, default=2400, help='synthetic subjects, all splits')
  ap.add_argument('--val-fraction', type=float, default=0.05)
  ap.add_argument('--test-fraction', type=float, default=0.08)
  ap.add_argument('--vocab-size', type=int, default=1000)
  ap.add_argument('--no-real', action='store_true', help='leave out the real sample files')
  a = ap.parse_args(argv)
  t0 = time.time()
  m = generate(a.out, seed=a.seed, size=a.size, n_subjects=a.n_subjects,
               val_fraction=a.val_fraction, test_fraction=a.test_fraction,
               vocab_size=a.vocab_size, include_real=not a.no_real)
  tot = {s: sum(c['total'] for c in m['counts'][s].values()) for s in SPLITS}
  print(json.dumps(dict(out=os.path.abspath(a.out), samples=tot, subjects=m['subjects'],
                        vocab_size=m['tokenizer']['vocab_size'],
                        seconds=round(time.time() - t0, 1))))
  return 0


if __name__ == '__main__':
  sys.exit(main())
