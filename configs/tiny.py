"""The tiny configuration: a small version of UniMedVL's three-stage curriculum on the embedded
synthetic dataset, on 2 CPU cores: the geometry the tests and benchmarks use. The README's main
job runs configs/demo.py, which reshapes this one for its 20-minute budget.

    python -m unimedvl_jax.train --config configs/tiny.py --workdir runs/tiny --evaluate

Stages: a short VAE stage (the tiny autoencoder starts random, unlike the released frozen FLUX
VAE), then foundation (75% image->text / 25% text->image), instruction (40 / 45 / 10
interleaved editing) and unified (37 / 35 / 25) as in SPEC section 5. Wall time on 2 cores and
what it reaches are recorded in benchmarks/RESULTS.md (target on the test split: closed VQA
accuracy >= 0.85, segmentation Dice >= 0.5, super-resolution PSNR above bicubic).
"""

from ml_collections import ConfigDict

from unimedvl_jax.config import default_config, stage_defaults


def _stage(kind, steps, mixture=None, mandatory=(), **train):
  st = stage_defaults()
  st.kind = kind
  st.steps = steps
  st.mixture = ConfigDict(mixture or {})
  st.mandatory = tuple(mandatory)
  st.train = ConfigDict(train)
  return st


def get_config():
  cfg = default_config()
  cfg.name = 'tiny'
  m = cfg.model
  m.llm.update(dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0))
  m.vit.update(dict(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4,
                    patch_size=8, grid_size=8))
  m.vae.update(dict(base_channels=16, channel_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=8))
  m.max_latent_size = 4
  m.dtype = 'float32'
  d = cfg.data
  d.update(dict(batch_size=4, seq_len=512, max_latent_tokens=128, max_vit_patches=256,
                max_vae_images=8, vae_buckets=((32, 32, 2), (64, 64, 6)), max_label_tokens=256,
                max_sample_tokens=512,
                vit_max_size=64, vit_min_size=32, vae_max_size=64, vae_min_size=32,
                cfg_dropout_text=0.1, cfg_dropout_vit=0.05, cfg_dropout_vae=0.05))
  t = cfg.train
  t.update(dict(lr=2e-3, warmup_steps=50, schedule='cosine', min_lr=1e-4, ema_decay=0.99,
                ce_weight=1.0, mse_weight=1.0, freeze=('vae',), log_every=10,
                checkpoint_every=100, keep_checkpoints=2))
  i2t = dict(vqa=0.35, report=0.2, caption=0.2)
  cfg.stages = ('vae', 'foundation', 'instruction', 'unified')
  cfg.curriculum = ConfigDict(dict(
      vae=_stage('vae', 150, {'t2i': 0.5, 'edit': 0.5}, lr=2e-3, warmup_steps=20, ema_decay=0.0),
      foundation=_stage('lm', 250, {**i2t, 't2i': 0.25}),
      instruction=_stage('lm', 250, {'vqa': 0.2, 'report': 0.1, 'caption': 0.1, 't2i': 0.45,
                                     'edit': 0.15}, mandatory=('edit',)),
      unified=_stage('lm', 250, {'vqa': 0.17, 'report': 0.1, 'caption': 0.1, 't2i': 0.35,
                                 'edit': 0.28}, mandatory=('edit',)),
  ))
  cfg.mesh.data = -1
  return cfg
