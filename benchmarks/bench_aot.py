"""AOT memory/FLOPs plans of the training step for TPU pod slices, without TPUs (libtpu only).

    python -m benchmarks.bench_aot --config configs/unimedvl_7b.py --topology v5p-128 \
        --config.data.batch_size=64 \
        --out benchmarks/aot/v5p-128_fsdp.json [--hlo benchmarks/aot/v5p-128_fsdp.hlo.txt] \
        [--config.model.attention_impl=pallas --config.mesh.tensor=4 ...] [--adjust_batch]

The batch must divide over the mesh's batch axes (data x fsdp): otherwise the plan is a
ConfigError naming both (the JSON's `error`), as training would be. `--adjust_batch` rounds it
up instead (reported as `batch.adjusted_from`; how the JSONs in benchmarks/aot/ with
`adjusted_from` were made, before that was an explicit choice).

One plan per process (libtpu and the compile stay isolated; wrap it in `timeout`). Writes the
JSON of `unimedvl_jax.aot.plan` (see its docstring) plus the command line; its compiled FLOPs
are cost_analysis of unrolled 1- and 2-layer variants scaled to the full depth (aot/cost.py: 3
more, smaller compiles). `--reanalyze HLO` recomputes the collectives and while-loop trip counts
of a saved optimized HLO into an existing JSON (no compile; the FLOPs need the variants).
`--table DIR` prints the markdown table of benchmarks/RESULTS.md from every JSON in DIR.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'configs/*.py file', lock_config=True)
flags.DEFINE_string('topology', None, 'e.g. v5p-128, v5p:4x4x4, v5e-256, v6e-256')
flags.DEFINE_string('out', None, 'JSON output path')
flags.DEFINE_string('hlo', None, 'also save the optimized HLO text here')
flags.DEFINE_string('reanalyze', None, 'HLO text to re-analyze into --out (no compile)')
flags.DEFINE_string('table', None, 'print the markdown table of the JSONs in this folder')
flags.DEFINE_bool('adjust_batch', False, 'round data.batch_size up to a multiple of data x fsdp')
FLAGS = flags.FLAGS


def _gib(x):
  return f'{x / (1 << 30):.1f}' if x is not None else '-'


def _row(name: str, r: dict) -> str:
  if 'error' in r:
    return f'| {name} | error: {r["error"][:120]} |' + ' |' * 12
  m, b, mem = r['mesh'], r['batch'], r.get('memory', {})
  oom = r.get('oom')
  fits_c = False
  if oom:
    if oom.get('required_for') == 'HLO temporaries':    # XLA stopped at the temporaries
      temp = _gib(oom.get('used_bytes'))
      peak = f'> {_gib(mem.get("state_bytes", 0) + oom.get("used_bytes", 0))} (OOM)'
    else:
      temp = '-'
      peak = f'{_gib(oom.get("used_bytes"))} (OOM)'
  else:
    from unimedvl_jax.aot import conservative_bytes
    temp = _gib(mem.get('temp_size_in_bytes'))
    peak = f'{_gib(mem.get("peak_memory_in_bytes"))} ({_gib(conservative_bytes(mem))})'
    fits_c = conservative_bytes(mem) <= r['hbm']['usable_bytes']
  fl, st = r.get('flops', {}), r.get('step_time', {})
  ratio = fl.get('compiled_over_analytic')
  cells = [f'{r["accelerator_type"]} ({r["topology"]})', f'{m["data"]}x{m["fsdp"]}x{m["tensor"]}',
           f'{r["model"]["attention_impl"]} / {r["model"]["remat"]}',
           f'{b["seq_len"]} x {b["batch_size"]}', _gib(mem.get('state_bytes')), temp,
           f'{peak} / {_gib(r["hbm"]["usable_bytes"])}',
           ('yes' if fits_c else 'yes (tight)') if r['fits'] else '**no**']
  if ratio is not None:
    cells += [f'{ratio:.2f}', f'{st["compute_bound_s"]:.2f}', f'{st["mfu_upper_bound"]:.2f}',
              f'{st["at_mfu"]["0.40"]:.2f}',
              ' / '.join(str(r['collectives']['per_step'][k]) for k in
                         ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
                          'collective-permute'))]
  else:
    cells += ['-', '-', '-', '-', '-']
  cells.append(str(r.get('compile_seconds', '-')))
  return '| ' + ' | '.join(cells) + ' |'


def table(folder: str) -> str:
  rows = []
  for p in sorted(glob.glob(os.path.join(folder, '*.json'))):
    with open(p) as f:
      rows.append(_row(os.path.basename(p)[:-5], json.load(f)))
  head = ('| slice | mesh d x f x t | attention / remat | tokens/pack x packs/step | state GiB/chip | '
          'temp GiB | peak (conservative) / usable GiB | fits | compiled/analytic FLOPs | step >= s | '
          'MFU <= | step @40% MFU s | collectives/step AG / RS / AR / A2A / CP | compile s |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  return head + '\n' + '\n'.join(rows)


def main(argv):
  del argv
  if FLAGS.table:
    print(table(FLAGS.table))
    return
  from unimedvl_jax import aot
  if FLAGS.reanalyze:
    with open(FLAGS.out) as f:
      r = json.load(f)
    with open(FLAGS.reanalyze) as f:
      text = f.read()
    aot.update_from_hlo(r, text)
    with open(FLAGS.out, 'w') as f:
      json.dump(r, f, indent=1)
    print(json.dumps({k: r.get(k) for k in ('flops', 'collectives')}, indent=1))
    return
  aot.prepare_env(FLAGS.topology)
  cmd = 'python ' + ' '.join(sys.argv)
  try:
    r = aot.plan(FLAGS.config, FLAGS.topology, hlo_path=FLAGS.hlo, adjust_batch=FLAGS.adjust_batch)
  except Exception as e:  # noqa: BLE001 - record the failure in the table
    r = {'error': f'{type(e).__name__}: {str(e)[:2000]}'}
  r['command'] = cmd
  text = json.dumps(r, indent=1)
  print(text)
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or '.', exist_ok=True)
    with open(FLAGS.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  app.run(main)
