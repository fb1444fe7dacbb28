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

The parts: eval/tasks.py (reading, grouping and preparing the samples), eval/scoring.py (the
metrics and baselines of one task), eval/outputs.py (the sample outputs on disk); this module
runs the tasks and assembles the report with its protocol.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from unimedvl_jax.batch import vae_downsample
from unimedvl_jax.eval import baselines as B
from unimedvl_jax.eval import metrics as M
from unimedvl_jax.eval.outputs import write_samples
from unimedvl_jax.eval.scoring import TrainPool, score_task
from unimedvl_jax.eval.tasks import IMAGE_KINDS, prepare, task_key, task_kind
from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.context import ContextError
from unimedvl_jax.infer.runner import Runner, run_programs

DEFAULT_TEXT = {'vqa': T.TextSettings(max_new_tokens=32),
                'report': T.TextSettings(max_new_tokens=256),
                'caption': T.TextSettings(max_new_tokens=128),
                'other': T.TextSettings(max_new_tokens=128)}
ABLATION_KINDS = ('vqa', 'segmentation')


# ------------------------------------------------------------------------------- the driver

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
