"""`python -m unimedvl_jax.data check`: every bad-input reason counted with its location."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.data.check import builtin_config, check
from unimedvl_jax.data.jsonl import SAMPLE_ERROR_REASONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vqa(path, ans='yes'):
  return json.dumps({'main_task_type': 'vqa', 'input_img': [{'path': path}],
                     'message': [{'from': 'human', 'value': '<image>\nIs it normal?'},
                                 {'from': 'gpt', 'value': ans}]})


def _write_dicom_without_pixels(path):
  """A valid DICOM file whose image cannot be read (no pixel data)."""
  pydicom = pytest.importorskip('pydicom')
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.7'
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b'\0' * 128)
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = 'OT'
  ds.PatientName = 'Test^Nopixels'
  ds.save_as(str(path), enforce_file_format=True) if 'enforce_file_format' in \
      ds.save_as.__code__.co_varnames else ds.save_as(str(path), write_like_original=False)
  del pydicom


@pytest.fixture
def bad_dir(tmp_path):
  img = tmp_path / 'img'
  img.mkdir()
  Image.fromarray(np.full((64, 48, 3), 100, np.uint8)).save(img / 'ok.png')
  (img / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
  _write_dicom_without_pixels(img / 'nopixels.dcm')
  lines = [
      _vqa('img/ok.png'),                                               # 1 good
      '{"message": [{"from": "human", "value": "hi"}',                  # 2 malformed
      json.dumps({'input_img': [{'path': 'img/ok.png'}]}),              # 3 no message
      _vqa('img/missing.png'),                                          # 4 missing file
      _vqa('img/corrupt.png'),                                          # 5 undecodable
      _vqa('img/ok.png', 'word ' * 3000),                               # 6 too long
      _vqa('img/nopixels.dcm'),                                         # 7 unsupported dicom
      '',                                                               # blank: not a sample
      _vqa('img/ok.png', 'no'),                                         # 9 good
  ]
  f = tmp_path / 'bad.jsonl'
  f.write_text('\n'.join(lines) + '\n')
  return tmp_path, f


def _cfg(synthetic_dir):
  cfg = builtin_config()
  cfg.data.tokenizer_path = os.path.join(str(synthetic_dir), 'tokenizer.model')
  return cfg


def test_check_counts_every_reason(bad_dir, synthetic_dir):
  root, f = bad_dir
  r = check([str(f)], root=str(root), cfg=_cfg(synthetic_dir))
  assert r['samples_read'] == 8 and r['usable'] == 2
  assert {k: v for k, v in r['skipped'].items() if v} == {
      'malformed_json': 1, 'missing_fields': 1, 'missing_file': 1, 'undecodable_image': 1,
      'too_long': 1, 'unsupported_dicom': 1}
  assert set(r['skipped']) == set(SAMPLE_ERROR_REASONS) == set(r['reasons'])
  where = {k: v[0].split(': ')[0] for k, v in r['examples'].items()}
  assert where == {'malformed_json': f'{f}:2', 'missing_fields': f'{f}:3',
                   'missing_file': f'{f}:4', 'undecodable_image': f'{f}:5',
                   'too_long': f'{f}:6', 'unsupported_dicom': f'{f}:7'}
  assert 'missing.png' in r['examples']['missing_file'][0]
  assert 'max_sample_tokens' in r['examples']['too_long'][0]
  assert not r['ok'] and r['task_families'] == {'understanding': 2}
  p = r['packing']
  assert p['packs'] == 1 and p['samples_per_pack'] == 2 and 0 < p['token_fill'] < 1
  json.dumps(r)


def test_check_missing_file_does_not_crash(bad_dir, synthetic_dir):
  root, f = bad_dir
  r = check([str(root / 'nope.jsonl'), str(f)], root=str(root), cfg=_cfg(synthetic_dir))
  assert str(root / 'nope.jsonl') in r['file_errors'] and r['samples_read'] == 8


def test_check_embedded_dataset_is_clean(synthetic_dir):
  f = os.path.join(str(synthetic_dir), 'train', 'vqa.jsonl')
  r = check([f])                    # root: the parent of train/; tokenizer found there
  assert r['root'] == os.path.abspath(str(synthetic_dir))
  assert r['usable'] == r['samples_read'] > 0 and r['ok']
  assert 0 < r['packing']['padding_fraction'] < 1


def test_cli(bad_dir, synthetic_dir):
  root, f = bad_dir
  tok = os.path.join(str(synthetic_dir), 'tokenizer.model')
  out = subprocess.run(
      [sys.executable, '-m', 'unimedvl_jax.data', 'check', '--data', str(f), '--root', str(root),
       '--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--set',
       f'data.tokenizer_path={tok!r}', '--strict'],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  r = json.loads(out.stdout)
  assert r['samples_read'] == 8 and r['skipped']['malformed_json'] == 1


def test_jsonl_source_lines_and_parse_errors(tmp_path):
  from unimedvl_jax.data.jsonl import JsonlSource, SampleError, iter_records
  f = tmp_path / 'x.jsonl'
  rec = json.dumps({'message': [{'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'yo'}],
                    'input_img': [{'path': 'a/b.png', 'height': 4}], 'meta': {'k': 1}})
  f.write_bytes((rec + '\r\n\r\n\n' + '[1, 2]\n' + '{"message": []}\n' +
                 json.dumps({'message': [{'from': 'bot', 'value': 'x'}]}) + '\n' + rec).encode())
  src = JsonlSource([str(f)])
  assert len(src) == 5 and [src[i].line for i in range(5)] == [1, 4, 5, 6, 7]
  out = list(iter_records(str(f), root='/data'))
  s = out[0]
  assert s.input_img[0].path == '/data/a/b.png' and s.input_img[0].height == 4
  assert s.meta == {'k': 1} and s.loc == f'{f}:1' and out[4].loc == f'{f}:7'
  errs = [(e.reason, e.line) for e in out if isinstance(e, SampleError)]
  assert errs == [('malformed_json', 4), ('missing_fields', 5), ('missing_fields', 6)]
  assert 'must hold one JSON object' in str(out[1]) and "message[0] must be" in str(out[3])
