"""Sharded vs single-device training step on 8 fake CPU devices (run by test_scale_sharding.py
in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8; not a test module).

    python -m tests.scale.scale_sharded_step DATA_ROOT   (from the repo root)

Prints one line 'SHARDED_RESULT {json}' with
  single / sharded : loss, ce, mse, grad_norm of one step on the same batch and state
  max_param_diff   : max |p_single - p_sharded| over the updated parameters (and EMA, moments)
  sharding         : per-device fraction of the parameter / optimizer bytes, and the specs of a
                     few parameters, on the data=2 x fsdp=2 x tensor=2 mesh
  collectives      : per mesh ('dp8' = data 8, 'fsdp8' = fsdp 8, 'mixed' = 2x2x2) the static and
                     per-step counts of the compiled step's collectives (unimedvl_jax.aot.analyze_hlo)
  expected         : facts the test compares the counts with (sharded parameter uses per step)
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np


def _fsdp_leaves(st_sh) -> int:
  """Parameters whose storage is split over 'fsdp' (each must be all-gathered to be used)."""
  import jax
  return len([s for s in jax.tree.leaves(st_sh['params'])
              if any(e == 'fsdp' or (isinstance(e, tuple) and 'fsdp' in e) for e in s.spec)])


def main():
  data_root = sys.argv[1]
  import jax
  import optax
  from flax import nnx
  from unimedvl_jax import aot, sharding
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax.config import stage_train_config
  from unimedvl_jax.data import pipeline
  from unimedvl_jax.train import step as step_lib
  from tests.helpers.scale_configs import small_config

  assert jax.device_count() == 8, jax.devices()
  cfg = small_config(data_root)
  # AdamW's first step moves every parameter by ~lr * g / (|g| + eps): with the default eps 1e-15
  # a parameter whose gradient is ~0 moves by +-lr on the sign of round-off, so the comparison
  # of updated parameters uses eps 1e-4 (well conditioned); the gradients themselves are compared
  # through the first moments (mu = (1 - b1) * g) in 'opt_state'.
  cfg.train.eps = 1e-4
  tc = stage_train_config(cfg, 'foundation')
  it = pipeline.make_train_iterator(cfg, 'foundation')
  host_batch = next(it)
  spec = batch_lib.batch_spec(cfg)
  graphdef, state0 = step_lib.init_state(cfg)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state0)
  schedule = optax.constant_schedule(1e-3)     # one AdamW step of lr 1e-3
  fn = step_lib.make_train_step(graphdef, cfg, tc, schedule=schedule)
  host_state = jax.tree.map(np.asarray, state0)

  def run(mesh_sizes, devices):
    mesh = sharding.make_mesh(mesh_sizes, devices)
    jitted, st_sh, b_sh = step_lib.jit_train_step(fn, abstract, mesh, spec)
    st = jax.device_put(host_state, st_sh)
    b = {k: jax.device_put(v, b_sh[k]) for k, v in host_batch.items()}
    compiled = jitted.lower(st, b).compile()
    new, m = compiled(st, b)
    return compiled, new, {k: float(m[k]) for k in ('loss', 'ce', 'mse', 'grad_norm')}

  _, s1, m1 = run({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  mixed_compiled, s8, m8 = run({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices())
  diffs = {}
  for k in ('params', 'ema', 'opt_state'):
    a, b = jax.tree.leaves(s1[k]), jax.tree.leaves(s8[k])
    diffs[k] = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(a, b))

  def per_device_fraction(tree):
    tot = dev = 0
    for x in jax.tree.leaves(tree):
      nb = x.size * x.dtype.itemsize
      tot += nb
      dev += math.prod(x.addressable_shards[0].data.shape) * x.dtype.itemsize
    return dev / tot
  flat = dict(nnx.to_flat_state(s8['params']))
  show = {}
  for path, v in flat.items():
    key = '/'.join(map(str, path))
    if key in ('embed_tokens', 'lm_head/kernel', 'decoder/layers/und/mlp/gate_proj/kernel',
               'decoder/layers/und/q_proj/kernel', 'vit/encoder/layers/mlp/fc1/kernel'):
      arr = v[...]
      spec_list = [list(e) if isinstance(e, tuple) else e for e in arr.sharding.spec]
      spec_list += [None] * (arr.ndim - len(spec_list))
      show[key] = {'spec': spec_list, 'shape': list(arr.shape),
                   'shard': list(arr.addressable_shards[0].data.shape)}
  shard_info = {'params_fraction': per_device_fraction(s8['params']),
                'opt_state_fraction': per_device_fraction(s8['opt_state']),
                'ema_fraction': per_device_fraction(s8['ema']), 'examples': show}

  # collectives of the compiled step on three 8-device meshes
  abatch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}
  colls = {}
  expected = {}
  for name, sizes in (('dp8', {'data': 8, 'fsdp': 1, 'tensor': 1}),
                      ('fsdp8', {'data': 1, 'fsdp': 8, 'tensor': 1}),
                      ('mixed', {'data': 2, 'fsdp': 2, 'tensor': 2})):
    mesh = sharding.make_mesh(sizes, jax.devices())
    if name == 'mixed':      # the step run above: reuse its executable
      colls[name] = aot.analyze_hlo(mixed_compiled.as_text())['collectives']
      _, st_sh, _ = step_lib.jit_train_step(fn, abstract, mesh, spec)
      expected[name] = {'fsdp_sharded_param_leaves': _fsdp_leaves(st_sh)}
      continue
    c_cfg = cfg
    if sizes['data'] * sizes['fsdp'] > cfg.data.batch_size:
      c_cfg = cfg.copy_and_resolve_references()
      c_cfg.data.batch_size = sizes['data'] * sizes['fsdp']
    c_spec = batch_lib.batch_spec(c_cfg)
    c_fn = step_lib.make_train_step(graphdef, c_cfg, tc, schedule=schedule)
    jitted, st_sh, _ = step_lib.jit_train_step(c_fn, abstract, mesh, c_spec)
    abatch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in c_spec.items()}
    comp = jitted.lower(abstract, abatch).compile()
    colls[name] = aot.analyze_hlo(comp.as_text())['collectives']
    expected[name] = {'fsdp_sharded_param_leaves': _fsdp_leaves(st_sh)}
  print('SHARDED_RESULT ' + json.dumps({
      'single': m1, 'sharded': m8, 'max_diff': diffs, 'sharding': shard_info,
      'collectives': colls, 'expected': expected,
      'layers': {'llm': int(cfg.model.llm.num_layers), 'vit': int(cfg.model.vit.num_layers)}}),
      flush=True)


if __name__ == '__main__':
  main()
