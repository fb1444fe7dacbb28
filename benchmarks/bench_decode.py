"""Per-token time of cached text decoding vs a full recompute, interleaved in one process.

    python -m benchmarks.bench_decode                                # tiny, 256 and 2048 context
    python -m benchmarks.bench_decode --contexts 256,2048 --new 32 --rounds 7 --json out.json

At each context size N (configs/tiny.py by default, random weights, batch 1): a context of
capacity N is prefilled with one text item of N - new - 4 prompt ids, so that the decode of
`new` tokens (+ <|im_start|> and the forced <|im_end|>: new + 2 fed tokens) fills it exactly.

- cached: `generate_text` through the public API (host work included: argument preparation,
  dispatch, reading the results back), on the model split once (`context.prepare`), greedy.
  Per-token time = wall time / (new + 2).
- cached, model not prepared: the same call on the plain nnx module (it is split per call).
- loop only: the jitted decode loop called directly (no host work around it).
- full recompute: what decoding without a cache does per token: ONE jitted forward of the whole
  N-token sequence (the same decoder, attention over the sequence with the `allowed` mask), the
  logits of the last token and their argmax.

Two ablations of the loop (same greedy loop, written here: `_ablation_loop`), to measure what
the prepared layers and the compiler option buy:
- loop, weights re-sliced per token: every token slices each layer's weights out of the stacked
  [layers, ...] arrays (what a scan over stacked layers does) instead of reading the prepared
  per-layer copies;
- loop, default CPU copy insertion: the library loop compiled without
  `context.CPU_COMPILER_OPTIONS` (XLA then copies every layer's cache buffers every token).

Each round times every variant once (after a compile/warm-up call of each; the order rotates
from round to round), rounds are interleaved so that machine load hits all variants alike; the medians are reported with the
ratio recompute / cached (and the minima: on a loaded machine the least disturbed run). The
load average is printed (the numbers are noisy on a shared CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from unimedvl_jax.config_load import load_config_file  # noqa: E402
from unimedvl_jax.infer import context as C  # noqa: E402
from unimedvl_jax.infer import text as T  # noqa: E402
from unimedvl_jax.infer.random_init import random_model  # noqa: E402


@functools.partial(jax.jit, static_argnums=(0,))
def _recompute_step(graphdef, state, ctx, blk, last):
  """Decoding without a cache, one token: the whole sequence through the model, the greedy
  next token of the last valid position."""
  model = C.merge(graphdef, state)
  _, h_u, _ = C.forward_block(model, ctx, blk, write=False)
  h = jnp.take_along_axis(h_u, last[:, None, None], axis=1)[:, 0]
  return jnp.argmax(model.logits(h), -1)


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6),
                   compiler_options=C.CPU_COMPILER_OPTIONS)
def _ablation_loop(graph, layer_graph, state, stacked_layers, ctx, steps: int, sliced: bool):
  """Greedy decoding of `steps` tokens (im_start first); sliced=True rebuilds every layer from
  slices of `stacked_layers` inside the loop body (per token) instead of the prepared copies."""
  model = C.merge(graph, state)
  B = ctx.batch_size
  n_layers = len(model.decoder.layers)

  def body(i, s):
    c, cur = s
    m = C.merge(graph, state)             # this trace level's own module objects
    if sliced:
      m.decoder.layers = nnx.List([
          C.merge(layer_graph, jax.tree.map(lambda a: a[j], stacked_layers))
          for j in range(n_layers)])
    blk = T.token_block(cur, jnp.ones((B,), bool), i == 0)
    c, h_u, _ = C.forward_block(m, c, blk, write=True)
    return c, jnp.argmax(m.logits(h_u[:, 0]), -1).astype(jnp.int32)

  return jax.lax.fori_loop(0, steps, body, (ctx, jnp.full((B,), 3, jnp.int32)))


def _timed(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def bench_context(model, prepared, sp, N, new, rounds, seed=0):
  V = model.lm_head.kernel.shape[-1]
  rs = np.random.RandomState(seed)
  prompt = N - new - 4
  if prompt < 1:
    raise SystemExit(f'--contexts {N}: needs more than --new + 4 = {new + 4} tokens')
  ids = rs.randint(10, V, size=prompt)
  ctx = C.add_text(model, C.new_context(model, 1, N), ids, sp)
  settings = T.TextSettings(max_new_tokens=new)
  fed = new + 2
  graphdef, state = prepared.static, prepared.state

  def cached():
    return T.generate_text(prepared, ctx, sp, settings).tokens

  def unprepared():
    return T.generate_text(model, ctx, sp, settings).tokens

  loop_args, _, _, greedy = T.decode_args(ctx, sp, settings)

  def loop_only():
    return T._decode_jit(graphdef, state, ctx, *loop_args, new, False, greedy)

  def loop_default_copies():
    return T._decode_jit.plain(graphdef, state, ctx, *loop_args, new, False, greedy)

  layer_graph = C.StaticGraph(nnx.split(prepared.module.decoder.layers[0])[0])
  stacked = nnx.split(C.module_of(model).decoder.layers)[1]

  def loop_prepared_layers():
    return _ablation_loop(graphdef, layer_graph, state, stacked, ctx, fed, False)

  def loop_sliced_weights():
    return _ablation_loop(graphdef, layer_graph, state, stacked, ctx, fed, True)

  tb = C.make_builder(model, 1, sp)
  tb.raw_text(0, rs.randint(10, V, size=N))
  blk = tb.build()
  assert blk.valid.shape[1] == N, blk.valid.shape
  empty = C.new_context(model, 1, 1)
  last = jnp.full((1,), N - 1, jnp.int32)

  def recompute():
    return _recompute_step(graphdef, state, empty, blk, last)

  variants = dict(cached=(cached, fed), cached_unprepared=(unprepared, fed),
                  loop_only=(loop_only, fed), loop_default_copy_insertion=(loop_default_copies, fed),
                  ablation_prepared_layers=(loop_prepared_layers, fed),
                  ablation_weights_sliced_per_token=(loop_sliced_weights, fed),
                  recompute=(recompute, 1))
  for fn, _ in variants.values():     # compile + warm up
    jax.block_until_ready(fn())
  times = {k: [] for k in variants}
  names = list(variants)
  for r in range(rounds):      # the order rotates: no variant always runs after the recompute
    for k in names[r % len(names):] + names[:r % len(names)]:
      fn, per = variants[k]
      times[k].append(_timed(fn) / per)
  med = {k: float(np.median(v)) for k, v in times.items()}
  best = {k: float(np.min(v)) for k, v in times.items()}
  out = dict(context=N, prompt_tokens=prompt, fed_tokens=fed,
             per_token_ms={k: round(v * 1e3, 4) for k, v in med.items()},
             per_token_ms_min={k: round(v * 1e3, 4) for k, v in best.items()},
             ratio_min_recompute_over_cached=round(best['recompute'] / best['cached'], 2),
             per_token_ms_all={k: [round(x * 1e3, 4) for x in v] for k, v in times.items()},
             ratio_recompute_over_cached=round(med['recompute'] / med['cached'], 2),
             ratio_recompute_over_cached_unprepared=round(
                 med['recompute'] / med['cached_unprepared'], 2),
             ratio_recompute_over_loop_only=round(med['recompute'] / med['loop_only'], 2),
             slicing_weights_per_token_costs=round(
                 med['ablation_weights_sliced_per_token'] / med['ablation_prepared_layers'], 2),
             default_copy_insertion_costs=round(
                 med['loop_default_copy_insertion'] / med['loop_only'], 2))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='tiny')
  ap.add_argument('--contexts', default='256,2048')
  ap.add_argument('--new', type=int, default=32, help='generated tokens per decode call')
  ap.add_argument('--rounds', type=int, default=7)
  ap.add_argument('--json', default=None)
  args = ap.parse_args()
  cfg = load_config_file(os.path.join(ROOT, 'configs', f'{args.config}.py'))
  model = random_model(cfg.model, 0)
  prepared = C.prepare(model)
  # end id -1: never chosen (ids are >= 0), so every call decodes exactly new + 2 tokens (the
  # forced end token is fed as id -1, i.e. the last embedding row; its logits are not used)
  sp = C.Specials(im_start=3, im_end=-1, vision_start=5, vision_end=6)
  res = dict(config=args.config, backend=jax.default_backend(), batch=1, new_tokens=args.new,
             load_average_before=list(os.getloadavg()), results=[])
  for N in (int(x) for x in args.contexts.split(',')):
    r = bench_context(model, prepared, sp, N, args.new, args.rounds)
    res['results'].append(r)
    print(json.dumps({k: v for k, v in r.items() if k != 'per_token_ms_all'}), flush=True)
  res['load_average_after'] = list(os.getloadavg())
  print(f"load average before {res['load_average_before']}, after {res['load_average_after']}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
