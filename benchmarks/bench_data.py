"""Input pipeline throughput: samples/s and packed tokens/s with 0 and 2 grain workers.

    python -m benchmarks.bench_data --steps_per_sec 2.0 [--config configs/tiny.py]
        [--workers 0,2] [--batches 30] [--root DIR]

Reads the embedded synthetic dataset (or --root / config.data.root) with the config's pack
shapes, times `--batches` batches after a warm-up of 3 (worker start-up is not timed), and says
whether each setting feeds `--steps_per_sec` training steps with 5x headroom
(batches/s >= 5 * steps/s). One batch = config.data.batch_size packs = one training step.
"""

from __future__ import annotations

import argparse
import json
import os
import time



def bench(cfg, workers: int, batches: int, warmup: int = 3) -> dict:
  from unimedvl_jax.data import pipeline
  cfg = cfg.copy_and_resolve_references()
  cfg.data.num_workers = workers
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(cfg)
  try:
    for _ in range(warmup):
      next(it)
    startup = time.perf_counter() - t0
    s0 = it.stats()
    t1 = time.perf_counter()
    for _ in range(batches):
      next(it)
    dt = time.perf_counter() - t1
    s1 = it.stats()
  finally:
    it.close()
  # with workers, stats() reflects the batches consumed; samples read run slightly ahead
  samples = s1['samples_packed'] - s0['samples_packed']
  tokens = s1['tokens'] - s0['tokens']
  return dict(workers=workers, batches=batches, seconds=round(dt, 3),
              startup_seconds=round(startup, 2),
              batches_per_s=round(batches / dt, 2), samples_per_s=round(samples / dt, 1),
              packed_tokens_per_s=round(tokens / dt), padding_fraction=round(
                  1 - tokens / ((s1['token_capacity'] - s0['token_capacity']) or 1), 4),
              samples_per_pack=round(samples / (s1['packs'] - s0['packs']), 2))


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--steps_per_sec', type=float, required=True,
                  help='training steps per second the pipeline must feed (x5 headroom)')
  ap.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                   'tiny.py'))
  ap.add_argument('--workers', default='0,2')
  ap.add_argument('--batches', type=int, default=30)
  ap.add_argument('--root', default=None)
  args = ap.parse_args()

  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.data import pipeline
  cfg = load_config_file(args.config)
  if args.root:
    cfg.data.root = args.root
  root = pipeline.data_root(cfg)
  cfg.data.root = root
  d = cfg.data
  print(f'data root {root}; packs of T={d.seq_len} tokens (L={d.max_latent_tokens} latent, '
        f'P={d.max_vit_patches} ViT patches, N={d.max_vae_images} VAE slots of '
        f'{d.vae_buffer_size}px), {d.batch_size} packs per batch; {os.cpu_count()} CPUs')
  need = 5 * args.steps_per_sec
  results = []
  for w in (int(x) for x in args.workers.split(',')):
    r = bench(cfg, w, args.batches)
    r['feeds_5x'] = r['batches_per_s'] >= need
    results.append(r)
    print(f"workers={w}: {r['batches_per_s']:.2f} batches/s, {r['samples_per_s']:.1f} samples/s, "
          f"{r['packed_tokens_per_s']} packed tokens/s, padding {r['padding_fraction']:.1%}, "
          f"{r['samples_per_pack']} samples/pack (start-up {r['startup_seconds']}s) -> "
          f"{'FEEDS' if r['feeds_5x'] else 'DOES NOT FEED'} {args.steps_per_sec} steps/s with "
          f"5x headroom (needs {need:.2f} batches/s)")
  print(json.dumps(results))


if __name__ == '__main__':
  main()
