"""Evaluate a training workdir on its held-out split and write the main job's report.

    evaluate_workdir('runs/tiny', split='test', max_per_task=48)

writes WORKDIR/eval/report.json (the harness report + a `headline` with the README targets
against their trivial baselines), WORKDIR/eval/report.md (a short human-readable summary) and
sample outputs under WORKDIR/eval/samples/ (PNG grids input | target | generated, answers and
reports as JSONL). The numbers are whatever the run reached; the report says so plainly.
"""

from __future__ import annotations

import json
import os
import time

from unimedvl_jax.infer import image as flow_lib

# README targets of the tiny main job (closed VQA accuracy, segmentation Dice, SR vs bicubic)
TARGETS = {'vqa_closed_accuracy': 0.85, 'segmentation_dice': 0.5}


def _find(tasks: dict, kind: str):
  for k, v in tasks.items():
    if v.get('kind') == kind:
      return k, v
  return None, None


def _val(entry):
  """A metric entry may be a number or an aggregate dict with 'mean'."""
  if isinstance(entry, dict):
    return entry.get('mean', entry.get('value'))
  return entry


def headline(report: dict) -> dict:
  """The main job's targets against trivial baselines, extracted from a harness report."""
  tasks = report.get('tasks', {})
  out = {}
  _, vqa = _find(tasks, 'vqa')
  if vqa:
    out['vqa_closed_accuracy'] = _val(vqa.get('closed_accuracy'))
    out['vqa_closed_majority_baseline'] = (vqa.get('baseline_majority', {}).get('closed', {})
                                           .get('accuracy'))
    out['vqa_open_accuracy'] = _val(vqa.get('open_accuracy'))
  _, seg = _find(tasks, 'segmentation')
  if seg:
    out['segmentation_dice'] = _val(seg.get('dice'))
    out['segmentation_blank_mask_dice'] = seg.get('baseline_blank_mask', {}).get('dice')
  _, sr = _find(tasks, 'super_resolution')
  if sr:
    out['super_resolution_psnr'] = _val(sr.get('psnr'))
    out['super_resolution_bicubic_psnr'] = sr.get('baseline_bicubic', {}).get('psnr')
  _, rep = _find(tasks, 'report')
  if rep:
    out['report_rouge_l'] = _val(rep.get('rouge_l'))
  met = {}
  if out.get('vqa_closed_accuracy') is not None:
    met['vqa_closed_accuracy>=0.85'] = out['vqa_closed_accuracy'] >= TARGETS['vqa_closed_accuracy']
  if out.get('segmentation_dice') is not None:
    met['segmentation_dice>=0.5'] = out['segmentation_dice'] >= TARGETS['segmentation_dice']
  if out.get('super_resolution_psnr') is not None and out.get('super_resolution_bicubic_psnr') is not None:
    met['super_resolution_psnr>bicubic'] = (out['super_resolution_psnr']
                                            > out['super_resolution_bicubic_psnr'])
  out['targets_met'] = met
  return out


def _markdown(report: dict, head: dict) -> str:
  lines = ['# Evaluation report', '',
           f"split: {report['protocol'].get('splits')}, model: {report['protocol'].get('model')}",
           '', '## Targets (README main job) vs trivial baselines', '']
  for k, v in head.items():
    if k != 'targets_met':
      lines.append(f'- {k}: {v if not isinstance(v, float) else round(v, 4)}')
  lines += ['', 'targets met: ' + json.dumps(head.get('targets_met', {})), '',
            '## All tasks', '']
  for key, t in report.get('tasks', {}).items():
    nums = {k: (round(_val(v), 4) if isinstance(_val(v), (int, float)) else None)
            for k, v in t.items() if isinstance(_val(v), (int, float)) and k != 'seconds'}
    lines.append(f'- {key}: ' + ', '.join(f'{k}={v}' for k, v in nums.items()))
  lines += ['', 'Numbers are what this run reached on this machine; nothing is adjusted.', '']
  return '\n'.join(lines)


def evaluate_workdir(workdir: str, *, split: str = 'test', max_per_task: int = 48,
                     image_steps: int = 20, seed: int = 0, log=print) -> dict:
  """Loads the EMA weights of `workdir`, evaluates every task of its data's `split`, writes the
  report files and returns the report dict."""
  from unimedvl_jax.data import pipeline
  from unimedvl_jax.eval import harness
  from unimedvl_jax.infer.loading import load_checkpoint, load_tokenizer
  t0 = time.time()
  cfg, model = load_checkpoint(workdir)
  tok = load_tokenizer(cfg, data_root=cfg.data.root)
  samples = list(pipeline.iter_eval_samples(cfg, split))
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  t2i = flow_lib.FlowSettings(**{**flow_lib.TEXT_TO_IMAGE.__dict__, 'num_steps': image_steps})
  edit = flow_lib.FlowSettings(**{**flow_lib.EDITING.__dict__, 'num_steps': image_steps})
  report = harness.evaluate(cfg, model, tok, samples, max_samples=max_per_task, seed=seed,
                            flow_text_to_image=t2i, flow_editing=edit,
                            samples_dir=os.path.join(out_dir, 'samples'),
                            data_files=[f'{cfg.data.root}/{split}/*.jsonl'], root=cfg.data.root,
                            log=log)
  report['protocol']['split'] = split
  report['protocol']['checkpoint'] = os.path.abspath(workdir)
  report['protocol']['weights'] = 'EMA'
  report['headline'] = headline(report)
  report['protocol']['total_seconds'] = round(time.time() - t0, 1)
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(harness.to_json(report), f, indent=1)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(_markdown(report, report['headline']))
  return report
