"""Train UniMedVL through its curriculum.

    python -m unimedvl_jax.train --config configs/tiny.py --workdir DIR [--config.KEY=VALUE ...]

Writes DIR/metrics.jsonl, TensorBoard events (DIR/tb), checkpoints (DIR/checkpoints). Running the
same command again resumes from the newest readable checkpoint. `--evaluate` runs the evaluation
harness on the held-out split afterwards and writes DIR/eval/report.json and sample outputs.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'configs/*.py file', lock_config=False)
flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, samples)')
flags.DEFINE_integer('max_steps', None, 'stop after this many steps of this invocation')
flags.DEFINE_bool('evaluate', False, 'evaluate the final EMA weights on the test split')
flags.DEFINE_integer('eval_samples', 48, 'samples per task for --evaluate')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint step at INFO
  from unimedvl_jax.train.checkpoint_format import CheckpointError
  from unimedvl_jax.train.loop import train
  from unimedvl_jax.train.workdir import WorkdirBusyError
  if FLAGS.evaluate:   # a bad eval.* sampler setting fails now, not after training
    from unimedvl_jax.config import ConfigError
    from unimedvl_jax.infer.image import eval_flow_settings
    try:
      eval_flow_settings(FLAGS.config)
    except ConfigError as e:
      print(f'ConfigError: {e}', file=sys.stderr, flush=True)
      sys.exit(1)
  try:
    summary = train(FLAGS.config, FLAGS.workdir, max_steps=FLAGS.max_steps)
  except (CheckpointError, WorkdirBusyError) as e:   # one clear line, no traceback
    print(f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(json.dumps({'train': summary}, default=str))
  if FLAGS.evaluate and not summary.get('preempted'):
    from unimedvl_jax.eval.report import evaluate_workdir
    report = evaluate_workdir(FLAGS.workdir, split='test', max_per_task=FLAGS.eval_samples)
    print(json.dumps({'eval_report': os.path.join(FLAGS.workdir, 'eval', 'report.json'),
                      'headline': report.get('headline', {})}, indent=1, default=str))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
