"""The embedded synthetic dataset (data/synthetic/) and its ground-truth checkers (data/truth.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from unimedvl_jax.data import synthetic as S
from unimedvl_jax.data import truth as T
from unimedvl_jax.data.images import load_image, resize


def _records(root, split=None, group=None):
  out = []
  for s in ([split] if split else S.SPLITS):
    for g in ([group] if group else S.GROUPS):
      with open(os.path.join(root, s, f'{g}.jsonl'), encoding='utf-8') as f:
        out += [(s, g, json.loads(line)) for line in f if line.strip()]
  return out


def _tree_bytes(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def test_deterministic_bytes(tmp_path):
  kw = dict(seed=3, size=64, n_subjects=12, include_real=True)
  S.generate(str(tmp_path / 'a'), **kw)
  S.generate(str(tmp_path / 'b'), **kw)
  a, b = _tree_bytes(tmp_path / 'a'), _tree_bytes(tmp_path / 'b')
  assert sorted(a) == sorted(b)
  assert [k for k in a if a[k] != b[k]] == []
  c = S.generate(str(tmp_path / 'c'), **dict(kw, seed=4, include_real=False))
  assert _tree_bytes(tmp_path / 'c')['train/vqa.jsonl'] != a['train/vqa.jsonl']
  assert c['seed'] == 4


def test_manifest_counts_match_files(synthetic_dir, synthetic_manifest):
  m = synthetic_manifest
  assert m['version'] == S.GENERATOR_VERSION and m['image_size'] == 64 and m['seed'] == 0
  assert m['groups'] == list(S.GROUPS) and m['splits'] == list(S.SPLITS)
  for s in S.SPLITS:
    for g in S.GROUPS:
      recs = _records(synthetic_dir, s, g)
      assert m['counts'][s][g]['total'] == len(recs)
      assert sum(m['counts'][s][g]['tasks'].values()) == len(recs)
  assert sum(m['subjects'].values()) == m['n_subjects'] == 48
  assert m['tokenizer']['vocab_size'] <= 1000


def test_every_group_and_task_present(synthetic_dir):
  recs = _records(synthetic_dir, 'train')
  tasks = {(g, r['main_task_type'], r['sub_task_type']) for _, g, r in recs}
  for g in ('vqa', 'report', 'caption', 't2i'):
    assert (g,) + S.GROUP_TASKS[g] in tasks
  for t in S.EDIT_TASKS:
    assert ('edit', 'image_generation', t) in tasks
  modalities = {r['meta']['modality'] for _, g, r in recs if g == 'vqa'}
  assert modalities == set(T.MODALITIES)
  real = [r for _, g, r in recs if r['meta'].get('real')]
  assert any(r['input_img'][0]['path'].endswith('.dcm') for r in real)
  assert any(r['input_img'][0]['path'].endswith(('.nii', '.nii.gz')) for r in real)
  qtypes = {r['meta']['question_type'] for _, g, r in recs if g == 'vqa'}
  assert qtypes == {'closed', 'open'}


def test_splits_disjoint_by_subject(synthetic_dir):
  subj = {s: {r['meta']['subject_id'] for _, _, r in _records(synthetic_dir, s)} for s in S.SPLITS}
  assert all(subj[s] for s in S.SPLITS)
  assert not subj['train'] & subj['val'] and not subj['train'] & subj['test']
  assert not subj['val'] & subj['test']
  # image files too
  paths = {s: {i['path'] for _, _, r in _records(synthetic_dir, s)
               for i in r['input_img'] + r['output_img']} for s in S.SPLITS}
  assert not paths['train'] & (paths['val'] | paths['test']) and not paths['val'] & paths['test']


def test_every_image_exists_and_loads(synthetic_dir):
  seen = {}
  for _, _, r in _records(synthetic_dir):
    assert r['message'][0]['from'] == 'human'
    n_ph = r['message'][0]['value'].count('<image>')
    assert n_ph == len(r['input_img'])
    for e in r['input_img'] + r['output_img']:
      p = e['path']
      assert not os.path.isabs(p)
      if p not in seen:
        seen[p] = load_image(os.path.join(synthetic_dir, p))
      assert seen[p].shape == (e['height'], e['width'], 3), p
  assert any(p.startswith('real/') for p in seen)


def test_records_agree_with_ground_truth(synthetic_dir):
  n_img = 0
  for _, g, r in _records(synthetic_dir):
    meta = r['meta']
    if meta.get('real'):
      continue
    gpt = [t['value'] for t in r['message'] if t['from'] == 'gpt']
    img_of = lambda e: load_image(os.path.join(synthetic_dir, e['path']))
    if g == 'report':
      assert T.findings_from_text(gpt[0]) == T.findings_from_meta(meta), gpt[0]
    elif g == 't2i':
      assert T.findings_from_text(r['message'][0]['value']) == T.findings_from_meta(meta)
      assert T.check_generated(img_of(r['output_img'][0]), meta)['all_ok']
    elif g == 'vqa':
      q, a = r['message'][0]['value'], gpt[0]
      locs = {f['location'] for f in meta['findings']}
      if meta['question_kind'] == 'lesion_in_quadrant':
        loc = next(l for l in T.LOCATIONS if f'in the {l} quadrant' in q)
        assert a == ('yes' if loc in locs else 'no')
      elif meta['question_kind'] == 'count':
        assert a == (['none', 'one', 'two', 'three'][len(locs)])
      elif meta['question_kind'] == 'location':
        assert [a] == list(locs)
    elif g == 'edit':
      src, tgt = img_of(r['input_img'][0]), img_of(r['output_img'][0])
      res = T.check_generated(tgt, meta)
      assert res['all_ok'] and res['modality_ok'], (r['id'], res)
      if r['sub_task_type'] == 'segmentation':
        np.testing.assert_array_equal(tgt[..., 0] > 127, T.lesion_mask(meta, 64))
      if r['sub_task_type'] == 'counterfactual':
        assert meta['target_findings'] == [] and meta['findings']
        diff = np.any(src != tgt, axis=-1)
        allowed = T.lesion_mask(meta, 64)
        if meta['modality'] == 'ultrasound':   # the posterior acoustic enhancement goes too
          yy, xx = np.mgrid[0:64, 0:64]
          for f in meta['findings']:
            allowed |= (np.abs(xx - f['center'][1]) <= f['radii'][1]) & (yy > f['center'][0])
        assert not (diff & ~allowed).any()   # only the lesions changed
        assert T.findings_from_text(gpt[0]) >= {f'lesion {f["location"]}' for f in meta['findings']}
      if r['sub_task_type'] == 'super_resolution':
        assert src.shape == (32, 32, 3) and tgt.shape == (64, 64, 3)
      n_img += 1
      src_res = T.check_generated(src if src.shape[0] == 64 else resize(src, (64, 64)),
                                  dict(meta, target_findings=meta['findings'],
                                       target_modality=meta['modality']))
      assert src_res['all_ok'], (r['id'], src_res)
  assert n_img > 10


def test_checker_accuracy_on_clean_and_degraded_images():
  rng = np.random.default_rng(0)
  n = ok = 0
  for i in range(64):
    sub = S.make_subject(11, i, 64)
    meta = dict(modality=sub['modality'], findings=sub['findings'], image_size=64)
    img = S.draw_subject(sub, 64)
    blurred = resize(resize(img, (40, 40)), (64, 64))
    noisy = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    for x in (img, blurred, noisy, resize(img, (96, 96))):
      r = T.check_generated(x, meta)
      n += 1
      ok += r['all_ok'] and r['size_ok'] and r['modality_ok']
    # the exact mask
    if sub['findings']:
      assert T.dice(T.candidate_mask(img, sub['modality']), T.lesion_mask(meta, 64)) > 0.95
      assert T.lesion_mask(meta, 128).sum() == pytest.approx(4 * T.lesion_mask(meta, 64).sum(),
                                                             rel=0.1)
  assert ok / n >= 0.95, (ok, n)


def test_checker_rejects_blank_and_wrong_images():
  subs = [S.make_subject(5, i, 64) for i in range(40)]
  rejected = total = 0
  for sub in subs:
    if not sub['findings']:
      continue
    meta = dict(modality=sub['modality'], findings=sub['findings'], image_size=64)
    for blank in (np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8),
                  np.full((64, 64, 3), 128, np.uint8)):
      r = T.check_generated(blank, meta)
      assert not r['all_ok'] and not r['modality_ok']
    # the same subject without its lesions, and another subject's image with other findings
    r = T.check_generated(S.draw_subject(sub, 64, with_lesions=False), meta)
    assert not r['present_ok'] and not r['all_ok']
    other = next(o for o in subs if o['modality'] == sub['modality'] and
                 {f['location'] for f in o['findings']} != {f['location'] for f in sub['findings']})
    total += 1
    rejected += not T.check_generated(S.draw_subject(other, 64), meta)['all_ok']
  assert rejected == total
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
  assert T.classify_modality(noise) == 'unknown'


def test_findings_vocabulary_and_scores():
  vocab = T.findings_vocabulary()
  assert len(vocab) == len(set(vocab)) and 'no lesion' in vocab and 'lesion upper left' in vocab
  meta = dict(findings=[dict(location='upper left', size='large', shape='oval', center=[20, 18],
                             radii=[6.4, 10.0])], image_size=64)
  f = T.findings_from_meta(meta)
  assert f == {'one lesion', 'lesion upper left', 'large lesion upper left', 'oval lesion upper left'}
  assert f <= set(vocab)
  assert T.findings_from_meta(dict(findings=[])) == {'no lesion'}
  assert T.findings_from_text(S.report_text('ct', [])) == {'no lesion'}
  s = T.finding_scores({'one lesion', 'lesion upper right'}, f)
  assert s['precision'] == 0.5 and s['recall'] == 0.25
  m = T.lesion_mask(meta, 64)
  assert m[20, 18] and not m[20, 40] and m.sum() == pytest.approx(np.pi * 64, rel=0.1)


def test_tokenizer_covers_the_text(synthetic_dir, tokenizer):
  assert tokenizer.vocab_size <= 1000
  for _, _, r in _records(synthetic_dir, 'val'):
    for t in r['message']:
      text = t['value'].replace('<image>', ' ').strip()
      ids = tokenizer.encode(text)
      assert 1 not in ids                      # no <unk>
      assert tokenizer.decode(ids) == text


def test_cli_and_ensure_dataset(tmp_path, monkeypatch, capsys):
  assert S.main(['--out', str(tmp_path / 'cli'), '--n-subjects', '8', '--no-real', '--seed', '1']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['subjects']['train'] + out['subjects']['val'] + out['subjects']['test'] == 8
  assert os.path.isfile(tmp_path / 'cli' / 'tokenizer.model')
  monkeypatch.setenv('UNIMEDVL_DATA_DIR', str(tmp_path / 'default'))
  assert S.default_root() == str(tmp_path / 'default')
  d = S.ensure_dataset(n_subjects=8, include_real=False)
  assert d == str(tmp_path / 'default')
  stamp = os.path.getmtime(os.path.join(d, 'manifest.json'))
  assert S.ensure_dataset(n_subjects=8, include_real=False) == d      # reused, not regenerated
  assert os.path.getmtime(os.path.join(d, 'manifest.json')) == stamp
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp-')]
  (tmp_path / 'user').mkdir()
  (tmp_path / 'user' / 'precious.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='user'):
    S.ensure_dataset(str(tmp_path / 'user'), n_subjects=8, include_real=False)
  assert (tmp_path / 'user' / 'precious.txt').read_text() == 'keep me'
