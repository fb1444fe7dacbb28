"""data/locate.py: the one rule for the data root and the tokenizer (training, inference,
evaluation, `data check` and the torch export all use it)."""

from __future__ import annotations

import os
import shutil

import pytest

from unimedvl_jax.config import default_config
from unimedvl_jax.data import locate
from unimedvl_jax.data.jsonl import DataError


def _cfg(**data):
  cfg = default_config()
  cfg.data.update(data)
  return cfg


def test_data_root_configured_is_expanded_and_absolute(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert locate.data_root(_cfg(root='~/ds')) == str(tmp_path / 'ds')
  monkeypatch.chdir(tmp_path)
  assert locate.data_root(_cfg(root='rel'), workdir='w') == str(tmp_path / 'rel')


def test_data_root_empty_is_the_embedded_dataset(tmp_path, monkeypatch):
  from unimedvl_jax.data import synthetic
  made = []

  def ensure(out_dir=None, **kw):        # stands in for the generation
    out_dir = out_dir or str(tmp_path / 'default')
    made.append((out_dir, kw))
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, 'manifest.json'), 'w').close()
    return out_dir
  monkeypatch.setattr(synthetic, 'ensure_dataset', ensure)
  assert locate.data_root(_cfg(root='')) == str(tmp_path / 'default')
  # training: under the workdir, at the config's VAE size, generated once
  cfg = _cfg(root='', vae_max_size=96)
  assert locate.data_root(cfg, str(tmp_path / 'wd')) == str(tmp_path / 'wd' / 'data')
  assert made[-1] == (str(tmp_path / 'wd' / 'data'), dict(seed=0, size=96))
  assert locate.data_root(cfg, str(tmp_path / 'wd')) == str(tmp_path / 'wd' / 'data')
  assert len(made) == 2


def test_jsonl_root(tmp_path):
  (tmp_path / 'a' / 'train').mkdir(parents=True)
  (tmp_path / 'a' / 'mine').mkdir()
  assert locate.jsonl_root(str(tmp_path / 'a' / 'mine' / 'x.jsonl')) == str(tmp_path / 'a' / 'mine')
  # a split directory: its parent
  assert locate.jsonl_root(str(tmp_path / 'a' / 'train' / 'x.jsonl')) == str(tmp_path / 'a')
  # a manifest.json above (the embedded layout) wins
  (tmp_path / 'm' / 'sub' / 'deeper').mkdir(parents=True)
  (tmp_path / 'm' / 'manifest.json').write_text('{}')
  assert locate.jsonl_root(str(tmp_path / 'm' / 'sub' / 'deeper' / 'x.jsonl')) == str(tmp_path / 'm')


def test_tokenizer_source_order(tmp_path):
  root = str(tmp_path)
  cfg = _cfg(root=root, tokenizer_path='', tokenizer_kind='sentencepiece')
  assert locate.tokenizer_source(cfg) == (os.path.join(root, 'tokenizer.model'), 'sentencepiece',
                                          'tokenizer.model under the data root')
  assert locate.tokenizer_source(cfg, '/other').path == '/other/tokenizer.model'
  cfg.data.tokenizer_path = str(tmp_path / 'hf' / 'tokenizer.json')
  assert locate.tokenizer_source(cfg)[1:] == ('hf', 'config.data.tokenizer_path')
  (tmp_path / 'dir').mkdir()
  (tmp_path / 'dir' / 'tokenizer.json').write_text('{}')
  src = locate.tokenizer_source(cfg, path=str(tmp_path / 'dir'))
  assert src == (str(tmp_path / 'dir'), 'hf', '--tokenizer')
  assert locate.tokenizer_source(cfg, path='x.model').kind == 'sentencepiece'


def test_load_tokenizer_messages_and_vocab_check(synthetic_dir, tmp_path):
  from unimedvl_jax.data.tokenizer import TokenizerError
  cfg = _cfg(root=str(tmp_path), tokenizer_path='')
  with pytest.raises(DataError, match="tokenizer file .*tokenizer.model' not found "
                     r'\(config.data.tokenizer_path, or tokenizer.model under the data root\)'):
    locate.load_tokenizer(cfg)
  with pytest.raises(TokenizerError, match='not found.*nope.model'):   # an explicit path
    locate.load_tokenizer(cfg, path=str(tmp_path / 'nope.model'))
  shutil.copy(synthetic_dir / 'tokenizer.model', tmp_path / 'tokenizer.model')
  tok = locate.load_tokenizer(cfg)
  assert tok.vocab_size > 0
  cfg.model.llm.vocab_size = 8
  with pytest.raises(DataError, match='vocab_size = 8'):
    locate.load_tokenizer(cfg)


def test_infer_load_tokenizer_prefers_the_data_root_and_refuses_a_missing_configured_one(
    synthetic_dir, tmp_path):
  from unimedvl_jax.infer.loading import LoadError, load_tokenizer
  shutil.copy(synthetic_dir / 'tokenizer.model', tmp_path / 'tokenizer.model')
  cfg = _cfg(root=str(tmp_path / 'nowhere'), tokenizer_path='')
  assert load_tokenizer(cfg, data_root=str(tmp_path)).path == str(tmp_path / 'tokenizer.model')
  with pytest.raises(LoadError, match='tokenizer: tokenizer file .*nowhere'):
    load_tokenizer(cfg, data_root=str(tmp_path / 'empty'))     # no tokenizer.model there
  cfg.data.tokenizer_path = str(tmp_path / 'moved' / 'tokenizer.model')
  with pytest.raises(LoadError, match='moved'):                # never silently another one
    load_tokenizer(cfg, data_root=str(tmp_path))


def test_checkpoint_tokenizer_dir(tmp_path):
  wd = tmp_path / 'wd'
  (wd / 'checkpoints').mkdir(parents=True)
  assert locate.checkpoint_tokenizer_dir(str(wd)) is None
  (wd / 'tokenizer').mkdir()
  assert locate.checkpoint_tokenizer_dir(str(wd)) == str(wd / 'tokenizer')
  assert locate.checkpoint_tokenizer_dir(str(wd / 'checkpoints')) == str(wd / 'tokenizer')
  (wd / 'checkpoints' / 'tokenizer').mkdir()
  assert locate.checkpoint_tokenizer_dir(str(wd / 'checkpoints')) == str(
      wd / 'checkpoints' / 'tokenizer')
