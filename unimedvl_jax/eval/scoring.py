"""Scoring one task: its metrics and baselines, from the prepared samples and their outputs.

`score_task` dispatches on the task kind (the definitions are listed in eval/harness.py's
module docstring, which the report carries as `protocol.metrics_doc`): VQA accuracies
(`vqa_metrics`), text metrics and finding P/R/F1 for reports / captions, Frechet distance, PSNR /
SSIM, Dice / IoU and the synthetic data's ground-truth checkers for images, each with its
baselines. The baselines fitted on training data read a `TrainPool` of the training split
(eval/baselines.py holds their pure functions) and are left out without one.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable

import numpy as np

from unimedvl_jax.eval import baselines as B
from unimedvl_jax.eval import metrics as M
from unimedvl_jax.eval.tasks import (IMAGE_KINDS, first_reply, is_closed, is_synthetic,
                                     prompt_key, question_kind, task_key, task_kind,
                                     template_group)

CHEXPERT_LIKE_VOCAB = {
    'atelectasis': ['atelectasis'], 'cardiomegaly': ['cardiomegaly', 'enlarged heart'],
    'consolidation': ['consolidation'], 'edema': ['edema', 'oedema'],
    'pleural effusion': ['pleural effusion', 'effusion', 'effusions'],
    'pneumonia': ['pneumonia'], 'pneumothorax': ['pneumothorax'], 'fracture': ['fracture'],
    'lung opacity': ['opacity', 'opacities'], 'nodule': ['nodule', 'nodules', 'mass'],
    'lesion': ['lesion', 'lesions'], 'support devices': ['tube', 'catheter', 'pacemaker'],
}


def _agg(values, seed):
  vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return M.aggregate(vals, seed=seed)


def _resize_to(img, hw):
  from unimedvl_jax.data import images as imlib
  return imlib.resize(np.asarray(img, np.uint8), hw) if img.shape[:2] != tuple(hw) else img


def text_metrics(preds, refs, seed) -> dict:
  out = {}
  if not preds:
    return out
  for n in (1, 2, 3, 4):
    out[f'bleu{n}'] = M.bleu(preds, refs, n)
  out['rouge_l'] = _agg([M.rouge_l(p, r) for p, r in zip(preds, refs)], seed)
  out['meteor_like'] = _agg([M.meteor_like(p, r) for p, r in zip(preds, refs)], seed)
  return out


def finding_metrics(preps, preds) -> dict:
  from unimedvl_jax.data import truth
  syn = [is_synthetic(p) for p in preps]
  if all(syn):
    pf = [truth.findings_from_text(x) for x in preds]
    rf = [truth.findings_from_meta(p.sample.meta) for p in preps]
    vocab = 'truth.findings_vocabulary (synthetic ground truth from meta)'
  else:
    pf = [M.extract_findings(x, CHEXPERT_LIKE_VOCAB) for x in preds]
    rf = [M.extract_findings(t, CHEXPERT_LIKE_VOCAB) for p in preps for t in p.ref_texts[:1]]
    vocab = 'CHEXPERT_LIKE_VOCAB (NegEx-like extraction from the reference text)'
  r = M.finding_prf(pf, rf)
  return dict(micro=r['micro'], macro=r['macro'], vocabulary=vocab)


def checker_metrics(preps, images) -> dict:
  from unimedvl_jax.data import truth
  keys = ('present_ok', 'count_ok', 'location_ok', 'size_ok', 'all_ok', 'modality_ok')
  gen = defaultdict(list)
  ref = defaultdict(list)
  for p, img in zip(preps, images):
    c = truth.check_generated(img, p.sample.meta)
    r = truth.check_generated(p.ref_images[0], p.sample.meta)
    for k in keys:
      gen[k].append(float(c[k]))
      ref[k].append(float(r[k]))
  return dict(generated={k: float(np.mean(v)) for k, v in gen.items()},
              references_ceiling={k: float(np.mean(v)) for k, v in ref.items()},
              n=len(images))


def image_pair_metrics(gen, refs, seed) -> dict:
  ps = [M.psnr(g, r) for g, r in zip(gen, refs)]
  ss = [M.ssim(g, r, channel_axis=-1) for g, r in zip(gen, refs)]
  inf = int(sum(1 for v in ps if not np.isfinite(v)))
  return dict(psnr=_agg([v for v in ps if np.isfinite(v)], seed), psnr_infinite=inf,
              ssim=_agg(ss, seed))


def frechet(gen, refs, extractor) -> dict:
  if len(gen) < 2:
    return dict(value=float('nan'), note='needs >= 2 images')
  fg = extractor(np.stack(gen))
  fr = extractor(np.stack(refs))
  return dict(value=float(M.frechet_distance_from_features(fg, fr)), n=len(gen),
              extractor=type(extractor).__name__)


class TrainPool:
  """Training-split samples for the baselines fitted on training data (eval/baselines.py):
  VQA answers per question kind, report / caption texts with their images' thumbnail features,
  text-to-image training images with their modality. Images are loaded lazily, once per path."""

  KINDS = ('vqa', 'report', 'caption', 'text_to_image')

  def __init__(self, samples: Iterable, description: str = 'training split'):
    self.description = description
    self.by_key: dict[str, list] = defaultdict(list)
    for s in samples:
      if task_kind(s) in self.KINDS:
        self.by_key[task_key(s)].append(s)
    self._img: dict = {}

  def __len__(self):
    return sum(len(v) for v in self.by_key.values())

  def image(self, ref) -> np.ndarray:
    from unimedvl_jax.data import images as imlib
    if ref not in self._img:
      self._img[ref] = imlib.load_image(ref.path, **ref.load_kwargs())
    return self._img[ref]

  def vqa(self, key):
    """(answers, question kinds, closed flags) of the key's training samples."""
    ss = self.by_key.get(key, [])
    return ([first_reply(s) for s in ss], [question_kind(s) for s in ss],
            [is_closed(s, first_reply(s)) for s in ss])

  def templates(self, key):
    """(features [N, 192], prompt keys, reference texts) of the key's samples with an image."""
    ss = [s for s in self.by_key.get(key, []) if s.input_img and first_reply(s)]
    if not ss:
      return None
    feats = np.stack([B.thumb_feature(self.image(s.input_img[0])) for s in ss])
    return feats, [prompt_key(s) for s in ss], [first_reply(s) for s in ss]

  def texts(self, key):
    """((modality, prompt) groups, reference texts) of the key's samples with a reply."""
    ss = [s for s in self.by_key.get(key, []) if first_reply(s)]
    return [template_group(s) for s in ss], [first_reply(s) for s in ss]

  def t2i_images(self, key):
    ss = [s for s in self.by_key.get(key, []) if s.output_img]
    return ss, [(s.meta or {}).get('modality') for s in ss]


def vqa_metrics(preps, preds, seed, pool=None, key=None) -> dict:
  """Closed / open accuracy, per-question-kind accuracy and their majority baselines."""
  res: dict = {}
  refs = [p.ref_texts[0] for p in preps]
  closed = [is_closed(p.sample, r) for p, r in zip(preps, refs)]
  em = [M.exact_match(a, r) for a, r in zip(preds, refs)]
  rec = [M.token_recall(a, r) for a, r in zip(preds, refs)]
  res['closed_accuracy'] = _agg([e for e, c in zip(em, closed) if c], seed)
  res['open_accuracy'] = _agg([e for e, c in zip(em, closed) if not c], seed)
  res['open_recall'] = _agg([x for x, c in zip(rec, closed) if not c], seed)
  res['accuracy'] = _agg(em, seed)
  base = {}
  for name, sel in (('closed', True), ('open', False)):
    r_sel = [r for r, c in zip(refs, closed) if c == sel]
    if r_sel:
      ans, acc = M.majority_baseline(r_sel, r_sel)
      base[name] = dict(answer=ans, accuracy=acc, n=len(r_sel),
                        fitted_on='the evaluated references (optimistic)')
  res['baseline_majority'] = base
  kinds = [question_kind(p.sample) for p in preps]
  if any(k is not None for k in kinds):
    kinds = [k or 'unlabelled' for k in kinds]
    tr_ans, tr_kinds, _ = pool.vqa(key) if pool is not None else ([], [], [])
    tr_kinds = [k or 'unlabelled' for k in tr_kinds]
    mb = B.majority_by_group(tr_ans, tr_kinds, refs, kinds)
    per = {}
    for k in sorted(set(kinds)):
      sel = [i for i, kk in enumerate(kinds) if kk == k]
      per[k] = dict(question_type='closed' if all(closed[i] for i in sel) else
                    ('open' if not any(closed[i] for i in sel) else 'mixed'),
                    accuracy=_agg([em[i] for i in sel], seed), **mb[k])
    res['by_question_kind'] = per
  if pool is not None:
    tr_ans, _, tr_closed = pool.vqa(key)
    for name, sel in (('closed', True), ('open', False)):
      r_sel = [r for r, c in zip(refs, closed) if c == sel]
      t_sel = [a for a, c in zip(tr_ans, tr_closed) if c == sel]
      if r_sel and t_sel:
        ans, acc = M.majority_baseline(t_sel, r_sel)
        base[f'{name}_train_majority'] = dict(answer=ans, accuracy=acc, n=len(r_sel),
                                              train_n=len(t_sel), fitted_on=pool.description)
  res['examples'] = [dict(prompt=p.prompt_text, reference=r, answer=a,
                          question_kind=question_kind(p.sample))
                     for p, r, a in list(zip(preps, refs, preds))[:4]]
  return res


def _baseline_scores(preps, preds, n_pool: int, pool, seed) -> dict:
  """A text baseline's predictions scored as the model's are (mean text metrics, findings), with
  its training pool."""
  refs = [p.ref_texts[0] for p in preps]
  out = {k: (v if not isinstance(v, dict) else v['mean'])
         for k, v in text_metrics(preds, refs, seed).items()}
  out['findings'] = finding_metrics(preps, preds)
  out['pool'] = dict(n=n_pool, source=pool.description)
  return out


def modality_template_baseline(preps, pool, key, seed) -> dict | None:
  """Report / caption: each evaluated sample gets its modality's template, the training text of
  the same modality (meta.modality: the true one, which favours the baseline) and prompt with
  the highest mean ROUGE-L to the others (medoid of the first 40)."""
  if pool is None:
    return None
  groups, texts = pool.texts(key)
  if not texts:
    return None
  preds = B.template_by_group([template_group(p.sample) for p in preps], groups, texts)
  out = _baseline_scores(preps, preds, len(texts), pool, seed)
  out['definition'] = ('the modality template: the training text of the same modality (true '
                       'label) and prompt with the highest mean ROUGE-L to the others (medoid '
                       'of the first 40 in file order); knows the kind of image, not its '
                       'content')
  out['example'] = preds[0]
  return out


def nearest_template_baseline(preps, pool, key, seed) -> dict | None:
  """Report / caption: each evaluated sample gets the reference text of the nearest training
  image (8x8 RGB thumbnail, L2) among the training samples with the same prompt."""
  if pool is None:
    return None
  tpl = pool.templates(key)
  if tpl is None or any(p.input_image is None for p in preps):
    return None
  feats, keys, texts = tpl
  q = np.stack([B.thumb_feature(p.input_image) for p in preps])
  preds = B.nearest_template(q, [prompt_key(p.sample) for p in preps], feats, keys, texts)
  out = _baseline_scores(preps, preds, len(texts), pool, seed)
  out['definition'] = ('the reference text of the training sample (same task, same prompt when '
                       'one exists) whose image is nearest by an 8x8 RGB box thumbnail (L2)')
  return out


def t2i_baselines(preps, pool, key, refs, extractor, seed) -> dict:
  """Frechet distances of random TRAINING images of another modality (the baseline) and of
  the same modality (real images: the level a perfect generator would reach) to the evaluated
  references."""
  if pool is None:
    return {}
  ss, mods = pool.t2i_images(key)
  q = [(p.sample.meta or {}).get('modality') for p in preps]
  if not ss or any(m is None for m in q) or any(m is None for m in mods):
    return {}
  out = {}
  for name, same in (('baseline_other_modality_train_images', False),
                     ('reference_same_modality_train_images', True)):
    try:
      idx = B.other_modality_indices(q, mods, seed=seed, same=same)
    except ValueError as e:
      out[name] = dict(value=float('nan'), note=str(e))
      continue
    imgs = [_resize_to(pool.image(ss[j].output_img[0]), r.shape[:2]) for j, r in zip(idx, refs)]
    out[name] = dict(frechet(imgs, refs, extractor), pool=len(ss), source=pool.description,
                     definition=('for each evaluated prompt one random training image (seed '
                                 f'{seed}) of {"the same" if same else "another"} modality'))
    if all(is_synthetic(p) for p in preps):
      out[name]['truth_checkers'] = checker_metrics(preps, imgs)['generated']
  return out


def score_task(kind, preps, outs, seed, extractor, pool=None, key=None) -> dict:
  """Metrics + baselines of one task's prepared samples and their step outputs. pool: a
  TrainPool for the baselines fitted on training data (skipped without one)."""
  texts = [[s.text for s in o if s.kind == 'text'] for o in outs]
  images = [[s.image for s in o if s.kind == 'image'] for o in outs]
  res: dict = {}
  if kind == 'vqa':
    res.update(vqa_metrics(preps, [t[0] for t in texts], seed, pool, key))
  elif kind in ('report', 'caption'):
    preds = [t[0] for t in texts]
    refs = [p.ref_texts[0] for p in preps]
    res.update(text_metrics(preds, refs, seed))
    res['findings'] = finding_metrics(preps, preds)
    top = Counter(refs).most_common(1)[0][0]
    res['baseline_most_frequent_reference'] = dict(text=top, **{
        k: (v if not isinstance(v, dict) else v['mean'])
        for k, v in text_metrics([top] * len(refs), refs, seed).items()})
    res['baseline_most_frequent_reference']['findings'] = finding_metrics(preps, [top] * len(refs))
    for name, fn in (('baseline_modality_template', modality_template_baseline),
                     ('baseline_nearest_image_retrieval', nearest_template_baseline)):
      b = fn(preps, pool, key, seed)
      if b is not None:
        res[name] = b
    res['examples'] = [dict(prompt=p.prompt_text, reference=r, answer=a)
                       for p, r, a in list(zip(preps, refs, preds))[:4]]
  elif kind in IMAGE_KINDS:
    gen = [im[0] for im in images]
    refs = [p.ref_images[0] for p in preps]
    if kind in ('text_to_image', 'counterfactual'):
      res['frechet_distance'] = frechet(gen, refs, extractor)
    if kind == 'text_to_image':
      res.update(t2i_baselines(preps, pool, key, refs, extractor, seed))
    if kind == 'segmentation':
      pm = [M.binarize(g, 0.5, channel_axis=-1) for g in gen]
      rm = [M.binarize(r, 0.5, channel_axis=-1) for r in refs]
      res['dice'] = _agg([M.dice(a, b) for a, b in zip(pm, rm)], seed)
      res['iou'] = _agg([M.iou(a, b) for a, b in zip(pm, rm)], seed)
      blank = [np.zeros_like(b) for b in rm]
      res['baseline_blank_mask'] = dict(
          dice=_agg([M.dice(a, b) for a, b in zip(blank, rm)], seed)['mean'],
          iou=_agg([M.iou(a, b) for a, b in zip(blank, rm)], seed)['mean'])
    elif kind != 'text_to_image':
      res.update(image_pair_metrics(gen, refs, seed))
      base_imgs, base_name = [], 'identity'
      for p, r in zip(preps, refs):
        if p.input_image is None:
          continue
        if kind == 'super_resolution':
          base_name = 'bicubic'
          up = M.bicubic_upsample(p.input_image, r.shape[0] / p.input_image.shape[0])
          base_imgs.append(_resize_to(up, r.shape[:2]))
        else:
          base_imgs.append(_resize_to(M.identity_baseline(p.input_image), r.shape[:2]))
      if len(base_imgs) == len(refs):
        b = image_pair_metrics(base_imgs, refs, seed)
        res[f'baseline_{base_name}'] = dict(psnr=b['psnr']['mean'], ssim=b['ssim']['mean'],
                                            psnr_infinite=b['psnr_infinite'])
    syn = [p for p in preps if is_synthetic(p)]
    if syn and len(syn) == len(preps):
      res['truth_checkers'] = checker_metrics(preps, gen)
    if kind == 'counterfactual' and all(len(t) for t in texts) and all(p.ref_texts for p in preps):
      res['explanation'] = text_metrics([t[-1] for t in texts], [p.ref_texts[-1] for p in preps],
                                        seed)
    if any(len(t) for t in texts) and kind != 'counterfactual':
      res['reply_texts'] = sum(1 for t in texts if t)
  res['n'] = len(preps)
  return res
