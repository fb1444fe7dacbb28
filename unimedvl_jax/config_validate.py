"""Validation of the config schema (unimedvl_jax.config): every field's type and range.

`validate(cfg)` runs at start-up of every entry point and raises `ConfigError` naming the
offending field and what was expected; the `validate_<section>` checks serve code that holds one
section (a checkpoint's model and data, a lone VAE's model, the eval samplers).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from unimedvl_jax.config import (FREEZE_ALIASES, LORA_EXPERTS, MESH_AXES, SHARDING_RULES,
                                 STAGE_KINDS, ConfigError, lora_defaults, stage_train_config)


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
  w0 = llm.get('qk_norm_init', 1.0)
  _require(_real(w0) and w0 > 0, f'{prefix}.llm.qk_norm_init',
           f'must be a finite number > 0 (the initial q_norm / k_norm weight), got {w0!r}')
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
