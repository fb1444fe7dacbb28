"""Sharded inference on 8 fake CPU devices (a subprocess: XLA_FLAGS must be set before jax is
imported): text decoding and image generation on a ('data' 4, 'tensor' 2) mesh give the
one-device outputs; the KV cache stays sharded (rows over 'data', kv heads over 'tensor')."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_mesh_outputs_equal_one_device():
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p))
  proc = subprocess.run([sys.executable, '-m', 'tests.infer.sharded_script'], env=env,
                        capture_output=True, text=True, timeout=1200, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('SHARDED_RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  r = json.loads(lines[-1][len('SHARDED_RESULT '):])
  assert r['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 2}
  assert r['tokens_mesh'] == r['tokens_one'] and all(len(t) == 4 for t in r['tokens_one'])
  assert r['logits_max_diff'] <= 1e-4 * max(1.0, r['logits_max']), r
  assert r['latents_max_diff'] <= 1e-4 * max(1.0, r['latents_max']), r
  # the cache is really distributed, and stays so after decoding
  assert r['cache_spec_in'] == r['cache_spec_out'] == "P('data', 'tensor')", r
  assert r['cache_devices'] == 8 and r['cache_one_device'] == 1
  assert 'tensor' in r['q_kernel_spec']
