"""Memory of LoRA fine-tuning and int8 inference, and (with a checkpoint) fp32 vs int8 metrics.

    python -m benchmarks.bench_lora_int8                          # tiny, small, unimedvl_7b
    python -m benchmarks.bench_lora_int8 --configs tiny,small --rank 16 --json out.json
    python -m benchmarks.bench_lora_int8 --configs tiny --checkpoint runs/tiny \
        --data runs/tiny/data/test/vqa.jsonl,runs/tiny/data/test/edit.jsonl --max-samples 32

1. Optimizer-state bytes (AdamW mu + nu and the step count) of the full training state vs
   train.lora (the adapters alone), from abstract shapes (jax.eval_shape of
   train/step.py `init_state`; nothing is allocated). LoRA: model.lora.rank = --rank on every
   projection of both experts (the default targets).
2. Weight bytes of the model: every parameter in fp32, in bf16, and with the decoder's
   projections and MLPs as int8 + float32 per-channel scales (model/quant.py; the rest fp32,
   and the rest bf16), from the abstract quantised model.
3. With --checkpoint and --data: `python -m unimedvl_jax.evaluate` on the same samples and seeds
   with the weights as stored and with --int8, the mean of every model metric side by side (the
   two reports are written to --out-dir).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from unimedvl_jax.config_load import load_config_file  # noqa: E402

MiB = 2 ** 20


def _bytes(tree) -> int:
  import jax
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def optimizer_bytes(name: str, rank: int) -> dict:
  from flax import nnx
  from unimedvl_jax.model.lora import is_adapter_path
  from unimedvl_jax.train import step as S
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  base = load_config_file(path, ['stages=()'])
  lcfg = load_config_file(path, ['stages=()', f'model.lora.rank={rank}', 'train.lora=True'])
  _, full = S.abstract_state(base, lora=False)
  _, lo = S.abstract_state(lcfg, lora=True)
  adapters = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(lo['params'])
                 if is_adapter_path(p))
  n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(full['params']))
  return {'config': name, 'rank': rank, 'params': n_params,
          'adapter_params': adapters, 'opt_bytes_full': _bytes(full['opt_state']),
          'opt_bytes_lora': _bytes(lo['opt_state'])}


def weight_bytes(name: str) -> dict:
  """Element counts of the abstract quantised model -> bytes of each storage choice."""
  from flax import nnx
  from unimedvl_jax.model import quant
  from unimedvl_jax.model.unimedvl import UniMedVL
  cfg = load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'), ['stages=()'])

  def build():
    m = UniMedVL(cfg.model, rngs=nnx.Rngs(0))
    quant.quantize(m)
    return m
  flat = list(nnx.to_flat_state(nnx.state(nnx.eval_shape(build), nnx.Param)))
  qparents = {tuple(p[:-1]) for p, v in flat if np.dtype(v.dtype) == np.int8}
  n = {'int8': 0, 'scale': 0, 'rest': 0}
  for p, v in flat:
    kind = ('int8' if np.dtype(v.dtype) == np.int8 else
            'scale' if str(p[-1]) == 'scale' and tuple(p[:-1]) in qparents else 'rest')
    n[kind] += int(np.prod(v.shape))
  base = n['int8'] + n['rest']                  # the model's own parameters
  return {'config': name, 'params': base, 'quantised_weights': n['int8'], 'fp32': 4 * base,
          'bf16': 2 * base, 'int8_rest_fp32': n['int8'] + 4 * n['scale'] + 4 * n['rest'],
          'int8_rest_bf16': n['int8'] + 4 * n['scale'] + 2 * n['rest']}


def _numeric(d, prefix=''):
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      if k != 'protocol':
        out.update(_numeric(v, f'{prefix}{k}.'))
  elif isinstance(d, (int, float)) and not isinstance(d, bool):
    out[prefix[:-1]] = float(d)
  return out


def metrics_side_by_side(checkpoint, data, max_samples, num_steps, out_dir):
  from unimedvl_jax import evaluate
  reps = {}
  for int8 in (False, True):
    reps[int8] = evaluate.run(checkpoint, data, os.path.join(out_dir, f'eval_int8_{int8}.json'),
                              max_samples=max_samples, num_steps=num_steps, int8=int8,
                              log=lambda *a: None)
  a, b = _numeric(reps[False]), _numeric(reps[True])
  # the model's metrics (means of bootstrapped metrics); baselines do not depend on the weights
  return [(k.removesuffix('.mean'), a[k], b.get(k)) for k in a
          if k.endswith('.mean') and '.baseline' not in k]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--configs', default='tiny,small,unimedvl_7b')
  ap.add_argument('--rank', type=int, default=16)
  ap.add_argument('--checkpoint', default=None)
  ap.add_argument('--data', default=None, help='comma-separated JSONL files (with --checkpoint)')
  ap.add_argument('--max-samples', type=int, default=32)
  ap.add_argument('--num-steps', type=int, default=20)
  ap.add_argument('--out-dir', default='/tmp/bench_lora_int8')
  ap.add_argument('--json', default=None)
  args = ap.parse_args(argv)
  names = [c.strip() for c in args.configs.split(',') if c.strip()]
  res = {'optimizer': [], 'weights': []}
  print(f'optimizer state (AdamW mu + nu + count), LoRA rank {args.rank} on every projection of '
        'both experts:')
  print(f'{"config":>12} {"params":>14} {"adapters":>12} {"full MiB":>12} {"LoRA MiB":>10} '
        f'{"ratio":>8}')
  for n in names:
    r = optimizer_bytes(n, args.rank)
    res['optimizer'].append(r)
    print(f'{n:>12} {r["params"]:>14,} {r["adapter_params"]:>12,} '
          f'{r["opt_bytes_full"] / MiB:>12.1f} {r["opt_bytes_lora"] / MiB:>10.2f} '
          f'{r["opt_bytes_full"] / r["opt_bytes_lora"]:>8.1f}')
  print('\nweight bytes (int8: decoder projections + MLPs, float32 per-channel scales):')
  print(f'{"config":>12} {"fp32 MiB":>12} {"bf16 MiB":>12} {"int8+fp32":>12} {"int8+bf16":>12}')
  for n in names:
    r = weight_bytes(n)
    res['weights'].append(r)
    print(f'{n:>12} {r["fp32"] / MiB:>12.1f} {r["bf16"] / MiB:>12.1f} '
          f'{r["int8_rest_fp32"] / MiB:>12.1f} {r["int8_rest_bf16"] / MiB:>12.1f}')
  if args.checkpoint:
    if not args.data:
      ap.error('--checkpoint needs --data')
    os.makedirs(args.out_dir, exist_ok=True)
    rows = metrics_side_by_side(args.checkpoint, args.data, args.max_samples, args.num_steps,
                                args.out_dir)
    res['metrics'] = [{'metric': k, 'fp32': a, 'int8': b} for k, a, b in rows]
    print(f'\nmetrics of {args.checkpoint} (stored weights vs --int8; same samples and seeds):')
    w = max(len(k) for k, _, _ in rows) if rows else 10
    for k, a, b in rows:
      d = '' if b is None else f'{b - a:+.4f}'
      print(f'{k:<{w}} {a:>10.4f} {"-" if b is None else f"{b:.4f}":>10} {d:>10}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
