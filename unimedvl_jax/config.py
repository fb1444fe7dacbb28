"""The configuration schema: every field, its default and its validation live here.

Config files in `configs/` start from `default_config()` and change fields; the command line
overrides any field (`--config.model.llm.num_layers=2`). `validate(cfg)` runs at start-up of
every entry point and raises `ConfigError` naming the offending field and what was expected.

Defaults are the released UniMedVL / BAGEL-7B-MoT dimensions (../shared/SPEC.md section 2) and
BAGEL's training hyper-parameters (section 4) unless a field says otherwise.
"""

from __future__ import annotations

import ast

import ml_collections
from collections.abc import Mapping

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
# stands for its regex. A regex must match some parameter of the model (config.validate builds
# the model abstractly to check, only when there is one); a module name may name a tower the
# config disables (model.vit.enabled=False).
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


_DTYPES = ('float32', 'bfloat16', 'float16')
_ATTN = ('xla', 'blocked', 'pallas', 'splash', 'cudnn', 'auto')


def _require(cond: bool, field: str, msg: str):
  if not cond:
    raise ConfigError(f'config.{field}: {msg}')


def _positive(cfg: ConfigDict, prefix: str, names):
  for n in names:
    v = cfg[n]
    _require(isinstance(v, (int, float)) and v > 0, f'{prefix}.{n}', f'must be > 0, got {v!r}')


def validate_model(m: ConfigDict, prefix: str = 'model') -> None:
  llm = m.llm
  _positive(llm, f'{prefix}.llm', ['vocab_size', 'hidden_size', 'intermediate_size',
                                   'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                                   'rope_theta', 'rms_norm_eps'])
  _require(llm.num_heads % llm.num_kv_heads == 0, f'{prefix}.llm.num_heads',
           f'must be a multiple of num_kv_heads ({llm.num_kv_heads}), got {llm.num_heads}')
  _require(llm.head_dim % 2 == 0, f'{prefix}.llm.head_dim', f'must be even for RoPE, got {llm.head_dim}')
  vit = m.vit
  if vit.enabled:
    _positive(vit, f'{prefix}.vit', ['hidden_size', 'intermediate_size', 'num_layers',
                                     'num_heads', 'patch_size', 'grid_size'])
    _require(vit.hidden_size % vit.num_heads == 0, f'{prefix}.vit.hidden_size',
             f'must be divisible by num_heads ({vit.num_heads}), got {vit.hidden_size}')
  vae = m.vae
  if vae.enabled:
    _positive(vae, f'{prefix}.vae', ['base_channels', 'num_res_blocks', 'z_channels', 'norm_groups'])
    for i, mult in enumerate(vae.channel_mult):
      ch = vae.base_channels * mult
      _require(ch % vae.norm_groups == 0, f'{prefix}.vae.channel_mult[{i}]',
               f'base_channels*mult = {ch} must be divisible by norm_groups ({vae.norm_groups})')
  _require(m.latent_patch_size > 0, f'{prefix}.latent_patch_size', 'must be > 0')
  _require(m.max_latent_size > 0, f'{prefix}.max_latent_size', 'must be > 0')
  _require(m.timestep_freq_dim % 2 == 0, f'{prefix}.timestep_freq_dim', 'must be even')
  _require(llm.hidden_size % 4 == 0, f'{prefix}.llm.hidden_size',
           'must be divisible by 4 (2-D sin-cos position tables)')
  _require(m.dtype in _DTYPES, f'{prefix}.dtype', f'must be one of {_DTYPES}, got {m.dtype!r}')
  _require(m.param_dtype in _DTYPES, f'{prefix}.param_dtype',
           f'must be one of {_DTYPES}, got {m.param_dtype!r}')
  _require(m.attention_impl in _ATTN, f'{prefix}.attention_impl',
           f'must be one of {_ATTN}, got {m.attention_impl!r}')
  from unimedvl_jax.model.scan import REMAT_POLICIES
  _require(m.remat in REMAT_POLICIES, f'{prefix}.remat',
           f'must be one of {REMAT_POLICIES}, got {m.remat!r}')
  plat = m.get('attention_platform', '')
  _require(plat in ('', 'cpu', 'gpu', 'tpu'), f'{prefix}.attention_platform',
           f"must be '' (the default backend), 'cpu', 'gpu' or 'tpu', got {plat!r}")
  validate_lora(m.get('lora', lora_defaults()), f'{prefix}.lora')
  blk = m.get('attention_block', 64)
  _require(isinstance(blk, int) and blk > 0 and blk % 8 == 0, f'{prefix}.attention_block',
           f'must be a positive multiple of 8, got {blk!r}')


def validate_lora(lc: ConfigDict, prefix: str = 'model.lora') -> None:
  import re
  r = lc.get('rank', 0)
  _require(_integer(r) and r >= 0, f'{prefix}.rank', f'must be an integer >= 0 (0 = off), got {r!r}')
  _require(_real(lc.get('alpha')) and lc.alpha > 0, f'{prefix}.alpha',
           f"must be a finite number > 0, got {lc.get('alpha')!r}")
  _require(lc.get('experts') in LORA_EXPERTS, f'{prefix}.experts',
           f"must be one of {LORA_EXPERTS}, got {lc.get('experts')!r}")
  t = lc.get('targets')
  _require(isinstance(t, str) and t != '', f'{prefix}.targets',
           f'must be a non-empty regex string, got {t!r}')
  try:
    rx = re.compile(t)
  except re.error as e:
    raise ConfigError(f'config.{prefix}.targets: not a valid regex ({e}): {t!r}') from None
  from unimedvl_jax.model.lora import EXPERT_LINEARS
  _require(any(rx.search(f'decoder/layers/und/{n}') for n in EXPERT_LINEARS), f'{prefix}.targets',
           f'{t!r} matches none of the expert projections '
           f'(decoder/layers/<expert>/{{{", ".join(EXPERT_LINEARS)}}})')


def validate_data(d: ConfigDict, model: ConfigDict, prefix: str = 'data') -> None:
  _positive(d, prefix, ['batch_size', 'seq_len'])
  _require(0 <= d.max_latent_tokens < d.seq_len, f'{prefix}.max_latent_tokens',
           f'must be in [0, seq_len={d.seq_len}), got {d.max_latent_tokens}')
  _require(d.max_vit_patches >= 0, f'{prefix}.max_vit_patches', 'must be >= 0')
  _require(d.max_vae_images >= 0, f'{prefix}.max_vae_images', 'must be >= 0')
  from unimedvl_jax.batch import vae_downsample
  tok_px = vae_downsample(model) * model.latent_patch_size
  _require(d.max_label_tokens >= 0, f'{prefix}.max_label_tokens',
           f'must be >= 0 (0 = seq_len - max_latent_tokens), got {d.max_label_tokens}')
  buckets = tuple(d.vae_buckets)
  for i, b in enumerate(buckets):
    ok = isinstance(b, (tuple, list)) and len(b) == 3 and all(
        isinstance(x, int) and x > 0 for x in b)
    _require(ok, f'{prefix}.vae_buckets[{i}]', f'must be (height, width, slots) positive ints, got {b!r}')
    h, w, _ = b
    _require(h % tok_px == 0 and w % tok_px == 0, f'{prefix}.vae_buckets[{i}]',
             f'{h}x{w} must be multiples of {tok_px} (pixels per latent token)')
    _require(max(h, w) // tok_px <= model.max_latent_size, f'{prefix}.vae_buckets[{i}]',
             f'{h}x{w} needs a latent grid over model.max_latent_size ({model.max_latent_size})')
  sizes = [tuple(b[:2]) for b in buckets]
  _require(len(set(sizes)) == len(sizes), f'{prefix}.vae_buckets', f'duplicate sizes in {buckets}')
  _require(d.vae_max_size % tok_px == 0 or buckets, f'{prefix}.vae_max_size',
           f'must be a multiple of {tok_px} (pixels per latent token), got {d.vae_max_size}')
  _require(d.vae_max_size // tok_px <= model.max_latent_size, f'{prefix}.vae_max_size',
           f'{d.vae_max_size}px needs a latent grid of {d.vae_max_size // tok_px} > '
           f'model.max_latent_size ({model.max_latent_size})')
  if model.vit.enabled:
    _require(d.vit_max_size // model.vit.patch_size <= model.vit.grid_size, f'{prefix}.vit_max_size',
             f'{d.vit_max_size}px needs a ViT grid of {d.vit_max_size // model.vit.patch_size} > '
             f'model.vit.grid_size ({model.vit.grid_size})')
  for n in ('cfg_dropout_text', 'cfg_dropout_vit', 'cfg_dropout_vae', 'max_bad_fraction'):
    _require(0.0 <= d[n] <= 1.0, f'{prefix}.{n}', f'must be in [0, 1], got {d[n]}')
  _require(d.tokenizer_kind in ('sentencepiece', 'hf'), f'{prefix}.tokenizer_kind',
           f"must be 'sentencepiece' or 'hf', got {d.tokenizer_kind!r}")
  _require(d.num_workers >= 0, f'{prefix}.num_workers', f'must be >= 0, got {d.num_workers}')
  _require(d.prefetch >= 1, f'{prefix}.prefetch', f'must be >= 1, got {d.prefetch}')
  _require(d.bad_check_min_samples >= 1, f'{prefix}.bad_check_min_samples',
           f'must be >= 1, got {d.bad_check_min_samples}')
  _require(d.pack_lookahead >= 1, f'{prefix}.pack_lookahead',
           f'must be >= 1, got {d.pack_lookahead}')
  _require(d.max_sample_tokens > 0, f'{prefix}.max_sample_tokens',
           f'must be > 0, got {d.max_sample_tokens}')
  _require(isinstance(d.get('allow_outside_root', False), bool), f'{prefix}.allow_outside_root',
           f"must be True or False, got {d.get('allow_outside_root')!r}")
  for name, g in d.groups.items():
    _require('jsonl' in g and isinstance(g.jsonl, str) and g.jsonl.strip(),
             f'{prefix}.groups.{name}.jsonl', 'must be a path (or comma-separated paths)')
    _require(g.get('weight', 1.0) >= 0, f'{prefix}.groups.{name}.weight',
             f"must be >= 0, got {g.get('weight')}")


def _real(v) -> bool:
  """A finite int or float (bools are not numbers here)."""
  import math
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _kernel_seq_multiples(impl: str, T: int) -> dict:
  """{kernel: the multiple it pads a length-T sequence to} for the kernels `impl` selects.
  'pallas' may run either Pallas backend, so both must divide T. 'auto' is not checked here: it
  is the blocked XLA attention on CPU (any T) and pads on an accelerator; configs meant for pods
  (configs/unimedvl_7b.py) use multiples of 512."""
  if impl == 'pallas':
    from unimedvl_jax.kernels.flash_attention import seq_multiple
    return {f'pallas {b}': seq_multiple(T, b) for b in ('tpu', 'generic')}
  if impl == 'splash':
    from unimedvl_jax.kernels.splash import seq_multiple
    return {'splash': seq_multiple(T)}
  return {}


def validate_attention_blocks(m: ConfigDict, d: ConfigDict, prefix: str = 'data') -> None:
  """With a block kernel selected, data.seq_len must be a multiple of its block: otherwise every
  attention call of every layer pads the pack to the next block and slices the result."""
  for kernel, mult in _kernel_seq_multiples(m.attention_impl, int(d.seq_len)).items():
    _require(d.seq_len % mult == 0, f'{prefix}.seq_len',
             f'must be a multiple of {mult} (the {kernel} attention block) with '
             f'model.attention_impl={m.attention_impl!r}, got {d.seq_len} (next: '
             f'{-(-d.seq_len // mult) * mult})')


def validate_train(t: ConfigDict, prefix: str = 'train', param_paths=None) -> None:
  """Every train field: type and range. Raises ConfigError naming the field. param_paths: a
  callable giving the model's parameter paths, for the freeze regexes (None: not checked)."""
  def num(name, ok, what):
    v = t[name]
    _require(_real(v) and ok(v), f'{prefix}.{name}', f'must be a finite number {what}, got {v!r}')

  def count(name, lo):
    v = t[name]
    _require(_integer(v) and v >= lo, f'{prefix}.{name}', f'must be an integer >= {lo}, got {v!r}')

  num('lr', lambda v: v >= 0, '>= 0')
  num('min_lr', lambda v: v >= 0, '>= 0')
  _require(t.schedule in ('constant', 'cosine'), f'{prefix}.schedule',
           f"must be 'constant' or 'cosine', got {t.schedule!r}")
  count('warmup_steps', 0)
  num('b1', lambda v: 0 <= v < 1, 'in [0, 1)')
  num('b2', lambda v: 0 <= v < 1, 'in [0, 1)')
  num('eps', lambda v: v > 0, '> 0')
  num('weight_decay', lambda v: v >= 0, '>= 0')
  num('grad_clip', lambda v: v > 0, '> 0 (the global-norm clip)')
  count('grad_accum', 1)
  num('ema_decay', lambda v: 0 <= v <= 1, 'in [0, 1]')
  num('ce_weight', lambda v: v >= 0, '>= 0')
  num('mse_weight', lambda v: v >= 0, '>= 0')
  num('timestep_shift', lambda v: v > 0, '> 0')
  validate_freeze(t.freeze, f'{prefix}.freeze', param_paths)
  count('total_steps', 0)
  count('log_every', 1)
  count('checkpoint_every', 1)
  count('keep_checkpoints', 1)
  count('max_nonfinite_steps', 0)
  _require(isinstance(t.profile_steps, (tuple, list))
           and all(_integer(s) and s >= 0 for s in t.profile_steps), f'{prefix}.profile_steps',
           f'must be a tuple of step numbers >= 0, got {t.profile_steps!r}')
  _require(isinstance(t.dump_hlo, bool), f'{prefix}.dump_hlo',
           f'must be True or False, got {t.dump_hlo!r}')
  _require(isinstance(t.get('lora', False), bool), f'{prefix}.lora',
           f"must be True or False, got {t.get('lora')!r}")


def validate_eval(e: ConfigDict, prefix: str = 'eval') -> None:
  """Structure only; the sampler values are checked by infer.image.eval_flow_settings (which
  `python -m unimedvl_jax.train --evaluate` calls before training)."""
  _require(_integer(e.get('image_steps')) and e.image_steps >= 2, f'{prefix}.image_steps',
           f"must be an integer >= 2, got {e.get('image_steps')!r}")
  for k in ('text_to_image', 'editing'):
    _require(isinstance(e.get(k), (ConfigDict, dict)), f'{prefix}.{k}',
             f'must be a dict of sampler settings, got {e.get(k)!r}')


def validate_mesh(m: ConfigDict, prefix: str = 'mesh') -> None:
  """Mesh axis sizes and the sharding rules: (logical name, None | mesh axis | tuple of them)."""
  for axis in MESH_AXES:
    v = m[axis]
    _require(isinstance(v, int) and (v == -1 or v >= 1), f'{prefix}.{axis}',
             f'must be -1 (all remaining devices) or >= 1, got {v!r}')
  rules = m.get('rules', SHARDING_RULES)
  _require(isinstance(rules, (tuple, list)), f'{prefix}.rules',
           f'must be a sequence of (logical name, mesh axes) pairs, got {rules!r}')
  for r in rules:
    ok = isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
    target = r[1] if ok else None
    axes = () if target is None else (target,) if isinstance(target, str) else target
    ok = ok and isinstance(axes, (tuple, list)) and all(a in MESH_AXES for a in axes)
    _require(ok, f'{prefix}.rules', f'each rule is (logical name, None | mesh axis | tuple of '
             f'mesh axes) with mesh axes from {MESH_AXES}, got {r!r}')
  names = {r[0] for r in rules}
  for need in ('batch',):
    _require(need in names, f'{prefix}.rules', f'needs a rule for the logical axis {need!r}')
  mb = m.get('max_replicated_bytes', 0)
  _require(_integer(mb) and mb >= 0, f'{prefix}.max_replicated_bytes',
           f'must be an integer >= 0 (0 = no check), got {mb!r}')


def validate_freeze(freeze, field: str = 'train.freeze', param_paths=None) -> None:
  """train.freeze: a tuple of module names (FREEZE_ALIASES) and regexes that compile and (with
  `param_paths`, a callable giving the model's '/'-joined parameter paths) match a parameter."""
  import re
  _require(isinstance(freeze, (tuple, list)), field,
           f'must be a tuple of regexes over parameter paths or module names '
           f'({", ".join(FREEZE_ALIASES)}), got {freeze!r}')
  for f in freeze:
    _require(isinstance(f, str) and f != '', field,
             f'entries must be non-empty strings (regexes or module names), got {f!r}')
    if f in FREEZE_ALIASES:
      continue
    try:
      rx = re.compile(f)
    except re.error as e:
      raise ConfigError(f'config.{field}: {f!r} is neither a module name '
                        f'({", ".join(FREEZE_ALIASES)}) nor a valid regex ({e})') from None
    if param_paths is not None:
      _require(any(rx.fullmatch(p) for p in param_paths()), field,
               f'{f!r} is not a module name ({", ".join(FREEZE_ALIASES)}) and as a regex matches '
               "no parameter path (the whole '/'-joined path, e.g. 'vit/.*', "
               "'decoder/layers/gen/.*')")


def _param_paths(cfg_model) -> list[str]:
  """The model's '/'-joined parameter paths (built abstractly: seconds, nothing allocated)."""
  from flax import nnx
  from unimedvl_jax.model.unimedvl import abstract_model
  state = nnx.state(abstract_model(cfg_model), nnx.Param)
  return ['/'.join(str(x) for x in p) for p, _ in nnx.to_flat_state(state)]


def validate(cfg: ConfigDict) -> ConfigDict:
  """Checks every section; returns cfg so it can be chained. Raises ConfigError."""
  validate_model(cfg.model)
  validate_data(cfg.data, cfg.model)
  validate_attention_blocks(cfg.model, cfg.data)
  paths: list = []

  def param_paths() -> list[str]:   # built once, and only for a freeze regex
    if not paths:
      paths.extend(_param_paths(cfg.model))
    return paths
  validate_train(cfg.train, param_paths=param_paths)
  if 'eval' in cfg:
    validate_eval(cfg.eval)
  lora_rank = cfg.model.get('lora', lora_defaults()).rank
  _require(not cfg.train.get('lora', False) or lora_rank > 0, 'train.lora',
           'needs model.lora.rank > 0 (the adapters to train)')
  validate_mesh(cfg.mesh)
  for name in cfg.stages:
    _require(name in cfg.curriculum, 'stages', f'stage {name!r} has no config.curriculum.{name}')
    st = cfg.curriculum[name]
    _require(st.get('kind', 'lm') in STAGE_KINDS, f'curriculum.{name}.kind',
             f"must be one of {tuple(STAGE_KINDS)}, got {st.get('kind')!r}")
    _require(int(st.get('steps', 0)) > 0, f'curriculum.{name}.steps', 'must be > 0')
    _require(isinstance(st.get('lora', False), bool), f'curriculum.{name}.lora',
             f"must be True or False, got {st.get('lora')!r}")
    st_train = stage_train_config(cfg, name)
    validate_train(st_train, f'curriculum.{name}.train', param_paths)
    _require(not st_train.get('lora', False) or lora_rank > 0, f'curriculum.{name}.train.lora',
             'needs model.lora.rank > 0 (the adapters to train)')
    _require(not (st_train.get('lora', False) and st.get('kind', 'lm') == 'vae'),
             f'curriculum.{name}.train.lora', "a 'vae' stage trains the autoencoder, not adapters")
  return cfg


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


def set_field(cfg: ConfigDict, key: str, value) -> None:
  """Sets the dotted field `key` of `cfg`, which must exist, coerced as `assign` does (the
  setter of command-line and importer overrides). Raises ConfigError naming it."""
  node = cfg
  parts = key.split('.')
  for p in parts[:-1]:
    if p not in node:
      raise ConfigError(f'config.{key}: no such field ({p!r} missing)')
    node = node[p]
  if parts[-1] not in node:
    raise ConfigError(f'config.{key}: no such field')
  assign(node, parts[-1], value, key)


def flat_fields(d, prefix: str = '') -> dict:
  """A nested mapping (a config's `to_dict()` or its JSON) as {'a.b.c': leaf value}: the dotted
  field names `set_field` / `parse_override` use."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flat_fields(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def parse_override(override: str) -> tuple[str, object]:
  """'a.b=VALUE' (also '--config.a.b=VALUE') -> ('a.b', value): the value as a Python literal
  (`ast.literal_eval`), else the string as written. The one parser of `key=value` overrides
  (`load_config_file`, `convert import --set`); `set_field` then sets and coerces it. Raises
  ConfigError for a missing '=' or an empty key."""
  key, eq, raw = override.partition('=')
  key = key.strip().removeprefix('--').removeprefix('config.')
  if not eq or not key:
    raise ConfigError(f'override {override!r}: expected KEY=VALUE')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key, value


def load_config_file(path: str, overrides=()) -> ConfigDict:
  """Loads `configs/NAME.py` (its `get_config()`), applies 'a.b=value' overrides
  (`parse_override`, `set_field`), validates.

  The CLIs use absl's `config_flags` for the same thing (`--config FILE --config.a.b=value`);
  this is the library form for tests, notebooks and subprocess launchers.
  """
  import importlib.util
  import os
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'_unimedvl_config_{abs(hash(path))}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, 'get_config'):
    raise ConfigError(f'{path}: a config file must define get_config()')
  cfg = mod.get_config()
  for ov in overrides:
    set_field(cfg, *parse_override(ov))
  return validate(cfg)
