"""Packed-sequence attention backends, timed: our Pallas kernel vs the baselines of each platform.

    python -m benchmarks.bench_attention                       # 4k..32k, 7B attention shape
    python -m benchmarks.bench_attention --lengths 4096,8192 --iters 20 --json out.json
    python -m benchmarks.bench_attention --impls pallas,splash   # on a TPU

Backends (`--impls`, default: every one this platform runs natively):
  pallas   our kernel (kernels/flash_attention.py): Mosaic on TPU, Triton on GPU
  splash   JAX's TPU splash attention with the per-pack dynamic mask (kernels/splash.py), TPU
  cudnn    jax.nn.dot_product_attention(implementation='cudnn') with the explicit mask
           (kernels/cudnn_attention.py), GPU
  dense    jax.nn.dot_product_attention(implementation='xla') with the explicit mask: XLA's
           dense softmax attention, any platform; skipped above --dense-max-len (default 16384;
           at 32k with 28 heads its [B, Hq, T, T] f32 logits need ~120 GB)
On a GPU (e.g. one H200: about 2-4 minutes for the default lengths) or TPU it times, per packed
length: forward, and forward + backward (grads of q, k, v), of each backend; prints milliseconds,
achieved TFLOP/s and the fraction of (query block, key block) pairs our kernel skips. FLOPs count
ONLY allowed (query, key) pairs, for every backend: forward 4 * D * Hq * allowed_pairs, backward
2.5x the forward (the FlashAttention-2 convention; recomputation is not counted).

Packs are realistic (unimedvl_jax/kernels/random_packs.py: VQA / report / text-to-image / editing /
counterfactual samples with ViT images, clean and noised VAE images, text), greedily packed.

On CPU the Pallas kernels run in interpret mode, which is far too slow to time: the script then
runs a small correctness check of every backend (forward and gradients vs the reference, in
interpret mode / with implementation='xla') plus the block-skip statistics of the requested
lengths, and says so. benchmarks/gpu_check.py is the one prepared GPU run (correctness on random
packs, these timings at 8k and 32k, the small config's train-step MFU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from unimedvl_jax.kernels.cudnn_attention import cudnn_attention  # noqa: E402
from unimedvl_jax.kernels.flash_attention import (block_sparsity, default_block_sizes,  # noqa: E402
                                                  flash_attention, resolve_backend)
from unimedvl_jax.kernels import random_packs as packs  # noqa: E402
from unimedvl_jax.kernels.splash import splash_attention  # noqa: E402
from unimedvl_jax.model.attention import allowed, attention_mask, reference_attention  # noqa: E402


ALL_IMPLS = ('pallas', 'splash', 'cudnn', 'dense')


def native_impls(platform: str) -> tuple[str, ...]:
  """The backends that run natively (not interpreted / emulated) on a platform."""
  return {'tpu': ('pallas', 'splash', 'dense'), 'gpu': ('pallas', 'cudnn', 'dense')}.get(
      platform, ('dense',))


def make_attn(impl: str, *, platform: str, density=None, block_q=None, block_k=None,
              backend='auto'):
  """attn(q, k, v, seg, split, mode) -> out, [B, T, H, D], for one backend on `platform`
  ('cpu' runs the kernels in interpret mode and cuDNN's call with implementation='xla')."""
  interpret = platform == 'cpu'
  if impl == 'pallas':
    return functools.partial(flash_attention, block_q=block_q, block_k=block_k, backend=backend,
                             density=density, interpret=interpret)
  if impl == 'splash':
    return functools.partial(splash_attention, interpret=interpret)
  if impl == 'cudnn':
    return functools.partial(cudnn_attention,
                             implementation='cudnn' if platform == 'gpu' else 'xla')
  if impl == 'dense':
    return functools.partial(cudnn_attention, implementation='xla')
  if impl == 'reference':
    return reference_attention
  raise ValueError(f'unknown backend {impl!r}; choose from {ALL_IMPLS}')


def fwd_and_grad(attn):
  """(jit forward, jit grad of sum(out * ct) w.r.t. q, k, v)."""
  def loss(q, k, v, seg, split, mode, ct):
    return jnp.sum(attn(q, k, v, seg, split, mode).astype(jnp.float32) * ct)
  return jax.jit(attn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def fwd_vjp(attn):
  """jit(q, k, v, ct, *meta) -> (out, dq, dk, dv)."""
  def f(q, k, v, ct, seg, split, mode):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg, split, mode), q, k, v)
    return (out,) + vjp(ct.astype(out.dtype))
  return jax.jit(f)


def rel_errors(got, want) -> dict:
  errs = {}
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    errs[name] = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
  return errs


def allowed_pairs(seg, split, mode, chunk=1024):
  """Number of allowed (query, key) pairs, without materialising T x T (chunks of queries)."""
  B, T = seg.shape
  idx = jnp.arange(T, dtype=jnp.int32)
  chunk = min(chunk, T)
  n_chunks = -(-T // chunk)
  pad = n_chunks * chunk - T
  padq = lambda x: jnp.pad(x, ((0, 0), (0, pad)))
  qseg, qsplit, qmode = padq(seg), padq(split), padq(mode)
  qidx = jnp.pad(idx, (0, pad))

  def one(c):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=-1)
    m = allowed(sl(qseg)[:, :, None], sl(qsplit)[:, :, None], sl(qmode)[:, :, None],
                sl(qidx)[None, :, None], seg[:, None, :], split[:, None, :], mode[:, None, :],
                idx[None, None, :])
    return jnp.sum(m, dtype=jnp.int32)          # <= B * chunk * T per chunk
  counts = jax.lax.map(one, jnp.arange(n_chunks))
  return int(np.sum(np.asarray(counts, np.int64)))


def timeit(fn, *args, iters=10, warmup=2):
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def time_impl(attn, q, k, v, meta, ct, fwd_flops, *, iters, backward=True) -> dict:
  """Forward (and forward + backward) median time and achieved TFLOP/s of one backend."""
  fwd, grad = fwd_and_grad(attn)
  t0 = time.perf_counter()
  jax.block_until_ready(fwd(q, k, v, *meta))
  res = {'fwd_compile_and_first_s': round(time.perf_counter() - t0, 2)}
  t_f = timeit(fwd, q, k, v, *meta, iters=iters)
  res.update(fwd_ms=1e3 * t_f, fwd_tflops=fwd_flops / t_f / 1e12)
  if backward:
    t0 = time.perf_counter()
    jax.block_until_ready(grad(q, k, v, *meta, ct))
    res['fwd_bwd_compile_and_first_s'] = round(time.perf_counter() - t0, 2)
    t_b = timeit(grad, q, k, v, *meta, ct, iters=iters)
    res.update(fwd_bwd_ms=1e3 * t_b, fwd_bwd_tflops=3.5 * fwd_flops / t_b / 1e12)
  return res


def correctness(args, impls, T=None):
  """Forward + grads of every backend vs reference_attention on a small random pack."""
  platform = jax.default_backend()
  rng = np.random.default_rng(args.seed)
  small = platform == 'cpu'
  B, Hq, Hkv, D = (1, 4, 2, 64) if small else (1, args.heads, args.kv_heads, args.head_dim)
  T = T or (384 if small else 4096)
  meta = packs.random_batch(rng, B, T, max_item=96 if small else 600)
  dt = jnp.float32 if small else jnp.bfloat16      # cuDNN needs bf16 on a GPU
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
  q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
  want = fwd_vjp(reference_attention)(q, k, v, ct, *meta)
  tol = 2e-5 if dt == jnp.float32 else 5e-2
  ok, out = True, {}
  for impl in impls:
    kw = dict(block_q=32, block_k=32, backend=args.backend) if (small and impl == 'pallas') else {}
    attn = make_attn(impl, platform=platform, **kw)
    errs = rel_errors(fwd_vjp(attn)(q, k, v, ct, *meta), want)
    good = max(errs.values()) <= tol
    ok &= good
    out[impl] = errs
    print(f'correctness {impl:7s} T={T} Hq={Hq} Hkv={Hkv} D={D} {jnp.dtype(dt).name}: max '
          'relative error ' + ', '.join(f'{k} {v:.2e}' for k, v in errs.items())
          + f' (tol {tol:g}) ' + ('OK' if good else 'FAILED'))
  return ok, out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--lengths', default='4096,8192,16384,32768',
                 help='comma-separated packed lengths T')
  p.add_argument('--impls', default=None,
                 help=f'comma-separated backends from {ALL_IMPLS} (default: native ones)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=28)
  p.add_argument('--kv-heads', type=int, default=4)
  p.add_argument('--head-dim', type=int, default=128)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--backend', default='auto', choices=['auto', 'generic', 'tpu'],
                 help="our kernel's Pallas backend")
  p.add_argument('--block-q', type=int, default=None)
  p.add_argument('--block-k', type=int, default=None)
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--dense-max-len', type=int, default=16384)
  p.add_argument('--no-backward', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None, help='write the results here')
  args = p.parse_args()
  dbq, dbk = default_block_sizes(args.backend)
  args.block_q, args.block_k = args.block_q or dbq, args.block_k or dbk
  lengths = [int(x) for x in args.lengths.split(',')]
  platform = jax.default_backend()
  impls = tuple(args.impls.split(',')) if args.impls else native_impls(platform)
  print(f'jax {jax.__version__} on {platform}: {jax.devices()[0].device_kind}; our kernel: '
        f'Pallas backend {resolve_backend(args.backend)}, blocks {args.block_q}x{args.block_k}; '
        f'backends {",".join(impls)}')
  results = {'platform': platform, 'device': jax.devices()[0].device_kind,
             'blocks': [args.block_q, args.block_k], 'impls': list(impls), 'lengths': {}}

  if platform == 'cpu':
    print('CPU: the kernels run in interpret mode here (far too slow to time), so this is a '
          'small correctness check of every backend plus block-skip statistics; run on a GPU or '
          'TPU for timings.')
    ok, errs = correctness(args, ('pallas', 'splash', 'cudnn', 'dense'))
  else:
    ok, errs = correctness(args, impls)
  results['correctness'] = errs

  rng = np.random.default_rng(args.seed)
  dt = jnp.dtype(args.dtype)
  B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
  for T in lengths:
    meta = tuple(jnp.asarray(x) for x in packs.realistic_batch(rng, B, T))
    n_samples = [int(len(np.unique(np.asarray(meta[0][b]))) - (np.asarray(meta[0][b]) == 0).any())
                 for b in range(B)]
    frac = {k: float(v) for k, v in block_sparsity(*meta, args.block_q, args.block_k).items()}
    pairs = allowed_pairs(*meta)
    density = pairs / (B * T * T)
    row = {'samples': n_samples, 'pad_frac': float(np.mean(np.asarray(meta[0]) == 0)),
           'allowed_density': density, 'blocks': frac}
    line = (f'T={T:6d} samples/pack={n_samples} allowed={density:.4f} of T^2 | blocks '
            f'skip {frac["skip"]:.3f} partial {frac["partial"]:.3f} full {frac["full"]:.3f}')
    print(line)
    if platform == 'cpu':
      results['lengths'][T] = row
      continue
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
    q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
    fwd_flops = 4.0 * D * Hq * pairs
    for impl in impls:
      if impl == 'dense' and T > args.dense_max_len:
        print(f'    {impl:6s}: skipped (T > --dense-max-len={args.dense_max_len})')
        continue
      attn = make_attn(impl, platform=platform, density=frac['computed'], block_q=args.block_q,
                       block_k=args.block_k, backend=args.backend)
      try:
        res = time_impl(attn, q, k, v, meta, ct, fwd_flops, iters=args.iters,
                        backward=not args.no_backward)
        msg = f'    {impl:6s}: fwd {res["fwd_ms"]:8.2f} ms {res["fwd_tflops"]:7.1f} TFLOP/s'
        if 'fwd_bwd_ms' in res:
          msg += f' | fwd+bwd {res["fwd_bwd_ms"]:8.2f} ms {res["fwd_bwd_tflops"]:7.1f} TFLOP/s'
      except Exception as e:  # noqa: BLE001 - OOM of the dense baseline is a result too
        res = {'error': f'{type(e).__name__}: {str(e)[:200]}'}
        msg = f'    {impl:6s}: failed ({res["error"]})'
      row[impl] = res
      print(msg)
    base = row.get('pallas', {})
    for impl in impls:
      other = row.get(impl, {})
      if impl != 'pallas' and 'fwd_ms' in other and 'fwd_ms' in base:
        msg = f'    pallas vs {impl}: fwd {other["fwd_ms"] / base["fwd_ms"]:.2f}x'
        if 'fwd_bwd_ms' in other and 'fwd_bwd_ms' in base:
          msg += f', fwd+bwd {other["fwd_bwd_ms"] / base["fwd_bwd_ms"]:.2f}x'
        print(msg)
    results['lengths'][T] = row
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
