"""Evaluate a training workdir on its held-out split and write the report a person reads.

    evaluate_workdir('runs/tiny', split='test', max_per_task=48)

writes, under WORKDIR/eval/:
  report.json   the harness report (metrics, baselines, protocol) + a `headline` with every
                README target beside its trivial baseline and met / not met;
  report.md     the human-readable report: the targets table, the image-conditioning ablation
                (VQA and segmentation re-run with constant grey input images), a loss-curve PNG
                per training stage, and per task a grid PNG (input | target | generated for 4
                samples) or, for text tasks, a table of question / reference / answer;
  loss_<stage>.png, samples/<task>/{grid.png, grid_blank_input.png, outputs.jsonl, NNNN.png};
and adds the grids, loss curves and headline numbers to TensorBoard (WORKDIR/tb, tags eval/...).
The baselines fitted on data use the TRAINING split (unimedvl_jax/eval/baselines.py). The
numbers are whatever the run reached; the report says so plainly.

    python -m unimedvl_jax.evaluate --workdir runs/tiny [--noablation]     (re-evaluate)
"""

from __future__ import annotations

import json
import math
import os
import time

from unimedvl_jax.infer import image as flow_lib

# README targets of the main job (issue 13)
TARGETS = {'vqa_closed_accuracy': 0.85, 'segmentation_dice': 0.5}
# the synthetic dataset's lesion question kinds (data/synthetic/texts.py `vqa_question`)
LESION_QUESTIONS = (('presence', 'any_lesion'), ('quadrant', 'lesion_in_quadrant'),
                    ('count', 'count'))
# blank-input accuracy within this of the best constant answer counts as "fell to the majority"
ABLATION_TOLERANCE = 0.10
# samples per task kind for the main job: VQA is cheap per sample and is split by question kind
# (36 presence, 72 quadrant, 84 count questions in the embedded test split)
DEFAULT_MAX_SAMPLES = {'vqa': 384}   # the embedded test split's 384 VQA questions


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


def _num(x):
  try:
    x = float(x)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _row(key, name, metric, value, baseline_name, baseline, rule, threshold=None, n=None,
         note=''):
  """One target: value vs baseline; rule '>=' (value >= threshold), '>' / '<' (vs baseline).
  `value` may be an aggregate dict (mean + bootstrap CI): the row then also says whether the
  95% CI clears the goal (`ci_clear`), so a met target within noise is visible."""
  ci = None
  if isinstance(value, dict):
    ci = (_num(value.get('ci_low')), _num(value.get('ci_high')))
    value = value.get('mean', value.get('value'))
  v, b = _num(value), _num(baseline)
  goal = threshold if rule == '>=' else b
  ci_clear = None
  if ci and None not in ci and goal is not None:
    ci_clear = ci[0] >= goal if rule == '>=' else (ci[0] > goal if rule == '>' else ci[1] < goal)
  if rule == '>=':
    met = None if v is None else v >= threshold
  elif rule == '>':
    met = None if v is None or b is None else v > b
  else:
    met = None if v is None or b is None else v < b
  return dict(key=key, target=name, metric=metric, value=v, ci=ci, ci_clear=ci_clear,
              baseline=baseline_name, baseline_value=b, rule=rule, threshold=threshold, met=met,
              n=n, note=note)


def headline(report: dict) -> dict:
  """The main job's targets against trivial baselines, extracted from a harness report."""
  tasks = report.get('tasks', {})
  rows = []
  out: dict = {}
  _, vqa = _find(tasks, 'vqa')
  if vqa:
    ca = vqa.get('closed_accuracy', {})
    base = vqa.get('baseline_majority', {})
    out['vqa_closed_accuracy'] = _val(ca)
    out['vqa_closed_majority_baseline'] = base.get('closed', {}).get('accuracy')
    out['vqa_open_accuracy'] = _val(vqa.get('open_accuracy'))
    rows.append(_row('vqa_closed_accuracy', 'closed VQA accuracy >= 0.85', 'accuracy', ca,
                     f"majority answer {base.get('closed', {}).get('answer')!r}",
                     base.get('closed', {}).get('accuracy'), '>=',
                     TARGETS['vqa_closed_accuracy'], n=ca.get('n')))
    per = vqa.get('by_question_kind', {})
    for label, qk in LESION_QUESTIONS:
      e = per.get(qk)
      if not e:
        continue
      cands = [x for x in (_num(e.get('best_constant_accuracy')), _num(e.get('train_accuracy')))
               if x is not None]
      b = max(cands) if cands else None
      out[f'vqa_{qk}_accuracy'] = _val(e['accuracy'])
      out[f'vqa_{qk}_majority_baseline'] = b
      rows.append(_row(f'vqa_{qk}_accuracy', f'lesion {label} ({qk}) above its majority answer',
                       'accuracy', e['accuracy'],
                       f"best constant answer {e.get('best_constant_answer')!r} (train "
                       f"majority {e.get('train_answer')!r})", b, '>', n=e.get('n')))
  _, seg = _find(tasks, 'segmentation')
  if seg:
    out['segmentation_dice'] = _val(seg.get('dice'))
    out['segmentation_blank_mask_dice'] = seg.get('baseline_blank_mask', {}).get('dice')
    rows.append(_row('segmentation_dice', 'segmentation Dice >= 0.5', 'Dice', seg.get('dice'),
                     'empty mask', out['segmentation_blank_mask_dice'], '>=',
                     TARGETS['segmentation_dice'], n=seg.get('n')))
  for kind, bkey, bname in (('super_resolution', 'baseline_bicubic', 'bicubic upsampling'),
                            ('modality_translation', 'baseline_identity', 'copy the input'),
                            ('virtual_staining', 'baseline_identity', 'copy the input')):
    _, t = _find(tasks, kind)
    if not t:
      continue
    out[f'{kind}_psnr'] = _val(t.get('psnr'))
    out[f'{kind}_{bkey[9:]}_psnr'] = t.get(bkey, {}).get('psnr')
    rows.append(_row(f'{kind}_psnr', f'{kind.replace("_", " ")} PSNR above {bname}',
                     'PSNR (dB)', t.get('psnr'), bname, t.get(bkey, {}).get('psnr'), '>',
                     n=t.get('n')))
  _, t2i = _find(tasks, 'text_to_image')
  if t2i:
    fd = t2i.get('frechet_distance', {})
    b = t2i.get('baseline_other_modality_train_images', {})
    out['text_to_image_frechet'] = fd.get('value')
    out['text_to_image_other_modality_frechet'] = b.get('value')
    rows.append(_row('text_to_image_frechet',
                     'text-to-image Frechet distance below random training images of other '
                     'modalities', f"Frechet distance ({fd.get('extractor', '')})",
                     fd.get('value'), 'random training images of another modality',
                     b.get('value'), '<', n=fd.get('n'),
                     note=('real same-modality training images reach ' + _fmt(
                         t2i.get('reference_same_modality_train_images', {}).get('value')))))
  for kind in ('report', 'caption'):
    _, t = _find(tasks, kind)
    if not t:
      continue
    b = t.get('baseline_modality_template', {})
    nn = t.get('baseline_nearest_image_retrieval', {})
    out[f'{kind}_rouge_l'] = _val(t.get('rouge_l'))
    out[f'{kind}_modality_template_rouge_l'] = b.get('rouge_l')
    out[f'{kind}_nearest_image_retrieval_rouge_l'] = nn.get('rouge_l')
    rows.append(_row(f'{kind}_rouge_l', f'{kind} ROUGE-L above the (modality) template baseline',
                     'ROUGE-L', t.get('rouge_l'), 'modality template', b.get('rouge_l'), '>',
                     n=t.get('n'),
                     note=('context, not a target: nearest-training-image retrieval reaches '
                           f"{_fmt(nn.get('rouge_l'))}" if nn else '')))
  out['targets'] = rows
  out['targets_met'] = {r['target']: r['met'] for r in rows}
  out['ablation'] = ablation_summary(report)
  return out


def ablation_summary(report: dict) -> list[dict]:
  """Rows of the image-conditioning ablation: metric with images, with blank inputs, the
  trivial baseline, and whether the blank-input number fell to about that baseline."""
  rows = []
  tasks = report.get('tasks', {})
  _, vqa = _find(tasks, 'vqa')
  if vqa and 'blank_input' in vqa:
    bl = vqa['blank_input']
    maj = vqa.get('baseline_majority', {})
    items = [('closed VQA', vqa.get('closed_accuracy'), bl.get('closed_accuracy'),
              maj.get('closed', {}).get('accuracy'))]
    for label, qk in LESION_QUESTIONS:
      e, eb = vqa.get('by_question_kind', {}).get(qk), bl.get('by_question_kind', {}).get(qk)
      if e and eb:
        items.append((f'VQA lesion {label}', e['accuracy'], eb['accuracy'],
                      e.get('best_constant_accuracy')))
    for name, a, b, base in items:
      va, vb, vbase = _num(_val(a)), _num(_val(b)), _num(base)
      rows.append(dict(task=name, metric='accuracy', with_images=va, blank_input=vb,
                       drop=None if va is None or vb is None else va - vb,
                       baseline='best constant answer', baseline_value=vbase,
                       fell_to_baseline=(None if vb is None or vbase is None
                                         else vb <= vbase + ABLATION_TOLERANCE),
                       n=(a or {}).get('n') if isinstance(a, dict) else None))
  _, seg = _find(tasks, 'segmentation')
  if seg and 'blank_input' in seg:
    va, vb = _num(_val(seg.get('dice'))), _num(_val(seg['blank_input'].get('dice')))
    vbase = _num(seg.get('baseline_blank_mask', {}).get('dice'))
    rows.append(dict(task='segmentation', metric='Dice', with_images=va, blank_input=vb,
                     drop=None if va is None or vb is None else va - vb,
                     baseline='empty mask', baseline_value=vbase,
                     fell_to_baseline=(None if vb is None or vbase is None
                                       else vb <= vbase + ABLATION_TOLERANCE),
                     n=seg.get('n')))
  return rows


# ------------------------------------------------------------------------------- markdown

def _fmt(v, nd=3):
  if v is None:
    return 'n/a'
  if isinstance(v, bool):
    return 'yes' if v else 'no'
  if isinstance(v, (int, float)):
    f = float(v)
    if not math.isfinite(f):
      return str(f)
    return f'{f:.{nd}f}' if abs(f) < 1e4 else f'{f:.3e}'
  return str(v)


def _ci(entry, nd=3):
  if isinstance(entry, dict) and 'mean' in entry:
    s = _fmt(entry['mean'], nd)
    if entry.get('n', 0) > 1 and _num(entry.get('ci_low')) is not None:
      s += f" [{_fmt(entry['ci_low'], nd)}, {_fmt(entry['ci_high'], nd)}]"
    return s
  return _fmt(_val(entry), nd)


def _cell(s) -> str:
  return str(s).replace('|', '\\|').replace('\n', ' ').strip()


def _table(header, rows) -> list[str]:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  out += ['| ' + ' | '.join(_cell(c) for c in r) + ' |' for r in rows]
  return out + ['']


def _met(m) -> str:
  return {True: '**met**', False: 'not met', None: 'n/a'}[m]


def _rel(path, start):
  return os.path.relpath(path, start).replace(os.sep, '/')


def _task_section(key, t, out_dir) -> list[str]:
  kind = t.get('kind')
  L = [f'### {key} ({kind}, n={t.get("n")}, {t.get("seconds")} s)', '']
  if t.get('grid_png') and t.get('samples_dir'):
    L += [f'![{key}]({_rel(os.path.join(t["samples_dir"], t["grid_png"]), out_dir)})', '']
  rows = []
  if kind == 'vqa':
    for k in ('closed_accuracy', 'open_accuracy', 'open_recall', 'accuracy'):
      if k in t:
        rows.append((k, _ci(t[k]), ''))
    for name, b in t.get('baseline_majority', {}).items():
      rows.append((f'baseline: {name} majority {b.get("answer")!r}', _fmt(b.get('accuracy')),
                   b.get('fitted_on', '')))
    L += _table(['metric', 'value [95% CI]', 'note'], rows)
    per = t.get('by_question_kind', {})
    if per:
      L += ['Per question kind (the majority baselines: the most frequent training answer of '
            'the kind, and the best constant answer of the evaluated questions):', '']
      prow = []
      for k, e in per.items():
        blank = t.get('blank_input', {}).get('by_question_kind', {}).get(k, {})
        prow.append((k, e.get('question_type'), e.get('n'), _ci(e.get('accuracy')),
                     f"{e.get('train_answer')!r}: {_fmt(e.get('train_accuracy'))}",
                     f"{e.get('best_constant_answer')!r}: {_fmt(e.get('best_constant_accuracy'))}",
                     _fmt(_val(blank.get('accuracy'))) if blank else ''))
      L += _table(['kind', 'type', 'n', 'accuracy [95% CI]', 'train majority', 'best constant',
                   'blank input'], prow)
  elif kind in ('report', 'caption'):
    bases = [t.get(k, {}) for k in ('baseline_modality_template',
                                    'baseline_nearest_image_retrieval',
                                    'baseline_most_frequent_reference')]
    f1 = lambda b: _fmt(b.get('findings', {}).get('micro', {}).get('f1'))
    for k in ('rouge_l', 'bleu1', 'bleu4', 'meteor_like'):
      if k in t:
        rows.append((k, _ci(t[k]), *[_fmt(b.get(k)) for b in bases]))
    if t.get('findings', {}).get('micro'):
      rows.append(('finding F1 (micro)', f1(t), *[f1(b) for b in bases]))
    L += _table(['metric', 'model [95% CI]', 'modality template (target baseline)',
                 'nearest-image retrieval (context)', 'most frequent reference'], rows)
  elif kind == 'segmentation':
    b = t.get('baseline_blank_mask', {})
    bl = t.get('blank_input', {})
    for k in ('dice', 'iou'):
      rows.append((k, _ci(t.get(k)), _fmt(b.get(k)), _ci(bl.get(k)) if bl else ''))
    L += _table(['metric', 'model [95% CI]', 'empty mask', 'model, blank input'], rows)
    if bl.get('grid_png'):
      L += ['With blank (grey) input images:', '',
            f'![{key} blank input]('
            f'{_rel(os.path.join(t["samples_dir"], bl["grid_png"]), out_dir)})',
            '']
  elif kind == 'text_to_image':
    fd = t.get('frechet_distance', {})
    ck = lambda d: ', '.join(f'{k[:-3]} {_fmt(v, 2)}' for k, v in (d or {}).items()
                             if k in ('modality_ok', 'count_ok', 'location_ok', 'all_ok'))
    rows.append(('Frechet distance to the test references', _fmt(fd.get('value')),
                 ck(t.get('truth_checkers', {}).get('generated'))))
    for k, label in (('baseline_other_modality_train_images',
                      'baseline: random training images of another modality'),
                     ('reference_same_modality_train_images',
                      'reference: random training images of the same modality')):
      if k in t:
        rows.append((label, _fmt(t[k].get('value')), ck(t[k].get('truth_checkers'))))
    L += _table(['', f"Frechet distance ({fd.get('extractor', '')}, lower is better)",
                 'ground-truth checkers (fraction ok)'], rows)
    L += ['The Frechet distance compares the two SETS of images: a set of realistic images of '
          'shuffled modalities is close to the references even though no image matches its '
          'prompt, so this target mostly measures realism; whether each image follows its '
          'prompt is what the checkers measure (modality, lesion count, location).', '']
  else:
    base = next(((k, v) for k, v in t.items() if k.startswith('baseline_')), (None, {}))
    for k in ('psnr', 'ssim'):
      if k in t:
        rows.append((k, _ci(t[k]), _fmt(base[1].get(k))))
    if 'frechet_distance' in t:
      rows.append(('Frechet distance', _fmt(t['frechet_distance'].get('value')), ''))
    L += _table(['metric', 'model [95% CI]', (base[0] or 'baseline').replace('baseline_', '')],
                rows)
  tc = t.get('truth_checkers')
  if tc:
    g, r = tc.get('generated', {}), tc.get('references_ceiling', {})
    L += ['Ground-truth checkers of the generated images (data/truth.py; references as ceiling): '
          + ', '.join(f'{k} {_fmt(g[k], 2)} / {_fmt(r.get(k), 2)}' for k in g), '']
  ex = t.get('examples')
  if ex:
    L += _table(['question / prompt', 'reference', 'answer'],
                [(e['prompt'][:160], e['reference'][:300], e['answer'][:300]) for e in ex])
  return L


def markdown(report: dict, head: dict, curves: dict | None = None, out_dir: str = '.') -> str:
  p = report['protocol']
  ab = p.get('ablation', {})
  tot, abl = _num(p.get('total_seconds')), _num(ab.get('seconds')) or 0.0
  L = ['# Evaluation report', '',
       f"Model `{p.get('model', {}).get('name')}` ({p.get('weights', 'EMA')} weights, step "
       f"{p.get('step', '?')}) from `{p.get('checkpoint', '')}`, evaluated on the "
       f"**{p.get('split', '')}** split {p.get('splits')}; samples per task: "
       f"{p.get('max_samples_per_task')}. Baselines fitted on data use "
       f"{p.get('baselines_fitted_on')}.", '',
       f"Evaluation time: {_fmt(tot, 1)} s in total ({_fmt(p.get('seconds'), 1)} s of tasks, of "
       f"which the image-conditioning ablation {_fmt(abl, 1)} s; without the ablation "
       f"{_fmt(None if tot is None else tot - abl, 1)} s).",
       '', '## Targets vs trivial baselines', '']
  rows = []
  for r in head.get('targets', []):
    goal = (f">= {r['threshold']}" if r['rule'] == '>=' else
            ('> baseline' if r['rule'] == '>' else '< baseline'))
    val = _fmt(r['value'])
    if r.get('ci') and None not in r['ci']:
      val += f" [{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]"
    notes = [r['note']] if r.get('note') else []
    if r['met'] and r.get('ci_clear') is False:
      notes.insert(0, 'within noise: the 95% CI includes the goal')
    rows.append((r['target'], r['metric'], val,
                 f"{r['baseline']}: {_fmt(r['baseline_value'])}", goal, r['n'],
                 _met(r['met']) + (f" ({'; '.join(notes)})" if notes else '')))
  L += _table(['target', 'metric', 'model [95% CI]', 'trivial baseline', 'goal', 'n', 'result'],
              rows)
  n_met = sum(1 for r in head.get('targets', []) if r['met'])
  n_noise = sum(1 for r in head.get('targets', []) if r['met'] and r.get('ci_clear') is False)
  L += [f"{n_met} of {len(head.get('targets', []))} targets met"
        + (f" ({n_noise} of them within noise)" if n_noise else '') + '.', '']
  if head.get('ablation'):
    L += ['## Image-conditioning ablation', '',
          'VQA and segmentation re-run on the same samples, prompts and seeds with every input '
          f'image replaced by {ab.get("input", "a constant grey image")}. A model that looks at '
          'the image falls to about the trivial baseline (here: at most '
          f'{ABLATION_TOLERANCE} above it).', '']
    L += _table(['task', 'metric', 'with images', 'blank input', 'drop', 'trivial baseline',
                 'fell to baseline', 'n'],
                [(r['task'], r['metric'], _fmt(r['with_images']), _fmt(r['blank_input']),
                  _fmt(r['drop']), f"{r['baseline']}: {_fmt(r['baseline_value'])}",
                  _fmt(r['fell_to_baseline']), r['n']) for r in head['ablation']])
  if curves:
    L += ['## Training loss per stage', '',
          'From metrics.jsonl (means over each logging interval; a `vae` stage trains the '
          'autoencoder only: its loss is the reconstruction MSE).', '']
    L += _table(['stage', 'steps', 'first', 'last'],
                [(st, f"{c['steps'][0]}-{c['steps'][1]}",
                  ', '.join(f'{k} {_fmt(v)}' for k, v in c['first'].items()),
                  ', '.join(f'{k} {_fmt(v)}' for k, v in c['last'].items()))
                 for st, c in curves.items()])
    L += [' '.join(f'![loss {st}]({c["png"]})' for st, c in curves.items()), '']
  L += ['## Tasks', '']
  for key, t in report.get('tasks', {}).items():
    L += _task_section(key, t, out_dir)
  L += ['## Baselines', '',
        '- **majority answer** (VQA): the most frequent normalised answer. Per question kind '
        'two versions are shown: the training split\'s majority answer of that kind, and the '
        'best constant answer of the evaluated questions (fitted on the test references '
        'themselves, so optimistic); a lesion-question target must beat the higher of the two.',
        '- **empty mask** (segmentation): predicting no lesion pixel.',
        '- **bicubic** (super-resolution): the low-resolution input upsampled with bicubic '
        'interpolation; **copy the input** (translation, staining, counterfactual): the input '
        'image resized to the target size.',
        '- **random training images of another modality** (text-to-image): for each test prompt '
        'one random training image whose modality differs from the prompt\'s; their Frechet '
        'distance to the test references is what an unconditional generator of realistic '
        'images of the wrong modality would reach. Random training images of the SAME '
        'modality are shown as the level of real images.',
        '- **modality template** (report, caption; the target\'s baseline): every test sample '
        'gets the template of its modality, the training text with the same modality (the true '
        'label, which favours the baseline) and the same prompt that has the highest mean '
        'ROUGE-L to the other such texts (the medoid of the first 40). It is the text '
        'counterpart of the majority answer: it knows what kind of image it is and writes the '
        'dataset\'s template perfectly, but not what is in the image; beating it requires '
        'reading the lesions.',
        '- **nearest-image retrieval** (report, caption; context, not a target): the reference '
        'text of the training sample whose image is nearest to the test image (8x8 RGB box '
        'thumbnail, Euclidean distance) among training samples with the same prompt. On this '
        'synthetic data the lesions dominate even a 2x2 thumbnail (a bright blob per quadrant), '
        'so this lookup nearly solves the task (ROUGE-L about 0.97); it is shown so the reader '
        'knows how far a non-learned method gets, not as a trivial baseline. The most frequent '
        'reference text is a third, weaker baseline.', '',
        'Metric definitions and the full protocol: report.json (`protocol`, '
        '`protocol.metrics_doc`). Numbers are what this run reached on this machine; nothing '
        'is adjusted.', '']
  return '\n'.join(L)


# ----------------------------------------------------------------------------- tensorboard

def write_tensorboard(workdir: str, report: dict, head: dict, curves: dict, out_dir: str,
                      step: int, log=print) -> bool:
  """Eval image summaries (task grids, blank-input grids, loss curves) and headline scalars in
  WORKDIR/tb, at the checkpoint's step. Returns False if tensorboardX is unavailable."""
  try:
    from tensorboardX import SummaryWriter
  except Exception as e:  # noqa: BLE001
    log(f'[evaluate] TensorBoard summaries skipped ({e})')
    return False
  from PIL import Image
  import numpy as np
  w = SummaryWriter(os.path.join(workdir, 'tb'))
  try:
    def img(tag, path):
      if path and os.path.isfile(path):
        w.add_image(tag, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')
    for key, t in report.get('tasks', {}).items():
      if t.get('grid_png'):
        img(f'eval/{key}', os.path.join(t['samples_dir'], t['grid_png']))
      if t.get('blank_input', {}).get('grid_png'):
        img(f'eval_blank_input/{key}', os.path.join(t['samples_dir'],
                                                    t['blank_input']['grid_png']))
      if t.get('examples'):
        w.add_text(f'eval/{key}', '\n\n'.join(
            f"**Q:** {e['prompt']}  \n**ref:** {e['reference']}  \n**model:** {e['answer']}"
            for e in t['examples']), step)
    for st, c in (curves or {}).items():
      img(f'train_loss_curve/{st}', os.path.join(out_dir, c['png']))
    for r in head.get('targets', []):
      tag = r['key']
      if r['value'] is not None:
        w.add_scalar(f'eval/{tag}', r['value'], step)
      if r['baseline_value'] is not None:
        w.add_scalar(f'eval_baseline/{tag}', r['baseline_value'], step)
    for r in head.get('ablation', []):
      if r['blank_input'] is not None:
        w.add_scalar(f'eval_blank_input/{r["task"].replace(" ", "_")}_{r["metric"].lower()}',
                     r['blank_input'], step)
  finally:
    w.close()
  return True


# -------------------------------------------------------------------------------- driver

def _last_step(workdir: str) -> int | None:
  from unimedvl_jax.eval.plots import read_metrics
  steps = [r.get('step') for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [s for s in steps if isinstance(s, int)]
  return max(steps) if steps else None


def write_outputs(workdir: str, report: dict, *, tensorboard: bool = True, log=print) -> dict:
  """headline + loss curves + report.json / report.md (+ TensorBoard) of a harness report."""
  from unimedvl_jax.eval import harness
  from unimedvl_jax.eval.plots import loss_curves
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  curves = loss_curves(os.path.join(workdir, 'metrics.jsonl'), out_dir)
  report['headline'] = headline(report)
  report['loss_curves'] = curves
  step = report['protocol'].get('step')
  if tensorboard:
    report['protocol']['tensorboard'] = write_tensorboard(
        workdir, report, report['headline'], curves, out_dir, step or 0, log=log)
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(harness.to_json(report), f, indent=1)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(markdown(report, report['headline'], curves, out_dir))
  return report


def evaluate_workdir(workdir: str, *, split: str = 'test', max_per_task: int = 48,
                     vqa_samples: int | None = DEFAULT_MAX_SAMPLES['vqa'],
                     image_steps: int | None = None, seed: int = 0, ablation: bool = True,
                     tensorboard: bool = True, log=print) -> dict:
  """Loads the EMA weights of `workdir`, evaluates every task of its data's `split` (at most
  max_per_task samples per task, vqa_samples for VQA; images sampled with the config's `eval`
  settings, infer.image.eval_flow_settings, image_steps replacing their step counts), with the blank-input ablation of VQA and
  segmentation unless ablation=False, writes the report files and returns the report dict."""
  from unimedvl_jax.data import pipeline
  from unimedvl_jax.eval import harness
  from unimedvl_jax.infer.loading import load_checkpoint, load_tokenizer
  t0 = time.time()
  cfg, model = load_checkpoint(workdir)
  tok = load_tokenizer(cfg, data_root=cfg.data.root)
  samples = list(pipeline.iter_eval_samples(cfg, split))
  train = list(pipeline.iter_eval_samples(cfg, 'train')) if split != 'train' else None
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  t2i, edit = flow_lib.eval_flow_settings(cfg, image_steps)
  limits = {'default': max_per_task}
  if vqa_samples is not None:
    limits['vqa'] = vqa_samples
  report = harness.evaluate(cfg, model, tok, samples, max_samples=limits, seed=seed,
                            flow_text_to_image=t2i, flow_editing=edit,
                            samples_dir=os.path.join(out_dir, 'samples'),
                            data_files=[f'{cfg.data.root}/{split}/*.jsonl'], root=cfg.data.root,
                            train_samples=train,
                            ablation=harness.ABLATION_KINDS if ablation else (), log=log)
  p = report['protocol']
  p['split'] = split
  p['checkpoint'] = os.path.abspath(workdir)
  p['weights'] = 'EMA'
  p['step'] = _last_step(workdir)
  p['total_seconds'] = round(time.time() - t0, 1)
  return write_outputs(workdir, report, tensorboard=tensorboard, log=log)
