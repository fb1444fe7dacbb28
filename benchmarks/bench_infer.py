"""Inference speed: prefill, KV-cache decode vs no-cache decode, and image generation.

    python -m benchmarks.bench_infer                          # tiny and small configs, CPU
    python -m benchmarks.bench_infer --configs tiny --json out.json

Per config (random weights, `unimedvl_jax.infer.random_init`; the config's compute dtype):
- prefill tokens/s: one causal text block of --prompt tokens into an empty context, batch 1, 8;
- decode tokens/s with the KV cache (the jitted greedy while-loop of infer/text.py on the
  prepared model; every row forced to run the full --new tokens; benchmarks/bench_decode.py
  compares it per token with a full recompute) at batch 1 and 8, and WITHOUT a cache (each new token recomputes
  the whole sequence: one jitted forward over the padded prompt + generated tokens per step);
- seconds per generated image: text-to-image at the config's largest VAE size, --steps
  timesteps (--steps - 1 model calls, 2 contexts for text CFG), + VAE decode, batch 1.

FLOPs (profiling.py convention: matmuls only, 2*m*k*n, attention 4*D per allowed (query head,
key) pair): decode per token = 2 * (one und-expert layer's matmul params * layers + lm_head) +
attention over the live context; no-cache decode counts the whole padded forward per token
(what it computes); prefill = 2 * und-expert params * tokens + causal attention (no lm_head:
prefill computes no logits); an image model call = gen expert on the latent tokens + und expert
on its 2 markers + attention over the context, times the contexts run; VAE decode from XLA's
cost analysis. MFU = achieved FLOP/s / the matmul peak measured in the same run (same dtype).
Times are the best of --iters runs after a compile/warm-up run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from unimedvl_jax import profiling  # noqa: E402
from unimedvl_jax.config_load import load_config_file  # noqa: E402
from unimedvl_jax.infer import context as C  # noqa: E402
from unimedvl_jax.infer import image as I  # noqa: E402
from unimedvl_jax.infer import text as T  # noqa: E402
from unimedvl_jax.infer.random_init import random_model  # noqa: E402


def best_time(fn, iters):
  jax.block_until_ready(fn())          # compile + warm up
  best = float('inf')
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def layer_params(llm):
  H, D, Hq, Hkv, Im = llm.hidden_size, llm.head_dim, llm.num_heads, llm.num_kv_heads, llm.intermediate_size
  return H * Hq * D + 2 * H * Hkv * D + Hq * D * H + 3 * H * Im


def attn_flops(llm, pairs):
  return 4.0 * llm.head_dim * llm.num_heads * pairs * llm.num_layers


@functools.partial(jax.jit, static_argnums=(0,))
def _nocache_step(graphdef, state, ctx, blk, last):
  """One no-cache decode step: the whole (padded) sequence through the model, logits of the last
  valid token per row."""
  model = C.merge(graphdef, state)
  _, h_u, _ = C.forward_block(model, ctx, blk, write=False)
  h = jnp.take_along_axis(h_u, last[:, None, None], axis=1)[:, 0]
  return jnp.argmax(model.logits(h), -1)


def bench_config(name, iters, prompt_len, new_tokens, steps, peak):
  cfg = load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  llm = cfg.model.llm
  model = C.prepare(random_model(cfg.model, 0))     # split once (context.prepare)
  graphdef, state = model.static, model.state
  V = llm.vocab_size
  # specials: an end id the random model is forced never to pick is not possible; instead the
  # end id is set to -1 (never sampled) so every row runs exactly `new_tokens` steps.
  sp = C.Specials(im_start=3, im_end=-1, vision_start=5, vision_end=6)
  lp = layer_params(llm) * llm.num_layers
  out = dict(config=name, dtype=cfg.model.dtype, params=profiling.param_counts(cfg.model)['total'],
             prompt_tokens=prompt_len, new_tokens=new_tokens)
  rs = np.random.RandomState(0)
  for B in (1, 8):
    cap = C.bucket(prompt_len + new_tokens + 4, 64)
    ids = rs.randint(10, V, size=(B, prompt_len - 2))
    b = C.make_builder(model, B, sp)
    for r in range(B):
      b.text(r, ids[r])
    blk = b.build()
    empty = C.new_context(model, B, cap)
    t_pre = best_time(lambda: C._prefill_jit(graphdef, state, empty, blk), iters)
    ctx = C._prefill_jit(graphdef, state, empty, blk)
    pre_flops = B * (2.0 * lp * prompt_len + attn_flops(llm, prompt_len * (prompt_len + 1) / 2))
    out[f'prefill_b{B}'] = dict(seconds=t_pre, tokens_per_s=B * prompt_len / t_pre,
                                flops=pre_flops, mfu=pre_flops / t_pre / peak)
    # decode with the cache
    args, _, _, greedy = T.decode_args(ctx, sp, T.TextSettings(max_new_tokens=new_tokens))
    run = lambda: T._decode_jit(graphdef, state, ctx, *args, new_tokens, False, greedy)
    t_dec = best_time(run, iters)
    fed = new_tokens + 2              # <|im_start|>, new tokens, the forced end token
    ctx_pairs = sum(prompt_len + i + 1 for i in range(fed))
    dec_flops = B * (2.0 * (lp + llm.hidden_size * V) * fed + attn_flops(llm, ctx_pairs))
    out[f'decode_cache_b{B}'] = dict(seconds=t_dec, tokens_per_s=B * fed / t_dec,
                                     flops=dec_flops, mfu=dec_flops / t_dec / peak)
    # decode without a cache: the full padded sequence per new token
    total = prompt_len + fed
    tb = C.make_builder(model, B, sp)
    for r in range(B):
      tb.raw_text(r, np.concatenate([ids[r], rs.randint(10, V, size=total - ids.shape[1])]))
    tblk = tb.build()
    nT = tblk.valid.shape[1]
    e2 = C.new_context(model, B, 1)
    last = jnp.full((B,), total - 1, jnp.int32)
    step = lambda: _nocache_step(graphdef, state, e2, tblk, last)
    t_step = best_time(step, iters)
    # every step recomputes the padded block; time per token = time per step
    nc_flops_tok = B * (2.0 * lp * nT + attn_flops(llm, total * (total + 1) / 2)
                        + 2.0 * llm.hidden_size * V)
    out[f'decode_nocache_b{B}'] = dict(seconds_per_step=t_step, tokens_per_s=B / t_step,
                                       padded_len=nT, flops_per_step=nc_flops_tok,
                                       mfu=nc_flops_tok / t_step / peak)
  # image generation
  S = int(cfg.data.vae_max_size)
  g = S // (8 * cfg.model.latent_patch_size)
  fs = dataclasses.replace(I.TEXT_TO_IMAGE, num_steps=steps, interval=(0.0, 1.0))
  e = C.new_context(model, 1, 64)
  ctx = C.add_text(model, e, list(rs.randint(10, V, size=16)), sp)

  def gen():
    lat = I.generate_latents(model, ctx, sp, [(g, g)], cfg_text_ctx=e, settings=fs, seeds=[0])
    return I.decode_latents(model, lat[0], (g, g))
  t_img = best_time(gen, max(1, iters // 2))
  L = g * g
  gen_calls = steps - 1
  gp = layer_params(llm) * llm.num_layers       # the generation expert has the same shapes
  H = llm.hidden_size
  prompt_ctx = int(ctx.lengths()[0])
  per_call = 0.0
  for c in (prompt_ctx, 0):                     # full context, "cfg_text" (empty) context
    per_call += (2.0 * gp * L + 2.0 * lp * 2 + attn_flops(llm, (L + 2) * (c + L + 2))
                 + 2.0 * L * (64 * H + H * 64 + cfg.model.timestep_freq_dim * H + H * H))
  from unimedvl_jax.model.vae import unpatchify
  dec = jax.jit(lambda st, t: C.merge(graphdef, st).vae.decode(
      unpatchify(t, g, g, cfg.model.latent_patch_size, cfg.model.vae.z_channels)))
  vae_flops = profiling.cost_analysis(
      dec.lower(state, jnp.zeros((1, L, 64), jnp.float32)).compile())['flops']
  img_flops = per_call * gen_calls + vae_flops
  out['image'] = dict(size=[S, S], latent_tokens=L, steps=steps, model_calls=gen_calls,
                      contexts=2, seconds=t_img, flops=img_flops, vae_decode_flops=vae_flops,
                      mfu=img_flops / t_img / peak)
  out['peak_memory_bytes'] = profiling.peak_memory_bytes()
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--configs', default='tiny,small')
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--prompt', type=int, default=128, help='prompt tokens')
  ap.add_argument('--new', type=int, default=32, help='generated tokens')
  ap.add_argument('--steps', type=int, default=10, help='image timesteps')
  ap.add_argument('--json', default=None)
  args = ap.parse_args()
  res = dict(backend=jax.default_backend(), devices=str(jax.devices()), results=[])
  peaks = {}
  for name in args.configs.split(','):
    dtype = load_config_file(os.path.join(ROOT, 'configs', f'{name}.py')).model.dtype
    if dtype not in peaks:
      peaks[dtype] = profiling.measure_matmul_peak(jnp.dtype(dtype), n=1024)
    r = bench_config(name, args.iters, args.prompt, args.new, args.steps, peaks[dtype])
    r['matmul_peak_flops'] = peaks[dtype]
    res['results'].append(r)
    print(json.dumps(r, indent=1), flush=True)
  res['matmul_peak_flops'] = peaks
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)


if __name__ == '__main__':
  main()
