"""The dataset writer: records per subject, the JSONL files, the tokenizer, the manifest; and the
default location with `ensure_dataset` (generate once, atomically)."""

from __future__ import annotations

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
from unimedvl_jax.data.synthetic.common import (DATASET_NAME, EDIT_TASKS, GENERATOR,
                                                GENERATOR_VERSION, GROUP_TASKS, GROUPS, MODALITIES,
                                                SPLITS, img_entry, vqa_prompt)
from unimedvl_jax.data.synthetic.draw import draw_subject, make_subject, render_mask, seeded_rng
from unimedvl_jax.data.synthetic.real import real_records
from unimedvl_jax.data.synthetic.texts import (MODALITY_INFO, describe, edit_texts, pick,
                                               report_text, vqa_question)


def split_sizes(n_subjects: int, val_fraction: float, test_fraction: float) -> dict:
  n_val = int(round(n_subjects * val_fraction))
  n_test = int(round(n_subjects * test_fraction))
  n_val = max(n_val, 1 if n_subjects >= 3 else 0)
  n_test = max(n_test, 1 if n_subjects >= 3 else 0)
  return dict(train=n_subjects - n_val - n_test, val=n_val, test=n_test)


def _save(img: np.ndarray, root: str, rel: str) -> None:
  Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(root, rel), format='PNG',
                                                   compress_level=1)


def _records_for_subject(sub: dict, split: str, size: int, seed: int, root: str) -> dict:
  """Writes the subject's images; returns {group: [record, ...]}."""
  sid, mod, findings = sub['subject_id'], sub['modality'], sub['findings']
  rng = seeded_rng(seed, sub['index'], 5)
  img_dir = f'images/{split}'
  main = draw_subject(sub, size)
  main_rel = f'{img_dir}/{sid}.png'
  _save(main, root, main_rel)
  main_e = img_entry(main_rel, size, size)
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
    kind, q, a = vqa_question(rng, mod, findings, closed)
    rec('vqa', None, [main_e], [], (vqa_prompt(q), a),
        question_type='closed' if closed else 'open', question_kind=kind, answer=a)
  # Report.
  kind = MODALITY_INFO[mod][4]
  prompt = pick(rng, (f'Generate a concise {kind} report with findings and impression for this '
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
  t2i_prompt = pick(rng, ('Generate ', 'Draw ', 'Create '))
  t2i_prompt += desc[0].lower() + desc[1:]
  rec('t2i', None, [], [main_e], (t2i_prompt, ''))
  # Edit.
  task = sub['task']
  ins, reply = edit_texts(rng, task, mod, findings)
  if task == 'segmentation':
    tgt_rel = f'{img_dir}/{sid}_mask.png'
    _save(render_mask(findings, size), root, tgt_rel)
    rec('edit', task, [main_e], [img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_modality=truth.MASK)
  elif task == 'super_resolution':
    lo = max(8, size // 2)
    lr = np.asarray(Image.fromarray(main).resize((lo, lo), Image.BICUBIC, reducing_gap=None))
    lr_rel = f'{img_dir}/{sid}_lr.png'
    _save(lr, root, lr_rel)
    rec('edit', task, [img_entry(lr_rel, lo, lo)], [main_e], (f'<image>\n{ins}', reply),
        input_size=lo)
  elif task == 'modality_translation':
    tgt_rel = f'{img_dir}/{sid}_t2.png'
    _save(draw_subject(sub, size, 'mri_t2'), root, tgt_rel)
    rec('edit', task, [main_e], [img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_modality='mri_t2')
  elif task == 'virtual_staining':
    tgt_rel = f'{img_dir}/{sid}_ihc.png'
    _save(draw_subject(sub, size, 'histology_ihc'), root, tgt_rel)
    rec('edit', task, [main_e], [img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_modality='histology_ihc')
  elif task == 'counterfactual':
    tgt_rel = f'{img_dir}/{sid}_cf.png'
    _save(draw_subject(sub, size, with_lesions=False), root, tgt_rel)
    rec('edit', task, [main_e], [img_entry(tgt_rel, size, size)], (f'<image>\n{ins}', reply),
        target_findings=[])
  return recs


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
    real, real_files = real_records(out_dir, seed)
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
      name=DATASET_NAME, generator=GENERATOR, version=GENERATOR_VERSION,
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
      return json.load(f).get('generator') == GENERATOR
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
