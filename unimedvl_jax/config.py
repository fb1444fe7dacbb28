"""The configuration schema: every field and its default, the curriculum's stages, ConfigError.

Config files in `configs/` start from `default_config()` and change fields; the command line
overrides any field (`--config.model.llm.num_layers=2`). The checks of every field live in
`config_validate` (`validate(cfg)` runs at start-up of every entry point and raises `ConfigError`
naming the offending field and what was expected); overrides and config files are read by
`config_load`. This module imports neither.

Defaults are the released UniMedVL / BAGEL-7B-MoT dimensions (../shared/SPEC.md section 2) and
BAGEL's training hyper-parameters (section 4) unless a field says otherwise.
"""

from __future__ import annotations

from ml_collections import ConfigDict


class ConfigError(ValueError):
  """A config field holds a value the code cannot run with."""


def llm_defaults() -> ConfigDict:
  return ConfigDict(dict(
      vocab_size=152064,
      hidden_size=3584,
      intermediate_size=18944,
      num_layers=28,
      num_heads=28,
      num_kv_heads=4,
      head_dim=128,
      rope_theta=1e6,
      rms_norm_eps=1e-6,
      qk_norm=True,
      # initial q_norm / k_norm weight (checkpoints bring their own): with QK-norm the attention
      # logits are bounded by qk_norm_init^2 * sqrt(head_dim), 5.7 at 1.0 and head_dim 32
      qk_norm_init=1.0,
  ))


def vit_defaults() -> ConfigDict:
  return ConfigDict(dict(
      enabled=True,
      hidden_size=1152,
      intermediate_size=4304,
      num_layers=26,          # layers actually built (SigLIP so400m has 27; BAGEL drops the last)
      num_heads=16,
      patch_size=14,
      grid_size=70,           # learned position table is grid_size x grid_size (row*grid + col)
      layer_norm_eps=1e-6,
  ))


def vae_defaults() -> ConfigDict:
  return ConfigDict(dict(
      enabled=True,
      in_channels=3,
      base_channels=128,
      channel_mult=(1, 2, 4, 4),
      num_res_blocks=2,        # encoder; the decoder uses num_res_blocks + 1
      z_channels=16,
      norm_groups=32,
      norm_eps=1e-6,
      scale_factor=0.3611,
      shift_factor=0.1159,
  ))


def model_defaults() -> ConfigDict:
  return ConfigDict(dict(
      llm=llm_defaults(),
      vit=vit_defaults(),
      vae=vae_defaults(),
      latent_patch_size=2,      # 2x2 latent patches -> one token = 16x16 pixels, a 64-vector
      max_latent_size=64,       # latent position table is max_latent_size^2 (64 -> 1024x1024 px)
      timestep_freq_dim=256,
      dtype='bfloat16',         # compute dtype
      param_dtype='float32',    # master weights
      attention_impl='auto',    # 'auto' (pallas on TPU/GPU, blocked elsewhere) | 'blocked'
                                # (block-sparse XLA) | 'xla' (dense reference) | 'pallas'
                                # | 'splash' (TPU) | 'cudnn' (GPU)
      attention_block=64,       # query/key block of the 'blocked' attention
      attention_platform='',    # platform the attention is compiled for ('cpu' | 'gpu' | 'tpu'):
                                # '' = this process's default backend; the AOT planner sets
                                # 'tpu' (it compiles for a TPU slice from a CPU process)
      remat='none',             # 'none' | 'full' | 'dots' (save matmul outputs) | 'dots_no_batch'
      scan_layers=True,
      unroll_loops=False,       # unroll the fixed-trip loops inside a layer (the VAE's chunked
                                # mid-block attention) so XLA's cost_analysis counts every trip
                                # (the AOT planner's cost variants set it; same numerics)
      init_std=0.02,
      ce_chunk=8192,            # tokens per lm_head chunk in the CE loss (bounds logits memory)
      lora=lora_defaults(),     # low-rank adapters on the decoder experts (model/lora.py)
  ))


# the decoder projections LoRA targets by default (regex searched in each Linear's module path,
# e.g. 'decoder/layers/und/q_proj', 'decoder/layers/gen/mlp/down_proj')
LORA_TARGETS = r'/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$'
LORA_EXPERTS = ('und', 'gen', 'both')


def lora_defaults() -> ConfigDict:
  return ConfigDict(dict(
      rank=0,                   # 0 = no adapters; r > 0 adds A [in, r], B [r, out] per target
      alpha=16.0,               # the adapter's output is scaled by alpha / rank
      targets=LORA_TARGETS,     # regex over the module paths of the experts' Linear layers
      experts='both',           # 'und' | 'gen' | 'both'
  ))


def data_defaults() -> ConfigDict:
  return ConfigDict(dict(
      root='',                  # dataset root; '' = the embedded synthetic dataset under workdir
      tokenizer_kind='sentencepiece',   # 'sentencepiece' | 'hf' (a Qwen2 tokenizer.json)
      tokenizer_path='',        # '' = the embedded dataset's tokenizer
      # --- static budgets of one pack (one compiled step serves every batch) ---
      batch_size=8,             # packs per step, global (all devices)
      seq_len=32768,            # tokens per pack, T
      max_latent_tokens=8192,   # generation-expert (VAE latent) tokens per pack, L; U = T - L
      max_vit_patches=16384,    # ViT patches per pack, P
      max_vae_images=8,         # VAE images per pack, N
      # VAE pixel slots by exact image size, ((h, w, n), ...): every image is encoded at its own
      # size, never padded; an image whose size has no bucket is skipped ('vae_size'). () = one
      # bucket (vae_max_size, vae_max_size, max_vae_images). Unused with a latent cache.
      vae_buckets=(),
      max_label_tokens=0,       # CE targets per pack, C (lm_head runs on these rows only); 0 = U
      # zarr latent cache (tensorstore) of the frozen VAE's moments, written by
      # `python -m unimedvl_jax.data cache-latents`; '' = encode pixels in the step
      latent_cache='',
      max_sample_tokens=16384,  # longer samples are skipped and counted
      # --- image size rules (SPEC section 3) ---
      vit_max_size=980,
      vit_min_size=378,
      vit_max_pixels=2007040,
      vae_max_size=1024,
      vae_min_size=512,
      # --- CFG dropout (probability an enable_cfg item is dropped) ---
      cfg_dropout_text=0.1,
      cfg_dropout_vit=0.3,
      cfg_dropout_vae=0.3,
      # --- pipeline ---
      num_workers=0,
      prefetch=2,
      max_bad_fraction=0.05,    # more bad samples than this fraction stops the run
      bad_check_min_samples=50,  # ... once at least this many samples were read (per worker)
      pack_lookahead=8,         # samples that did not fit, held for later packs (first-fit)
      groups=ConfigDict(),      # dataset groups: name -> {jsonl, weight, mandatory, ...}
      allow_outside_root=False,  # image paths may leave the data root (../, absolute, symlinks)
  ))


def train_defaults() -> ConfigDict:
  return ConfigDict(dict(
      lr=1e-4,
      schedule='constant',      # 'constant' | 'cosine'
      warmup_steps=2000,
      min_lr=1e-7,
      b1=0.9,
      b2=0.95,
      eps=1e-15,
      weight_decay=0.0,
      grad_clip=1.0,
      grad_accum=1,
      ema_decay=0.9999,
      ce_weight=1.0,
      mse_weight=1.0,
      timestep_shift=1.0,
      freeze=('vae',),          # regexes over the parameter paths, or module names (FREEZE_ALIASES)
      total_steps=1000,
      log_every=10,
      checkpoint_every=500,
      keep_checkpoints=3,
      max_nonfinite_steps=10,
      profile_steps=(),
      dump_hlo=False,
      lora=False,               # train only the LoRA adapters (needs model.lora.rank > 0); the
                                # optimizer state then holds the adapters alone
  ))


def eval_defaults() -> ConfigDict:
  """The evaluation's image samplers (`--evaluate`, `python -m unimedvl_jax.evaluate`): overrides
  of the FlowSettings fields of infer.image.TEXT_TO_IMAGE / EDITING (BAGEL's settings, SPEC 7),
  e.g. editing=dict(s_text=1.0, s_img=1.0) for guidance-free editing; `image_steps` timesteps
  unless the override names num_steps."""
  return ConfigDict(dict(image_steps=20, text_to_image=ConfigDict(), editing=ConfigDict()))


MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis name -> mesh axes (None = replicated; a mesh axis name or a tuple of them), in
# order: a name may have several rules, the first whose axes divide the dimension wins (the others
# are fallbacks); unimedvl_jax.sharding applies them. Head axes of the attention projections are
# split on head boundaries only (the parameters' `head_dim` metadata).
SHARDING_RULES = (
    # activations
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    # parameters
    ('embed', 'fsdp'),
    ('vit_embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('vit_mlp', 'tensor'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vit_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),
    ('table', None),
    ('vit_pos', None),
)


def mesh_defaults() -> ConfigDict:
  return ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,
      rules=SHARDING_RULES,
      # a tensor of the training state (parameter, optimizer moment, EMA) of at least this many
      # bytes that the rules cannot split on a mesh whose rule axes have more than one device is
      # a start-up ConfigError instead of being replicated on every device; 0 = no check
      max_replicated_bytes=4 << 20,
  ))


def default_config() -> ConfigDict:
  cfg = ConfigDict()
  cfg.name = 'unimedvl'
  cfg.seed = 0
  cfg.model = model_defaults()
  cfg.data = data_defaults()
  cfg.train = train_defaults()
  cfg.mesh = mesh_defaults()
  cfg.eval = eval_defaults()
  # The curriculum: `stages` orders the names; each `curriculum.<name>` is a stage dict:
  #   kind='lm' (the UniMedVL objective) | 'vae' (autoencoder reconstruction, for toy VAEs),
  #   steps, mixture (group -> weight), mandatory (group names), train (overrides of `train`),
  #   data (cfg_dropout_* overrides). Empty `stages`: train.total_steps on data.groups.
  cfg.stages = ()
  cfg.curriculum = ConfigDict()
  return cfg


def stage_defaults() -> ConfigDict:
  return ConfigDict(dict(kind='lm', steps=100, mixture=ConfigDict(), mandatory=(),
                         train=ConfigDict(), data=ConfigDict(),
                         lora=False))   # True = train.lora for this stage (the adapters alone)


# train.freeze: each entry is a regex matched against the whole '/'-joined path of a parameter
# ('decoder/layers/und/q_proj/kernel', 'embed_tokens'), or one of these module names, which
# stands for its regex. A regex must match some parameter of the model (config_validate.validate
# builds the model abstractly to check, only when there is one); a module name may name a tower
# the config disables (model.vit.enabled=False).
def _modules(*prefixes: str) -> str:
  """The regex of every parameter under one of the module paths `prefixes`."""
  return f'({"|".join(prefixes)})(/.*)?'


FREEZE_ALIASES = {
    'vae': _modules('vae'),
    'vit': _modules('vit'),
    'connector': _modules('connector'),
    'adapters': _modules('vae2llm', 'llm2vae', 'time_embedder'),
    'llm': _modules('embed_tokens', 'lm_head', 'decoder'),
    'und': _modules('embed_tokens', 'lm_head', 'decoder/norm', 'decoder/layers/und'),
    'gen': _modules('decoder/norm_moe_gen', 'decoder/layers/gen'),
}

# What each curriculum stage kind sets in `train` before the stage's own `train` overrides:
#   'lm'   the UniMedVL objective (CE + flow MSE) with the run's `train` settings;
#   'vae'  autoencoder reconstruction (for toy VAEs that must be trained): only the VAE learns.
STAGE_KINDS = {
    'lm': {},
    'vae': {'freeze': ('vit', 'connector', 'adapters', 'llm')},
}


def freeze_patterns(freeze) -> tuple[str, ...]:
  """train.freeze with the module names replaced by their regexes."""
  return tuple(FREEZE_ALIASES.get(f, f) for f in freeze)


def stage_plan(cfg) -> list[dict]:
  """[{name, kind, start, end}] in global steps; one implicit stage without a curriculum."""
  if not cfg.stages:
    return [dict(name=None, kind='lm', start=0, end=int(cfg.train.total_steps))]
  out, start = [], 0
  for name in cfg.stages:
    st = cfg.curriculum[name]
    n = int(st.steps)
    out.append(dict(name=name, kind=st.get('kind', 'lm'), start=start, end=start + n))
    start += n
  return out


def stage_train_config(cfg, stage: str | None) -> ConfigDict:
  """`train` with the stage kind's settings (STAGE_KINDS) and then the stage's own overrides
  applied (a new ConfigDict)."""
  t = ConfigDict(cfg.train.to_dict())
  if stage is not None:
    st = cfg.curriculum[stage]
    for k, v in STAGE_KINDS.get(st.get('kind', 'lm'), {}).items():
      t[k] = v
    for k, v in st.get('train', ConfigDict()).items():
      field = f'curriculum.{stage}.train.{k}'
      if k not in t:
        raise ConfigError(f'config.{field}: no such train field')
      assign(t, k, v, field)
    if st.get('lora', False) is True:
      t.lora = True
  return t


def assign(node: ConfigDict, name: str, value, field: str) -> None:
  """node[name] = value with the one coercion of config values: an int (not a bool) given for a
  float field becomes a float and a list given for a tuple field a tuple. Raises ConfigError
  naming `field`."""
  old = node[name]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[name] = value
  except TypeError as e:
    raise ConfigError(f'config.{field}: cannot set {value!r} ({e})') from None


