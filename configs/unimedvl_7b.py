"""The released UniMedVL / BAGEL-7B-MoT dimensions (SPEC section 2): 14,607,260,128 parameters
without the VAE.

    python -m unimedvl_jax.inspect --config configs/unimedvl_7b.py          # parameter counts
    python -m unimedvl_jax.inspect --config configs/unimedvl_7b.py --topology v5p:4x4x4

Needs a pod: see launch/ and benchmarks/RESULTS.md for meshes that fit. Training defaults are
UniMedVL's fine-tuning example (SPEC sections 3-4).
"""

from unimedvl_jax.config import default_config


def get_config():
  cfg = default_config()
  cfg.name = 'unimedvl_7b'
  cfg.model.remat = 'full'
  # UniMedVL's fine-tuning example, except seq_len: 20480 = 40 x 512 (the example's 20000 is not
  # a multiple of the attention kernels' block, which config_validate.validate requires)
  cfg.data.seq_len = 20480
  cfg.data.max_latent_tokens = 8192
  cfg.data.max_vit_patches = 12288
  cfg.data.max_sample_tokens = 17000
  cfg.data.max_label_tokens = 4096
  # pixel slots by size (images of other sizes need the latent cache: data.latent_cache)
  cfg.data.vae_buckets = ((512, 512, 4), (1024, 1024, 1))
  cfg.data.cfg_dropout_text = 0.3
  cfg.data.cfg_dropout_vit = 0.05
  cfg.data.cfg_dropout_vae = 0.05
  cfg.train.lr = 1e-5
  cfg.train.ema_decay = 0.995
  cfg.train.ce_weight = 0.25
  cfg.train.mse_weight = 1.0
  cfg.mesh.data = 1
  cfg.mesh.fsdp = -1
  return cfg
