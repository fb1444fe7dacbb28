"""The evaluation harness: every task present in the data, with its protocol stated.

    report = evaluate(cfg, model, tokenizer, samples, samples_dir='out/samples')

Samples (data/jsonl.py `Sample`s) are grouped by task (`main_task_type/sub_task_type`) and each
is run as its TRAINING PLAN prescribes (data/plans.py, SPEC 6): the prompt is the plan's items
before its first loss item (the sample's own human turns, images resized by the training rules,
input images as ViT items for understanding and as VAE (latent mean) + ViT items for editing),
and the plan's loss items that follow are generated in order (text decoded, images sampled with
three-context CFG). Multi-turn samples are scored on their first answer. Generated images are
scored against the target image resized by the VAE rule (the model's output resolution).

Metrics per task kind (unimedvl_jax/eval/metrics*.py), each mean with a bootstrap 95% CI.
Baselines marked (train) need `train_samples` (a TrainPool of the training split;
unimedvl_jax/eval/baselines.py) and are left out without them:
  vqa           closed accuracy (normalised exact match), open accuracy, open token recall,
                accuracy per question kind (meta.question_kind); baselines: majority answer of
                the evaluated references per question type (fitted on the evaluated set itself:
                optimistic), (train) the training majority answer per question type, and per
                question kind both the training majority answer and the best constant answer
                of the evaluated questions
  report/caption  corpus BLEU-1..4, ROUGE-L, METEOR-like (exact unigrams), finding P/R/F1
                (synthetic data: truth.findings_from_text vs the record's findings; other data:
                NegEx-like extraction over CHEXPERT_LIKE_VOCAB); baselines: the most frequent
                reference text; (train) the modality template: the medoid (ROUGE-L) training
                text of the same modality and prompt; (train) nearest-image retrieval: the
                reference text of the training sample with the same prompt whose image is
                nearest (8x8 RGB thumbnail, L2)
  text_to_image Frechet distance (pluggable extractor; default PixelStatsExtractor -- NOT an
                FID); (train) baseline: one random training image of ANOTHER modality per
                prompt, and as a reference one of the SAME modality; synthetic: ground-truth
                checkers (truth.check_generated) of the generated images and, as a ceiling, of
                the references
  segmentation  Dice / IoU (generated mask binarised at 0.5 of the channel mean); baseline:
                blank mask; synthetic: checkers
  super_resolution, modality_translation, virtual_staining, editing: PSNR / SSIM (uint8, data
                range 255, SSIM per channel); baselines: bicubic upsampling (super-resolution),
                identity (the input resized to the target size) otherwise
  counterfactual PSNR / SSIM (identity baseline), Frechet distance, checkers (lesions removed),
                explanation BLEU / ROUGE-L / METEOR-like
Image-conditioning ablation (`ablation=('vqa', 'segmentation')`): those tasks are re-run on
the same samples, prompts and seeds with every prompt image replaced by a constant grey image
of the same size (`prepare(blank_inputs=True)`) and scored the same way, under the task's
`blank_input` entry. The returned dict carries a `protocol` section (data, splits, prompts,
decoding and sampler settings, seeds, image rules, counts of evaluated and skipped samples).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from unimedvl_jax.batch import vae_downsample
from unimedvl_jax.eval import baselines as B
from unimedvl_jax.eval import metrics as M
from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.context import ContextError
from unimedvl_jax.infer.runner import Item, Program, Runner, run_programs

SYNTHETIC_DATASET = 'unimedvl-synthetic'
CHEXPERT_LIKE_VOCAB = {
    'atelectasis': ['atelectasis'], 'cardiomegaly': ['cardiomegaly', 'enlarged heart'],
    'consolidation': ['consolidation'], 'edema': ['edema', 'oedema'],
    'pleural effusion': ['pleural effusion', 'effusion', 'effusions'],
    'pneumonia': ['pneumonia'], 'pneumothorax': ['pneumothorax'], 'fracture': ['fracture'],
    'lung opacity': ['opacity', 'opacities'], 'nodule': ['nodule', 'nodules', 'mass'],
    'lesion': ['lesion', 'lesions'], 'support devices': ['tube', 'catheter', 'pacemaker'],
}
DEFAULT_TEXT = {'vqa': T.TextSettings(max_new_tokens=32),
                'report': T.TextSettings(max_new_tokens=256),
                'caption': T.TextSettings(max_new_tokens=128),
                'other': T.TextSettings(max_new_tokens=128)}
IMAGE_KINDS = ('text_to_image', 'segmentation', 'super_resolution', 'modality_translation',
               'virtual_staining', 'editing', 'counterfactual')


def task_key(sample) -> str:
  return f'{sample.main_task_type or "unknown"}/{sample.sub_task_type or "unknown"}'


def task_kind(sample) -> str:
  from unimedvl_jax.data.plans import task_family
  fam = task_family(sample)
  s = f'{sample.sub_task_type} {sample.main_task_type}'.lower()
  if fam == 'understanding':
    if 'vqa' in s or 'question' in s:
      return 'vqa'
    return 'report' if 'report' in s else 'caption'
  if fam == 'text_to_image':
    return 'text_to_image'
  if fam == 'counterfactual':
    return 'counterfactual'
  for key, kind in (('segment', 'segmentation'), ('super', 'super_resolution'),
                    ('resolution', 'super_resolution'), ('translat', 'modality_translation'),
                    ('stain', 'virtual_staining')):
    if key in s:
      return kind
  return 'editing'


@dataclasses.dataclass
class Prepared:
  sample: object
  kind: str
  program: Program
  ref_texts: list           # reference texts of the generated text steps
  ref_images: list          # uint8 targets (resized to the generated size)
  input_image: np.ndarray | None
  prompt_text: str


def prepare(runner: Runner, sample, geom, tokenizer, blank_inputs: bool = False) -> Prepared:
  """The sample's plan -> a Program (prompt = items before the first loss item; steps = the
  contiguous loss items after it) + references. Raises SampleError / ContextError.

  blank_inputs: the image-conditioning ablation -- every prompt image (ViT patches and VAE
  pixels, after the training resize rules) is replaced by a constant grey (128) image of the
  same size; texts, references and targets are unchanged."""
  from unimedvl_jax.data import images as imlib
  from unimedvl_jax.data.plans import materialize, plan_sample
  items = materialize(plan_sample(sample), tokenizer, geom, sample, for_training=False)
  first = next(i for i, it in enumerate(items) if it.loss)
  prompt, steps, ref_texts, ref_images = [], [], [], []
  blank = B.blank_like if blank_inputs else (lambda x: x)
  for it in items[:first]:
    if it.kind == 'text':
      prompt.append(Item.text(it.ids))
    elif it.kind == 'vit':
      prompt.append(Item('vit', patches=imlib.to_unit_range(blank(it.patches)),
                         grid=tuple(it.grid)))
    else:
      from unimedvl_jax.infer.context import encode_vae_tokens
      tok, grid = encode_vae_tokens(runner.model, imlib.to_unit_range(blank(it.pixels)))
      prompt.append(Item('vae', tokens=tok, grid=grid))
  for it in items[first:]:
    if not it.loss:
      break
    if it.kind == 'text':
      steps.append('text')
      ref_texts.append(it.text)
    else:
      steps.append(('image', tuple(it.grid)))
      ref_images.append(it.pixels)
  inp = None
  if sample.input_img:
    ref = sample.input_img[0]
    inp = imlib.load_image(ref.path, **ref.load_kwargs())
    if blank_inputs:
      inp = B.blank_like(inp)
  human = ' | '.join(t.text for t in sample.message if t.role == 'human')
  return Prepared(sample, task_kind(sample), Program(prompt, steps), ref_texts, ref_images, inp,
                  human)


# ------------------------------------------------------------------------------------ metrics

def _agg(values, seed):
  vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return M.aggregate(vals, seed=seed)


def _resize_to(img, hw):
  from unimedvl_jax.data import images as imlib
  return imlib.resize(np.asarray(img, np.uint8), hw) if img.shape[:2] != tuple(hw) else img


def _is_synthetic(p: Prepared) -> bool:
  return p.sample.dataset == SYNTHETIC_DATASET and 'findings' in (p.sample.meta or {})


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
  syn = [_is_synthetic(p) for p in preps]
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


def _first_reply(sample) -> str:
  return next((t.text for t in sample.message if t.role == 'gpt'), '')


def _prompt_key(sample) -> str:
  """The first human turn without image markers, whitespace collapsed (the baselines' prompt)."""
  h = next((t.text for t in sample.message if t.role == 'human'), '')
  return ' '.join(h.replace('<image>', ' ').split())


def template_group(sample) -> tuple:
  """(modality, prompt) of a sample: the modality template baseline's group."""
  return ((sample.meta or {}).get('modality'), _prompt_key(sample))


def question_kind(sample) -> str | None:
  """The dataset's question kind label (synthetic: meta.question_kind) or None."""
  return (sample.meta or {}).get('question_kind')


def is_closed(sample, reference: str) -> bool:
  """The dataset's label (meta.question_type) when present, else the yes/no heuristic."""
  meta = sample.meta or {}
  if 'question_type' in meta:
    return meta['question_type'] == 'closed'
  return M.is_closed_question(reference)


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
    return ([_first_reply(s) for s in ss], [question_kind(s) for s in ss],
            [is_closed(s, _first_reply(s)) for s in ss])

  def templates(self, key):
    """(features [N, 192], prompt keys, reference texts) of the key's samples with an image."""
    ss = [s for s in self.by_key.get(key, []) if s.input_img and _first_reply(s)]
    if not ss:
      return None
    feats = np.stack([B.thumb_feature(self.image(s.input_img[0])) for s in ss])
    return feats, [_prompt_key(s) for s in ss], [_first_reply(s) for s in ss]

  def texts(self, key):
    """((modality, prompt) groups, reference texts) of the key's samples with a reply."""
    ss = [s for s in self.by_key.get(key, []) if _first_reply(s)]
    return [template_group(s) for s in ss], [_first_reply(s) for s in ss]

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
  refs = [p.ref_texts[0] for p in preps]
  out = {k: (v if not isinstance(v, dict) else v['mean'])
         for k, v in text_metrics(preds, refs, seed).items()}
  out['findings'] = finding_metrics(preps, preds)
  out['pool'] = dict(n=len(texts), source=pool.description)
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
  preds = B.nearest_template(q, [_prompt_key(p.sample) for p in preps], feats, keys, texts)
  refs = [p.ref_texts[0] for p in preps]
  out = {k: (v if not isinstance(v, dict) else v['mean'])
         for k, v in text_metrics(preds, refs, seed).items()}
  out['findings'] = finding_metrics(preps, preds)
  out['pool'] = dict(n=len(texts), source=pool.description)
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
    if all(_is_synthetic(p) for p in preps):
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
    syn = [p for p in preps if _is_synthetic(p)]
    if syn and len(syn) == len(preps):
      res['truth_checkers'] = checker_metrics(preps, gen)
    if kind == 'counterfactual' and all(len(t) for t in texts) and all(p.ref_texts for p in preps):
      res['explanation'] = text_metrics([t[-1] for t in texts], [p.ref_texts[-1] for p in preps],
                                        seed)
    if any(len(t) for t in texts) and kind != 'counterfactual':
      res['reply_texts'] = sum(1 for t in texts if t)
  res['n'] = len(preps)
  return res


# ------------------------------------------------------------------------- sample outputs

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


# ------------------------------------------------------------------------------- the driver

ABLATION_KINDS = ('vqa', 'segmentation')


def _run_task(runner, preps, kind, ts, flow_text_to_image, flow_editing, batch_size, seed):
  groups: dict[tuple, list[int]] = defaultdict(list)
  for i, p in enumerate(preps):
    groups[p.program.signature()].append(i)
  outs: list = [None] * len(preps)
  is_edit = kind in IMAGE_KINDS and kind != 'text_to_image'
  flow = flow_editing if is_edit else flow_text_to_image
  txt = ts.get(kind, ts['other'])
  for sig, idx in groups.items():
    for j in range(0, len(idx), batch_size):
      chunk = idx[j:j + batch_size]
      res = run_programs(runner, [preps[i].program for i in chunk], text_settings=txt,
                         flow_settings=flow, seeds=[seed + i for i in chunk])
      for i, o in zip(chunk, res):
        outs[i] = o
  return outs, groups, txt, flow


def evaluate(cfg, model, tokenizer, samples: Iterable, *, batch_size: int = 8,
             max_samples: int | dict | None = None, seed: int = 0,
             text_settings: dict | None = None,
             flow_text_to_image: I.FlowSettings = I.TEXT_TO_IMAGE,
             flow_editing: I.FlowSettings = I.EDITING,
             samples_dir: str | None = None, n_sample_images: int = 8,
             extractor=None, data_files: Sequence[str] = (), root: str | None = None,
             train_samples: Iterable | None = None, ablation: Sequence[str] = (),
             log=print) -> dict:
  """Runs every task found in `samples` and returns the report dict (see module doc).

  max_samples: per task (the first ones in file order): an int, or {kind: int} with an
  optional 'default' entry (e.g. {'vqa': 192, 'default': 48}). text_settings: kind ->
  TextSettings overrides of DEFAULT_TEXT. Per-request seeds are seed + the sample's index
  within its task (independent of batching). extractor: a FeatureExtractor for Frechet
  distances. train_samples: training-split samples for the baselines fitted on training data
  (VQA majority per question kind, report / caption templates, text-to-image random
  other-modality images); without them those baselines are left out. ablation: task kinds
  (of ABLATION_KINDS) re-run with blank (constant grey) input images; their result is stored
  under the task's 'blank_input' entry.
  """
  from unimedvl_jax.data.jsonl import SampleError
  from unimedvl_jax.data.plans import Geometry
  extractor = extractor or M.PixelStatsExtractor()
  ts = dict(DEFAULT_TEXT, **(text_settings or {}))
  bad = set(ablation) - set(ABLATION_KINDS)
  if bad:
    raise ValueError(f'ablation: kinds {sorted(bad)} not supported (use {ABLATION_KINDS})')
  if isinstance(max_samples, dict):
    unknown = set(max_samples) - {'default', 'vqa', 'report', 'caption', 'other', *IMAGE_KINDS}
    if unknown:
      raise ValueError(f'max_samples: unknown task kinds {sorted(unknown)}')
    limit = lambda kind: max_samples.get(kind, max_samples.get('default'))
  else:
    limit = lambda kind: max_samples
  runner = Runner(model, tokenizer, cfg)
  geom = Geometry.from_config(cfg)
  t_pool = time.time()
  pool = TrainPool(train_samples) if train_samples is not None else None
  by_task: dict[str, list] = defaultdict(list)
  skipped: dict[str, Counter] = defaultdict(Counter)
  examples: dict[str, list] = defaultdict(list)
  splits: Counter = Counter()
  n_seen: Counter = Counter()
  t_start = time.time()
  for s in samples:
    key = task_key(s)
    n_seen[key] += 1
    lim = limit(task_kind(s))
    if lim is not None and len(by_task[key]) >= lim:
      continue
    try:
      by_task[key].append(prepare(runner, s, geom, tokenizer))
      splits[str((s.meta or {}).get('split', os.path.basename(os.path.dirname(s.file))))] += 1
    except (SampleError, ContextError, StopIteration, ValueError) as e:
      reason = getattr(e, 'reason', type(e).__name__)
      skipped[key][reason] += 1
      if len(examples[key]) < 3:
        examples[key].append(f'{s.loc}: {e}')
  tasks, prompts = {}, {}
  t_ablation = 0.0
  for key in sorted(by_task):
    preps = by_task[key]
    if not preps:
      continue
    kind = preps[0].kind
    t0 = time.time()
    outs, groups, txt, flow = _run_task(runner, preps, kind, ts, flow_text_to_image,
                                        flow_editing, batch_size, seed)
    metrics = score_task(kind, preps, outs, seed, extractor, pool, key)
    metrics['kind'] = kind
    metrics['seconds'] = round(time.time() - t0, 2)
    metrics['steps'] = sorted({'+'.join(s) for s in groups})
    metrics['decoding'] = txt.describe() if any('text' in s for s in groups) else None
    metrics['sampler'] = flow.describe() if any('image' in s for s in groups) else None
    if samples_dir:
      metrics['samples_dir'], metrics['grid_png'] = write_samples(samples_dir, key, preps, outs,
                                                                  n_sample_images)
    if kind in ablation:
      t1 = time.time()
      bpreps = [prepare(runner, p.sample, geom, tokenizer, blank_inputs=True) for p in preps]
      bouts, *_ = _run_task(runner, bpreps, kind, ts, flow_text_to_image, flow_editing,
                            batch_size, seed)
      blank = score_task(kind, bpreps, bouts, seed, extractor, pool, key)
      blank.pop('truth_checkers', None)
      if samples_dir:
        _, blank['grid_png'] = write_samples(samples_dir, key, bpreps, bouts, 0,
                                             grid_name='grid_blank_input.png',
                                             outputs_name='blank_input_outputs.jsonl')
      blank['seconds'] = round(time.time() - t1, 2)
      blank['definition'] = ('the same samples, prompts and seeds with every input image '
                             f'replaced by a constant grey ({B.GREY}) image of the same size')
      metrics['blank_input'] = blank
      t_ablation += time.time() - t1
    tasks[key] = metrics
    prompts[key] = sorted(Counter(p.prompt_text for p in preps).items(),
                          key=lambda kv: -kv[1])[:5]
    log(f'[evaluate] {key}: {len(preps)} samples, {metrics["seconds"]}s'
        + (f' (+{metrics["blank_input"]["seconds"]}s blank-input ablation)'
           if 'blank_input' in metrics else ''))
  d = cfg.data
  protocol = dict(
      data_files=list(data_files), root=root, splits=dict(splits),
      counts={k: dict(available=int(n_seen[k]), evaluated=len(by_task.get(k, [])),
                      skipped=dict(skipped.get(k, {})), skipped_examples=examples.get(k, []))
              for k in sorted(n_seen)},
      max_samples_per_task=max_samples, batch_size=batch_size,
      seeds=dict(base=seed, rule='request seed = base + index of the sample within its task; '
                 'text step j uses seed*1000 + j, image step j the same'),
      prompts=dict(rule='each sample\'s own human turns, as its training plan (data/plans.py): '
                   'understanding = text split at <image> with ViT images; text-to-image = the '
                   'prompt; editing = input image as VAE (latent mean) + ViT, then the '
                   'instruction; the plan\'s loss items are generated in order (an editing gpt '
                   'reply before the image; the counterfactual explanation after it, not seeing '
                   'it); multi-turn samples: first answer only',
                   most_common=prompts),
      decoding={k: v.describe() for k, v in ts.items()},
      sampler=dict(text_to_image=flow_text_to_image.describe(),
                   editing=flow_editing.describe()),
      image_rules=dict(vit=dict(max=d.vit_max_size, min=d.vit_min_size, stride=cfg.model.vit.patch_size),
                       vae=dict(max=d.vae_max_size, min=d.vae_min_size,
                                stride=vae_downsample(cfg.model) * cfg.model.latent_patch_size),
                       scoring='generated images vs the target resized by the VAE rule (uint8)'),
      frechet_extractor=type(extractor).__name__,
      frechet_note=('PixelStatsExtractor features: a pixel-statistics Frechet distance, not an '
                    'FID' if isinstance(extractor, M.PixelStatsExtractor) else 'user extractor'),
      metrics_doc=__doc__.split('Metrics per task kind')[1].split('The returned dict')[0].strip(),
      model=dict(name=cfg.get('name', ''), dtype=cfg.model.dtype),
      ablation=dict(kinds=list(ablation), input=f'constant grey ({B.GREY}) images of the '
                    'input sizes', seconds=round(t_ablation, 2)),
      baselines_fitted_on=(f'{pool.description} ({len(pool)} samples)' if pool is not None
                           else 'not computed (no training samples given)'),
      train_pool_seconds=round(t_start - t_pool, 2),
      seconds=round(time.time() - t_start, 2))
  return dict(protocol=protocol, tasks=tasks)


def guess_root(jsonl_path: str) -> str:
  """The data root of a JSONL file: the nearest ancestor holding a manifest.json (the embedded
  synthetic layout root/{split}/{group}.jsonl), else the file's directory."""
  d = os.path.dirname(os.path.abspath(jsonl_path))
  cur = d
  for _ in range(4):
    if os.path.isfile(os.path.join(cur, 'manifest.json')):
      return cur
    parent = os.path.dirname(cur)
    if parent == cur:
      break
    cur = parent
  return d


def load_samples(files: Sequence[str], root: str | None = None, log=print) -> list:
  """Samples of JSONL files (bad lines logged and skipped)."""
  from unimedvl_jax.data.jsonl import SampleError, iter_records
  out = []
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f'--data file {f!r} does not exist')
    r = root or guess_root(f)
    bad = 0
    for rec in iter_records(f, r):
      if isinstance(rec, SampleError):
        bad += 1
        if bad <= 3:
          log(f'[evaluate] skipping {rec}')
        continue
      out.append(rec)
    if bad:
      log(f'[evaluate] {f}: {bad} bad line(s) skipped')
  return out


def to_json(obj):
  """JSON-safe copy (numpy scalars, nan/inf as strings)."""
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    f = float(obj)
    return f if math.isfinite(f) else str(f)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return to_json(obj.tolist())
  return obj
