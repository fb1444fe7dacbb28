"""Real sample files shipped inside installed packages (DICOM from pydicom / pydicom-data, NIfTI
from nibabel, PNG / JPEG from scikit-image): where they are, their captions, and their records."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Optional

from unimedvl_jax.data.synthetic.common import REAL_DATASET_NAME, SPLITS, img_entry, vqa_prompt

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


def real_records(root: str, seed: int) -> tuple[dict, list]:
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
    e = img_entry(rel, img.shape[0], img.shape[1])
    sid = 'real-' + name.split('.')[0]
    meta = dict(subject_id=sid, modality=short, source_file=name, real=True, split=split)
    qa = [('<image>\nDescribe this medical image.', caption, 'description', None),
          (vqa_prompt('What is the imaging modality of this image?'), short,
           'modality', short)]
    if body:
      qa.append((vqa_prompt('Which body part or organ is shown?'), body, 'body_part',
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
