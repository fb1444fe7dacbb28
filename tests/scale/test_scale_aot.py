"""AOT planning without hardware (unimedvl_jax/aot/): the real training step of a small
tiny-config variant compiled for a TPU v5e 2x2 slice through libtpu, in a subprocess.

Skipped when libtpu is not importable (install: pip install 'jax[tpu]==0.10.2', which pins
libtpu==0.0.42.1, the `aot` extra; it must not change jax/jaxlib). The big configurations are planned with
benchmarks/bench_aot.py (results in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.libtpu import require_libtpu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOPOLOGY = 'v5e:2x2'


def test_parse_topology():
  from unimedvl_jax import aot
  t = aot.parse_topology('v5p-128')
  assert (t.generation, t.name, t.chips) == ('v5p', 'v5p:4x4x4', 64)
  assert aot.parse_topology('v5p:4x4x4').accelerator_type == 'v5p-128'
  assert aot.parse_topology('v5e-256').name == 'v5e:16x16'
  assert aot.parse_topology('v5litepod-256').chips == 256
  assert aot.parse_topology('v6e-256').accelerator_type == 'v6e-256'
  assert aot.parse_topology('v5p-64').name == 'v5p:2x4x4'
  with pytest.raises(ValueError, match='unknown TPU generation'):
    aot.parse_topology('v9x:2x2')


def test_analyze_hlo_counts_loops_and_collectives():
  """The collective counter on a hand-written module: a while loop of 7 trips around a dot and
  an all-gather; the trip count comes from the condition (counter < 7, counter from 0)."""
  from unimedvl_jax import aot
  text = '''HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16] get-tuple-element(%p), index=1
  %w = f32[16,16] constant({...})
  %d = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[16,16] all-gather(%d), dimensions={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16]) tuple(%n, %d)
}

%cond (p.1: (s32[], f32[8,16])) -> pred[] {
  %p.1 = (s32[], f32[8,16]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %c = s32[] constant(7)
  ROOT %lt = pred[] compare(%i.1, %c), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]) tuple(%zero, %a)
  %w = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  %r = f32[8,16] get-tuple-element(%w), index=1
  ROOT %ar = f32[8,16] all-reduce(%r), to_apply=%cond
}
'''
  r = aot.analyze_hlo(text)
  assert r['while_trip_counts'] == [7] and r['unknown_trip_counts'] == 0
  assert r['while_loops'] == [{'trips': 7, 'op_name': '', 'float': True}]
  assert r['collectives']['static']['all-gather'] == 1
  assert r['collectives']['per_step']['all-gather'] == 7
  assert r['collectives']['per_step']['all-reduce'] == 1


def _tiny_cost_setup():
  """configs/tiny.py on one CPU device, with small packs (128 tokens, VAE latents from the
  cache: no VAE encoder in the step) and the reference attention (no attention loop)."""
  import jax
  from unimedvl_jax import sharding
  from unimedvl_jax.config import stage_train_config
  from unimedvl_jax.config_load import load_config_file
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'), [
      'data.batch_size=1', 'mesh.data=1', 'model.attention_impl=xla', 'data.seq_len=128',
      'data.max_sample_tokens=128', 'data.max_latent_tokens=16', 'data.max_vit_patches=64',
      'data.max_label_tokens=64', 'data.max_vae_images=2', 'data.vae_buckets=((32,32,2),)',
      'data.latent_cache=/latents'])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  return cfg, stage_train_config(cfg, 'foundation'), mesh, sharding.Rules.from_config(cfg)


def _full_unrolled_cost(cfg, tc, mesh, rules, lower_only):
  from unimedvl_jax.aot import cost_analysis
  from unimedvl_jax.aot.train_plan import lower_train_step, unrolled_variant
  v, tv = unrolled_variant(cfg, tc, {'llm': cfg.model.llm.num_layers,
                                     'vit': cfg.model.vit.num_layers})
  lowered = lower_train_step(v, tv, mesh, rules)[0]
  return cost_analysis(lowered if lower_only else lowered.compile())


def _check_scaled_cost(lower_only):
  from unimedvl_jax.aot.train_plan import train_step_cost
  cfg, tc, mesh, rules = _tiny_cost_setup()
  assert (cfg.model.llm.num_layers, cfg.model.vit.num_layers) == (4, 2)
  est = train_step_cost(cfg, tc, mesh, rules, lower_only=lower_only)
  full = _full_unrolled_cost(cfg, tc, mesh, rules, lower_only)
  assert set(est['variants']) == {'llm=1,vit=1', 'llm=2,vit=1', 'llm=1,vit=2'}
  assert est['loops_counted_once'] == [], est['loops_counted_once']
  assert est['per_layer']['llm']['flops'] > est['per_layer']['vit']['flops'] > 0
  # the fully unrolled program adds each layer's gradient into the whole [L, ...] stack (the
  # transpose of slicing layer i): a term quadratic in L of parameter size, which the scanned
  # step does not have and the linear scaling leaves out (0.25% of the FLOPs here)
  assert abs(est['flops'] - full['flops']) <= 0.01 * full['flops'], (est, full)
  assert abs(est['transcendentals'] - full['transcendentals']) <= 1e-3 * full['transcendentals']
  assert abs(est['bytes_accessed'] - full['bytes_accessed']) <= 0.03 * full['bytes_accessed']
  # the scan counts its body once: the 1-layer variant is far below the full step
  assert est['variants']['llm=1,vit=1']['flops'] < 0.7 * full['flops']


def test_scaled_cost_matches_fully_unrolled_step_lowered():
  """cost.scaled_cost via train_plan.train_step_cost on configs/tiny.py (4 decoder and 2 ViT
  layers, CPU): the 1- and 2-layer unrolled variants scaled linearly equal cost_analysis of the
  whole unrolled training step, on the lowered programs (fast: no XLA compile)."""
  _check_scaled_cost(lower_only=True)


@pytest.mark.slow
def test_scaled_cost_matches_fully_unrolled_step_compiled():
  """The same on the compiled (optimized) CPU programs: XLA's fusion keeps the layers linear."""
  _check_scaled_cost(lower_only=False)


@pytest.fixture(scope='module')
def aot_result():
  libtpu = require_libtpu()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'JAX_', 'XLA_', 'SLURM_', 'OMPI_', 'MEGASCALE'))}
  env.update(JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1', PYTHONPATH=os.pathsep.join(
      p for p in (libtpu, ROOT, os.environ.get('PYTHONPATH', '')) if p))
  proc = subprocess.run([sys.executable, '-m', 'tests.scale.scale_aot_script', TOPOLOGY],
                        env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('AOT_RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-8000:]
  return json.loads(lines[-1][len('AOT_RESULT '):])


@pytest.mark.slow
def test_plan_small_config(aot_result):
  r = aot_result['plan']
  print(json.dumps(r, indent=1))
  assert r['generation'] == 'v5e' and r['devices'] == 4 and r['device_kind'] == 'TPU v5 lite'
  assert r['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert r['fits'] is True
  mem = r['memory']
  assert 0 < mem['peak_memory_in_bytes'] <= r['hbm']['usable_bytes']
  # the sharded train state is part of the arguments (plus the batch), and aliased (donated)
  assert mem['argument_size_in_bytes'] >= mem['state_bytes'] > 0
  assert mem['alias_size_in_bytes'] > 0
  fl = r['flops']
  assert fl['unknown_trip_counts'] == 0
  assert 2 in fl['while_trip_counts']            # the 2 scanned decoder layers
  # cost_analysis of the unrolled 1- and 2-decoder-layer variants (1 ViT layer: no ViT variant),
  # with nothing left in a loop; it counts the Mosaic kernels' CostEstimate
  # (tests/kernels/test_flash_attention_tpu_aot.py)
  assert set(fl['variants']) == {'llm=1,vit=1', 'llm=2,vit=1'}, fl['variants']
  assert fl['loops_counted_once'] == [] and fl['per_layer']['llm']['flops'] > 0
  assert fl['compiled_per_chip'] > fl['xla_cost_analysis_raw']   # the scan's body counted once
  assert fl['bytes_accessed_per_chip'] > 0
  # compiled (incl. padding blocks, the frozen VAE's convs, remat none) vs analytic model FLOPs
  assert 0.7 < fl['compiled_over_analytic'] < 3.0, fl
  assert fl['xla_cost_analysis_raw'] > 0
  st = r['step_time']
  assert st['compute_bound_s'] > 0 and 0 < st['mfu_upper_bound'] <= 1.5
  coll = r['collectives']['per_step']
  assert coll['all-gather'] > 0 and coll['all-reduce'] > 0, coll


@pytest.mark.slow
def test_scaled_cost_matches_unrolled_cost_analysis(aot_result):
  """XLA:TPU's cost_analysis counts a scanned body once; cost.scaled_cost (1- and 2-layer
  unrolled variants, scaled linearly) equals cost_analysis of the unrolled program (and both
  the matmul FLOPs)."""
  t = aot_result['toy']
  assert abs(t['scaled'] - t['xla_unrolled']) <= 0.01 * t['xla_unrolled'], t
  assert abs(t['scaled'] - t['matmul_flops']) <= 0.01 * t['matmul_flops'], t
  assert t['loops_counted_once'] == [], t
  assert t['xla_scanned'] < 0.5 * t['xla_unrolled'], t     # the raw count misses the trips


@pytest.mark.slow
def test_out_of_memory_is_reported(aot_result):
  assert aot_result['oom_compiled'] is False
  oom = aot_result['oom']
  assert oom is not None and oom['message']
  assert oom.get('used_bytes', 0) > oom.get('capacity_bytes', 1) > 0, oom


@pytest.mark.slow
def test_plan_of_a_batch_that_does_not_divide_is_a_config_error():
  """configs/unimedvl_7b.py's batch 8 on v5p-128 (64 chips; fsdp=-1): a ConfigError naming the
  batch and the mesh at plan time (it used to be rounded up to 64 silently)."""
  libtpu = require_libtpu()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'JAX_', 'XLA_', 'SLURM_', 'OMPI_', 'MEGASCALE'))}
  env.update(JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1', PYTHONPATH=os.pathsep.join(
      p for p in (libtpu, ROOT, os.environ.get('PYTHONPATH', '')) if p))
  script = ("from unimedvl_jax import aot\n"
            "aot.prepare_env('v5p-128')\n"
            "from unimedvl_jax.config import ConfigError\n"
            "from unimedvl_jax.config_load import load_config_file\n"
            "cfg = load_config_file('configs/unimedvl_7b.py')\n"
            "try:\n"
            "  aot.plan(cfg, 'v5p-128')\n"
            "except ConfigError as e:\n"
            "  print('CONFIG_ERROR', e)\n")
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('CONFIG_ERROR ')]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  assert 'data.batch_size=8' in lines[0] and 'fsdp=64' in lines[0], lines[0]
