"""Sharding of the training state and step (DESIGN.md "Sharding").

1. Golden per-parameter PartitionSpecs of the 7b config on data=1 x fsdp=16 x tensor=4
   (tests/scale/golden_7b_specs.json; regenerate after an intended rules change with
   `python -m tests.scale.regen_golden`). Abstract: jax.eval_shape + an AbstractMesh.
2. Under FSDP no parameter, EMA or optimizer tensor above 4 MiB is replicated, and the per-chip
   state is ~1/N of the whole.
3. (subprocess, 8 fake CPU devices) the data=2 x fsdp=2 x tensor=2 step gives the single-device
   step's loss and updated state, the state is really sharded, and the compiled step's
   collectives match the expectations stated in `test_sharded_step_*`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MiB = 1 << 20


@pytest.fixture(scope='module')
def golden_mod():
  from tests.scale import regen_golden
  return regen_golden


@pytest.fixture(scope='module')
def abstract_7b(golden_mod):
  from unimedvl_jax.train import step as step_lib
  _, abstract = step_lib.abstract_state(golden_mod.load_config('unimedvl_7b'))
  return abstract


def test_golden_7b_partition_specs(golden_mod, abstract_7b):
  from unimedvl_jax.train import step as step_lib
  sh = step_lib.state_shardings(abstract_7b, golden_mod.abstract_mesh(golden_mod.MESH))
  got = golden_mod.param_specs(abstract_7b, sh)
  with open(golden_mod.GOLDEN) as f:
    golden = json.load(f)
  assert golden['mesh'] == golden_mod.MESH
  keys = sorted(set(got) | set(golden['params']))
  diff = [k for k in keys if got.get(k) != golden['params'].get(k)]
  assert not diff, (f'{len(diff)} of {len(keys)} parameter specs differ from '
                    f'{golden_mod.GOLDEN} (after an intended change: python -m '
                    f'tests.scale.regen_golden): ' +
                    '; '.join(f'{k}: got {got.get(k)} golden {golden["params"].get(k)}'
                              for k in diff[:10]))
  # facts the file must keep whatever else changes
  p = golden['params']
  assert p['embed_tokens']['spec'] == ['tensor', 'fsdp']
  assert p['lm_head/kernel']['spec'] == ['fsdp', 'tensor']
  assert p['decoder/layers/und/mlp/gate_proj/kernel']['spec'] == [None, 'fsdp', 'tensor']
  assert p['decoder/layers/gen/o_proj/kernel']['spec'] == [None, 'tensor', 'fsdp']
  # the layer-stack axis is never sharded (scan slices it)
  assert all(v['spec'][0] is None for k, v in p.items() if k.startswith('decoder/layers/'))


@pytest.mark.parametrize('mesh', [(1, 16, 4), (1, 64, 1), (2, 32, 1)])
def test_fsdp_replicates_no_large_tensor(golden_mod, abstract_7b, mesh):
  import jax
  from unimedvl_jax.sharding import MESH_AXES
  from unimedvl_jax.train import step as step_lib
  sizes = dict(zip(MESH_AXES, mesh))
  sh = step_lib.state_shardings(abstract_7b, golden_mod.abstract_mesh(sizes))
  n = sizes['fsdp'] * sizes['tensor']      # the state is replicated over 'data' (hybrid FSDP)
  replicated, total, per_dev = [], 0, 0
  for item in ('params', 'ema', 'opt_state'):
    leaves = jax.tree_util.tree_flatten_with_path(abstract_7b[item])[0]
    shs = jax.tree.leaves(sh[item])
    assert len(leaves) == len(shs)
    for (path, x), s in zip(leaves, shs):
      nb = math.prod(x.shape) * np.dtype(x.dtype).itemsize
      sb = math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
      total += nb
      per_dev += sb
      if nb > 4 * MiB and sb == nb:
        replicated.append(f'{item}{jax.tree_util.keystr(path)} {tuple(x.shape)} {nb / MiB:.1f} MiB')
  assert not replicated, f'{len(replicated)} tensors > 4 MiB replicated on {sizes}: {replicated[:10]}'
  # per chip: ~1/(fsdp x tensor) of the 235 GB state (small replicated norms/biases aside)
  assert total > 200e9, total
  assert per_dev <= 1.05 * total / n + 64 * MiB, (per_dev / 2**30, total / n / 2**30)


def test_batch_that_does_not_divide_is_a_start_up_error(golden_mod):
  """configs/unimedvl_7b.py's batch 8 on v5p-128 (64 chips, fsdp=-1 -> 64 batch shards): the
  step builder raises ConfigError naming the batch and the mesh, before anything is compiled."""
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.train import step as step_lib
  cfg = golden_mod.load_config('unimedvl_7b')
  assert cfg.data.batch_size == 8
  mesh = golden_mod.abstract_mesh({'data': 1, 'fsdp': 64, 'tensor': 1})
  with pytest.raises(ConfigError, match=r'data\.batch_size=8 .*fsdp=64.* 64 shards'):
    step_lib.jit_train_step(None, None, mesh, batch_lib.batch_spec(cfg))


def test_large_tensor_the_rules_cannot_split_is_a_start_up_error(golden_mod, abstract_7b):
  """tensor=7 divides neither the MLP width (18944) nor the embed axis' rule (fsdp=1): the
  MLP kernels would be replicated on every chip; that is a ConfigError naming them."""
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.train import step as step_lib
  mesh = golden_mod.abstract_mesh({'data': 1, 'fsdp': 1, 'tensor': 7})
  with pytest.raises(ConfigError, match=r'tensor=7.*gate_proj.*max_replicated_bytes'):
    step_lib.state_shardings(abstract_7b, mesh)


def test_rules_are_config_with_fallbacks_and_heads_stay_whole(golden_mod):
  from jax.sharding import PartitionSpec as P
  from unimedvl_jax import sharding
  from unimedvl_jax.config import default_config
  m8 = golden_mod.abstract_mesh({'data': 1, 'fsdp': 2, 'tensor': 8})
  rules = sharding.Rules.from_config(default_config())
  # 2-D projections [embed, heads * head_dim]: 'tensor' only where it divides the heads
  assert sharding.logical_to_spec(('embed', 'q_heads'), (3584, 28 * 128), m8, rules,
                                  head_dim=128) == P('fsdp', None)     # 28 heads / 8: no
  assert sharding.logical_to_spec(('embed', 'q_heads'), (4096, 32 * 128), m8, rules,
                                  head_dim=128) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('embed', 'kv_heads'), (3584, 4 * 128), m8, rules,
                                  head_dim=128) == P('fsdp', None)     # mid-head otherwise
  # an ordered rule list: a name's next rule is its fallback
  cfg = default_config()
  cfg.mesh.rules = (('kv_heads', 'tensor'), ('kv_heads', 'fsdp'), ('embed', None))
  fb = sharding.Rules.from_config(cfg)
  assert sharding.logical_to_spec(('embed', 'kv_heads'), (3584, 4 * 128), m8, fb,
                                  head_dim=128) == P(None, 'fsdp')


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'JAX_', 'XLA_', 'SLURM_', 'OMPI_', 'MEGASCALE'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p))
  env.update(extra)
  return env


@pytest.fixture(scope='module')
def sharded_result():
  from unimedvl_jax.data import synthetic
  root = synthetic.ensure_dataset()
  env = _clean_env(XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-m', 'tests.scale.scale_sharded_step', root],
                        env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('SHARDED_RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  return json.loads(lines[-1][len('SHARDED_RESULT '):])


@pytest.mark.slow
def test_sharded_step_equals_single_device(sharded_result):
  r = sharded_result
  for k in ('loss', 'ce', 'mse', 'grad_norm'):
    np.testing.assert_allclose(r['sharded'][k], r['single'][k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert r['single']['loss'] > 0 and r['single']['ce'] > 0 and r['single']['mse'] > 0
  # one AdamW step of lr 1e-3 moves parameters by up to 1e-3; the sharded result agrees far below
  # that (eps 1e-4 in the script: see there); the moments (mu = 0.1 * g) agree to round-off
  assert r['max_diff']['params'] < 1e-6, r['max_diff']
  assert r['max_diff']['ema'] < 1e-6, r['max_diff']
  assert r['max_diff']['opt_state'] < 1e-7, r['max_diff']


@pytest.mark.slow
def test_sharded_step_state_is_sharded(sharded_result):
  s = sharded_result['sharding']
  # data=2 x fsdp=2 x tensor=2: matrices split over fsdp and tensor (1/4 per device); norms,
  # biases and small tables stay whole, so the per-device share is between 1/4 and 1/2
  for k in ('params_fraction', 'opt_state_fraction', 'ema_fraction'):
    assert 0.2 < s[k] < 0.5, (k, s[k])
  ex = s['examples']
  assert ex['embed_tokens']['spec'] == ['tensor', 'fsdp'], ex
  assert ex['embed_tokens']['shard'] == [ex['embed_tokens']['shape'][0] // 2,
                                         ex['embed_tokens']['shape'][1] // 2]
  g = ex['decoder/layers/und/mlp/gate_proj/kernel']
  assert g['shard'] == [g['shape'][0], g['shape'][1] // 2, g['shape'][2] // 2], g


@pytest.mark.slow
def test_sharded_step_collectives(sharded_result):
  """Expectations, and why:
  - dp8 (data=8, parameters replicated): no parameter is gathered, nothing is re-sharded, so
    there is no all-gather, reduce-scatter, all-to-all or collective-permute; gradients and the
    global token counts are summed with all-reduce (XLA combines them into a few ops, >= 1).
  - fsdp8 (fsdp=8): every fsdp-sharded parameter must be all-gathered before its matmul (the
    stacked layers inside the scan body, once per layer, in the forward and again in the
    backward), so the per-step all-gathers are at least the number of fsdp-sharded parameter
    leaves and at most ~4x that (fwd + bwd, x layers for the stacks; 106 for 37 leaves with
    jax/jaxlib 0.10.2). Gradients of sharded parameters are reduced to shards: on the CPU
    backend as all-reduce (+ slice), on TPU as reduce-scatter (see the AOT plans), so
    reduce-scatter + all-reduce >= 1. A few all-to-alls (12 here) are XLA's reshards of
    activations between batch- and feature-sharded layouts (embedding gather / its scatter-add
    transpose, layer boundaries); more than 16 would signal an activation-sharding regression.
  - mixed (2x2x2): both kinds appear (all-gather > 0, all-reduce > 0), plus collective-permutes
    for the tensor-parallel reshards.
  """
  c = sharded_result['collectives']
  dp, fs, mx = c['dp8']['per_step'], c['fsdp8']['per_step'], c['mixed']['per_step']
  assert dp['all-gather'] == 0 and dp['reduce-scatter'] == 0, dp
  assert dp['all-to-all'] == 0 and dp['collective-permute'] == 0, dp
  assert 1 <= dp['all-reduce'] <= 8, dp
  n_fsdp = sharded_result['expected']['fsdp8']['fsdp_sharded_param_leaves']
  assert n_fsdp > 0
  assert n_fsdp <= fs['all-gather'] <= 4 * n_fsdp * sharded_result['layers']['llm'], (fs, n_fsdp)
  assert fs['reduce-scatter'] + fs['all-reduce'] >= 1, fs
  assert fs['all-to-all'] <= 16 and fs['collective-permute'] == 0, fs
  assert mx['all-gather'] > 0 and mx['all-reduce'] > 0, mx
