"""The evaluation harness end to end on a random tiny model and a tiny generated synthetic
dataset: report structure, protocol fields, finite metrics, sample outputs, and the CLI function
with a saved checkpoint (including the config-mismatch error). The random model's numbers are
meaningless; only the plumbing is checked."""

import dataclasses
import json
import math
import os

import pytest

from unimedvl_jax.config import load_config_file
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


def test_evaluate_all_tasks(setup, tmp_path):
  from unimedvl_jax.eval import harness
  d, cfg, model, tok = setup
  files = [os.path.join(d, 'train', f'{g}.jsonl') for g in ('vqa', 'report', 't2i', 'edit')]
  samples = harness.load_samples(files)
  report = harness.evaluate(cfg, model, tok, samples, batch_size=2, max_samples=2, seed=3,
                            samples_dir=str(tmp_path / 'samples'), data_files=files, root=d,
                            **FAST)
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
    assert c['evaluated'] <= 2 and c['available'] >= c['evaluated']
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
  sd = tmp_path / 'samples'
  for key, v in tasks.items():
    out = os.path.join(v['samples_dir'], 'outputs.jsonl')
    recs = [json.loads(l) for l in open(out)]
    assert len(recs) == v['n']
    if v['kind'] in harness.IMAGE_KINDS:
      assert recs[0]['grid_png'] and os.path.isfile(os.path.join(v['samples_dir'],
                                                                 recs[0]['grid_png']))
    else:
      assert isinstance(recs[0]['generated_texts'][0], str)


def test_evaluate_cli_function_and_errors(setup, tmp_path):
  from unimedvl_jax import evaluate as ev
  from unimedvl_jax.infer.loading import LoadError
  from unimedvl_jax.train.checkpoint import save_model_checkpoint
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
