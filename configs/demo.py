"""The README main job: configs/tiny.py's model and curriculum shaped for the 20-minute budget on
2 CPU cores (configs/tiny.py itself stays the small, fast geometry the tests and benchmarks use).

    bash launch/local_demo.sh          # = python -m unimedvl_jax.train --config configs/demo.py ...

Differences from tiny.py, each measured (benchmarks/RESULTS.md section 1):
- a 2x autoencoder (channel_mult (1, 2), 2 latent channels, 8x8 latent patches: one token is
  still 16x16 pixels, now a 128-vector): 26 dB reconstructions after 300 steps, where tiny's 8x
  one reaches 16 dB in 150; the VAE stage is 300 steps;
- the frozen VAE's moments are cached once after its stage (data.latent_cache='auto'), so the LM
  steps never run the VAE;
- 800 / 600 / 800 LM steps (3x tiny's) and mixtures that give VQA more weight than the SPEC's:
  foundation keeps 75 % image->text / 25 % text->image, instruction is 50 / 35 / 15 editing,
  unified 45 / 30 / 25;
- the evaluation samples images without classifier-free guidance (cfg scales 1, 10 steps): at this
  size the SPEC's guidance (text 4, image 2) amplifies the model's errors; on the same checkpoint
  guidance-free editing gains 2 dB PSNR (modality translation 12.2 -> 14.2 dB, above copying
  the input), segmentation Dice 0.27 -> 0.31, and text-to-image Frechet distance 0.95 -> 0.75.
"""

import importlib.util
import os

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location(
    'unimedvl_configs_tiny', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
  cfg = _tiny.get_config()
  m = cfg.model
  m.vae.update(dict(channel_mult=(1, 2), z_channels=2))
  m.latent_patch_size = 8
  cfg.data.latent_cache = 'auto'
  st = _tiny._stage
  cfg.curriculum = ConfigDict(dict(
      vae=st('vae', 300, {'t2i': 0.5, 'edit': 0.5}, lr=2e-3, warmup_steps=20, ema_decay=0.0),
      foundation=st('lm', 800, {'vqa': 0.5, 'report': 0.15, 'caption': 0.1, 't2i': 0.25}),
      instruction=st('lm', 600, {'vqa': 0.35, 'report': 0.1, 'caption': 0.05, 't2i': 0.35,
                                 'edit': 0.15}, mandatory=('edit',)),
      unified=st('lm', 800, {'vqa': 0.3, 'report': 0.1, 'caption': 0.05, 't2i': 0.3,
                             'edit': 0.25}, mandatory=('edit',)),
  ))
  cfg.eval.update(dict(image_steps=10, text_to_image=ConfigDict(dict(s_text=1.0)),
                       editing=ConfigDict(dict(s_text=1.0, s_img=1.0))))
  return cfg
