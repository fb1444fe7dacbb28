"""The AOT plan of image generation (aot.plan_generation via benchmarks/bench_aot_infer.py) for a
2-layer tiny model on a TPU v5e 2x2 slice, compiled through libtpu in a subprocess. Skipped
without libtpu. (The 14.6B plans are in benchmarks/aot_infer/.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.libtpu import require_libtpu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.slow
def test_plan_generation_tiny(tmp_path):
  libtpu = require_libtpu()
  from unimedvl_jax import profiling
  from unimedvl_jax.config_load import load_config_file
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'JAX_', 'XLA_'))}
  env.update(JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1', PYTHONPATH=os.pathsep.join(
      p for p in (libtpu, ROOT, os.environ.get('PYTHONPATH', '')) if p))
  out = tmp_path / 'plan.json'
  over = ['model.llm.num_layers=2', 'model.vit.num_layers=1']
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_aot_infer.py'), '--config',
         os.path.join(ROOT, 'configs', 'tiny.py'), '--topology', 'v5e:2x2', '--mesh',
         'data=1,tensor=4', '--image-size', '64', '--out', str(out)]
  for o in over:
    cmd += ['--set', o]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0 and out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
  r = json.loads(out.read_text())
  assert 'error' not in r, r['error']
  assert r['devices'] == 4 and r['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 4}
  assert r['request']['latent_tokens'] == 16 and r['request']['rows_per_model_call'] == 2
  mem = r['memory']
  total = 4 * profiling.param_counts(load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'),
                                                      over).model)['total']   # fp32 bytes
  # weights sharded at most 4-way, some of them really sharded; every weight is an argument
  assert total / 4 <= mem['weights_bytes'] < total, (total, mem)
  assert mem['argument_size_in_bytes'] >= mem['weights_bytes']
  assert 0 < mem['peak_memory_in_bytes'] <= r['hbm']['usable_bytes'] and r['fits'] is True
  # cost_analysis of the step: the prepared model runs its layers one by one (no loop to miss)
  assert r['flops_per_chip'] > 0 and r['bytes_accessed_per_chip'] > 0
  assert r['loops_counted_once'] == [], r['loops_counted_once']
