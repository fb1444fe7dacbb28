"""The evaluation harness end to end on a random tiny model and a tiny generated synthetic
dataset: report structure, protocol fields, finite metrics, sample outputs, and the CLI function
with a saved checkpoint (including the config-mismatch error). The random model's numbers are
meaningless; only the plumbing is checked."""

import dataclasses
import json
import math
import os

import pytest

from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.random_init import random_model

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
OVERRIDES = ['model.llm.num_layers=2', 'model.vit.num_layers=1', 'model.init_std=0.1']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  from unimedvl_jax.data import synthetic
  from unimedvl_jax.data.tokenizer import SentencePieceTokenizer
  d = str(tmp_path_factory.mktemp('syn'))
  synthetic.generate(d, seed=0, size=32, n_subjects=24, include_real=False, vocab_size=600)
  cfg = load_config_file(TINY, OVERRIDES + [f'data.tokenizer_path={d}/tokenizer.model'])
  model = random_model(cfg.model, 0)
  tok = SentencePieceTokenizer(os.path.join(d, 'tokenizer.model'))
  return d, cfg, model, tok


FAST = dict(text_settings={k: T.TextSettings(max_new_tokens=4) for k in
                           ('vqa', 'report', 'caption', 'other')},
            flow_text_to_image=dataclasses.replace(I.TEXT_TO_IMAGE, num_steps=2),
            flow_editing=dataclasses.replace(I.EDITING, num_steps=2))


def _finite_numbers(x, path=''):
  """Yields (path, value) of every float in a nested report, except inside aggregates over an
  empty subset (n == 0, e.g. open-question accuracy when all sampled questions are closed)."""
  if isinstance(x, dict):
    if x.get('n') == 0:
      return
    for k, v in x.items():
      yield from _finite_numbers(v, f'{path}.{k}')
  elif isinstance(x, (list, tuple)):
    for i, v in enumerate(x):
      yield from _finite_numbers(v, f'{path}[{i}]')
  elif isinstance(x, float):
    yield path, x


@pytest.fixture(scope='module')
def evaluated(setup, tmp_path_factory):
  """One evaluation of the train split (2 samples per task, 3 VQA), with the training split
  itself as the baselines' pool and the blank-input ablation; samples under a module tmp dir."""
  from unimedvl_jax.eval import harness, tasks
  d, cfg, model, tok = setup
  files = [os.path.join(d, 'train', f'{g}.jsonl') for g in ('vqa', 'report', 't2i', 'edit',
                                                            'caption')]
  samples = tasks.load_samples(files)
  wd = tmp_path_factory.mktemp('wd')
  report = harness.evaluate(cfg, model, tok, samples, batch_size=2,
                            max_samples={'vqa': 3, 'default': 2}, seed=3,
                            samples_dir=str(wd / 'eval' / 'samples'), data_files=files, root=d,
                            train_samples=samples, ablation=harness.ABLATION_KINDS, **FAST)
  return str(wd), files, report


def test_evaluate_all_tasks(setup, evaluated):
  from unimedvl_jax.eval import harness
  from unimedvl_jax.eval.tasks import IMAGE_KINDS
  d, cfg, model, tok = setup
  _, files, report = evaluated
  tasks = report['tasks']
  kinds = {v['kind'] for v in tasks.values()}
  assert {'vqa', 'report', 'text_to_image', 'segmentation', 'super_resolution',
          'modality_translation', 'virtual_staining', 'counterfactual'} <= kinds, kinds
  p = report['protocol']
  for key in ('data_files', 'splits', 'counts', 'seeds', 'prompts', 'decoding', 'sampler',
              'image_rules', 'frechet_extractor', 'metrics_doc', 'batch_size'):
    assert key in p, key
  assert p['splits'] == {'train': sum(v['n'] for v in tasks.values())}
  for key, c in p['counts'].items():
    assert c['evaluated'] <= (3 if key.endswith('vqa') else 2)
    assert c['available'] >= c['evaluated']
  by_kind = {v['kind']: v for v in tasks.values()}
  vqa = by_kind['vqa']
  assert 0.0 <= vqa['accuracy']['mean'] <= 1.0 and 'baseline_majority' in vqa
  rep = by_kind['report']
  for k in ('bleu1', 'bleu4'):
    assert 0.0 <= rep[k] <= 1.0
  assert math.isfinite(rep['rouge_l']['mean']) and 'micro' in rep['findings']
  seg = by_kind['segmentation']
  assert 0.0 <= seg['dice']['mean'] <= 1.0 and 'baseline_blank_mask' in seg
  assert 'truth_checkers' in seg
  sr = by_kind['super_resolution']
  assert math.isfinite(sr['psnr']['mean']) and 'baseline_bicubic' in sr
  assert 'baseline_identity' in by_kind['modality_translation']
  t2i = by_kind['text_to_image']
  assert math.isfinite(t2i['frechet_distance']['value'])
  assert set(t2i['truth_checkers']['generated']) >= {'present_ok', 'count_ok', 'all_ok'}
  cf = by_kind['counterfactual']
  assert 'explanation' in cf and 'psnr' in cf
  # every number outside empty subsets is finite; the report is JSON-serialisable
  bad = [(k, v) for k, v in _finite_numbers(report) if not math.isfinite(v)]
  assert not bad, bad
  json.dumps(harness.to_json(report), allow_nan=False)
  # sample outputs: texts for every task, PNG grids for image tasks
  for key, v in tasks.items():
    out = os.path.join(v['samples_dir'], 'outputs.jsonl')
    recs = [json.loads(l) for l in open(out)]
    assert len(recs) == v['n']
    if v['kind'] in IMAGE_KINDS:
      assert recs[0]['grid_png'] and os.path.isfile(os.path.join(v['samples_dir'],
                                                                 recs[0]['grid_png']))
    else:
      assert isinstance(recs[0]['generated_texts'][0], str)


def test_evaluate_cli_function_and_errors(setup, tmp_path):
  from unimedvl_jax import evaluate as ev
  from unimedvl_jax.infer.loading import LoadError
  from unimedvl_jax.train.model_checkpoint import save_model_checkpoint
  d, cfg, model, tok = setup
  ck = str(tmp_path / 'ckpt')
  save_model_checkpoint(ck, cfg, model, step=1)
  out = str(tmp_path / 'report.json')
  rep = ev.run(ck, os.path.join(d, 'val', 'vqa.jsonl'), out, max_samples=1, num_steps=2,
               max_new_tokens=3)
  on_disk = json.load(open(out))
  assert on_disk['protocol']['checkpoint'] == os.path.abspath(ck)
  assert on_disk['protocol']['root'] == d                  # found through manifest.json
  assert list(on_disk['tasks']) == ['understanding/vqa'] and rep['tasks']
  assert on_disk['tasks']['understanding/vqa']['decoding']['max_new_tokens'] == 3
  # a checkpoint whose config does not match the requested one
  with pytest.raises(LoadError, match='different model'):
    ev.run(ck, os.path.join(d, 'val', 'vqa.jsonl'), None, config=TINY)
  with pytest.raises(FileNotFoundError):
    ev.run(ck, os.path.join(d, 'val', 'missing.jsonl'), None)


def _jsonl(path, n):
  return [json.loads(l) for l in open(path)][:n]


def test_training_baselines_and_ablation(setup, evaluated):
  """The baselines fitted on the pool and the blank-input ablation, checked against the data
  files read directly (the pool here is the evaluated split itself)."""
  from unimedvl_jax.eval import tasks
  from unimedvl_jax.eval import metrics as M
  d, cfg, model, tok = setup
  _, files, report = evaluated
  by_kind = {v['kind']: v for v in report['tasks'].values()}
  vqa = by_kind['vqa']
  recs = _jsonl(os.path.join(d, 'train', 'vqa.jsonl'), 3)
  all_recs = _jsonl(os.path.join(d, 'train', 'vqa.jsonl'), 10 ** 6)
  for k, e in vqa['by_question_kind'].items():
    refs = [r['meta']['answer'] for r in recs if r['meta']['question_kind'] == k]
    assert e['n'] == len(refs)
    tr = [r['meta']['answer'] for r in all_recs if r['meta']['question_kind'] == k]
    c = {a: tr.count(a) for a in set(tr)}
    top = min(c, key=lambda a: (-c[a], a))
    assert e['train_answer'] == M.normalize_answer(top) and e['train_n'] == len(tr)
    assert e['train_accuracy'] == pytest.approx(sum(r == top for r in refs) / len(refs))
  closed_tr = [r['meta']['answer'] for r in all_recs if r['meta']['question_type'] == 'closed']
  assert vqa['baseline_majority']['closed_train_majority']['train_n'] == len(closed_tr)
  # nearest-image retrieval over a pool holding the evaluated images themselves: their own
  # texts; the modality template is one of the pool's texts of the same modality and prompt
  for kind in ('report', 'caption'):
    t = by_kind[kind]
    assert t['baseline_nearest_image_retrieval']['rouge_l'] == pytest.approx(1.0)
    assert len(t['examples']) == t['n']
    key = next(k for k, v in report['tasks'].items() if v is t)
    s0 = next(s for s in tasks.load_samples(files) if tasks.task_key(s) == key)
    same = [s for s in tasks.load_samples(files) if tasks.task_key(s) == key
            and tasks.template_group(s) == tasks.template_group(s0)]
    assert t['baseline_modality_template']['example'] in [tasks.first_reply(s) for s in same]
  t2i = by_kind['text_to_image']
  for k in ('baseline_other_modality_train_images', 'reference_same_modality_train_images'):
    assert math.isfinite(t2i[k]['value']) and t2i[k]['n'] == t2i['n']
    assert 0.0 <= t2i[k]['truth_checkers']['modality_ok'] <= 1.0
  # the ablation: same samples, grey inputs, scored the same way
  for kind in ('vqa', 'segmentation'):
    bl = by_kind[kind]['blank_input']
    assert bl['n'] == by_kind[kind]['n'] and bl['seconds'] >= 0
    assert os.path.isfile(os.path.join(by_kind[kind]['samples_dir'],
                                       'blank_input_outputs.jsonl'))
  assert 'dice' in by_kind['segmentation']['blank_input']
  assert by_kind['segmentation']['blank_input']['grid_png'] == 'grid_blank_input.png'
  assert 'blank_input' not in by_kind['report']
  assert report['protocol']['ablation']['kinds'] == ['vqa', 'segmentation']


def test_prepare_blank_inputs(setup):
  """blank_inputs replaces every prompt image by constant grey of the same size (ViT patches
  and the VAE latent of a grey image); references are untouched."""
  import numpy as np
  from unimedvl_jax.data import images as imlib
  from unimedvl_jax.data.plans import Geometry
  from unimedvl_jax.eval import tasks
  from unimedvl_jax.infer.context import encode_vae_tokens
  from unimedvl_jax.infer.runner import Runner
  d, cfg, model, tok = setup
  s = next(x for x in tasks.load_samples([os.path.join(d, 'train', 'edit.jsonl')])
           if x.sub_task_type == 'segmentation')
  runner, geom = Runner(model, tok, cfg), Geometry.from_config(cfg)
  a = tasks.prepare(runner, s, geom, tok)
  b = tasks.prepare(runner, s, geom, tok, blank_inputs=True)
  va, vb = [i for i in a.program.prompt if i.kind == 'vit'], [i for i in b.program.prompt
                                                             if i.kind == 'vit']
  assert len(va) == len(vb) == 1 and vb[0].grid == va[0].grid
  np.testing.assert_allclose(np.asarray(vb[0].patches), (128 / 255 - 0.5) / 0.5, atol=1e-6)
  ea, eb = [i for i in a.program.prompt if i.kind == 'vae'], [i for i in b.program.prompt
                                                             if i.kind == 'vae']
  grey = np.full((eb[0].grid[0] * geom.latent_px, eb[0].grid[1] * geom.latent_px, 3), 128,
                 np.uint8)
  want, _ = encode_vae_tokens(model, imlib.to_unit_range(grey))
  np.testing.assert_allclose(np.asarray(eb[0].tokens), np.asarray(want), atol=1e-5)
  assert not np.allclose(np.asarray(ea[0].tokens), np.asarray(want))
  assert (b.input_image == 128).all() and b.input_image.shape == a.input_image.shape
  np.testing.assert_array_equal(b.ref_images[0], a.ref_images[0])
  assert b.ref_texts == a.ref_texts and b.prompt_text == a.prompt_text


def _events(tb_dir):
  """(tag, kind) of every summary value in the TensorBoard event files (TFRecord framing read
  by hand; the protos from tensorboardX)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = []
  for name in os.listdir(tb_dir):
    data = open(os.path.join(tb_dir, name), 'rb').read()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        out.append((v.tag, v.WhichOneof('value'), ev.step))
  return out


def test_report_markdown_images_tables_and_tensorboard(evaluated):
  """write_outputs: report.md embeds a grid PNG per image task and a loss PNG per stage (files
  exist), the targets / ablation / per-task tables; TensorBoard gets the images at the step."""
  import re
  from unimedvl_jax.eval import report as R
  wd, _, report = evaluated
  recs = [dict(step=5, stage='vae', loss=0.4, ce=0.0, mse=0.4),
          dict(step=10, stage='vae', loss=0.2, ce=0.0, mse=0.2),
          dict(step=15, stage='foundation', loss=5.0, ce=5.0, mse=0.0),
          dict(step=20, stage='foundation', loss=3.0, ce=2.5, mse=0.5)]
  with open(os.path.join(wd, 'metrics.jsonl'), 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in recs) + '\n')
  report = json.loads(json.dumps(report, default=str))   # what report.json holds (a copy)
  report['protocol'].update(step=20, split='train', checkpoint=wd, total_seconds=12.5)
  out = R.write_outputs(wd, report)
  md = open(os.path.join(wd, 'eval', 'report.md')).read()
  links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', md)
  for l in links:
    assert os.path.isfile(os.path.join(wd, 'eval', l)), l
  assert {'loss_vae.png', 'loss_foundation.png'} <= set(links)
  kinds = {v['kind']: k for k, v in report['tasks'].items()}
  for kind in ('segmentation', 'super_resolution', 'modality_translation', 'virtual_staining',
               'text_to_image', 'counterfactual'):
    assert any(l.startswith('samples/') and l.endswith('/grid.png') and
               ('samples/' + l.split('/')[1]) in md for l in links), kind
    assert f'### {kinds[kind]} ' in md
  assert any(l.endswith('grid_blank_input.png') for l in links)
  for head in ('## Targets vs trivial baselines', '## Image-conditioning ablation',
               '## Training loss per stage', '## Baselines', '| question / prompt |',
               'modality template', 'random training images of another modality',
               'copy the input', 'bicubic upsampling', 'empty mask'):
    assert head in md, head
  rows = out['headline']['targets']
  assert {r['target'] for r in rows} >= {'closed VQA accuracy >= 0.85', 'segmentation Dice >= 0.5'}
  for r in rows:                       # met follows the rule from the numbers
    if r['met'] is not None:
      want = (r['value'] >= r['threshold'] if r['rule'] == '>=' else
              r['value'] > r['baseline_value'] if r['rule'] == '>' else
              r['value'] < r['baseline_value'])
      assert r['met'] == want, r
    if r['ci'] and r['met'] is not None:   # the CI check uses the bound on the goal's side
      goal = r['threshold'] if r['rule'] == '>=' else r['baseline_value']
      lo, hi = r['ci']
      assert r['ci_clear'] == (lo >= goal if r['rule'] == '>=' else
                               lo > goal if r['rule'] == '>' else hi < goal), r
  assert '12.5 s in total' in md
  on_disk = json.load(open(os.path.join(wd, 'eval', 'report.json')))
  assert on_disk['headline']['targets_met'] and on_disk['loss_curves']['vae']['steps'] == [5, 10]
  ev = _events(os.path.join(wd, 'tb'))
  tags = {(t, k) for t, k, _ in ev}
  assert ('train_loss_curve/vae', 'image') in tags
  assert (f"eval/{kinds['segmentation']}", 'image') in tags
  assert (f"eval_blank_input/{kinds['segmentation']}", 'image') in tags
  assert any(t.startswith('eval/') and k == 'simple_value' for t, k in tags)
  assert {s for _, _, s in ev if s} == {20}


def test_training_scalars_are_tagged_per_stage(tmp_path):
  """train/loop.py MetricsWriter: TensorBoard scalars under '<stage>/<metric>' at the global step
  (and metrics.jsonl keeps the record as is)."""
  from unimedvl_jax.train.loop import MetricsWriter
  w = MetricsWriter(str(tmp_path), 0)
  w.write(dict(step=10, stage='vae', loss=0.5, mse=0.5))
  w.write(dict(step=20, stage='foundation', loss=4.0, ce=4.0))
  w.close()
  ev = {(t, s) for t, k, s in _events(str(tmp_path / 'tb')) if k == 'simple_value'}
  assert ev == {('vae/loss', 10), ('vae/mse', 10), ('foundation/loss', 20),
                ('foundation/ce', 20)}
  assert [json.loads(l)['stage'] for l in open(tmp_path / 'metrics.jsonl')] == ['vae',
                                                                                'foundation']
