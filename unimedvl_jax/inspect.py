"""Inspect a configuration without hardware.

    python -m unimedvl_jax.inspect --config configs/unimedvl_7b.py [--config.KEY=VALUE ...]

prints JSON with parameter counts per component, `total` (without the VAE, counting the two frozen
sin-cos tables as the reference checkpoint does) and `vae`, computed abstractly (no allocation),
plus the analytic training FLOPs of one step at the config's budgets. With `--topology NAME`
(e.g. v5p:4x4x4) it AOT-compiles the real training step for that TPU topology (see
unimedvl_jax/aot/) and adds memory, compiled FLOPs and the implied step time.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags


def _topology_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--topology='):
      return a.split('=', 1)[1]
    if a == '--topology' and i + 1 < len(argv):
      return argv[i + 1]
  return None


if _topology_arg(sys.argv):
  # libtpu's environment and JAX_PLATFORMS=cpu must be set before jax initialises a backend
  from unimedvl_jax.aot import prepare_env
  prepare_env(_topology_arg(sys.argv))

config_flags.DEFINE_config_file('config', None, 'configs/*.py file', lock_config=True)
flags.DEFINE_string('topology', None, 'TPU topology to AOT-compile for, e.g. v5p:4x4x4')
flags.DEFINE_string('out', None, 'also write the JSON here')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from unimedvl_jax import profiling
  from unimedvl_jax.config_validate import validate
  cfg = validate(FLAGS.config)
  report = {'config': cfg.name, 'params': profiling.param_counts(cfg.model),
            'model_flops_per_step': profiling.model_flops_per_step(cfg)}
  if FLAGS.topology:
    from unimedvl_jax import aot
    report['aot'] = aot.plan(cfg, FLAGS.topology)
  text = json.dumps(report, indent=2)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
