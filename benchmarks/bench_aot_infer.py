"""AOT memory plan of image generation (one guided flow step) for TPU slices, without TPUs.

    nice -n 19 python -m benchmarks.bench_aot_infer --config configs/unimedvl_7b.py \
        --topology v5e-8 --mesh data=1,tensor=8 --image-size 1024 \
        --out benchmarks/aot_infer/v5e-8_t8_fp32.json [--param-dtype bfloat16] [--set k=v ...]
    python -m benchmarks.bench_aot_infer --gpu-check      # can XLA compile for GPUs offline here?
    python -m benchmarks.bench_aot_infer --table benchmarks/aot_infer

One plan per process (libtpu isolated; run them one at a time on a small machine). Writes the
JSON of `unimedvl_jax.aot.plan_generation` (per-chip weights, contexts, XLA's argument / temp /
peak bytes, fits) plus the command line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gib(x):
  return f'{x / (1 << 30):.2f}' if x is not None else '-'


def table(folder: str) -> str:
  head = ('| slice | mesh d x f x t | weights | requests | weights GiB/chip | contexts GiB/chip | '
          'args GiB | temp GiB | peak GiB / usable | fits | compile s |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|')
  rows = []
  for p in sorted(glob.glob(os.path.join(folder, '*.json'))):
    with open(p) as f:
      r = json.load(f)
    if 'error' in r:
      rows.append(f'| {os.path.basename(p)} | error: {r["error"][:150]} |' + ' |' * 9)
      continue
    m, mem, q = r['mesh'], r['memory'], r['request']
    if r.get('oom'):
      peak = f'> {_gib(r["oom"].get("used_bytes"))} (OOM)'
    else:
      peak = f'{_gib(mem.get("peak_memory_in_bytes"))}'
    rows.append('| ' + ' | '.join([
        f'{r["accelerator_type"]} ({r["topology"]})', f'{m["data"]}x{m["fsdp"]}x{m["tensor"]}',
        r['model']['param_dtype'],
        f'{q["batch"]} x {q["image_size"]}^2 ({q["latent_tokens"]} latents, '
        f'{q["rows_per_model_call"]} rows/call)',
        _gib(mem['weights_bytes']), _gib(mem['contexts_bytes']),
        _gib(mem.get('argument_size_in_bytes')), _gib(mem.get('temp_size_in_bytes')),
        f'{peak} / {_gib(r["hbm"]["usable_bytes"])}', 'yes' if r['fits'] else '**no**',
        str(r.get('compile_seconds', '-'))]) + ' |')
  return head + '\n' + '\n'.join(rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default=os.path.join(ROOT, 'configs', 'unimedvl_7b.py'))
  ap.add_argument('--topology', default='v5e-8')
  ap.add_argument('--mesh', default='data=1,tensor=8')
  ap.add_argument('--image-size', type=int, default=1024)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--prompt-tokens', type=int, default=128)
  ap.add_argument('--param-dtype', default=None, help='e.g. bfloat16 (default: the config)')
  ap.add_argument('--set', action='append', default=[], help='config override k=v')
  ap.add_argument('--out', default=None)
  ap.add_argument('--hlo', default=None)
  ap.add_argument('--gpu-check', action='store_true')
  ap.add_argument('--table', default=None)
  args = ap.parse_args()
  if args.table:
    print(table(args.table))
    return
  from unimedvl_jax import aot
  if args.gpu_check:
    print(json.dumps(aot.gpu_offline_compile_check(), indent=1))
    return
  aot.prepare_env(args.topology)
  from unimedvl_jax.config_load import load_config_file
  cmd = 'python ' + ' '.join(sys.argv)
  try:
    cfg = load_config_file(args.config, args.set)
    r = aot.plan_generation(cfg, args.topology, image_size=args.image_size, batch=args.batch,
                            prompt_tokens=args.prompt_tokens, mesh=args.mesh,
                            param_dtype=args.param_dtype, hlo_path=args.hlo)
  except Exception as e:  # noqa: BLE001 - record the failure
    r = {'error': f'{type(e).__name__}: {str(e)[:2000]}'}
  r['command'] = cmd
  text = json.dumps(r, indent=1)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
