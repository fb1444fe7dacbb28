"""The evaluated samples: read from JSONL, grouped by task, prepared as their training plan says.

`load_samples` reads the JSONL files (bad lines logged and skipped; a file given without a root gets
`data.locate.jsonl_root`'s); `task_key` / `task_kind` group them (`main_task_type/sub_task_type`; the metric kind);
`prepare` turns a sample's training plan (data/plans.py) into a Program (the prompt = the plan's
items before its first loss item, the steps = the loss items that follow) and its references.
The rest reads what the metrics and baselines need off a sample: its first reply, its prompt,
its (modality, prompt) group, question kind and open / closed label.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from unimedvl_jax.data.locate import jsonl_root
from unimedvl_jax.eval import baselines as B
from unimedvl_jax.eval import metrics as M
from unimedvl_jax.infer.runner import Item, Program, Runner

SYNTHETIC_DATASET = 'unimedvl-synthetic'
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
  from unimedvl_jax.data.plans import materialize, plan_sample, prompt_items
  items = materialize(plan_sample(sample), tokenizer, geom, sample, for_training=False)
  head = prompt_items(items)
  prompt = runner.prompt(head, blank=B.blank_like if blank_inputs else None)
  steps, ref_texts, ref_images = [], [], []
  for it in items[len(head):]:
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


def is_synthetic(p: Prepared) -> bool:
  return p.sample.dataset == SYNTHETIC_DATASET and 'findings' in (p.sample.meta or {})


def first_reply(sample) -> str:
  return next((t.text for t in sample.message if t.role == 'gpt'), '')


def prompt_key(sample) -> str:
  """The first human turn without image markers, whitespace collapsed (the baselines' prompt)."""
  h = next((t.text for t in sample.message if t.role == 'human'), '')
  return ' '.join(h.replace('<image>', ' ').split())


def template_group(sample) -> tuple:
  """(modality, prompt) of a sample: the modality template baseline's group."""
  return ((sample.meta or {}).get('modality'), prompt_key(sample))


def question_kind(sample) -> str | None:
  """The dataset's question kind label (synthetic: meta.question_kind) or None."""
  return (sample.meta or {}).get('question_kind')


def is_closed(sample, reference: str) -> bool:
  """The dataset's label (meta.question_type) when present, else the yes/no heuristic."""
  meta = sample.meta or {}
  if 'question_type' in meta:
    return meta['question_type'] == 'closed'
  return M.is_closed_question(reference)


# ------------------------------------------------------------------------------- reading

def load_samples(files: Sequence[str], root: str | None = None, log=print) -> list:
  """Samples of JSONL files (bad lines logged and skipped)."""
  from unimedvl_jax.data.jsonl import SampleError, iter_records
  out = []
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f'--data file {f!r} does not exist')
    r = root or jsonl_root(f)
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
