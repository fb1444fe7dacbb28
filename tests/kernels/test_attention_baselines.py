"""The baseline backends vs `reference_attention` (model/attention.py), on CPU.

  splash  JAX's TPU splash attention with our per-pack dynamic mask (kernels/splash.py), run by
          the Pallas TPU interpreter (interpret=True);
  cudnn   jax.nn.dot_product_attention with the explicit mask (kernels/cudnn_attention.py), with
          implementation='xla' here (cuDNN itself needs a GPU: benchmarks/gpu_check.py).
Forward and dq/dk/dv, GQA 7:1, head dim 128, packs with causal, full and noise splits, both
layouts; plus the dispatcher's names and the config's seq_len / block rule. Tolerances as in
test_flash_attention.py (f32 2e-5 relative, bf16 2e-2 / 4e-2 against the f32 reference on the
same bf16 inputs).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import attention_packs as packs
from unimedvl_jax.config import ConfigError
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.kernels.cudnn_attention import cudnn_attention
from unimedvl_jax.kernels.splash import splash_attention
from unimedvl_jax.model.attention import attention, attention_mask, reference_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_fwd_bwd = packs.fwd_bwd


_reference = _fwd_bwd(reference_attention)


_rel_err = packs.rel_err


def _t(layout, *xs):
  return xs if layout == 'bthd' else tuple(x.transpose(0, 2, 1, 3) for x in xs)


CASES = {
    # name: (B, T, Hq, Hkv, D, dtype, layout); T=300 is not a multiple of the 128 block
    'gqa7_d128_f32': (2, 256, 14, 2, 128, jnp.float32, 'bthd'),
    'gqa7_d128_bf16_head_major_T300': (1, 300, 7, 1, 128, jnp.bfloat16, 'bhtd'),
}


def _check(attn, case):
  B, T, Hq, Hkv, D, dtype, layout = CASES[case]
  rng, meta = packs.batch_with_all_modes(zlib.crc32(case.encode()), B, T, pad_frac=0.3,
                                         max_item=96)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
  out, grads = _fwd_bwd(functools.partial(attn, layout=layout))(*_t(layout, q, k, v), *meta,
                                                                *_t(layout, ct))
  out, dq, dk, dv = _t(layout, out, *grads)
  ref, (rdq, rdk, rdv) = _reference(q, k, v, *meta, ct)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol_o, tol_g = (2e-5, 2e-5) if dtype == jnp.float32 else (2e-2, 4e-2)
  errs = {n: _rel_err(a, b) for n, a, b in
          (('out', out, ref), ('dq', dq, rdq), ('dk', dk, rdk), ('dv', dv, rdv))}
  assert errs['out'] <= tol_o, errs
  assert max(errs['dq'], errs['dk'], errs['dv']) <= tol_g, errs
  pad = np.asarray(meta[0] == 0)
  assert pad.any()
  assert np.all(np.asarray(out, np.float32)[pad] == 0.0)       # padding rows: exactly zero
  # keys no query may see (padding) get exactly zero gradients
  seen = np.asarray(attention_mask(*(jnp.asarray(x) for x in meta))).any(axis=1)
  assert np.all(np.asarray(dk, np.float32)[~seen] == 0.0)
  assert np.all(np.asarray(dv, np.float32)[~seen] == 0.0)
  return errs


@pytest.mark.parametrize('case', list(CASES))
def test_splash_matches_reference(case):
  _check(functools.partial(splash_attention, block=128, interpret=True), case)


@pytest.mark.parametrize('case', list(CASES))
def test_cudnn_call_matches_reference(case):
  _check(functools.partial(cudnn_attention, implementation='xla'), case)


@pytest.mark.parametrize('impl', ['splash', 'cudnn', 'pallas', 'xla'])
def test_dispatcher_names_and_head_major_layout(impl):
  """model.attention.attention(impl=..., layout='bhtd') reaches each backend (default blocks)."""
  rng = np.random.default_rng(5)
  B, T, Hq, Hkv, D = 1, 256, 4, 2, 64
  meta = packs.random_batch(rng, B, T)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D)
  f = jax.jit(functools.partial(attention, impl=impl, layout='bhtd'))
  out = f(*_t('bhtd', q, k, v), *meta)
  assert _rel_err(_t('bhtd', out)[0], reference_attention(q, k, v, *meta)) <= 2e-5


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match='unknown attention_impl'):
    attention(jnp.zeros((1, 8, 1, 8)), jnp.zeros((1, 8, 1, 8)), jnp.zeros((1, 8, 1, 8)),
              *(jnp.zeros((1, 8), jnp.int32),) * 3, impl='flash')


@pytest.mark.parametrize('name,impl,seq_len,bad', [
    ('unimedvl_7b', 'pallas', 20000, True), ('unimedvl_7b', 'pallas', 20480, False),
    # 'auto' is the blocked XLA attention on CPU (any length) and pads on an accelerator
    ('unimedvl_7b', 'auto', 20000, False), ('unimedvl_7b', 'splash', 20224, True),
    ('unimedvl_7b', 'splash', 20480, False), ('unimedvl_7b', 'cudnn', 20000, False),
    ('unimedvl_7b', 'xla', 20000, False),
    ('tiny', 'pallas', 384, False), ('tiny', 'pallas', 320, True)])   # short: one 384 block
def test_config_requires_seq_len_multiple_of_the_kernel_block(name, impl, seq_len, bad):
  cfg = os.path.join(ROOT, 'configs', f'{name}.py')
  ov = [f'model.attention_impl={impl}', f'data.seq_len={seq_len}']
  if bad:
    with pytest.raises(ConfigError, match='config.data.seq_len: must be a multiple of'):
      load_config_file(cfg, ov)
  else:
    assert load_config_file(cfg, ov).data.seq_len == seq_len


def test_7b_config_runs_every_kernel_without_padding():
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'unimedvl_7b.py'),
                         ['model.attention_impl=pallas'])
  assert cfg.data.seq_len == 20480 and cfg.data.seq_len % 512 == 0


def test_gpu_check_measures_nothing_without_a_gpu(capsys):
  """benchmarks/gpu_check.py never estimates: on CPU without --dry-run it exits with status 2.
  (`--dry-run` runs every part at tiny shapes: ~6 minutes on 2 shared cores, not run here.)"""
  spec = importlib.util.spec_from_file_location(
      'gpu_check', os.path.join(ROOT, 'benchmarks', 'gpu_check.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.main([]) == 2
  assert 'no GPU here' in capsys.readouterr().err
  assert mod.datasheet_peak('NVIDIA H200') == 989.4e12 and mod.datasheet_peak('TPU v5') is None
