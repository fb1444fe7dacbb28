"""Shared pieces of the interop tests: the tiny config they convert, a model with every leaf
random, and a bit-exact comparison of two models' parameters."""

import os

import jax
import numpy as np
from flax import nnx

from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.interop import keymap as km

TINY = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')
OVERRIDES = ['model.llm.num_layers=2', 'model.llm.vocab_size=256', 'model.vit.num_layers=3']


def tiny_cfg(param_dtype='float32'):
  return load_config_file(TINY, OVERRIDES + [f'model.param_dtype={param_dtype}'])


def random_model(cfg, seed=0):
  """UniMedVL with every leaf random (no zero-init / all-ones leaf hides a transpose bug)."""
  graphdef, state = km.abstract_split(cfg.model)    # abstract: shapes/dtypes only
  rng = np.random.default_rng(seed)
  flat = [(p, v.replace(jax.numpy.asarray(rng.standard_normal(v.shape).astype(v.dtype))))
          for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def flat_np(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_bit_exact(a, b):
  fa, fb = flat_np(a), flat_np(b)
  assert set(fa) == set(fb)
  for p in fa:
    assert fa[p].dtype == fb[p].dtype, p
    np.testing.assert_array_equal(fa[p].view(np.uint8), fb[p].view(np.uint8), err_msg=str(p))
