"""Shared test fixtures (all test directories).

synthetic_dir   a small embedded dataset (48 synthetic subjects, 64 px, real sample files
                included), generated once per test session into a temporary directory.
tokenizer       the SentencePiece tokenizer of that dataset.
"""

from __future__ import annotations

import pytest

SYNTHETIC_KW = dict(seed=0, size=64, n_subjects=48, include_real=True)


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
  from unimedvl_jax.data import synthetic
  out = tmp_path_factory.mktemp('synthetic') / 'ds'
  synthetic.generate(str(out), **SYNTHETIC_KW)
  return out


@pytest.fixture(scope='session')
def synthetic_manifest(synthetic_dir):
  import json
  return json.loads((synthetic_dir / 'manifest.json').read_text())


@pytest.fixture(scope='session')
def tokenizer(synthetic_dir):
  from unimedvl_jax.data.tokenizer import load_tokenizer
  return load_tokenizer('sentencepiece', str(synthetic_dir / 'tokenizer.model'))
