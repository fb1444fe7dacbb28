"""Parameter counts of the released dimensions, computed abstractly."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')


def test_inspect_7b_counts():
  out = subprocess.run([sys.executable, '-m', 'unimedvl_jax.inspect', '--config',
                        os.path.join(ROOT, 'configs', 'unimedvl_7b.py')],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  rep = json.loads(out.stdout)
  p = rep['params']
  assert p['total'] == 14_607_260_128
  # component figures of SPEC section 2
  assert p['vit'] == 402_552_736
  assert p['connector'] == 16_980_992
  assert p['vit_pos_embed'] == 4900 * 3584
  assert p['latent_pos_embed'] == 4096 * 3584
  assert p['time_embedder'] == 13_769_728
  assert p['vae2llm'] == 232_960 and p['llm2vae'] == 229_440
  assert round(p['llm_und'] / 1e9, 3) == 7.616 and round(p['llm_gen'] / 1e9, 3) == 6.526
  assert 80e6 < p['vae'] < 90e6
