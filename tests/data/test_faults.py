"""Bad input injected line by line: every per-sample failure is skipped under a named reason
(never an exception out of the pipeline), decompression bombs are refused from their header,
paths cannot leave the data root, FIFOs / devices never hang, a BOM is accepted, an empty JSONL
is an error, and `data check` runs on a user's own JSONL with the embedded tokenizer."""

import json
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.data import check as check_lib
from unimedvl_jax.data import images as I
from unimedvl_jax.data import packer as packer_lib
from unimedvl_jax.data import pipeline
from unimedvl_jax.data import samples as samples_lib
from unimedvl_jax.data.jsonl import (SAMPLE_ERROR_DOCS, SAMPLE_ERROR_REASONS, DataError,
                                     JsonlSource, RawLine, SampleError, parse_record)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rec(path='img/ok.png', answer='yes', **img):
  return {'main_task_type': 'vqa', 'input_img': [dict(path=path, **img)],
          'message': [{'from': 'human', 'value': '<image>\nIs it normal?'},
                      {'from': 'gpt', 'value': answer}]}


def _raw(text, line=1):
  return RawLine('/d/x.jsonl', line, text)


def _reason(text, root='/d', **kw):
  with pytest.raises(SampleError) as e:
    parse_record(_raw(text), root, **kw)
  return e.value.reason, e.value.detail


# --------------------------------------------------------------------------- parse_record


@pytest.mark.parametrize('value', ['Infinity', '-Infinity', 'NaN', '1e400', '2.5', 'true', '"7"'])
def test_non_integer_heights_are_missing_fields(value):
  text = json.dumps(_rec()).replace('"path": "img/ok.png"', f'"path": "img/ok.png", "height": {value}')
  assert json.loads(text)['input_img'][0]['height'] is not None   # the line is valid JSON
  reason, detail = _reason(text)
  assert reason == 'missing_fields' and 'input_img[0].height must be a finite integer' in detail


def test_lone_surrogate_is_invalid_text():
  text = json.dumps(_rec(answer='ok')).replace('"ok"', '"o\\ud800k"')
  assert json.loads(text)['message'][1]['value'] == 'o\ud800k'
  reason, detail = _reason(text)
  assert reason == 'invalid_text' and 'message[1].value' in detail and "'\\ud800'" in detail
  path = json.dumps(_rec(path='a\\ud801.png'))
  assert _reason(path.replace('\\\\', '\\'))[0] == 'invalid_text'


@pytest.mark.parametrize('window', [5, 'lungs', [40], [40, 0], [40, 'x'], {'c': 1}, [1e400, 5]])
def test_bad_windows_are_missing_fields(window):
  reason, detail = _reason(json.dumps(_rec(window=window)))
  assert reason == 'missing_fields' and 'input_img[0].window' in detail


def test_good_windows_parse():
  s = parse_record(_raw(json.dumps(_rec(window='lung'))), '/d')
  assert s.input_img[0].window == 'lung'
  s = parse_record(_raw(json.dumps(_rec(window=[40, 400]))), '/d', max_image_pixels=123)
  assert s.input_img[0].window == (40.0, 400.0) and s.input_img[0].max_pixels == 123


def test_reasons_are_documented():
  assert set(SAMPLE_ERROR_REASONS) == set(SAMPLE_ERROR_DOCS) and 'other' not in SAMPLE_ERROR_DOCS
  assert set(I.REASONS) <= set(SAMPLE_ERROR_REASONS)
  assert all(len(v) > 20 for v in SAMPLE_ERROR_DOCS.values())


# ------------------------------------------------------------------------------ paths


@pytest.fixture
def rooted(tmp_path):
  """root/ with img/ok.png, a symlink inside pointing in, one pointing out; outside.png beside."""
  root = tmp_path / 'root'
  (root / 'img').mkdir(parents=True)
  Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / 'img' / 'ok.png')
  Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / 'outside.png')
  os.symlink(root / 'img' / 'ok.png', root / 'img' / 'in_link.png')
  os.symlink(tmp_path / 'outside.png', root / 'img' / 'out_link.png')
  os.symlink(tmp_path, root / 'up')      # a directory symlink leading out
  return root, tmp_path / 'outside.png'


def test_paths_confined_to_the_root(rooted):
  root, outside = rooted
  for p in ('../outside.png', str(outside), 'img/out_link.png', 'up/outside.png',
            'img/../../outside.png'):
    reason, detail = _reason(json.dumps(_rec(path=p)), str(root))
    assert reason == 'path_outside_root', p
    assert str(outside) in detail and 'allow_outside_root' in detail
  for p in ('img/ok.png', 'img/in_link.png', str(root / 'img' / 'ok.png'), './img/../img/ok.png'):
    s = parse_record(_raw(json.dumps(_rec(path=p))), str(root))
    assert os.path.realpath(s.input_img[0].path) == str(root / 'img' / 'ok.png')
  s = parse_record(_raw(json.dumps(_rec(path='../outside.png'))), str(root),
                   allow_outside_root=True)
  assert I.load_image(s.input_img[0].path)[0, 0, 0] == 200


def _run_with_timeout(fn, seconds=20):
  out = {}

  def target():
    try:
      out['value'] = fn()
    except Exception as e:  # noqa: BLE001
      out['error'] = e
  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), 'hung'
  return out


def test_fifo_and_devices_are_refused_without_hanging(tmp_path):
  fifo = tmp_path / 'pipe.png'
  os.mkfifo(fifo)
  for p in (str(fifo), '/dev/zero'):
    out = _run_with_timeout(lambda: I.load_image(p))
    e = out.get('error')
    assert isinstance(e, I.ImageError) and e.reason == 'not_a_regular_file', out
  out = _run_with_timeout(lambda: JsonlSource([str(fifo)]))
  assert isinstance(out.get('error'), DataError) and 'pipe.png' in str(out['error'])


def test_bom_accepted_and_empty_jsonl_is_an_error(tmp_path):
  f = tmp_path / 'bom.jsonl'
  f.write_bytes(b'\xef\xbb\xbf' + json.dumps(_rec()).encode() + b'\n' +
                json.dumps(_rec(answer='no')).encode() + b'\n')
  src = JsonlSource([str(f)])
  assert len(src) == 2 and [src[i].line for i in range(2)] == [1, 2]
  assert parse_record(src[0], str(tmp_path)).message[1].text == 'yes'
  for name, data in (('empty.jsonl', b''), ('blank.jsonl', b'\n \r\n\n'), ('bomonly.jsonl',
                                                                            b'\xef\xbb\xbf\n')):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=f'{name} holds no sample'):
      JsonlSource([str(tmp_path / name)])


# ------------------------------------------------------------------------- decompression bombs


def _png_header_only(path, w, h, bit_depth=16):
  """A PNG whose IHDR declares w x h grey pixels, with a tiny (wrong) IDAT: only the header is
  valid, as in a bomb whose pixels are never decoded."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  ihdr = struct.pack('>IIBBBBB', w, h, bit_depth, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
                   chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


def test_pixel_cap_from_config():
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'unimedvl_7b.py'))
  cap = pipeline.sample_pixel_cap(cfg)
  d = cfg.data
  vit = min(d.vit_max_size ** 2, d.vit_max_pixels)
  assert cap == max(32 * max(vit, d.vae_max_size ** 2), 4096 ** 2) == 32 * 1024 ** 2
  assert 9000 * 9000 > cap > 5355 * 4915     # the bomb out, a large mammogram in
  tiny = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  assert pipeline.sample_pixel_cap(tiny) == 4096 ** 2


def test_bombs_refused_from_the_header(tmp_path):
  _png_header_only(tmp_path / 'bomb.png', 9000, 9000)
  assert os.path.getsize(tmp_path / 'bomb.png') < 200
  with pytest.raises(I.ImageError) as e:
    I.load_image(tmp_path / 'bomb.png', max_pixels=32 * 1024 ** 2)
  assert e.value.reason == 'image_too_large' and '9000 x 9000' in str(e.value)
  # a real image: refused above the cap, decoded at it
  Image.fromarray(np.full((30, 50), 7, np.uint8)).save(tmp_path / 'small.png')
  with pytest.raises(I.ImageError, match='image_too_large'):
    I.load_image(tmp_path / 'small.png', max_pixels=1499)
  assert I.load_image(tmp_path / 'small.png', max_pixels=1500).shape == (30, 50, 3)


def test_nifti_and_dicom_bombs_refused_from_the_header(tmp_path):
  nib = pytest.importorskip('nibabel')
  nib.save(nib.Nifti1Image(np.zeros((40, 30, 4), np.float32), np.eye(4)), str(tmp_path / 'v.nii'))
  with pytest.raises(I.ImageError, match='image_too_large.*in-plane'):
    I.load_image(tmp_path / 'v.nii', max_pixels=1199)
  assert I.load_image(tmp_path / 'v.nii', max_pixels=1200).shape == (30, 40, 3)
  nib.save(nib.Nifti1Image(np.zeros((10, 10, 40), np.float32), np.eye(4)), str(tmp_path / 't.nii'))
  with pytest.raises(I.ImageError, match='image_too_large.*volume'):
    I.load_image(tmp_path / 't.nii', max_pixels=200)     # 4000 voxels > 16 x 200
  pydicom = pytest.importorskip('pydicom')
  ds = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
  n = int(ds.Rows) * int(ds.Columns)
  with pytest.raises(I.ImageError, match='image_too_large.*Rows x Columns'):
    I.load_image(pydicom.data.get_testdata_file('CT_small.dcm'), max_pixels=n - 1)
  assert I.load_image(pydicom.data.get_testdata_file('CT_small.dcm'), max_pixels=n).shape[:2] == (
      ds.Rows, ds.Columns)


def test_bad_window_argument_is_a_value_error(tmp_path):
  nib = pytest.importorskip('nibabel')
  nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), str(tmp_path / 'v.nii'))
  for w in (5, 'lungs', (1, 2, 3), (0, -1)):
    with pytest.raises(ValueError, match='window'):
      I.load_image(tmp_path / 'v.nii', window=w)


# --------------------------------------------------------------- the pipeline never raises


@pytest.fixture
def cfg(synthetic_dir):
  c = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  c.data.root = str(synthetic_dir)
  c.data.tokenizer_path = os.path.join(str(synthetic_dir), 'tokenizer.model')
  return c


def _nifti_rec():
  return {'main_task_type': 'vqa', 'input_img': [{'path': 'vol.nii.gz', 'window': 5}],
          'message': [{'from': 'human', 'value': '<image>\nWhat is it?'},
                      {'from': 'gpt', 'value': 'a volume'}]}


def test_sample_processor_never_raises(cfg, tmp_path, monkeypatch):
  nib = pytest.importorskip('nibabel')
  nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), str(tmp_path / 'vol.nii.gz'))
  Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / 'ok.png')
  proc = pipeline.SampleProcessor(cfg, 'g', str(tmp_path))
  ok = json.dumps(_rec(path='ok.png'))
  cases = {
      ok.replace('"path": "ok.png"', '"path": "ok.png", "height": Infinity'): 'missing_fields',
      ok.replace('"path": "ok.png"', '"path": "ok.png", "width": NaN'): 'missing_fields',
      ok.replace('"path": "ok.png"', '"path": "ok.png", "height": 1e400'): 'missing_fields',
      ok.replace('"yes"', '"y\\udfffes"'): 'invalid_text',
      json.dumps(_nifti_rec()): 'missing_fields',
      json.dumps(_rec(path='../x.png')): 'path_outside_root',
  }
  for text, want in cases.items():
    el = proc(_raw(text))
    assert isinstance(el, pipeline.Bad) and el.reason == want, (text, el.reason, el.detail)
    assert el.loc == '/d/x.jsonl:1'
  assert isinstance(proc(_raw(ok)), pipeline.Good)

  # the tokenizer failing on a text -> invalid_text; any other exception -> processing_error
  class Picky:
    def __init__(self, tok):
      self.tok = tok

    def encode(self, text):
      if 'yes' in text:
        raise RuntimeError('Unable to cast Python instance')
      return self.tok.encode(text)

    def __getattr__(self, n):
      return getattr(self.tok, n)
  proc._tok = Picky(proc.tokenizer)
  el = proc(_raw(ok))
  assert el.reason == 'invalid_text' and 'Unable to cast' in el.detail
  proc._tok = proc._tok.tok

  def boom(*a, **k):
    raise KeyError('unforeseen')
  monkeypatch.setattr(samples_lib, 'plan_sample', boom)
  el = proc(_raw(ok))
  assert el.reason == 'processing_error' and el.detail == "KeyError: 'unforeseen'"


def test_train_iterator_skips_tokenize_failures(cfg, monkeypatch):
  real = pipeline.tokenize
  calls = {'n': 0}

  def flaky(items, *a, **k):
    calls['n'] += 1
    if calls['n'] % 5 == 2:
      raise ZeroDivisionError('injected')
    return real(items, *a, **k)
  monkeypatch.setattr(packer_lib, 'tokenize', flaky)
  cfg.data.max_bad_fraction = 0.5
  it = pipeline.make_train_iterator(cfg)
  for _ in range(3):
    next(it)
  st = it.stats()
  assert st['skipped']['processing_error'] >= 2 and st['batches'] == 3
  assert any('ZeroDivisionError: injected' in e for e in st['examples']['processing_error'])


# --------------------------------------------------------------------------------- data check


def _user_dataset(d):
  """A user's own dataset: no tokenizer anywhere near it; one line of every kind listed in the
  issue plus good ones."""
  nib = pytest.importorskip('nibabel')
  d.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(d / 'ok.png')
  nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), str(d / 'vol.nii.gz'))
  _png_header_only(d / 'bomb.png', 9000, 9000)
  ok = json.dumps(_rec(path='ok.png'))
  lines = [ok,
           ok.replace('"path": "ok.png"', '"path": "ok.png", "height": Infinity'),
           ok.replace('"path": "ok.png"', '"path": "ok.png", "height": NaN'),
           ok.replace('"path": "ok.png"', '"path": "ok.png", "height": 1e400'),
           ok.replace('"yes"', '"\\ud800"'),
           json.dumps(_nifti_rec()),
           json.dumps(_rec(path='bomb.png')),
           json.dumps(_rec(path='../elsewhere.png')),
           json.dumps(_rec(path='ok.png', answer='no'))]
  f = d / 'mine.jsonl'
  f.write_bytes(b'\xef\xbb\xbf' + '\n'.join(lines).encode() + b'\n')
  return f


def test_check_user_jsonl_with_embedded_tokenizer(synthetic_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('UNIMEDVL_DATA_DIR', str(synthetic_dir))   # the embedded dataset's home
  f = _user_dataset(tmp_path / 'user')
  r = check_lib.check([str(f)])
  assert r['tokenizer'] == os.path.join(str(synthetic_dir), 'tokenizer.model')
  assert r['samples_read'] == 9 and r['usable'] == 2, r
  assert {k: v for k, v in r['skipped'].items() if v} == {
      'missing_fields': 4, 'invalid_text': 1, 'image_too_large': 1, 'path_outside_root': 1}
  assert set(r['skipped']) == set(SAMPLE_ERROR_REASONS) and 'other' not in r['skipped']
  assert any(':6: ' in e and 'window' in e for e in r['examples']['missing_fields'])
  assert 'bomb.png' in r['examples']['image_too_large'][0]


def test_check_generates_the_embedded_tokenizer_when_absent(synthetic_dir, tmp_path, monkeypatch):
  from unimedvl_jax.data import synthetic
  home = tmp_path / 'cache' / 'ds'
  monkeypatch.setattr(synthetic, 'default_root', lambda *a, **k: str(home))
  made = []

  def ensure(out_dir=None, **kw):      # stands in for the ~20 s generation
    made.append(out_dir)
    os.makedirs(out_dir)
    os.link(os.path.join(str(synthetic_dir), 'tokenizer.model'), os.path.join(out_dir,
                                                                               'tokenizer.model'))
    return out_dir
  monkeypatch.setattr(synthetic, 'ensure_dataset', ensure)
  assert check_lib.embedded_tokenizer_path() == str(home / 'tokenizer.model')
  assert made == [str(home)]


def test_check_cli_tokenizer_flag_sentencepiece_and_hf(synthetic_dir, tmp_path, capsys):
  from unimedvl_jax.data.__main__ import main
  from tokenizers import Tokenizer, models, pre_tokenizers
  from unimedvl_jax.data.tokenizer import SPECIAL_TOKENS
  f = _user_dataset(tmp_path / 'user')
  assert main(['check', '--data', str(f), '--tokenizer',
               os.path.join(str(synthetic_dir), 'tokenizer.model')]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r['usable'] == 2 and r['tokenizer'].endswith('tokenizer.model')
  words = sorted({w for w in 'Is it normal ? yes no'.split()})
  vocab = {w: i for i, w in enumerate(['[UNK]'] + words)}
  hf = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.add_special_tokens(list(SPECIAL_TOKENS))
  hf.save(str(tmp_path / 'tokenizer.json'))
  assert main(['check', '--data', str(f), '--tokenizer', str(tmp_path / 'tokenizer.json')]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r['usable'] == 2 and r['tokenizer'] == str(tmp_path / 'tokenizer.json')
  # a wrong path: exit 2, and the hint names the flag that works
  assert main(['check', '--data', str(f), '--tokenizer', str(tmp_path / 'nope.model')]) == 2
  err = json.loads(capsys.readouterr().out)['error']
  assert 'nope.model' in err and '--tokenizer PATH' in err


def test_check_reports_an_empty_file(synthetic_dir, tmp_path):
  (tmp_path / 'empty.jsonl').write_text('')
  r = check_lib.check([str(tmp_path / 'empty.jsonl')], tokenizer=os.path.join(
      str(synthetic_dir), 'tokenizer.model'))
  assert 'holds no sample' in r['file_errors'][str(tmp_path / 'empty.jsonl')] and not r['ok']
