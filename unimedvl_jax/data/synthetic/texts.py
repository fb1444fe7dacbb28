"""The texts of the synthetic samples: descriptions, reports, VQA questions and edit
instructions, all derived from a subject's modality and exact findings."""

from __future__ import annotations

import numpy as np

from unimedvl_jax.data.truth import COUNT_WORDS, LOCATIONS, MODALITIES

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


def vqa_question(rng, modality: str, findings: list[dict], closed: bool) -> tuple[str, str, str]:
  """(question kind, question, answer): a closed (yes / no) or open question about the image."""
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


def pick(rng, options):
  """One of the options, uniformly."""
  return options[int(rng.integers(len(options)))]


def edit_texts(rng, task: str, modality: str, findings: list[dict]) -> tuple[str, str]:
  """(instruction, gpt text). For counterfactual the gpt text is the explanation."""
  phrase = MODALITY_INFO[modality][1]
  n = len(findings)
  if task == 'segmentation':
    ins = pick(rng, (f'Please segment the lesions in this {phrase}.',
                      'Please segment the lesion.', 'Segment all lesions and output the mask.'))
    rep = ('Here is the segmentation mask; no lesion is present.' if n == 0 else
           f'Here is the segmentation mask of {COUNT_WORDS[n]} lesion{"s" if n > 1 else ""}.')
    return ins, rep
  if task == 'super_resolution':
    ins = pick(rng, (f'Please increase the resolution of this {phrase} by a factor of 2.',
                      'Generate a 2x super-resolved version of this image.'))
    return ins, 'Here is the high-resolution image.'
  if task == 'modality_translation':
    ins = pick(rng, ('Translate this T1-weighted brain MRI into a T2-weighted image.',
                      'Convert this T1-weighted MRI to T2 contrast.'))
    return ins, 'Here is the corresponding T2-weighted image.'
  if task == 'virtual_staining':
    ins = pick(rng, ('Convert this H&E-stained histology image into an IHC-stained image.',
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
