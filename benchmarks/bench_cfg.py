"""Per-step time of the flow sampler with the CFG contexts batched into one model call vs one
call per context, interleaved in one process.

    python -m benchmarks.bench_cfg                        # tiny, batch 1 and 4, 2 and 3 contexts
    python -m benchmarks.bench_cfg --config tiny --batches 1,4 --steps 11 --rounds 5 --json out.json

Random weights (configs/<config>.py, its compute dtype), a prepared model. Requests: an editing
prompt (a clean VAE image, a ViT image, a 24-token instruction) generating an image at the
config's largest VAE size, with 2 contexts (full + cfg_text: s_text = 4, s_img = 1) and 3
contexts (+ cfg_img: s_img = 2). The guidance interval is (0, 1] so that every step is guided.
Per-step time = wall time of `generate_latents` (--steps timesteps = --steps - 1 model steps,
host work included) / (--steps - 1); the median over --rounds rounds, each round timing both
ways back to back. The load average is printed (numbers are noisy on a shared CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from unimedvl_jax.config_load import load_config_file  # noqa: E402
from unimedvl_jax.infer import context as C  # noqa: E402
from unimedvl_jax.infer import image as I  # noqa: E402
from unimedvl_jax.infer.random_init import random_model  # noqa: E402


def contexts(model, cfg, B, sp, rs):
  """(full, cfg_text, cfg_img) contexts of B editing requests."""
  S = int(cfg.data.vae_max_size)
  V = cfg.model.llm.vocab_size
  cap = C.bucket(2 * (S // 8) ** 2 + 64, 64)
  e = C.new_context(model, B, cap)
  imgs = [rs.uniform(-1, 1, (S, S, 3)).astype(np.float32) for _ in range(B)]
  toks = [C.encode_vae_tokens(model, im) for im in imgs]
  vit = [im[:min(S, 8 * cfg.model.vit.grid_size), :min(S, 8 * cfg.model.vit.grid_size)]
         for im in imgs] if cfg.model.vit.enabled else None
  cfg_text = C.add_image(model, e, sp, vae_tokens=toks, vit=vit)
  instr = [list(rs.randint(10, V, size=24)) for _ in range(B)]
  full = C.add_text(model, cfg_text, instr, sp)
  cfg_img = C.add_text(model, e, instr, sp)
  return full, cfg_text, cfg_img, (S // 16, S // 16)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='tiny')
  ap.add_argument('--batches', default='1,4')
  ap.add_argument('--steps', type=int, default=11, help='timesteps (steps - 1 model steps)')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--json', default=None)
  args = ap.parse_args()
  cfg = load_config_file(os.path.join(ROOT, 'configs', f'{args.config}.py'))
  model = C.prepare(random_model(cfg.model, 0, bias_std=0.02))
  sp = C.Specials(im_start=3, im_end=4, vision_start=5, vision_end=6)
  rs = np.random.RandomState(0)
  res = dict(config=args.config, backend=jax.default_backend(), steps=args.steps,
             load_average_before=list(os.getloadavg()), results=[])
  for B in (int(b) for b in args.batches.split(',')):
    full, cfg_text, cfg_img, grid = contexts(model, cfg, B, sp, rs)
    for n_ctx, s_img in ((2, 1.0), (3, 2.0)):
      fs = dataclasses.replace(I.EDITING, num_steps=args.steps, s_text=4.0, s_img=s_img,
                               interval=(0.0, 1.0), renorm='text_channel')
      run = {}
      for batched in (True, False):
        run[batched] = (lambda b=batched: I.generate_latents(
            model, full, sp, [grid] * B, cfg_text_ctx=cfg_text, cfg_img_ctx=cfg_img,
            settings=fs, seeds=list(range(B)), cfg_batched=b))
      outs = {b: f() for b, f in run.items()}     # compile + warm up
      diff = max(float(np.max(np.abs(x - y))) for x, y in zip(outs[True], outs[False]))
      times = {True: [], False: []}
      for _ in range(args.rounds):
        for b, f in run.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f())
          times[b].append((time.perf_counter() - t0) / (args.steps - 1))
      med = {b: float(np.median(v)) for b, v in times.items()}
      r = dict(batch=B, contexts=n_ctx, latent_tokens=grid[0] * grid[1],
               context_tokens=[int(c.lengths()[0]) for c in (full, cfg_text, cfg_img)[:n_ctx]],
               step_ms_batched=round(med[True] * 1e3, 3),
               step_ms_one_call_per_context=round(med[False] * 1e3, 3),
               speedup_batched=round(med[False] / med[True], 2),
               step_ms_min_batched=round(min(times[True]) * 1e3, 3),
               step_ms_min_one_call_per_context=round(min(times[False]) * 1e3, 3),
               speedup_batched_min=round(min(times[False]) / min(times[True]), 2),
               max_abs_latent_diff=diff,
               step_ms_all={'batched': [round(x * 1e3, 3) for x in times[True]],
                            'per_context': [round(x * 1e3, 3) for x in times[False]]})
      res['results'].append(r)
      print(json.dumps({k: v for k, v in r.items() if k != 'step_ms_all'}), flush=True)
  res['load_average_after'] = list(os.getloadavg())
  print(f"load average before {res['load_average_before']}, after {res['load_average_after']}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
