"""Evaluate a checkpoint on JSONL data: every task present, metrics + baselines + protocol.

    python -m unimedvl_jax.evaluate --checkpoint runs/tiny --data DIR/val/vqa.jsonl,DIR/val/edit.jsonl \
        --out report.json [--root DIR] [--max-samples 50] [--samples-dir out/samples] [--int8]

    python -m unimedvl_jax.evaluate --workdir runs/tiny [--split test] [--max-samples 48]
        [--vqa-samples 384] [--noablation] [--num-steps 20]

The second form (re-)evaluates a training workdir on its own data's held-out split and writes
the report a person reads: WORKDIR/eval/report.md (targets vs trivial baselines, the blank-input
ablation of VQA and segmentation, loss curves per stage, sample grids), report.json, samples,
and TensorBoard image summaries in WORKDIR/tb (unimedvl_jax/eval/report.py); it is what
`python -m unimedvl_jax.train ... --evaluate` runs after training.

The data root (image paths are relative to it) defaults to the nearest ancestor of the first
JSONL holding a manifest.json (the embedded synthetic dataset), else the JSONL's directory. The
report's `protocol` section states prompts, decoding and sampler settings, seeds, splits and
counts; see unimedvl_jax/eval/harness.py for the metric definitions.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

def define_flags():
  """Defines the CLI's absl flags (only when run as a program)."""
  flags.DEFINE_string('checkpoint', None, 'training workdir or its checkpoints/ folder')
  flags.DEFINE_string('data', None, 'comma-separated JSONL files')
  flags.DEFINE_string('out', None, 'report JSON path')
  flags.DEFINE_string('root', None, 'data root for relative image paths')
  flags.DEFINE_integer('max-samples', None, 'at most this many samples per task')
  flags.DEFINE_string('samples-dir', None, 'write sample outputs (PNG grids, texts) here')
  flags.DEFINE_integer('batch-size', 8, 'requests per batch')
  flags.DEFINE_integer('seed', 0, 'base seed')
  flags.DEFINE_integer('num-steps', None, "override every sampler's timesteps (default: the config's eval settings, 20 steps)")
  flags.DEFINE_integer('max-new-tokens', None, 'override every task\'s text budget')
  flags.DEFINE_bool('ema', True, 'use the EMA weights (else the raw params)')
  flags.DEFINE_bool('int8', False, 'int8 weight-only inference (decoder projections and MLPs, '
                    'per-output-channel scales; model/quant.py)')
  flags.DEFINE_string('config', None, 'configs/*.py the checkpoint must match (optional)')
  flags.DEFINE_string('tokenizer', None, 'tokenizer file (default: config / data root)')
  flags.DEFINE_string('workdir', None, 'evaluate this training workdir on its data split and '
                      'write WORKDIR/eval/report.md (instead of --checkpoint/--data/--out)')
  flags.DEFINE_string('split', 'test', '--workdir: the split to evaluate')
  flags.DEFINE_integer('vqa-samples', 384, '--workdir: VQA samples (split by question kind)')
  flags.DEFINE_bool('ablation', True, '--workdir: re-run VQA and segmentation with blank '
                    '(grey) input images')
  for _name in ('max-samples', 'samples-dir', 'batch-size', 'num-steps', 'max-new-tokens',
                'vqa-samples'):
    flags.DEFINE_alias(_name.replace('-', '_'), _name)


FLAGS = flags.FLAGS


def run(checkpoint, data, out, *, root=None, max_samples=None, samples_dir=None, batch_size=8,
        seed=0, num_steps=None, max_new_tokens=None, use_ema=True, config=None, tokenizer=None,
        int8=False, log=print) -> dict:
  """The CLI as a function (tests call it). Returns the report dict written to `out`."""
  import dataclasses
  from unimedvl_jax.eval import harness
  from unimedvl_jax.data.locate import jsonl_root
  from unimedvl_jax.eval.tasks import load_samples
  from unimedvl_jax.infer import image as I
  from unimedvl_jax.infer.loading import load_checkpoint, load_tokenizer
  files = [f.strip() for f in (data or '').split(',') if f.strip()]
  if not files:
    raise ValueError('--data: give at least one JSONL file')
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f'--data file {f!r} does not exist')
  data_root = root or jsonl_root(files[0])
  cfg, model = load_checkpoint(checkpoint, config_path=config, use_ema=use_ema, int8=int8)
  tok = load_tokenizer(cfg, tokenizer, data_root)
  samples = load_samples(files, root, log=log)
  kw = {}
  kw['flow_text_to_image'], kw['flow_editing'] = I.eval_flow_settings(cfg, num_steps)
  if max_new_tokens:
    kw['text_settings'] = {k: dataclasses.replace(v, max_new_tokens=max_new_tokens)
                           for k, v in harness.DEFAULT_TEXT.items()}
  report = harness.evaluate(cfg, model, tok, samples, batch_size=batch_size,
                            max_samples=max_samples, seed=seed, samples_dir=samples_dir,
                            data_files=files, root=data_root, log=log, **kw)
  report['protocol']['checkpoint'] = os.path.abspath(checkpoint)
  report['protocol']['weights'] = 'ema' if use_ema else 'params'
  report['protocol']['int8'] = bool(int8)
  report['protocol']['tokenizer'] = getattr(tok, 'path', '')
  report = harness.to_json(report)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2, sort_keys=False)
      f.write('\n')
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  from unimedvl_jax.infer.loading import LoadError
  if FLAGS.workdir and FLAGS.int8:
    raise app.UsageError('--int8 works with --checkpoint --data --out (the --workdir report is '
                         "the checkpoint's own)")
  if FLAGS.workdir:
    from unimedvl_jax.data.jsonl import DataError
    from unimedvl_jax.eval.report import evaluate_workdir
    try:
      rep = evaluate_workdir(FLAGS.workdir, split=FLAGS.split,
                             max_per_task=FLAGS['max-samples'].value or 48,
                             vqa_samples=FLAGS['vqa-samples'].value,
                             image_steps=FLAGS['num-steps'].value, seed=FLAGS.seed,
                             ablation=FLAGS.ablation)
    except (LoadError, FileNotFoundError, ValueError, DataError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    met = rep['headline']['targets_met']
    print(f"wrote {os.path.join(FLAGS.workdir, 'eval', 'report.md')}: "
          f"{sum(1 for v in met.values() if v)} of {len(met)} targets met")
    return 0
  missing = [n for n in ('checkpoint', 'data', 'out') if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f'give --workdir, or all of --checkpoint --data --out (missing: '
                         f'{", ".join("--" + m for m in missing)})')
  try:
    run(FLAGS.checkpoint, FLAGS.data, FLAGS.out, root=FLAGS.root,
        max_samples=FLAGS['max-samples'].value, samples_dir=FLAGS['samples-dir'].value,
        batch_size=FLAGS['batch-size'].value, seed=FLAGS.seed,
        num_steps=FLAGS['num-steps'].value, max_new_tokens=FLAGS['max-new-tokens'].value,
        use_ema=FLAGS.ema, config=FLAGS.config, tokenizer=FLAGS.tokenizer, int8=FLAGS.int8)
  except (LoadError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {FLAGS.out}')
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
