"""Reconstruction PSNR of a training workdir's VAE on its dataset's test images: the ceiling of
every image-generation task (a generated image is always a VAE decode).

    JAX_PLATFORMS=cpu python -m benchmarks.vae_recon_psnr WORKDIR [--n 64] [--split test]
        [--latent_noise 0.1,0.3,0.5]

Encodes each image to its posterior mean, decodes, clips to [-1, 1] and reports the mean PSNR in
[0, 1] pixel units (the evaluation harness's convention). Uses the EMA weights, as evaluation does.
--latent_noise: also decodes the scaled latents plus Gaussian noise of each given std relative
to the latents' own std (seed 0): how much a generator's latent error costs after decoding.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('workdir')
  ap.add_argument('--n', type=int, default=64)
  ap.add_argument('--split', default='test')
  ap.add_argument('--latent_noise', default='', help='comma-separated relative noise stds')
  a = ap.parse_args()
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image
  from unimedvl_jax.infer.loading import load_checkpoint
  cfg, model = load_checkpoint(a.workdir)
  files = sorted(glob.glob(os.path.join(cfg.data.root, 'images', a.split, '*.png')))[:a.n]
  if not files:
    raise SystemExit(f'no PNG images under {cfg.data.root}/images/{a.split}')
  S = int(cfg.data.vae_max_size)
  x = np.stack([np.asarray(Image.open(f).convert('RGB').resize((S, S), Image.BICUBIC), np.float32)
                / 127.5 - 1.0 for f in files])
  mean, _ = model.vae.encode_moments(jnp.asarray(x))
  rec = np.clip(np.asarray(model.vae.decoder(mean), np.float32), -1.0, 1.0)
  mse = np.mean(((rec - x) / 2.0) ** 2, axis=(1, 2, 3))
  psnr = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))
  out = {'workdir': a.workdir, 'images': len(files), 'size': S,
         'psnr_mean': float(np.mean(psnr)), 'psnr_min': float(np.min(psnr)),
         'psnr_max': float(np.max(psnr))}
  if a.latent_noise:
    z = model.vae.encode_mean(jnp.asarray(x))
    z_std = float(jnp.std(z))
    rng = np.random.default_rng(0)
    out['latent_std'] = z_std
    out['psnr_with_latent_noise'] = {}
    for rel in (float(v) for v in a.latent_noise.split(',')):
      zn = z + rel * z_std * rng.standard_normal(z.shape).astype(np.float32)
      r = np.clip(np.asarray(model.vae.decode(zn), np.float32), -1.0, 1.0)
      m = np.mean(((r - x) / 2.0) ** 2, axis=(1, 2, 3))
      out['psnr_with_latent_noise'][str(rel)] = float(np.mean(10.0 * np.log10(1.0 / np.maximum(m, 1e-12))))
  print(json.dumps(out))


if __name__ == '__main__':
  main()
