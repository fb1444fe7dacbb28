"""The one prepared GPU check of the attention backends (issue 16): under 5 minutes on one GPU.

    python -m benchmarks.gpu_check --json gpu_check.json        # on a GPU machine (jax[cuda])
    JAX_PLATFORMS=cpu python -m benchmarks.gpu_check --dry-run  # tiny shapes, any CPU machine

Four parts, each recorded in the JSON (and printed); a part that would run past --budget-s is
skipped and marked so (never estimated):
  1. environment: jax version, device kind, the device's bf16 dense datasheet peak (if known)
  2. correctness of every backend against `reference_attention` (f32 softmax on the same inputs)
     on random packs holding causal, full and noise splits (unimedvl_jax/kernels/random_packs.py),
     GQA 7:1 (28 query / 4 KV heads), head dim 128, bf16: forward and dq / dk / dv, max relative
     error (tolerance 5e-2: bf16 inputs, p and dS rounded to bf16 before the second matmuls)
  3. forward and forward+backward time and achieved TFLOP/s of each backend at 8k and 32k tokens
     on realistic packs (benchmarks/bench_attention.py: FLOPs = allowed pairs only, forward
     4 * D * Hq * pairs, fwd+bwd 3.5x that); the dense XLA baseline only up to 16k
  4. the small config's train step (configs/small.py, bf16, benchmarks/bench_train_step.py) with
     attention_impl 'pallas' and 'cudnn': step time, tokens/s, model TFLOP/s and MFU (model FLOPs
     / step time / peak) against the datasheet peak and against a measured bf16 matmul peak
Backends on a GPU: 'pallas' (our kernel, Pallas -> Triton), 'cudnn'
(jax.nn.dot_product_attention(implementation='cudnn') with the explicit packed mask), 'dense'
(the same call with implementation='xla'). --dry-run (CPU): tiny shapes (T 256 for correctness,
2048 / 4096 for timing, Hq 7 / Hkv 1), the Pallas kernels and splash in interpret mode, cuDNN's call with
implementation='xla', one train step of a 1-layer tiny config; it checks that the script works,
and its times mean nothing. Without a GPU and without --dry-run the script exits with status 2.
Exit status 1 if any correctness check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


from benchmarks import bench_attention as ba  # noqa: E402
from unimedvl_jax.kernels import random_packs as packs  # noqa: E402

# bf16 dense (no sparsity) datasheet peaks, FLOP/s, by device-kind substring (first match wins)
DATASHEET_BF16 = (('H200', 989.4e12), ('H100 PCIe', 756.0e12), ('H100', 989.4e12),
                  ('A100', 312.0e12), ('L40S', 362.05e12), ('L4', 121.0e12))


def datasheet_peak(kind: str) -> float | None:
  for key, peak in DATASHEET_BF16:
    if key in kind:
      return peak
  return None


class Budget:
  def __init__(self, seconds: float):
    self.t0, self.seconds = time.perf_counter(), seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def left(self) -> float:
    return self.seconds - self.elapsed()


def part_correctness(args, impls, out) -> bool:
  platform = jax.default_backend()
  B, T, Hq, Hkv, D = args.corr_shape
  dt = jnp.dtype(args.dtype)
  rng, meta = packs.batch_with_all_modes(args.seed, B, T, max_item=args.max_item, pad_frac=0.15)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
  q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
  modes = {int(m): int(np.sum(meta[2][meta[0] > 0] == m)) for m in (0, 1, 2)}
  want = ba.fwd_vjp(ba.make_attn('reference', platform=platform))(q, k, v, ct, *meta)
  tol = 2e-5 if dt == jnp.float32 else 5e-2
  res = {'shape': dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=dt.name), 'tolerance': tol,
         'tokens_per_mode': {'causal': modes[0], 'full': modes[1], 'noise': modes[2]},
         'pad_frac': float(np.mean(meta[0] == 0)), 'backends': {}}
  ok = True
  for impl in impls:
    name, kw = impl, {}
    if impl == 'pallas-tpu':            # dry run: the Mosaic variant, interpreted
      name, kw = 'pallas', dict(backend='tpu')
    t0 = time.perf_counter()
    try:
      errs = ba.rel_errors(ba.fwd_vjp(ba.make_attn(name, platform=platform, **kw))(
          q, k, v, ct, *meta), want)
      good = max(errs.values()) <= tol
      r = dict(errs, ok=good, seconds=round(time.perf_counter() - t0, 1))
    except Exception as e:  # noqa: BLE001 - a backend that cannot run is a result
      good, r = False, {'ok': False, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
    ok &= good
    res['backends'][impl] = r
    print(f'  {impl:10s} ' + (', '.join(f'{n} {r[n]:.2e}' for n in ('out', 'dq', 'dk', 'dv'))
                              if 'out' in r else r.get('error', '')) + ('  OK' if good else
                                                                         '  FAILED'), flush=True)
  out['correctness'] = res
  return ok


def part_timing(args, impls, budget: Budget, out):
  platform = jax.default_backend()
  rng = np.random.default_rng(args.seed + 1)
  _, _, Hq, Hkv, D = args.corr_shape
  B = 1
  dt = jnp.dtype(args.dtype)
  rows = {}
  for T in args.lengths:
    meta = tuple(jnp.asarray(x) for x in packs.realistic_batch(rng, B, T,
                                                               max_sample=args.max_sample))
    bq, bk = args.blocks
    frac = {k: float(v) for k, v in ba.block_sparsity(*meta, bq, bk).items()}
    pairs = ba.allowed_pairs(*meta)
    row = {'allowed_density': pairs / (B * T * T), 'allowed_pairs': pairs, 'blocks': frac,
           'pad_frac': float(np.mean(np.asarray(meta[0]) == 0))}
    print(f'  T={T}: allowed {row["allowed_density"]:.4f} of T^2, blocks computed '
          f'{frac["computed"]:.3f} (skip {frac["skip"]:.3f})', flush=True)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
    q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
    fwd_flops = 4.0 * D * Hq * pairs
    for impl in impls:
      if impl == 'dense' and T > args.dense_max_len:
        row[impl] = {'skipped': f'T > {args.dense_max_len} (dense [B, Hq, T, T] logits)'}
        continue
      if budget.left() < args.reserve_s:
        row[impl] = {'skipped': f'time budget ({budget.elapsed():.0f} s used)'}
        print(f'    {impl:7s} skipped (time budget)', flush=True)
        continue
      attn = ba.make_attn(impl, platform=platform, density=frac['computed'], block_q=bq,
                          block_k=bk)
      try:
        r = ba.time_impl(attn, q, k, v, meta, ct, fwd_flops, iters=args.iters)
        print(f'    {impl:7s} fwd {r["fwd_ms"]:9.2f} ms {r["fwd_tflops"]:7.1f} TFLOP/s | '
              f'fwd+bwd {r["fwd_bwd_ms"]:9.2f} ms {r["fwd_bwd_tflops"]:7.1f} TFLOP/s', flush=True)
      except Exception as e:  # noqa: BLE001 - OOM / unsupported is a result too
        r = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
        print(f'    {impl:7s} failed: {r["error"]}', flush=True)
      row[impl] = r
    rows[str(T)] = row
  out['timing'] = {'shape': dict(B=B, Hq=Hq, Hkv=Hkv, D=D, dtype=dt.name, blocks=args.blocks,
                                 iters=args.iters), 'lengths': rows}


def part_train_step(args, budget: Budget, out):
  from benchmarks import bench_train_step as bts
  kind = jax.devices()[0].device_kind
  peak = datasheet_peak(kind)
  res = {'config': args.train_config, 'overrides': args.train_overrides, 'impls': {}}
  for impl in args.train_impls:
    if budget.left() < args.reserve_s:
      res['impls'][impl] = {'skipped': f'time budget ({budget.elapsed():.0f} s used)'}
      print(f'  {impl}: skipped (time budget)', flush=True)
      continue
    argv = ['--config', os.path.join(ROOT, args.train_config), '--steps', str(args.train_steps),
            '--warmup', str(args.train_warmup), '--no-unrolled', '--peak_n', str(args.peak_n),
            '--override', f'model.attention_impl={impl}']
    for ov in args.train_overrides:
      argv += ['--override', ov]
    try:
      with contextlib.redirect_stdout(io.StringIO()):     # its full JSON; we keep a summary
        r = bts.main(argv)
      keep = {k: r[k] for k in ('shapes', 'source', 'compile_s', 'step_s', 'tokens_per_s',
                                'model_tflops_per_s', 'mfu', 'bf16_matmul_peak_gflops',
                                'peak_memory_bytes', 'finite') if k in r}
      keep['model_flops_train'] = r['model_flops']['train']
      keep['mfu_vs_measured_bf16_matmul'] = r.get('mfu_vs_bf16_peak')
      keep['mfu_vs_datasheet'] = (r['model_tflops_per_s'] * 1e12 / peak) if peak else None
      res['impls'][impl] = keep
      msg = (f'  {impl}: step {r["step_s"]["median"] * 1e3:.1f} ms, '
             f'{r["tokens_per_s"]:.0f} tok/s, {r["model_tflops_per_s"]:.2f} model TFLOP/s, MFU '
             f'{keep["mfu_vs_measured_bf16_matmul"]:.3f} of the measured bf16 matmul peak')
      if peak:
        msg += f', {keep["mfu_vs_datasheet"]:.3f} of the datasheet peak'
      print(msg, flush=True)
    except Exception as e:  # noqa: BLE001
      res['impls'][impl] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
      print(f'  {impl}: failed: {res["impls"][impl]["error"]}', flush=True)
  out['train_step'] = res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dry-run', action='store_true',
                 help='tiny shapes on any platform (CPU: interpret mode); times mean nothing')
  p.add_argument('--json', default=None, help='write the results here')
  p.add_argument('--budget-s', type=float, default=None,
                 help='skip remaining timed parts past this many seconds (default 285; dry '
                      'run 3600)')
  p.add_argument('--reserve-s', type=float, default=25.0,
                 help='start no new timed item with less than this left of the budget')
  p.add_argument('--iters', type=int, default=None)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)

  platform = jax.default_backend()
  kind = jax.devices()[0].device_kind
  if platform != 'gpu' and not args.dry_run:
    print(f'no GPU here (jax backend {platform!r}): nothing measured. Run on a GPU machine, '
          'or pass --dry-run to check that the script works.', file=sys.stderr)
    return 2
  dry = args.dry_run
  args.dtype = 'float32' if (dry and platform == 'cpu') else 'bfloat16'
  args.corr_shape = (1, 256, 7, 1, 128) if dry else (2, 2048, 28, 4, 128)   # B, T, Hq, Hkv, D
  args.max_item = 48 if dry else 400
  args.lengths = (2048, 4096) if dry else (8192, 32768)
  args.max_sample = None
  args.blocks = (32, 32) if (dry and platform == 'cpu') else (64, 64)
  args.dense_max_len = 16384
  args.iters = args.iters or (1 if dry else 5)
  args.train_config = 'configs/tiny.py' if dry else 'configs/small.py'
  args.train_overrides = (['model.llm.num_layers=1', 'model.vit.num_layers=1',
                           'data.batch_size=1', 'data.seq_len=256', 'data.max_latent_tokens=64',
                           'data.max_vit_patches=64', 'data.max_vae_images=2',
                           'data.max_sample_tokens=256', 'model.dtype=float32']
                          if dry else [])
  args.train_impls = ('pallas', 'cudnn')
  args.train_steps, args.train_warmup = (1, 0) if dry else (5, 2)
  args.peak_n = 256 if dry else 8192
  if platform == 'gpu':
    corr_impls, time_impls = ('pallas', 'cudnn', 'dense'), ('pallas', 'cudnn', 'dense')
  elif platform == 'tpu':
    corr_impls, time_impls = ('pallas', 'splash', 'dense'), ('pallas', 'splash', 'dense')
  else:     # dry run on CPU: every code path, interpreted / emulated
    corr_impls = ('pallas', 'pallas-tpu', 'splash', 'cudnn', 'dense')
    time_impls = ('pallas', 'cudnn', 'dense')
  budget = Budget(args.budget_s or (3600.0 if dry else 285.0))
  cmd = 'python -m benchmarks.gpu_check ' + ' '.join(argv if argv is not None else sys.argv[1:])
  out = {'command': cmd, 'dry_run': dry, 'jax': jax.__version__, 'platform': platform,
         'device_kind': kind, 'device_count': jax.device_count(),
         'datasheet_bf16_peak_flops': datasheet_peak(kind)}
  print(f'gpu_check: jax {jax.__version__}, {platform} ({kind}), dry run {dry}', flush=True)

  print('1/3 correctness vs reference_attention (random packs, GQA 7:1, head dim 128)', flush=True)
  ok = part_correctness(args, corr_impls, out)
  print(f'2/3 fwd / fwd+bwd time at T={list(args.lengths)} (realistic packs)', flush=True)
  part_timing(args, time_impls, budget, out)
  print(f'3/3 train step of {args.train_config} (MFU)', flush=True)
  part_train_step(args, budget, out)
  out['total_s'] = round(budget.elapsed(), 1)
  out['correctness_ok'] = bool(ok)
  print(f'done in {out["total_s"]} s; correctness {"OK" if ok else "FAILED"}', flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
