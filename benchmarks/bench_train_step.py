"""The real jitted training step on real packed batches: FLOPs, compile time, step time, MFU, memory.

    JAX_PLATFORMS=cpu python benchmarks/bench_train_step.py                      # small, bf16
    python benchmarks/bench_train_step.py --config configs/tiny.py --dtype fp32 --steps 5
    python benchmarks/bench_train_step.py --remat full --json out.json
    python benchmarks/bench_train_step.py --profile /tmp/prof      # + top ops of one step
    python benchmarks/bench_train_step.py --what_if bf16_dots --what_if blocked_attention --no-unrolled

Batches come from the real input pipeline (`data.pipeline.make_train_iterator`) on the embedded
synthetic dataset, generated once into --data_dir at the config's VAE image size (a few
seconds); `--source packs` uses hand-built packs (tests/model/packs.py) instead. All batches are
drawn before timing (data time is not in the step time). The step is `train.step.make_train_step`
under `jit_train_step` (explicit shardings, donated state), compiled ahead of time.

Printed (JSON): model FLOPs per step (profiling.model_flops_per_step with the exact allowed
attention pairs of each batch, profiling.allowed_pairs, and the exact ViT pairs; the FLOPs
convention is in unimedvl_jax/profiling.py: padding slots counted, causal/masked attention
counted by allowed pairs only, 3x forward for trainable parts, remat not counted), lower and
compile time, step time (median over --steps after --warmup steps, plus min/max), real tokens/s
(non-padding tokens), MFU against a square-matmul peak measured in the same run with the same
dtype (before and after the timed steps; the higher is used, so MFU is conservative) and also
against the bf16 peak, peak memory (profiling.peak_memory_bytes: on CPU the process peak RSS,
which includes the compiler), compiled.memory_analysis(), and compiled.cost_analysis() FLOPs.
XLA counts a scanned layer body once, so --unrolled (default on) also compiles the same step
with config.model.scan_layers=False and reports its cost-analysis FLOPs (that compile is only
analysed, never run). Compiled FLOPs count what XLA executes: dense [T, T] attention (not just
allowed pairs), rematerialisation, the optimizer; so they exceed the model FLOPs.

Timings on a shared CPU are noisy: the load average is recorded at start and end, and each step's
process CPU time (all threads; `step_cpu_s`) is reported next to its wall time.

--profile DIR traces one extra step (jax.profiler) and prints the top HLO ops by thread-summed
time with their JAX source op, and the time per coarse bucket (dense [T, T] attention, matmuls,
VAE convolutions, converts, scan slicing, ...). --what_if NAME measures a proposed model change by
monkeypatching it in for this process only (see WHAT_IFS below; nothing in the package changes):
  bf16_dots          Linear and the lm_head CE dot as bf16 x bf16 -> f32 dots, forward and backward
  bf16_attention     the reference attention's QK^T / PV in the compute dtype with f32 accumulation
  blocked_attention  a flash-style XLA attention that skips fully masked key blocks at run time
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unimedvl_jax import profiling, sharding  # noqa: E402
from unimedvl_jax.batch import batch_spec  # noqa: E402
from unimedvl_jax.config import load_config_file, stage_train_config  # noqa: E402
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


# ---------------------------------------------------------------------------------- what-ifs
# In-process monkeypatches that measure proposed model changes WITHOUT editing the model (off by
# default; the result JSON lists the ones applied). XLA:CPU runs a dot natively in bf16 only as
# bf16 x bf16 -> f32 (YNNPACK); a bf16 x bf16 -> bf16 dot (jnp.dot of two bf16 arrays) is
# converted to an f32 x f32 dot, and so are the backward dots that JAX derives from a
# preferred_element_type=f32 dot. `lowp_einsum` keeps inputs in the compute dtype and
# accumulates in f32 in the forward AND both backward products (custom_vjp).

WHAT_IFS = ('bf16_dots', 'bf16_attention', 'blocked_attention')


def lowp_einsum(eq: str, a, b):
  """einsum(eq, a, b) in a's dtype with f32 accumulation (f32 result), in forward and backward.
  Every index of `eq` must appear in at least two of its three terms (true for matmuls and the
  attention contractions)."""
  ins, out = eq.split('->')
  ia, ib = ins.split(',')
  f32 = jnp.float32

  @jax.custom_vjp
  def f(a, b):
    return jnp.einsum(eq, a, b, preferred_element_type=f32)

  def fwd(a, b):
    return f(a, b), (a, b)

  def bwd(res, g):
    a, b = res
    g = g.astype(a.dtype)
    da = jnp.einsum(f'{out},{ib}->{ia}', g, b, preferred_element_type=f32).astype(a.dtype)
    db = jnp.einsum(f'{ia},{out}->{ib}', a, g, preferred_element_type=f32).astype(b.dtype)
    return da, db

  f.defvjp(fwd, bwd)
  return f(a, b)


def blocked_attention(q, k, v, seg, split, mode, *, scale=None, block=128):
  """Flash-style attention in plain XLA: query blocks (lax.map, rematerialised) x key blocks
  (lax.scan with online softmax); a key block with no allowed pair is skipped with lax.cond
  (at run time, forward and backward). Matmuls in q's dtype with f32 accumulation (lowp_einsum)."""
  from unimedvl_jax.model.attention import allowed
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  scale = D ** -0.5 if scale is None else scale
  pad = (-T) % block
  if pad:
    p2 = lambda a, c=0: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=c)
    q, k, v = p2(q), p2(k), p2(v)
    seg = p2(seg)            # padding: segment 0 (sees nothing, seen by nothing)
    split, mode = p2(split, jnp.max(split) + 1), p2(mode)
  Tp = T + pad
  nb = Tp // block
  idx = jnp.arange(Tp, dtype=jnp.int32)
  f32 = jnp.float32
  kb = k.reshape(B, nb, block, Hkv, D).swapaxes(0, 1)
  vb = v.reshape(B, nb, block, Hkv, D).swapaxes(0, 1)
  metab = lambda a: a.reshape(B, nb, block).swapaxes(0, 1)
  kmeta = (metab(seg), metab(split), metab(mode), idx.reshape(nb, block))

  @jax.checkpoint
  def q_block(args):
    qb, qs, qsp, qm, qi = args                      # qb [B, bq, Hkv, G, D]; meta [B, bq]
    def kstep(carry, xs):
      kk, vv, ks, ksp, km, ki = xs
      mask = allowed(qs[:, :, None], qsp[:, :, None], qm[:, :, None], qi[None, :, None],
                     ks[:, None, :], ksp[:, None, :], km[:, None, :], ki[None, None, :])
      def compute(c):
        m, l, acc = c
        s = lowp_einsum('bqhgd,bkhd->bhgqk', qb, kk.astype(qb.dtype)) * scale
        mk = mask[:, None, None]
        s = jnp.where(mk, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mk, jnp.exp(s - m_safe[..., None]), 0.0)
        corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        l_new = l * corr + jnp.sum(p, axis=-1)
        acc_new = acc * corr[..., None] + lowp_einsum('bhgqk,bkhd->bhgqd', p.astype(qb.dtype),
                                                      vv.astype(qb.dtype))
        return m_new, l_new, acc_new
      return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry), None
    bq = qb.shape[1]
    init = (jnp.full((B, Hkv, G, bq), -jnp.inf, f32), jnp.zeros((B, Hkv, G, bq), f32),
            jnp.zeros((B, Hkv, G, bq, D), f32))
    (m, l, acc), _ = jax.lax.scan(kstep, init, (kb, vb) + kmeta)
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return o.transpose(0, 3, 1, 2, 4).astype(qb.dtype)          # [B, bq, Hkv, G, D]

  qbs = q.reshape(B, nb, block, Hkv, G, D).swapaxes(0, 1)
  out = jax.lax.map(q_block, (qbs,) + tuple(metab(a) for a in (seg, split, mode)) + (idx.reshape(nb, block),))
  out = out.swapaxes(0, 1).reshape(B, Tp, Hq, D)
  return out[:, :T]


def apply_what_ifs(names) -> None:
  from unimedvl_jax.model import attention as attn_lib
  from unimedvl_jax.model import layers, unimedvl
  for name in names:
    if name == 'bf16_dots':
      def linear_call(self, x):
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        lead = x.shape[:-1]
        y = lowp_einsum('mk,kn->mn', x.reshape(-1, x.shape[-1]), w).astype(self.dtype)
        y = y.reshape(lead + (w.shape[1],))
        if self.bias is not None:
          y = y + self.bias[...].astype(self.dtype)
        return y
      layers.Linear.__call__ = linear_call
      orig_ce = unimedvl.chunked_cross_entropy

      def ce(h, w, labels, mask, chunk, dtype):
        # same as chunked_cross_entropy, with the lm_head dot in lowp_einsum
        Hd = h.shape[-1]
        hf, lf = h.reshape(-1, Hd), labels.reshape(-1)
        mf = mask.reshape(-1).astype(jnp.float32)
        n = hf.shape[0]
        chunk = max(1, min(chunk, n))
        pad = (-n) % chunk
        if pad:
          hf, lf, mf = jnp.pad(hf, ((0, pad), (0, 0))), jnp.pad(lf, (0, pad)), jnp.pad(mf, (0, pad))
        hc, lc, mc = hf.reshape(-1, chunk, Hd), lf.reshape(-1, chunk), mf.reshape(-1, chunk)
        wd = w.astype(dtype)

        @jax.checkpoint
        def one(args):
          hh, ll, mm = args
          logits = lowp_einsum('mk,kn->mn', hh.astype(dtype), wd)
          lse = jax.nn.logsumexp(logits, axis=-1)
          tgt = jnp.take_along_axis(logits, ll[:, None], axis=-1)[:, 0]
          return jnp.sum((lse - tgt) * mm)
        if hc.shape[0] == 1:
          return one((hc[0], lc[0], mc[0]))
        return jnp.sum(jax.lax.map(one, (hc, lc, mc)))
      ce.__wrapped__ = orig_ce
      unimedvl.chunked_cross_entropy = ce
    elif name == 'bf16_attention':
      def masked_attention(q, k, v, mask, scale=None):
        # masked_attention with QK^T and PV in q's dtype, f32 accumulation, softmax in f32
        B, Tq, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        scale = D ** -0.5 if scale is None else scale
        qg = q.reshape(B, Tq, Hkv, G, D)
        logits = lowp_einsum('bqhgd,bkhd->bhgqk', qg, k.astype(q.dtype)) * scale
        m = mask[:, None, None, :, :]
        logits = jnp.where(m, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom > 0, denom, 1.0)
        out = lowp_einsum('bhgqk,bkhd->bqhgd', p.astype(q.dtype), v.astype(q.dtype))
        return out.reshape(B, Tq, Hq, D).astype(q.dtype)
      attn_lib.masked_attention = masked_attention
    elif name == 'blocked_attention':
      attn_lib.reference_attention = blocked_attention
    else:
      raise ValueError(f'unknown --what_if {name!r}; choose from {WHAT_IFS}')


# ---------------------------------------------------------------------------------- batches

def pipeline_batches(cfg, n: int, data_dir: str) -> list[dict]:
  from unimedvl_jax.data import pipeline, synthetic
  size = int(cfg.data.vae_max_size)
  root = synthetic.ensure_dataset(os.path.join(data_dir, f'synthetic-s0-{size}-n64'), seed=0,
                                  size=size, n_subjects=64)
  cfg = cfg.copy_and_resolve_references()
  cfg.data.root = root
  cfg.data.num_workers = 0
  it = pipeline.make_train_iterator(cfg)
  try:
    return [next(it) for _ in range(n)]
  finally:
    if hasattr(it, 'close'):
      it.close()


def _load_packs():
  spec = importlib.util.spec_from_file_location('bench_model_packs',
                                                os.path.join(ROOT, 'tests', 'model', 'packs.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def hand_packs(cfg, n: int) -> list[dict]:
  """tests/model/packs.py packs: repeat the two mixed samples while they fit the budgets."""
  packs = _load_packs()
  d, m = cfg.data, cfg.model
  side = max(1, min(4, d.vae_buffer_size // 16))
  vit_side = max(1, min(8, m.vit.grid_size))
  protos = [
      [('text', 24, False), ('vit', vit_side, vit_side), ('text', 40, True)],
      [('text', 16, False), ('vae', side, side, False), ('vit', vit_side // 2 or 1, vit_side // 2 or 1),
       ('vae', side, side, True), ('text', 20, True)],
      [('text', 30, False), ('vae', side, side, True)],
  ]

  def cost(s):
    t = l_ = p = nv = 0
    for it in s:
      if it[0] == 'text':
        t += it[1] + 2
      elif it[0] == 'vit':
        t += it[1] * it[2] + 2
        p += it[1] * it[2]
      else:
        t += it[1] * it[2] + 2
        l_ += it[1] * it[2]
        nv += 1
    return t, l_, p, nv

  rows = []
  for r in range(d.batch_size):
    used = [0, 0, 0, 0]
    row = []
    k = r
    for _ in range(10000):
      s = protos[k % len(protos)]
      c = cost(s)
      u = [a + b for a, b in zip(used, c)]
      if (u[0] > d.seq_len or u[1] > d.max_latent_tokens or u[2] > d.max_vit_patches
          or u[3] > d.max_vae_images or u[0] - u[1] > d.seq_len - d.max_latent_tokens):
        break
      row.append(s)
      used = u
      k += 1
    rows.append(row)
  return [packs.build_batch(cfg, rows, seed=i) for i in range(n)]


def vit_pairs(batch) -> float:
  seg = np.asarray(batch['vit_segment_ids'])
  tot = 0.0
  for row in seg:
    _, counts = np.unique(row[row != 0], return_counts=True)
    tot += float(np.sum(counts.astype(np.float64) ** 2))
  return tot


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
  apply_what_ifs(args.what_if)
  out['what_if'] = list(args.what_if)
  cfg = load_cfg(args)
  spec = batch_spec(cfg)
  n_batches = args.warmup + args.steps + (1 if args.profile else 0)
  t0 = time.perf_counter()
  if args.source == 'pipeline':
    try:
      batches = pipeline_batches(cfg, n_batches, args.data_dir)
      out['source'] = 'pipeline (embedded synthetic dataset)'
    except Exception as e:  # noqa: BLE001 - data shapes that do not suit the config
      print(f'pipeline batches failed ({type(e).__name__}: {e}); using hand-built packs',
            file=sys.stderr)
      batches = hand_packs(cfg, n_batches)
      out['source'] = f'tests/model/packs.py (pipeline failed: {type(e).__name__})'
  else:
    batches = hand_packs(cfg, n_batches)
    out['source'] = 'tests/model/packs.py'
  out['data_s'] = round(time.perf_counter() - t0, 2)
  d = cfg.data
  out['shapes'] = dict(B=d.batch_size, T=d.seq_len, U=d.seq_len - d.max_latent_tokens,
                       L=d.max_latent_tokens, P=d.max_vit_patches, N=d.max_vae_images,
                       S=d.vae_buffer_size)

  # ---- analytic model FLOPs of the timed batches (exact attention pairs)
  timed = batches[args.warmup:args.warmup + args.steps]
  per = []
  for b in timed:
    per.append(profiling.model_flops_per_step(cfg, attn_pairs=profiling.allowed_pairs(b),
                                              vit_pairs=vit_pairs(b)))
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
  fn = step_lib.make_train_step(graphdef, cfg, tc)
  jitted, _, b_sh = step_lib.jit_train_step(fn, abstract, mesh, spec)
  b_abs = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in spec.items()}
  lr_abs = jax.ShapeDtypeStruct((), jnp.float32)
  t0 = time.perf_counter()
  lowered = jitted.lower(abstract, b_abs, lr_abs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out['lower_s'] = round(t1 - t0, 2)
  out['compile_s'] = round(t2 - t1, 2)
  out['cost_analysis_scanned'] = profiling.compiled_cost(compiled)
  out['memory_analysis'] = profiling.compiled_memory(compiled)
  hlo_text = compiled.as_text() if (args.dump_hlo or args.profile) else None
  if args.dump_hlo:
    profiling.dump_hlo(compiled, args.dump_hlo)

  init = jax.jit(lambda: step_lib.init_state(cfg)[1], out_shardings=st_sh)
  state = init()
  dev_batches = [{k: jax.device_put(v, b_sh[k]) for k, v in b.items()} for b in batches]
  lr = jnp.float32(1e-4)

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
    state, metrics = compiled(state, b, lr)
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

  # ---- an unrolled compile, only for cost_analysis (a scanned body is counted once)
  if args.unrolled:
    cfg_u = load_cfg(args, scan=False)
    g_u, abs_u = step_lib.abstract_state(cfg_u)
    fn_u = step_lib.make_train_step(g_u, cfg_u, stage_train_config(cfg_u, args.stage))
    jit_u, _, _ = step_lib.jit_train_step(fn_u, abs_u, mesh, spec)
    t0 = time.perf_counter()
    comp_u = jit_u.lower(abs_u, b_abs, lr_abs).compile()
    out['unrolled_compile_s'] = round(time.perf_counter() - t0, 2)
    out['cost_analysis_unrolled'] = profiling.compiled_cost(comp_u)
    out['memory_analysis_unrolled'] = profiling.compiled_memory(comp_u)
    cf = out['cost_analysis_unrolled']['flops']
    out['compiled_over_model_flops'] = cf / flops['train']
    out['compiled_flops_per_s'] = cf / med
    out['compiled_fraction_of_peak'] = cf / med / peak
    del comp_u
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
  ap.add_argument('--source', default='pipeline', choices=['pipeline', 'packs'])
  ap.add_argument('--data_dir', default=os.path.join(
      os.environ.get('TMPDIR', '/tmp'), 'unimedvl_bench'), help='where the dataset is generated')
  ap.add_argument('--peak_n', type=int, default=2048, help='matmul size of the peak measurement')
  ap.add_argument('--unrolled', action=argparse.BooleanOptionalAction, default=True,
                  help='also compile with scan_layers=False for cost_analysis FLOPs')
  ap.add_argument('--override', action='append', default=[],
                  help="config override 'a.b=value' (repeatable)")
  ap.add_argument('--what_if', action='append', default=[], choices=WHAT_IFS,
                  help='measure a proposed model change by monkeypatching it in (repeatable)')
  ap.add_argument('--profile', default=None,
                  help='trace one extra step (after the timed ones) into this dir; top ops')
  ap.add_argument('--profile_top', type=int, default=25)
  ap.add_argument('--dump_hlo', default=None, help='write the compiled HLO here')
  ap.add_argument('--json', default=None, help='also write the result here')
  ap.add_argument('--verbose', action='store_true')
  args = ap.parse_args(argv)
  res = bench(args)
  profiling.print_json(res)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == '__main__':
  main()
