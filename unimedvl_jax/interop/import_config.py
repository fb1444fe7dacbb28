"""The config of an imported PyTorch checkpoint: its model section derived from the files.

Every model dimension comes from the JSON configs (llm_config.json, vit_config.json) and the
tensor shapes (`derive_config`: `derive_llm`, `derive_vit`, `derive_vae`, `derive_generation`);
the VAE values no shape gives come from flags, `--set`, the file's metadata or the released
defaults, each with its source (`resolve_vae_settings`); each file must hold one dtype
(`check_file_dtypes`). The other sections come from a base config (`base_config`: `--config`,
the export's sidecar, or `default_config()`) with the `--set` overrides (parsed by
`config_load.parse_override`, set by `config_load.set_field`); data settings the model cannot
run with are adjusted with a note, or are an error when set explicitly (`fit_data_to_model`).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from unimedvl_jax.batch import vae_downsample
from unimedvl_jax.config_load import flat_fields
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.import_common import (ADAPTERS_FILE, SIDECAR_CONFIG, VAE_META_PREFIX,
                                                VAE_SETTINGS, ImportReport, TorchImportError,
                                                dtype_name)
from unimedvl_jax.interop.st_io import TensorSource

# Model fields that are run settings, not facts of the checkpoint: --set may change them freely.
RUN_FIELDS = ('model.dtype', 'model.attention_impl', 'model.attention_platform', 'model.remat',
              'model.scan_layers', 'model.unroll_loops', 'model.ce_chunk', 'model.init_std')


# ------------------------------------------------------------------------------- small helpers

def _req(d: Mapping, key: str, where: str):
  if key not in d:
    raise TorchImportError(f'{where}: field {key!r} is missing')
  return d[key]


# ---------------------------------------------------------------------- base config, overrides

def parse_overrides(overrides: Sequence[str]) -> dict:
  """The `--set` values: ['a.b=1', ...] -> {'a.b': 1}, each parsed by
  `config_load.parse_override` (a Python literal, else the string; a missing '=' is an error)."""
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.config_load import parse_override
  out = {}
  for ov in overrides:
    try:
      key, value = parse_override(ov)
    except ConfigError as e:
      raise TorchImportError(f'--set: {e}') from None
    out[key] = value
  return out


def apply_overrides(cfg, values: Mapping) -> None:
  """Sets each dotted field of `cfg` (which must exist), with `config_load.load_config_file`'s
  coercions (`config_load.set_field`)."""
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.config_load import set_field
  for key, value in values.items():
    try:
      set_field(cfg, key, value)
    except ConfigError as e:
      raise TorchImportError(f'--set {key}: {e}') from None


def base_config(config_path, sidecar, report, torch_dir):
  """(base config, explicit fields {dotted: where}): `--config`, else the `config` of the
  export's sidecar (SIDECAR_CONFIG in torch_dir), else `default_config()`. Explicit: the data
  fields the --config file sets away from the defaults."""
  from unimedvl_jax.config import ConfigError, default_config
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.train.checkpoint_format import config_from_json
  explicit = {}
  if config_path:
    try:
      base = load_config_file(config_path)
    except (ConfigError, FileNotFoundError) as e:
      raise TorchImportError(f'--config {config_path}: {e}') from None
    defaults = flat_fields(default_config().to_dict())
    for k, v in flat_fields(base.to_dict()).items():
      if k.startswith('data.') and defaults.get(k, object()) != v:
        explicit[k] = f'--config {config_path}'
    if sidecar is not None:
      report.note(f'--config {config_path} used; {SIDECAR_CONFIG} in {torch_dir} ignored')
  elif sidecar is not None:
    if not isinstance(sidecar.get('config'), dict):
      raise TorchImportError(f'{os.path.join(torch_dir, SIDECAR_CONFIG)}: no "config" object')
    try:
      base = config_from_json(sidecar['config'])
    except (ConfigError, TypeError, ValueError) as e:
      raise TorchImportError(f'{os.path.join(torch_dir, SIDECAR_CONFIG)}: {e}') from None
    report.note(f'data/train/mesh sections and run settings from {SIDECAR_CONFIG} (written by '
                'the export)')
  else:
    base = default_config()
    report.note('no --config: data/train/mesh sections from default_config()')
  return base, explicit


# ------------------------------------------------------------------------- config derivation

def derive_llm(llm_json: Mapping, src: TensorSource, report: ImportReport,
               where: str = 'llm_config.json') -> dict:
  """Qwen2 config fields -> our `model.llm` section (checked against the weights later)."""
  H = int(_req(llm_json, 'hidden_size', where))
  heads = int(_req(llm_json, 'num_attention_heads', where))
  theta = llm_json.get('rope_theta')
  if theta is None:
    theta = (llm_json.get('rope_parameters') or {}).get('rope_theta')
  if theta is None:
    raise TorchImportError(f'{where}: neither rope_theta nor rope_parameters.rope_theta is set')
  rope_type = (llm_json.get('rope_parameters') or {}).get('rope_type', 'default')
  if llm_json.get('rope_scaling') or rope_type not in ('default', None):
    raise TorchImportError(f'{where}: RoPE scaling ({llm_json.get("rope_scaling") or rope_type}) is '
                           'not supported; the model uses plain 1-D RoPE')
  if llm_json.get('use_sliding_window'):
    raise TorchImportError(f'{where}: use_sliding_window=true is not supported')
  if llm_json.get('tie_word_embeddings'):
    raise TorchImportError(f'{where}: tie_word_embeddings=true; UniMedVL has an untied lm_head')
  act = llm_json.get('hidden_act', 'silu')
  if act != 'silu':
    raise TorchImportError(f'{where}: hidden_act={act!r}; only silu (SwiGLU) is supported')
  has_qk = any('.self_attn.q_norm' in k for k in src.keys())
  qk_norm = llm_json.get('qk_norm')
  if qk_norm is None:
    qk_norm = has_qk
    report.note(f'{where} has no qk_norm field; qk_norm={has_qk} from the weights '
                '(BAGEL sets it in code)')
  return dict(
      vocab_size=int(_req(llm_json, 'vocab_size', where)),
      hidden_size=H,
      intermediate_size=int(_req(llm_json, 'intermediate_size', where)),
      num_layers=int(_req(llm_json, 'num_hidden_layers', where)),
      num_heads=heads,
      num_kv_heads=int(llm_json.get('num_key_value_heads') or heads),
      head_dim=int(llm_json.get('head_dim') or H // heads),
      rope_theta=float(theta),
      rms_norm_eps=float(llm_json.get('rms_norm_eps', 1e-6)),
      qk_norm=bool(qk_norm),
  )


def derive_vit(vit_json: Mapping | None, src: TensorSource, report: ImportReport,
               vit_layers: int | None, where: str = 'vit_config.json') -> tuple[dict, list]:
  """SigLIP fields + weights -> our `model.vit` section, and the keys deliberately left out."""
  keys = src.keys()
  if not any(k.startswith(km.VIT_PREFIX) for k in keys):
    report.note('no vit_model.* weights: the ViT (understanding image path) is disabled')
    return dict(enabled=False), []
  if vit_json is None:
    raise TorchImportError(f'the weights hold vit_model.* tensors but {where} is missing')
  act = vit_json.get('hidden_act', 'gelu_pytorch_tanh')
  if act not in ('gelu_pytorch_tanh', 'gelu_new'):
    raise TorchImportError(f'{where}: hidden_act={act!r}; the ViT uses tanh-GELU')
  p = int(_req(vit_json, 'patch_size', where))
  pos_key = km.VIT_PREFIX + 'embeddings.position_embedding.weight'
  if pos_key not in src:
    raise TorchImportError(f'{src.name}: {pos_key} is missing')
  grid = km.isqrt_exact(src.shape(pos_key)[0], pos_key)
  img = vit_json.get('image_size')
  if img is not None and int(img) // p != grid:
    report.note(f'{where}: image_size/patch_size = {int(img) // p} but the position table is '
                f'{grid}x{grid}; using {grid} (from the weights)')
  present = km.layer_indices(keys, km.VIT_PREFIX + 'encoder.layers.')
  n_present = len(present)
  if present != list(range(n_present)):
    missing = sorted(set(range(max(present) + 1)) - set(present))
    raise TorchImportError(f'{src.name}: ViT layers {missing} are missing (the file holds layers '
                           f'{present}, not 0..{max(present)})')
  json_layers = vit_json.get('num_hidden_layers')
  conv = int(json_layers) - 1 if json_layers is not None else None
  if conv is not None and n_present < conv:
    raise TorchImportError(
        f'{src.name}: {where} says num_hidden_layers={json_layers}, so the model has {conv} ViT '
        f'layers (BAGEL builds num_hidden_layers - 1, SPEC 8), but the weights hold only '
        f'{n_present} (layers {list(range(n_present, conv))} are missing)')
  if conv is None:
    report.note(f'{where} has no num_hidden_layers; {n_present} ViT layers from the weights')
  ignored: list = []
  n = n_present
  if vit_layers is not None:
    if not 1 <= vit_layers <= n_present:
      raise TorchImportError(f'vit_layers={vit_layers}: the weights hold {n_present} ViT layers')
    n = vit_layers
    if n < n_present:
      drop = list(range(n, n_present))
      ignored = [k for k in keys if k.startswith(km.VIT_PREFIX + 'encoder.layers.')
                 and int(k[len(km.VIT_PREFIX + 'encoder.layers.'):].split('.')[0]) in drop]
      report.note(f'ViT: built {n} layers as requested; ignored the weights of layers {drop} '
                  f'({len(ignored)} tensors)')
  if conv is not None and conv != n:
    report.note(f'ViT: {where} says num_hidden_layers={json_layers}, so BAGEL/UniMedVL PyTorch '
                f'code builds {conv} layers; the file holds {n_present} layers '
                f'(0..{n_present - 1}); we built {n}'
                + (' (from the weights present; pass --vit-layers '
                   f'{conv} to reproduce the PyTorch behaviour)' if vit_layers is None else ''))
  return dict(
      enabled=True,
      hidden_size=int(_req(vit_json, 'hidden_size', where)),
      intermediate_size=int(_req(vit_json, 'intermediate_size', where)),
      num_layers=n,
      num_heads=int(_req(vit_json, 'num_attention_heads', where)),
      patch_size=p,
      grid_size=grid,
      layer_norm_eps=float(vit_json.get('layer_norm_eps', 1e-6)),
  ), ignored


def resolve_vae_settings(vae_src: TensorSource | None, report: ImportReport,
                         flags: Mapping | None = None, set_values: Mapping | None = None) -> dict:
  """The VAE values no tensor shape determines: norm_groups, norm_eps, scale_factor,
  shift_factor. Each from (first that has it) its flag, `--set model.vae.<name>`, the
  `unimedvl.vae.<name>` metadata of ae.safetensors (our exports), else the released default.
  Never from a base config. Records value and source in report.vae_settings and a note."""
  flags = {k: v for k, v in (flags or {}).items() if v is not None}
  set_values = set_values or {}
  meta = vae_src.metadata() if vae_src is not None else {}
  where = vae_src.name if vae_src is not None else 'ae.safetensors'
  out, parts = {}, []
  for name, (typ, default) in VAE_SETTINGS.items():
    mkey = VAE_META_PREFIX + name
    mval = None
    if mkey in meta:
      try:
        mval = typ(float(meta[mkey])) if typ is int else typ(meta[mkey])
      except ValueError:
        raise TorchImportError(f'{where}: metadata {mkey}={meta[mkey]!r} is not a number') from None
    if name in flags:
      value, source = typ(flags[name]), f'--vae-{name.replace("_", "-")}'
    elif f'model.vae.{name}' in set_values:
      value, source = typ(set_values[f'model.vae.{name}']), f'--set model.vae.{name}'
    elif mval is not None:
      value, source = mval, f'{where} metadata'
    else:
      value, source = default, 'released default (not recorded in the file)'
    if mval is not None and value != mval:
      report.note(f'VAE {name}: {source} gives {value}, overriding {mval} recorded in {where}')
    out[name] = value
    report.vae_settings[name] = {'value': value, 'source': source}
    parts.append(f'{name}={value} ({source})')
  report.note('VAE settings: ' + ', '.join(parts))
  return out


def derive_vae(vae_src: TensorSource | None, model_src: TensorSource, report: ImportReport,
               settings: Mapping | None = None) -> dict:
  """FLUX autoencoder shapes -> our `model.vae` section. `settings`: the values no shape gives
  (`resolve_vae_settings`; default: from the file's metadata, else the released values)."""
  has_gen = 'vae2llm.weight' in model_src if model_src is not None else True
  if vae_src is None:
    if has_gen:
      report.note('no ae.safetensors: the model is imported without a VAE')
    else:
      report.note('no ae.safetensors and no generation adapters: the VAE / generation path is '
                  'disabled')
    return dict(enabled=False)
  if not has_gen:
    raise TorchImportError(f'a VAE ({vae_src.name}) is given but {model_src.name} has no '
                           'vae2llm.*: a generation-less model cannot carry a VAE')
  keys = vae_src.keys()
  for k in ('encoder.conv_in.weight', 'decoder.conv_in.weight'):
    if k not in keys:
      raise TorchImportError(f'{vae_src.name}: {k} is missing (not a FLUX autoencoder?)')
  cin_w = vae_src.shape('encoder.conv_in.weight')
  ch, cin = cin_w[0], cin_w[1]
  levels = km.layer_indices(keys, 'encoder.down.')
  mult = []
  for lvl in levels:
    k = f'encoder.down.{lvl}.block.0.conv1.weight'
    if k not in keys:
      raise TorchImportError(f'{vae_src.name}: {k} is missing')
    out = vae_src.shape(k)[0]
    if out % ch:
      raise TorchImportError(f'{vae_src.name}: {k} has {out} channels, not a multiple of {ch}')
    mult.append(out // ch)
  nrb = len(km.layer_indices(keys, 'encoder.down.0.block.'))
  zc = vae_src.shape('decoder.conv_in.weight')[1]
  if settings is None:
    settings = resolve_vae_settings(vae_src, report)
  d = dict(enabled=True, in_channels=int(cin), base_channels=int(ch),
           channel_mult=tuple(int(m) for m in mult), num_res_blocks=int(nrb), z_channels=int(zc))
  d.update({k: settings[k] for k in VAE_SETTINGS})
  for i, m in enumerate(d['channel_mult']):
    if (ch * m) % d['norm_groups']:
      src = report.vae_settings.get('norm_groups', {}).get('source', 'given')
      raise TorchImportError(f'{vae_src.name}: level {i} has {ch * m} channels, not divisible by '
                             f'norm_groups={d["norm_groups"]} ({src}); pass --vae-norm-groups')
  return d


def derive_generation(model_src: TensorSource, z_channels: int, report: ImportReport,
                      z_source: str) -> dict:
  """latent_patch_size / max_latent_size / timestep_freq_dim from the adapters' shapes."""
  in_dim = model_src.shape('vae2llm.weight')[1]
  p = int(round((in_dim / z_channels) ** 0.5)) if in_dim % z_channels == 0 else 0
  if p < 1 or p * p * z_channels != in_dim:
    raise TorchImportError(f'{model_src.name}: vae2llm.weight takes {in_dim} inputs, not '
                           f'p*p*{z_channels} latent channels ({z_source})')
  out = dict(latent_patch_size=p)
  lp = 'latent_pos_embed.pos_embed'
  if lp in model_src:
    out['max_latent_size'] = km.isqrt_exact(model_src.shape(lp)[0], lp)
  te = 'time_embedder.mlp.0.weight'
  if te in model_src:
    out['timestep_freq_dim'] = int(model_src.shape(te)[1])
  return out


def check_file_dtypes(src: TensorSource, allow_cast: bool, report: ImportReport) -> str:
  """The one dtype of a file's tensors (by tensor count). A tensor of another dtype is an error
  listing them, unless allow_cast (then a note). Returns the file's dtype name."""
  by_dtype: dict = {}
  for k in src.keys():
    by_dtype.setdefault(np.dtype(src.dtype(k)).name, []).append(k)
  if not by_dtype:
    raise TorchImportError(f'{src.name}: holds no tensors')
  main = max(by_dtype, key=lambda d: (len(by_dtype[d]), d))
  odd = {d: ks for d, ks in by_dtype.items() if d != main}
  if odd:
    listed = [f'{k} ({d})' for d, ks in sorted(odd.items()) for k in ks]
    n = len(listed)
    msg = (f'{src.name}: {n} tensors are not {main} like the other {len(by_dtype[main])}: '
           + ', '.join(listed[:10]) + (f' ... (+{n - 10})' if n > 10 else ''))
    if not allow_cast:
      raise TorchImportError(msg + '; pass --allow-cast to cast them')
    report.note(msg + '; cast (--allow-cast)')
  return main


def fit_data_to_model(cfg, explicit: Mapping, report: ImportReport, model_where: str = '') -> None:
  """Adjusts data settings that the imported model cannot run with. A field set explicitly
  (`explicit`: dotted field -> where it was set) is not changed: that is an error naming the
  field and the model value it conflicts with; other fields are adjusted with a note."""
  d, m = cfg.data, cfg.model
  tok_px = vae_downsample(m) * m.latent_patch_size

  def fix(field, new, why):
    old = d[field]
    if old == new:
      return
    full = f'data.{field}'
    if full in explicit:
      raise TorchImportError(f'{full}={old} ({explicit[full]}) conflicts with the imported model: '
                             f'{why}')
    d[field] = new
    report.adjusted[full] = [old, new]
    report.note(f'{full}: {old} -> {new} ({why})')

  lat_where = f'latent_pos_embed.pos_embed in {model_where}' if model_where else 'latent_pos_embed'
  if d.vae_max_size // tok_px > m.max_latent_size:
    fix('vae_max_size', m.max_latent_size * tok_px,
        f'{d.vae_max_size}px needs a latent grid of {d.vae_max_size // tok_px} > the model\'s '
        f'max_latent_size {m.max_latent_size} ({lat_where})')
  for i, (h, w, n) in enumerate(tuple(d.get('vae_buckets', ()))):
    if h % tok_px or w % tok_px or max(h, w) // tok_px > m.max_latent_size:
      fix('vae_buckets', (), f'bucket {h}x{w} does not fit the model ({tok_px} px per latent '
          f'token, max_latent_size {m.max_latent_size}): default bucket of data.vae_max_size')
      break
  if d.vae_min_size > d.vae_max_size:
    fix('vae_min_size', d.vae_max_size, f'must be <= data.vae_max_size={d.vae_max_size}')
  if m.vit.enabled:
    p, g = m.vit.patch_size, m.vit.grid_size
    if d.vit_max_size // p > g:
      fix('vit_max_size', g * p, f'{d.vit_max_size}px needs a ViT grid of {d.vit_max_size // p} > '
          f'the model\'s {g}x{g} position table (vit_model...position_embedding.weight)')
    if d.vit_min_size > d.vit_max_size:
      fix('vit_min_size', d.vit_max_size, f'must be <= data.vit_max_size={d.vit_max_size}')


def derive_config(base_cfg, llm_json: Mapping, vit_json: Mapping | None, model_src: TensorSource,
                  vae_src: TensorSource | None, *, vit_layers: int | None = None,
                  dtype: str | None = None, report: ImportReport | None = None,
                  vae_settings: Mapping | None = None, explicit: Mapping | None = None,
                  set_values: Mapping | None = None, allow_cast: bool = False):
  """(config, report, ignored keys): `base_cfg` with its model section derived from the files.

  explicit: dotted data/model fields the user set (field -> where); set_values: the `--set`
  values (a model field set there that the files contradict is an error naming both). The
  ignored keys include the generation adapters when there is no VAE (`report.generation_adapters`).
  """
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.config_validate import validate
  report = report or ImportReport()
  explicit = dict(explicit or {})
  set_values = dict(set_values or {})
  cfg = base_cfg.copy_and_resolve_references()
  m = cfg.model
  m.llm.update(derive_llm(llm_json, model_src, report))
  if 'initializer_range' in llm_json and 'model.init_std' not in set_values:
    m.init_std = float(llm_json['initializer_range'])
  vit, ignored = derive_vit(vit_json, model_src, report, vit_layers)
  m.vit.update(vit)
  vae = derive_vae(vae_src, model_src, report, vae_settings)
  m.vae.update(vae)
  has_gen = 'vae2llm.weight' in model_src
  if has_gen:
    if vae['enabled']:
      z, z_src = vae['z_channels'], 'from ae.safetensors'
    elif 'model.vae.z_channels' in set_values:
      z, z_src = int(set_values['model.vae.z_channels']), '--set model.vae.z_channels'
    else:
      z, z_src = 16, 'the released FLUX autoencoder\'s 16, no ae.safetensors to read it from'
      m.vae.z_channels = 16
    m.update(derive_generation(model_src, z, report, z_src))
    if not vae['enabled']:
      want = km.gen_adapter_keys(m)
      found = {k: model_src.shape(k) for k in model_src.keys() if km.is_gen_adapter_key(k)}
      km.check_key_set(found, want, f'{model_src.name} (generation adapters)')
      report.generation_adapters = sorted(want)
      ignored = list(ignored) + sorted(want)
      report.note(f'generation adapters ({len(want)} tensors: vae2llm, llm2vae, time_embedder, '
                  f'latent_pos_embed; latent channels {z}, {z_src}) are kept beside the model, '
                  f'bit exact, in {ADAPTERS_FILE}: UniMedVL builds them only with its VAE; pass '
                  '--vae ae.safetensors to import a model that generates images')
  # dtype: --dtype, else the one dtype of the weights file; each file must be one dtype
  report.source_dtypes = {}
  file_dtype = {}
  for src in (model_src, vae_src):
    if src is None:
      continue
    file_dtype[src.name] = check_file_dtypes(src, allow_cast, report)
    for k in src.keys():
      dn = np.dtype(src.dtype(k)).name
      report.source_dtypes[dn] = report.source_dtypes.get(dn, 0) + int(
          np.prod(src.shape(k), dtype=np.int64))
  if dtype is None and 'model.param_dtype' in set_values:
    dtype = str(set_values['model.param_dtype'])
  if dtype is not None:
    m.param_dtype = dtype_name(dtype)
  else:
    main = file_dtype[model_src.name]
    if main not in ('float32', 'bfloat16', 'float16'):
      raise TorchImportError(f'{model_src.name} holds {main} tensors; pass --dtype')
    m.param_dtype = main
  for name, dn in file_dtype.items():
    if dn != m.param_dtype:
      report.note(f'{name} is {dn}: stored as {m.param_dtype} (pass --dtype to choose)')
  report.param_dtype = m.param_dtype
  # a --set model field the files contradict
  final = flat_fields(cfg.to_dict())
  for key, value in set_values.items():
    if not key.startswith('model.') or key in RUN_FIELDS or key == 'model.param_dtype':
      continue
    if key.startswith('model.vae.') and key[len('model.vae.'):] in VAE_SETTINGS:
      continue
    got = final.get(key)
    if isinstance(got, tuple) and isinstance(value, list):
      value = tuple(value)
    if got != value:
      raise TorchImportError(f'--set {key}={value!r} conflicts with the checkpoint files, which give '
                             f'{got!r}')
  fit_data_to_model(cfg, explicit, report, model_src.name)
  try:
    validate(cfg)
  except ConfigError as e:
    raise TorchImportError(f'the imported model does not fit the configuration: {e}') from None
  return cfg, report, ignored
