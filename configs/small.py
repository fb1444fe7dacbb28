"""A CPU benchmark size (~50 M parameters): the same architecture, both experts, ViT and VAE.

    python -m benchmarks.bench_train_step --config configs/small.py

Used for speed/memory benchmarks on the 2-core CPU (bf16 and fp32); not a training target here.
"""

from unimedvl_jax.config import default_config


def get_config():
  cfg = default_config()
  cfg.name = 'small'
  m = cfg.model
  m.llm.update(dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                    num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=10000.0))
  m.vit.update(dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                    patch_size=14, grid_size=16))
  m.vae.update(dict(base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=16))
  m.max_latent_size = 16
  m.dtype = 'bfloat16'
  d = cfg.data
  d.update(dict(batch_size=2, seq_len=1024, max_latent_tokens=256, max_vit_patches=512,
                max_vae_images=4, vae_buckets=((64, 64, 2), (128, 128, 3)), max_label_tokens=256,
                max_sample_tokens=1024,
                vit_max_size=224, vit_min_size=112, vae_max_size=128, vae_min_size=64))
  cfg.train.warmup_steps = 10
  cfg.mesh.data = -1
  return cfg
