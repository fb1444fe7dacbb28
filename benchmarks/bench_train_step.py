"""The real jitted training step on real packed batches: FLOPs, compile time, step time, MFU, memory.

    JAX_PLATFORMS=cpu python -m benchmarks.bench_train_step                      # small, bf16
    python -m benchmarks.bench_train_step --config configs/tiny.py --dtype fp32 --steps 5
    python -m benchmarks.bench_train_step --remat full --json out.json
    python -m benchmarks.bench_train_step --profile /tmp/prof      # + top ops of one step
    python -m benchmarks.bench_train_step --override model.attention_impl=xla   # dense reference
    python -m benchmarks.bench_train_step --side_by_side    # vs torch / minimal JAX / baseline

Batches come from the real input pipeline (`data.pipeline.make_train_iterator`) on the embedded
synthetic dataset, generated once into --data_dir at the config's VAE image size (a few
seconds). All batches are drawn before timing (data time is not in the step time). The step is
`train.step.make_train_step` under `jit_train_step` (explicit shardings, donated state),
compiled ahead of time. Model changes are measured through config knobs (--override), never by
patching the package.

Printed (JSON): model FLOPs per step (profiling.model_flops_per_step(cfg, batch=...): the useful
work of each batch: decoder layers over every token slot, attention at the allowed pairs, lm_head
at the CE rows, the VAE at the real images, 3x forward for trainable parts, remat not counted),
lower and compile time, step time (median over --steps after --warmup steps, plus min/max), real
tokens/s (non-padding tokens), MFU against a square-matmul peak measured in the same run with the
same dtype (before and after the timed steps; the higher is used, so MFU is conservative) and
also against the bf16 peak, peak memory (profiling.peak_memory_bytes: on CPU the process peak
RSS, which includes the compiler), compiled.memory_analysis(), and compiled.cost_analysis() FLOPs
of the scanned step (XLA counts a scanned layer body once; the exact compiled/analytic ratio of
the unrolled step with the blocked attention's loop iterations is
`benchmarks/side_by_side.py --contestant project_full:flops=1`).

Timings on a shared CPU are noisy: the load average is recorded at start and end, and each step's
process CPU time (all threads; `step_cpu_s`) is reported next to its wall time.

--profile DIR traces one extra step (jax.profiler) and prints the top HLO ops by thread-summed
time with their JAX source op, and the time per coarse bucket (matmuls, VAE convolutions,
converts, scan slicing, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from unimedvl_jax import profiling, sharding  # noqa: E402
from unimedvl_jax import batch as batch_lib  # noqa: E402
from unimedvl_jax.batch import batch_spec  # noqa: E402
from unimedvl_jax.config import stage_train_config  # noqa: E402
from unimedvl_jax.config_load import load_config_file  # noqa: E402
from unimedvl_jax.train import step as step_lib  # noqa: E402

DTYPES = {'bf16': 'bfloat16', 'fp32': 'float32'}
JNP = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


def load_cfg(args, scan: bool = True):
  ov = [f'model.dtype={DTYPES[args.dtype]}', f'model.remat={args.remat}',
        f'model.scan_layers={scan}'] + list(args.override)
  return load_config_file(args.config, ov)


def loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


# ---------------------------------------------------------------------------------- batches

def pipeline_batches(cfg, n: int, data_dir: str) -> list[dict]:
  from benchmarks.side_by_side import pipeline_batches as batches_and_root
  return batches_and_root(cfg, n, data_dir)[0]


# ---------------------------------------------------------------------------------- profile

_RUNTIME_EVENTS = ('SlinkyThreadPool', 'ThunkExecutor', 'Wait for', 'PjitFunction',
                   'ExecuteHelper', 'stop_trace', 'start_trace', 'PjRt', 'Execute')


_CONTAINERS = ('while', 'call', 'conditional', 'cond')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its metadata op_name (the JAX source op), from compiled.as_text()."""
  import re
  out = {}
  pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def top_ops(trace_dir: str, k: int = 25, hlo_text: str | None = None) -> dict:
  """Per-op CPU time of a jax.profiler trace (.xplane.pb), summed over threads, by HLO name.

  Thread-summed: on a multi-threaded CPU backend the sum exceeds wall time. Runtime bookkeeping
  events are dropped; with `hlo_text`, each op carries its JAX op_name."""
  import glob
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return {'error': f'no .xplane.pb under {trace_dir}'}
  prof = ProfileData.from_file(files[-1])
  agg: dict[str, list] = {}
  for plane in prof.planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for ev in line.events:
        name = ev.name
        if name.startswith('end: ') or any(r in name for r in _RUNTIME_EVENTS):
          continue
        a = agg.setdefault(name, [0, 0.0])
        a[0] += 1
        a[1] += ev.duration_ns / 1e6
  names = hlo_op_names(hlo_text) if hlo_text else {}
  total = sum(ms for _, ms in agg.values())
  items = sorted(agg.items(), key=lambda kv: -kv[1][1])[:k]
  ops = [{'op': n, 'count': c, 'ms': round(ms, 1), 'frac': round(ms / total, 4),
          'source': names.get(n, '')[-160:]} for n, (c, ms) in items]
  return {'total_op_ms_thread_summed': round(total, 1), 'top': ops,
          'note': 'while/cond/call entries are containers: their time includes their bodies'}


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (output type string, metadata op_name)."""
  import re
  out = {}
  pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+)')
  opn = re.compile(r'op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m:
      o = opn.search(line)
      out[m.group(1)] = (m.group(2), o.group(1) if o else '')
  return out


def op_category(name: str, shape: str, source: str, T: int, P: int) -> str:
  """A coarse cost bucket for one executed HLO op (from its name, output shape and source)."""
  dims = shape.split('[', 1)[-1].split(']', 1)[0]
  tt = f'{T},{T}' in dims or (f'{T},' in dims and dims.endswith(f',{T * 4}')) or 'bhgqk' in source \
      or 'bqhgd' in source
  if 'conv' in source:
    return 'vae_conv'
  if tt:
    return 'llm_attention_TxT'
  if f'{P},{P}' in dims:
    return 'vit_attention_PxP'
  if 'ynn_fusion' in name or 'dot' in name:
    return 'matmul'
  if 'gather' in name or 'scatter' in name or 'gather' in source or 'scatter' in source:
    return 'gather_scatter'
  if 'dynamic-update-slice' in name or 'dynamic-slice' in name or 'dynamic_slice' in source:
    return 'scan_slices'
  if name.startswith('copy') or 'transpose' in name:
    return 'copies_transposes'
  if 'convert' in name:
    return 'converts_fusions'
  return 'other_elementwise'


def op_categories(trace_dir: str, hlo_text: str, T: int, P: int) -> dict:
  """Thread-summed op time of the trace per op_category."""
  import glob
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  prof = ProfileData.from_file(files[-1])
  ops = hlo_ops(hlo_text)
  agg: dict[str, float] = {}
  for plane in prof.planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for ev in line.events:
        n = ev.name
        if n.startswith('end: ') or any(r in n for r in _RUNTIME_EVENTS) or n.startswith(
            'Threadpool') or n not in ops:
          continue
        shape, src = ops[n]
        if n.split('.')[0] in _CONTAINERS:
          continue                     # containers: their bodies' ops are counted themselves
        c = op_category(n, shape, src, T, P)
        agg[c] = agg.get(c, 0.0) + ev.duration_ns / 1e6
  total = sum(agg.values())
  return {'total_ms_thread_summed': round(total, 1),
          **{k: {'ms': round(v, 1), 'frac': round(v / total, 4)}
             for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}}


# ---------------------------------------------------------------------------------- main

def bench(args) -> dict:
  out: dict = {'config': os.path.relpath(args.config, ROOT) if os.path.isabs(args.config)
               else args.config, 'dtype': args.dtype, 'remat': args.remat,
               'backend': jax.default_backend(), 'devices': jax.device_count(),
               'loadavg_start': loadavg(), 'overrides': list(args.override)}
  cfg = load_cfg(args)
  spec = batch_spec(cfg)
  n_batches = args.warmup + args.steps + (1 if args.profile else 0)
  t0 = time.perf_counter()
  batches = pipeline_batches(cfg, n_batches, args.data_dir)
  out['source'] = 'pipeline (embedded synthetic dataset)'
  out['data_s'] = round(time.perf_counter() - t0, 2)
  d = cfg.data
  out['shapes'] = dict(B=d.batch_size, T=d.seq_len, U=d.seq_len - d.max_latent_tokens,
                       L=d.max_latent_tokens, P=d.max_vit_patches, N=d.max_vae_images,
                       vae_buckets=[list(b) for b in batch_lib.Geometry.from_config(cfg).vae_buckets])

  # ---- analytic model FLOPs of the timed batches (exact attention pairs)
  timed = batches[args.warmup:args.warmup + args.steps]
  per = [profiling.model_flops_per_step(cfg, batch=b) for b in timed]
  flops = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
  real_tokens = float(np.mean([np.sum(np.asarray(b['segment_ids']) > 0) for b in timed]))
  pairs = float(np.mean([profiling.allowed_pairs(b) for b in timed]))
  B, T = d.batch_size, d.seq_len
  out['model_flops'] = {k: v for k, v in flops.items()}
  out['attention_pairs'] = {'allowed_mean': pairs, 'dense': float(B * T * T),
                            'allowed_fraction': pairs / (B * T * T)}
  out['real_tokens_per_step'] = real_tokens
  out['token_slots_per_step'] = B * T

  # ---- the real step
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abstract = step_lib.abstract_state(cfg)
  st_sh = step_lib.state_shardings(abstract, mesh)
  tc = stage_train_config(cfg, args.stage)
  fn = step_lib.make_train_step(graphdef, cfg, tc, schedule=optax.constant_schedule(1e-4))
  jitted, _, b_sh = step_lib.jit_train_step(fn, abstract, mesh, spec)
  b_abs = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in spec.items()}
  t0 = time.perf_counter()
  lowered = jitted.lower(abstract, b_abs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out['lower_s'] = round(t1 - t0, 2)
  out['compile_s'] = round(t2 - t1, 2)
  out['cost_analysis_scanned'] = profiling.cost_analysis(compiled)
  out['memory_analysis'] = profiling.compiled_memory(compiled)
  hlo_text = compiled.as_text() if (args.dump_hlo or args.profile) else None
  if args.dump_hlo:
    profiling.dump_hlo(compiled, args.dump_hlo)

  init = jax.jit(lambda: step_lib.init_state(cfg)[1], out_shardings=st_sh)
  state = init()
  dev_batches = [{k: jax.device_put(v, b_sh[k]) for k, v in b.items()} for b in batches]

  dtype = JNP[cfg.model.dtype]
  peak_before = profiling.measure_matmul_peak(dtype, n=args.peak_n)
  bf16_peak_before = (peak_before if dtype == jnp.bfloat16
                      else profiling.measure_matmul_peak(jnp.bfloat16, n=args.peak_n))

  times = []
  cpu_times = []
  losses = []
  for i, b in enumerate(dev_batches):
    prof = args.profile and i == args.warmup + args.steps     # one extra, traced step
    if prof:
      jax.profiler.start_trace(args.profile)
    s0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, b)
    jax.block_until_ready((state, metrics))
    dt = time.perf_counter() - s0
    dc = time.process_time() - c0
    if prof:
      jax.profiler.stop_trace()
    if i >= args.warmup and not prof:
      times.append(dt)
      cpu_times.append(dc)
    losses.append(float(metrics['loss']))
    if args.verbose:
      print(f'step {i}: {dt:.3f}s (cpu {dc:.3f}s) loss {losses[-1]:.4f} ok {bool(metrics["ok"])} '
            f'load {loadavg()}', file=sys.stderr, flush=True)
  peak_after = profiling.measure_matmul_peak(dtype, n=args.peak_n)
  bf16_peak_after = (peak_after if dtype == jnp.bfloat16
                     else profiling.measure_matmul_peak(jnp.bfloat16, n=args.peak_n))
  peak = max(peak_before, peak_after)
  bf16_peak = max(bf16_peak_before, bf16_peak_after)

  med = statistics.median(times) if times else float('nan')
  out['step_s'] = {'median': round(med, 4), 'min': round(min(times), 4) if times else None,
                   'max': round(max(times), 4) if times else None, 'n': len(times),
                   'all': [round(t, 4) for t in times]}
  # process CPU time (all threads): less sensitive than wall time to other jobs on the machine
  out['step_cpu_s'] = {'median': round(statistics.median(cpu_times), 4) if cpu_times else None,
                       'all': [round(t, 4) for t in cpu_times]}
  out['losses'] = [round(x, 4) for x in losses]
  out['finite'] = bool(np.all(np.isfinite(losses)))
  out['tokens_per_s'] = round(real_tokens / med, 1)
  out['model_tflops_per_s'] = flops['train'] / med / 1e12
  out['matmul_peak_gflops'] = {'dtype': cfg.model.dtype, 'before': round(peak_before / 1e9, 1),
                               'after': round(peak_after / 1e9, 1), 'used': round(peak / 1e9, 1),
                               'n': args.peak_n}
  out['bf16_matmul_peak_gflops'] = round(bf16_peak / 1e9, 1)
  out['mfu'] = flops['train'] / med / peak
  out['mfu_vs_bf16_peak'] = flops['train'] / med / bf16_peak
  out['peak_memory_bytes'] = profiling.peak_memory_bytes()
  out['compiled_flops_per_s_scanned'] = out['cost_analysis_scanned']['flops'] / med
  del compiled, lowered, state, dev_batches

  # ---- compiled FLOPs of the unrolled step, with the blocked attention's loop iterations
  if args.unrolled:
    from benchmarks import side_by_side
    cf = side_by_side.compiled_flops(cfg, timed[0], tc, mesh, spec)
    f0 = profiling.model_flops_per_step(cfg, batch=timed[0])['train']
    out['compiled_flops_unrolled'] = cf
    out['compiled_over_model_flops'] = cf['compiled_flops'] / f0
    out['compiled_flops_per_s'] = cf['compiled_flops'] / med
    out['compiled_fraction_of_peak'] = cf['compiled_flops'] / med / peak
  if args.profile:
    out['profile_top_ops'] = top_ops(args.profile, args.profile_top, hlo_text)
    out['profile_categories'] = op_categories(args.profile, hlo_text, d.seq_len,
                                              d.max_vit_patches)
  out['loadavg_end'] = loadavg()
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--config', default=os.path.join(ROOT, 'configs', 'small.py'))
  ap.add_argument('--dtype', default='bf16', choices=sorted(DTYPES))
  ap.add_argument('--remat', default='none', choices=['none', 'full', 'dots', 'dots_no_batch'])
  ap.add_argument('--steps', type=int, default=5, help='timed steps (median reported)')
  ap.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  ap.add_argument('--stage', default=None, help='curriculum stage whose train overrides to use')
  ap.add_argument('--data_dir', default=os.path.join(
      os.environ.get('TMPDIR', '/tmp'), 'unimedvl_bench'), help='where the dataset is generated')
  ap.add_argument('--peak_n', type=int, default=2048, help='matmul size of the peak measurement')
  ap.add_argument('--unrolled', action=argparse.BooleanOptionalAction, default=True,
                  help='also compile with scan_layers=False for cost_analysis FLOPs')
  ap.add_argument('--override', action='append', default=[],
                  help="config override 'a.b=value' (repeatable)")
  ap.add_argument('--side_by_side', action='store_true',
                  help='run benchmarks/side_by_side.py (torch Qwen2 vs minimal JAX LM vs this '
                       'project vs the baseline commit, stepped in turn); see its --help')
  ap.add_argument('--contestant', action='append', default=None,
                  help='with --side_by_side: the contestants (default: its full line-up)')
  ap.add_argument('--rounds', type=int, default=4, help='with --side_by_side')
  ap.add_argument('--profile', default=None,
                  help='trace one extra step (after the timed ones) into this dir; top ops')
  ap.add_argument('--profile_top', type=int, default=25)
  ap.add_argument('--dump_hlo', default=None, help='write the compiled HLO here')
  ap.add_argument('--json', default=None, help='also write the result here')
  ap.add_argument('--verbose', action='store_true')
  args = ap.parse_args(argv)
  if args.side_by_side:
    from benchmarks import side_by_side
    out = side_by_side.run(args.contestant or list(side_by_side.DEFAULT_LINEUP),
                           rounds=args.rounds, steps=1, reference=None, data_dir=args.data_dir,
                           baseline_commit=side_by_side.BASELINE_COMMIT, timeout=1800)
    print(side_by_side.table(out))
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(out, f, indent=2)
    return out
  res = bench(args)
  profiling.print_json(res)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == '__main__':
  main()
