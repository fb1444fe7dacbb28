"""Packed-sequence flash attention (Pallas) vs jax.nn.dot_product_attention with a dense mask.

    python benchmarks/bench_attention.py                       # 4k..32k, 7B attention shape
    python benchmarks/bench_attention.py --lengths 4096,8192 --iters 20 --json out.json

On a GPU (e.g. one H200: about 2-4 minutes for the default lengths) or TPU it times, per packed
length: forward, and forward + backward (grads of q, k, v), of `flash_attention` and of the dense
XLA baseline; prints milliseconds, achieved TFLOP/s and the fraction of (query block, key block)
pairs the kernels skip. FLOPs count ONLY allowed (query, key) pairs, for both implementations:
forward 4 * D * Hq * allowed_pairs, backward 2.5x the forward (the FlashAttention-2 convention;
the kernel's recomputation is not counted). The dense baseline materialises [B, Hq, T, T]
logits, so it is skipped above --dense-max-len (default 16384; at 32k with 28 heads it needs
~120 GB in f32).

Packs are realistic (tests/kernels/packs.py: VQA / report / text-to-image / editing /
counterfactual samples with ViT images, clean and noised VAE images, text), greedily packed.

On CPU, Pallas runs in interpret mode, which is far too slow to time: the script then runs a
small correctness check (forward and gradients vs the reference) plus the block-skip statistics
of the requested lengths, and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unimedvl_jax.kernels.flash_attention import (block_sparsity, default_block_sizes,  # noqa: E402
                                                  flash_attention, resolve_backend)
from unimedvl_jax.model.attention import allowed, attention_mask, reference_attention  # noqa: E402

_spec = importlib.util.spec_from_file_location('bench_packs',
                                               os.path.join(ROOT, 'tests', 'kernels', 'packs.py'))
packs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(packs)


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


def make_fns(args, density, bq, bk):
  def flash(q, k, v, seg, split, mode):
    return flash_attention(q, k, v, seg, split, mode, block_q=bq, block_k=bk,
                           backend=args.backend, density=density)

  def dense(q, k, v, seg, split, mode):
    mask = attention_mask(seg, split, mode)[:, None, :, :]        # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  def fwd_bwd(attn):
    def loss(q, k, v, seg, split, mode, ct):
      return jnp.sum(attn(q, k, v, seg, split, mode).astype(jnp.float32) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  return {'flash': (jax.jit(flash), fwd_bwd(flash)), 'dense': (jax.jit(dense), fwd_bwd(dense))}


def correctness(args, T=None, interpret=None):
  """Forward + grads vs reference_attention on a small realistic-ish pack."""
  rng = np.random.default_rng(args.seed)
  small = jax.default_backend() == 'cpu'
  B, Hq, Hkv, D = (1, 4, 2, 64) if small else (1, args.heads, args.kv_heads, args.head_dim)
  T = T or (384 if small else 4096)
  meta = packs.random_batch(rng, B, T, max_item=96 if small else 600)
  dt = jnp.float32 if small else jnp.bfloat16
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
  q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
  bq, bk = (32, 32) if small else (args.block_q, args.block_k)

  def run(attn):
    def f(q, k, v, ct):
      out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, *meta), q, k, v)
      return (out,) + vjp(ct)
    return jax.jit(f)(q, k, v, ct)

  got = run(lambda *a: flash_attention(*a, block_q=bq, block_k=bk, backend=args.backend,
                                       interpret=interpret))
  want = run(reference_attention)
  errs = {}
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    errs[name] = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
  tol = 2e-5 if dt == jnp.float32 else 5e-2
  ok = max(errs.values()) <= tol
  print(f'correctness T={T} Hq={Hq} Hkv={Hkv} D={D} {jnp.dtype(dt).name}: max relative error '
        + ', '.join(f'{k} {v:.2e}' for k, v in errs.items()) + f' (tol {tol:g}) '
        + ('OK' if ok else 'FAILED'))
  return ok, errs


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--lengths', default='4096,8192,16384,32768',
                 help='comma-separated packed lengths T')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=28)
  p.add_argument('--kv-heads', type=int, default=4)
  p.add_argument('--head-dim', type=int, default=128)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--backend', default='auto', choices=['auto', 'generic', 'tpu'])
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
  print(f'jax {jax.__version__} on {platform}: {jax.devices()[0].device_kind}; kernel backend '
        f'{resolve_backend(args.backend)}, blocks {args.block_q}x{args.block_k}')
  results = {'platform': platform, 'device': jax.devices()[0].device_kind,
             'blocks': [args.block_q, args.block_k], 'lengths': {}}

  if platform == 'cpu':
    print('CPU: Pallas runs in interpret mode here (far too slow to time), so this is a small '
          'correctness check plus block-skip statistics; run on a GPU or TPU for timings.')
    ok, errs = correctness(args, interpret=True)
    results['correctness'] = errs
  else:
    ok, errs = correctness(args)
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
    if platform == 'cpu':
      print(line)
      results['lengths'][T] = row
      continue
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
    q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
    fwd_flops = 4.0 * D * Hq * pairs
    fns = make_fns(args, frac['computed'], args.block_q, args.block_k)
    print(line)
    for impl, (fwd, grad) in fns.items():
      if impl == 'dense' and T > args.dense_max_len:
        print(f'    {impl:5s}: skipped (T > --dense-max-len={args.dense_max_len})')
        continue
      try:
        t_f = timeit(fwd, q, k, v, *meta, iters=args.iters)
        res = {'fwd_ms': 1e3 * t_f, 'fwd_tflops': fwd_flops / t_f / 1e12}
        msg = f'    {impl:5s}: fwd {1e3 * t_f:8.2f} ms {res["fwd_tflops"]:7.1f} TFLOP/s'
        if not args.no_backward:
          t_b = timeit(grad, q, k, v, *meta, ct, iters=args.iters)
          res.update(fwd_bwd_ms=1e3 * t_b, fwd_bwd_tflops=3.5 * fwd_flops / t_b / 1e12)
          msg += f' | fwd+bwd {1e3 * t_b:8.2f} ms {res["fwd_bwd_tflops"]:7.1f} TFLOP/s'
      except Exception as e:  # noqa: BLE001 - OOM of the dense baseline is a result too
        res = {'error': f'{type(e).__name__}: {str(e)[:200]}'}
        msg = f'    {impl:5s}: failed ({res["error"]})'
      row[impl] = res
      print(msg)
    if 'fwd_ms' in row.get('dense', {}) and 'fwd_ms' in row.get('flash', {}):
      sp = row['dense']['fwd_ms'] / row['flash']['fwd_ms']
      msg = f'    speedup vs dense: fwd {sp:.2f}x'
      if 'fwd_bwd_ms' in row['dense'] and 'fwd_bwd_ms' in row['flash']:
        msg += f', fwd+bwd {row["dense"]["fwd_bwd_ms"] / row["flash"]["fwd_bwd_ms"]:.2f}x'
      print(msg)
    results['lengths'][T] = row
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
