"""The grain pipeline: batches match the contract, determinism, resume (JSON and Orbax), hosts,
curriculum stages, workers, and bad samples counted / the bad-fraction stop."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.batch import check_batch
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.data import packing, pipeline
from unimedvl_jax.data.jsonl import DataError, Sample
from unimedvl_jax.data.plans import Geometry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cfg(synthetic_dir):
  c = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  c.data.root = str(synthetic_dir)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_match_contract_and_invariants(cfg):
  it = pipeline.make_train_iterator(cfg)
  g = Geometry.from_config(cfg)
  for b in _take(it, 4):
    check_batch(b, cfg)
    packing.check_pack_invariants(b, g)
  st = it.stats()
  assert st['batches'] == 4 and st['packs'] == 4 * cfg.data.batch_size
  assert st['read'] >= st['samples_packed'] > 0 and st['bad'] == 0
  assert 0.0 <= st['padding_fraction'] < 0.6, st
  assert set(st['read_by_group']) >= {'vqa', 't2i'}
  json.dumps(it.get_state())   # JSON-able


def test_deterministic_given_seed(cfg):
  a = _take(pipeline.make_train_iterator(cfg), 3)
  b = _take(pipeline.make_train_iterator(cfg), 3)
  assert _same(a, b)
  cfg.seed = 1
  c = _take(pipeline.make_train_iterator(cfg), 3)
  assert not _same(a, c)


def test_resume_json_round_trip(cfg):
  it = pipeline.make_train_iterator(cfg)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  stats = it.stats()
  ref = _take(it, 3)
  it2 = pipeline.make_train_iterator(cfg)
  it2.set_state(state)
  assert it2.stats() == stats
  assert _same(_take(it2, 3), ref)
  cfg.data.batch_size = 2
  with pytest.raises(ValueError, match='different pipeline'):
    pipeline.make_train_iterator(cfg).set_state(state)


def test_resume_through_orbax(cfg, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  import grain
  it = pipeline.make_train_iterator(cfg)
  _take(it, 2)
  mngr = ocp.CheckpointManager(
      str(tmp_path / 'ckpt'),
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  ref = _take(it, 2)
  it2 = pipeline.make_train_iterator(cfg)
  mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  assert _same(_take(it2, 2), ref)
  mngr.close()


def test_two_workers_and_resume(cfg):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  cfg.data.num_workers = 2
  it = pipeline.make_train_iterator(cfg)   # ~10 s here: each spawned worker imports grain + jax
  try:
    for b in _take(it, 2):
      check_batch(b, cfg)
    state = json.loads(json.dumps(it.get_state()))
    ref = _take(it, 3)
    assert it.stats()['batches'] == 5    # summed over both workers
    it.set_state(state)                  # rewinds the workers (no new processes)
    assert it.stats()['batches'] == 2
    assert _same(_take(it, 3), ref)
  finally:
    it.close()


def test_hosts_read_disjoint_shards(cfg):
  B = cfg.data.batch_size
  locs = []
  for host in range(2):
    ds, sig = pipeline.build_dataset(cfg, process_index=host, process_count=2)
    assert sig['packs_per_batch'] == B // 2
    grp = ds.parents[0]   # first group's mapped dataset (this host's shard, shuffled)
    n = len(pipeline.JsonlSource(pipeline.resolve_groups(cfg)[0][0]['files']))
    mine = {grp[k].loc for k in range(len(range(host, n, 2)))}
    locs.append(mine)
  assert not locs[0] & locs[1] and len(locs[0] | locs[1]) == n
  it = pipeline.make_train_iterator(cfg, process_index=1, process_count=2)
  b = next(it)
  assert b['input_ids'].shape == (B // 2, cfg.data.seq_len)
  with pytest.raises(DataError, match='multiple of the number of hosts'):
    pipeline.make_train_iterator(cfg, process_count=3)


def test_curriculum_stage_mixture_and_mandatory(cfg):
  import ml_collections
  cfg.data.groups = ml_collections.ConfigDict({
      'vqa': {'jsonl': '{split}/vqa.jsonl', 'weight': 1.0, 'mandatory': False},
      'report': {'jsonl': '{split}/report.jsonl', 'weight': 1.0, 'mandatory': False},
      't2i': {'jsonl': '{split}/t2i.jsonl', 'weight': 1.0, 'mandatory': False}})
  cfg.curriculum = ml_collections.ConfigDict({'s1': {
      'mixture': {'vqa': 1.0, 'report': 1.0}, 'mandatory': ('t2i',),
      'data': {'cfg_dropout_text': 0.0}}})
  assert pipeline.resolve_groups(cfg, 's1')[1] == (0.0, cfg.data.cfg_dropout_vit,
                                                   cfg.data.cfg_dropout_vae)
  it = pipeline.make_train_iterator(cfg, stage='s1')
  for b in _take(it, 3):
    # t2i is the only group with noised images: each pack has one
    assert (b['latent_noised'].sum(1) > 0).all()
  st = it.stats()
  assert st['read_by_group']['t2i'] == 3 * cfg.data.batch_size
  assert set(st['read_by_group']) == {'vqa', 'report', 't2i'}
  assert _same(_take(pipeline.make_train_iterator(cfg, stage='s1'), 1),
               _take(pipeline.make_train_iterator(cfg, stage='s1'), 1))
  with pytest.raises(DataError, match="stage 'nope'"):
    pipeline.make_train_iterator(cfg, stage='nope')
  cfg.curriculum.s1.mixture = {'vqa': 1.0, 'missing': 1.0}
  with pytest.raises(DataError, match=r"\['missing'\] are not in config.data.groups"):
    pipeline.make_train_iterator(cfg, stage='s1')


def test_tokenizer_vocab_check(cfg):
  cfg.model.llm.vocab_size = 8
  with pytest.raises(DataError, match='vocab_size = 8'):
    pipeline.make_train_iterator(cfg)


def test_iter_eval_samples_and_pack_samples(cfg):
  samples = list(pipeline.iter_eval_samples(cfg, 'val', groups=['vqa']))
  assert samples and all(isinstance(s, Sample) and s.group == 'vqa' for s in samples)
  assert all(isinstance(s.meta, dict) for s in samples)
  again = list(pipeline.iter_eval_samples(cfg, 'val', groups=['vqa']))
  assert [s.loc for s in samples] == [s.loc for s in again]
  batch = pipeline.pack_samples(cfg, samples[:3])
  check_batch(batch, cfg)
  packing.check_pack_invariants(batch, Geometry.from_config(cfg))
  assert batch['segment_ids'].max() >= 1
  with pytest.raises(DataError, match='not found'):
    list(pipeline.iter_eval_samples(cfg, 'val', groups=['nope']))


# ---------------------------------------------------------------------------------------------
# bad samples


def _write_bad_dataset(d, good=10, bad=None):
  """A root with good VQA lines and the given bad lines (reason -> count)."""
  os.makedirs(d / 'train', exist_ok=True)
  os.makedirs(d / 'img', exist_ok=True)
  Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(d / 'img' / 'ok.png')
  (d / 'img' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
  vqa = lambda path, ans='yes': json.dumps({
      'main_task_type': 'vqa', 'input_img': [{'path': path}],
      'message': [{'from': 'human', 'value': '<image>\nIs it normal?'},
                  {'from': 'gpt', 'value': ans}]})
  lines = [vqa('img/ok.png')] * good
  bad = bad or {}
  lines += ['{"message": [oops'] * bad.get('malformed_json', 0)
  lines += [json.dumps({'input_img': [{'path': 'img/ok.png'}]})] * bad.get('missing_fields', 0)
  lines += [vqa('img/nothere.png')] * bad.get('missing_file', 0)
  lines += [vqa('img/corrupt.png')] * bad.get('undecodable_image', 0)
  lines += [vqa('img/ok.png', 'word ' * 2000)] * bad.get('too_long', 0)
  (d / 'train' / 'mixed.jsonl').write_text('\n'.join(lines) + '\n')


def _bad_cfg(cfg, d, synthetic_dir):
  cfg.data.root = str(d)
  cfg.data.tokenizer_path = os.path.join(str(synthetic_dir), 'tokenizer.model')
  return cfg


def test_bad_samples_counted_and_survive_resume(cfg, tmp_path, synthetic_dir):
  bad = {'malformed_json': 1, 'missing_fields': 1, 'missing_file': 1, 'undecodable_image': 1,
         'too_long': 1}
  _write_bad_dataset(tmp_path, good=195, bad=bad)
  _bad_cfg(cfg, tmp_path, synthetic_dir)
  cfg.data.bad_check_min_samples = 10
  it = pipeline.make_train_iterator(cfg)
  while it.stats()['read'] < 200:
    next(it)
  st = it.stats()
  assert {r: st['skipped'][r] for r in bad} == bad, st['skipped']
  for r in bad:
    ex = st['examples'][r][0]
    assert ex.startswith(str(tmp_path / 'train' / 'mixed.jsonl') + ':'), ex
  assert 'input_img' in st['examples']['missing_fields'][0] or \
      'message' in st['examples']['missing_fields'][0]
  assert 'nothere.png' in st['examples']['missing_file'][0]
  assert 'max_sample_tokens' in st['examples']['too_long'][0]
  state = json.loads(json.dumps(it.get_state()))
  it2 = pipeline.make_train_iterator(cfg)
  it2.set_state(state)
  assert it2.stats()['skipped'] == st['skipped']


def test_bad_fraction_stops_with_clear_error(cfg, tmp_path, synthetic_dir):
  _write_bad_dataset(tmp_path, good=5, bad={'missing_file': 12, 'malformed_json': 3})
  _bad_cfg(cfg, tmp_path, synthetic_dir)
  cfg.data.bad_check_min_samples = 10
  it = pipeline.make_train_iterator(cfg)
  with pytest.raises(DataError) as e:
    _take(it, 50)
  msg = str(e.value)
  assert "most are 'missing_file'" in msg and 'max_bad_fraction' in msg
  assert str(tmp_path / 'train' / 'mixed.jsonl') + ':' in msg and 'nothere.png' in msg
