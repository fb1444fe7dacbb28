"""Import a PyTorch BAGEL / UniMedVL checkpoint directory into an Orbax checkpoint.

    python -m unimedvl_jax.convert import --torch-dir DIR --out CKPT

DIR holds `ema.safetensors` (or `model.safetensors`, or a sharded `model.safetensors.index.json`
with its `model-0000k-of-0000n.safetensors`), `llm_config.json`, `vit_config.json`, optionally
`ae.safetensors` and the Qwen2 tokenizer files. `--torch-dir` may also name one .safetensors file.

No config is needed. Every model dimension comes from the files: the JSON configs and the tensor
shapes (`derive_config`). What the files cannot say is explicit:
  * the VAE's GroupNorm groups / epsilon and latent scale / shift factors: the flags
    `--vae-norm-groups` ... (defaults: the released FLUX values 32, 1e-6, 0.3611, 0.1159), unless
    the ae.safetensors header records them (our exports write `unimedvl.vae.*` metadata); the
    report states each value and where it came from;
  * the data / train / mesh sections: `--config`, else the `unimedvl_config.json` an export of
    ours writes beside the weights, else `default_config()`; `--set key=value` overrides any field
    of that base. A data setting that does not fit the imported model (e.g. `data.vae_max_size`
    needing a latent grid larger than the model's `latent_pos_embed`) is adjusted with a note
    when it came from a default, and is an error naming both when it was set explicitly.

Files on their own:
  * a lone ema.safetensors (no ae.safetensors, no `--vae`): the model imports without a VAE. Our
    UniMedVL builds the generation adapters (vae2llm, llm2vae, time_embedder, latent_pos_embed)
    only together with a VAE, so they are kept, bit exact, in CKPT/generation_adapters.safetensors
    (an export puts them back into ema.safetensors); `--vae` supplies the VAE from elsewhere;
  * a lone ae.safetensors: imports as a VAE checkpoint (`import_vae_checkpoint`;
    `load_vae_checkpoint` gives the AutoEncoder; `--vae` accepts it).

Strict: every missing, unexpected or mis-shaped key is listed in one error; ViT layers missing
against vit_config.json (BAGEL builds `num_hidden_layers - 1` layers, SPEC 8) are an error; a
tensor whose dtype differs from the rest of its file is an error unless `allow_cast`; non-finite
tensors are an error listing them unless `allow_nonfinite`; malformed JSON / safetensors headers
give one line naming the file. Keys prefixed `module.` import with a note.

Streaming: tensors are memory-mapped and read one at a time; a stacked [L, ...] parameter is
assembled into one preallocated array, layer by layer, then handed to JAX (optionally placed on
a mesh) before the next parameter is read, so peak host memory is the imported model plus about
one parameter; each tensor's mapped pages are dropped once it is consumed (measured by
`python -m unimedvl_jax.interop.measure_memory` on configs/small.py, a 233 MiB fp32 model whose
largest parameter is 22 MiB: resident memory +277 MiB over the start). Dtype is preserved (bf16
stays bf16) unless `dtype` is given; `model.param_dtype` is set to match.

ViT depth: BAGEL's loaders build `vit_config.json:num_hidden_layers - 1` layers. We build the
layers whose weights are in the file; more layers than that convention (the UniMedVL release: JSON
26 -> PyTorch builds 25 while the file holds 0..25) are built and reported; `vit_layers=N` builds
only the first N layers and reports the layers it leaves out.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
from typing import Mapping, Sequence

import numpy as np

from unimedvl_jax.batch import vae_downsample
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.st_io import (DictSource, PrefixStrippedSource,
                                        SafetensorsSource, TensorSource, count_nonfinite,
                                        np_dtype, read_json_file, write_file_atomic)

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                   'special_tokens_map.json', 'added_tokens.json', 'generation_config.json',
                   'chat_template.jinja')
MODEL_FILES = ('ema.safetensors', 'model.safetensors', 'model.safetensors.index.json')
VAE_FILE_NAME = 'ae.safetensors'
SIDECAR_CONFIG = 'unimedvl_config.json'       # our exports: the full config, for a no-flag re-import
ADAPTERS_FILE = 'generation_adapters.safetensors'
VAE_CKPT_CONFIG = 'vae_config.json'           # marks a VAE checkpoint (a lone ae.safetensors import)
VAE_META_PREFIX = 'unimedvl.vae.'             # ae.safetensors metadata keys written by our exports
# The VAE settings no tensor shape determines, with the released FLUX autoencoder's values.
VAE_SETTINGS = {'norm_groups': (int, 32), 'norm_eps': (float, 1e-6),
                'scale_factor': (float, 0.3611), 'shift_factor': (float, 0.1159)}
# Model fields that are run settings, not facts of the checkpoint: --set may change them freely.
RUN_FIELDS = ('model.dtype', 'model.attention_impl', 'model.attention_platform', 'model.remat',
              'model.scan_layers', 'model.ce_chunk', 'model.init_std')
_DTYPE_NAMES = {'bf16': 'bfloat16', 'bfloat16': 'bfloat16', 'fp32': 'float32', 'float32': 'float32',
                'fp16': 'float16', 'float16': 'float16'}


class TorchImportError(ValueError):
  """The PyTorch checkpoint cannot be imported as is (message names the file/key/field)."""


@dataclasses.dataclass
class ImportReport:
  notes: list = dataclasses.field(default_factory=list)
  ignored_keys: list = dataclasses.field(default_factory=list)
  source_dtypes: dict = dataclasses.field(default_factory=dict)
  param_dtype: str = ''
  num_tensors: dict = dataclasses.field(default_factory=dict)
  kind: str = 'model'                   # 'model' | 'vae' (a lone ae.safetensors)
  files: list = dataclasses.field(default_factory=list)
  vae_settings: dict = dataclasses.field(default_factory=dict)   # name -> {value, source}
  adjusted: dict = dataclasses.field(default_factory=dict)       # field -> [old, new]
  nonfinite: dict = dataclasses.field(default_factory=dict)      # key -> number of NaN/inf values
  generation_adapters: list = dataclasses.field(default_factory=list)  # kept beside the model

  def note(self, msg: str):
    self.notes.append(msg)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def dtype_name(d: str | None) -> str | None:
  if d is None:
    return None
  if d not in _DTYPE_NAMES:
    raise TorchImportError(f'--dtype {d!r}: choose from bf16, fp32, fp16')
  return _DTYPE_NAMES[d]


# ------------------------------------------------------------------------------- small helpers

def _req(d: Mapping, key: str, where: str):
  if key not in d:
    raise TorchImportError(f'{where}: field {key!r} is missing')
  return d[key]


def read_json(path: str, required: bool = True):
  """A JSON object from `path`; missing (when required), unreadable or malformed -> one line."""
  if not os.path.exists(path):
    if required:
      raise TorchImportError(f'{path} is missing')
    return None
  d = read_json_file(path, TorchImportError)
  if not isinstance(d, dict):
    raise TorchImportError(f'{path}: expected a JSON object, got {type(d).__name__}')
  return d


def strip_module_prefix(src: TensorSource, report: ImportReport, prefix: str = 'module.'):
  """Removes a `module.` key prefix (DataParallel / DeepSpeed saves), with a note."""
  keys = src.keys()
  n = sum(k.startswith(prefix) for k in keys)
  if not n:
    return src
  report.note(f'{src.name}: {n} of {len(keys)} keys start with {prefix!r} (a DataParallel / '
              'DeepSpeed save); the prefix is removed')
  return PrefixStrippedSource(src, prefix)


def _flat(d: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def parse_overrides(overrides: Sequence[str]) -> dict:
  """['a.b=1', ...] -> {'a.b': 1} (values as Python literals, else strings)."""
  out = {}
  for ov in overrides:
    key, eq, raw = ov.partition('=')
    key = key.strip().removeprefix('--').removeprefix('config.')
    if not eq or not key:
      raise TorchImportError(f'--set {ov!r}: expected KEY=VALUE')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    out[key] = value
  return out


def apply_overrides(cfg, values: Mapping) -> None:
  """Sets each dotted field of `cfg` (which must exist), with `config.load_config_file`'s
  coercions (`config.set_field`)."""
  from unimedvl_jax.config import ConfigError, set_field
  for key, value in values.items():
    try:
      set_field(cfg, key, value)
    except ConfigError as e:
      raise TorchImportError(f'--set {key}: {e}') from None


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
  from unimedvl_jax.config import ConfigError, validate
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
  final = _flat(cfg.to_dict())
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


# ---------------------------------------------------------------------------- the conversion

def _stream_into(entries, abs_flat, src_of, target, shardings, report: ImportReport):
  """Reads, converts and places every entry; collects non-finite tensors in report.nonfinite."""
  import jax
  flat = []
  for e, (path, var) in zip(entries, abs_flat):
    assert e.path == tuple(path)
    src = src_of(e)
    out = np.empty(e.shape, target)
    for i, k in enumerate(e.keys):
      t = src.get(k)
      bad = count_nonfinite(t)
      if bad:
        report.nonfinite[k] = bad
      if e.stacked:
        out[i] = km.from_torch_layout(t, e.transform)       # casts on assignment
      else:
        out[...] = km.from_torch_layout(t, e.transform)
      del t
      src.release(k)
    arr = jax.device_put(out, shardings[tuple(path)]) if shardings is not None else jax.device_put(out)
    del out
    flat.append((tuple(path), var.replace(arr)))
  return flat


def _raise_nonfinite(report: ImportReport, allow: bool):
  if not report.nonfinite:
    return
  items = sorted(report.nonfinite.items())
  listed = ', '.join(f'{k} ({n} values)' for k, n in items[:20])
  msg = f'{len(items)} tensors hold NaN or inf: {listed}' + (' ...' if len(items) > 20 else '')
  if not allow:
    raise TorchImportError(msg + '; pass --allow-nonfinite to import them anyway')
  report.note(msg + ' (imported: --allow-nonfinite)')


def import_state(cfg, model_src: TensorSource, vae_src: TensorSource | None = None, *,
                 ignore: Sequence[str] = (), mesh=None, report: ImportReport | None = None,
                 allow_nonfinite: bool = False):
  """Streams the tensors of the two sources into a concrete nnx.State of UniMedVL(cfg.model).

  Strict key check first (nothing is read before it passes). Every leaf is cast to
  `cfg.model.param_dtype`. With `mesh`, each leaf is placed with its logical sharding
  (`sharding.state_shardings`) right after it is assembled. A tensor holding NaN / inf is an
  error naming it (after all were read) unless allow_nonfinite. Returns (graphdef, state).
  """
  from flax import nnx
  report = report or ImportReport()
  graphdef, abs_state = km.abstract_split(cfg.model)
  entries = km.entries_from_state(abs_state)
  want_model = km.expected_keys_from_entries(entries, km.MODEL_FILE)
  want_vae = km.expected_keys_from_entries(entries, km.VAE_FILE)
  km.check_key_set(model_src.shapes(), want_model, model_src.name, ignore=ignore)
  if want_vae or vae_src is not None:
    if vae_src is None:
      raise km.KeySetError('the model has a VAE but no ae.safetensors was given')
    if not want_vae:
      raise km.KeySetError(f'{vae_src.name} was given but the model config has no VAE '
                           '(model.vae.enabled is False)')
    km.check_key_set(vae_src.shapes(), want_vae, vae_src.name)
  report.ignored_keys = sorted(ignore)
  report.num_tensors = {'model': len(want_model), 'vae': len(want_vae)}
  shardings = None
  if mesh is not None:
    from unimedvl_jax import sharding as sh
    shardings = dict(nnx.to_flat_state(sh.state_shardings(abs_state, mesh)))
  flat = _stream_into(entries, nnx.to_flat_state(abs_state),
                      lambda e: model_src if e.file == km.MODEL_FILE else vae_src,
                      np_dtype(cfg.model.param_dtype), shardings, report)
  _raise_nonfinite(report, allow_nonfinite)
  return graphdef, nnx.from_flat_state(flat)


def import_state_dict(cfg, sd: Mapping, ae_sd: Mapping | None = None, **kw):
  """In-memory form (tests, notebooks): torch-layout dicts (numpy or torch) -> nnx model."""
  from flax import nnx
  graphdef, state = import_state(cfg, DictSource(sd, 'model state dict'),
                                 DictSource(ae_sd, 'ae state dict') if ae_sd is not None else None, **kw)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------ VAE checkpoints

def vae_model_config(vae_cfg, dtype: str = 'float32', param_dtype: str = 'float32'):
  """The part of a model config an AutoEncoder is built from."""
  from ml_collections import ConfigDict
  return ConfigDict({'vae': dict(vae_cfg), 'dtype': dtype, 'param_dtype': param_dtype})


def abstract_vae(cfg_model):
  from flax import nnx
  from unimedvl_jax.model.vae import AutoEncoder
  return nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg_model, rngs=nnx.Rngs(0))))


def vae_entries(state):
  return km.entries_from_state(state, prefix=('vae',))


def import_vae_state(cfg_model, vae_src: TensorSource, *, report: ImportReport | None = None,
                     allow_nonfinite: bool = False):
  """ae.safetensors tensors -> (graphdef, state) of a lone AutoEncoder(cfg_model), strictly."""
  from flax import nnx
  report = report or ImportReport()
  graphdef, abs_state = abstract_vae(cfg_model)
  entries = vae_entries(abs_state)
  want = km.expected_keys_from_entries(entries, km.VAE_FILE)
  km.check_key_set(vae_src.shapes(), want, vae_src.name)
  report.num_tensors = {'vae': len(want)}
  flat = _stream_into(entries, nnx.to_flat_state(abs_state), lambda e: vae_src,
                      np_dtype(cfg_model.param_dtype), None, report)
  _raise_nonfinite(report, allow_nonfinite)
  return graphdef, nnx.from_flat_state(flat)


def save_vae_checkpoint(out: str, cfg_model, state, report: ImportReport | None = None) -> None:
  """OUT/vae_config.json (the VAE config) + OUT/params (Orbax) [+ OUT/import_report.json]."""
  import orbax.checkpoint as ocp
  from unimedvl_jax.train.checkpoint import to_tree
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  ck = ocp.StandardCheckpointer()
  ck.save(os.path.join(out, 'params'), to_tree(state))
  ck.wait_until_finished()
  ck.close()
  write_file_atomic(os.path.join(out, VAE_CKPT_CONFIG), json.dumps(
      {'format': 'unimedvl_jax.vae_checkpoint', 'model': cfg_model.to_dict()}, indent=1,
      default=list))
  if report is not None:
    write_file_atomic(os.path.join(out, 'import_report.json'),
                      json.dumps(report.to_json(), indent=1, default=str))


def is_vae_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, VAE_CKPT_CONFIG))


def load_vae_checkpoint(path: str):
  """(cfg_model, AutoEncoder) from a VAE checkpoint (`convert import` of a lone ae.safetensors).
  Strict: the stored key set must be the AutoEncoder's (CheckpointError listing the difference)."""
  import orbax.checkpoint as ocp
  from flax import nnx
  from ml_collections import ConfigDict
  from unimedvl_jax.config import ConfigError, model_defaults, validate_model
  from unimedvl_jax.train.checkpoint import (_abstract, _check_keys, _meta_tree, flat_keys,
                                             from_tree, to_tree)
  where = os.path.join(path, VAE_CKPT_CONFIG)
  d = read_json(where)
  m = d.get('model') if d.get('format') == 'unimedvl_jax.vae_checkpoint' else None
  if not isinstance(m, dict) or not isinstance(m.get('vae'), dict):
    raise TorchImportError(f'{where}: not a VAE checkpoint config')
  full = model_defaults()
  try:
    full.vae.update({k: tuple(v) if isinstance(v, list) else v for k, v in m['vae'].items()})
    full.dtype, full.param_dtype = m['dtype'], m['param_dtype']
    validate_model(full)
  except (ConfigError, KeyError, TypeError, AttributeError) as e:
    raise TorchImportError(f'{where}: {e}') from None
  cfg_model = vae_model_config(full.vae, full.dtype, full.param_dtype)
  graphdef, abs_state = abstract_vae(cfg_model)
  params = os.path.join(os.path.abspath(path), 'params')
  ck = ocp.StandardCheckpointer()
  try:
    meta = ck.metadata(params)
    _check_keys(set(flat_keys(_meta_tree(getattr(meta, 'item_metadata', meta)))),
                set(flat_keys(to_tree(abs_state))), f'VAE checkpoint {path}')
    tree = ck.restore(params, _abstract(abs_state))
  finally:
    ck.close()
  return cfg_model, nnx.merge(graphdef, from_tree(tree, abs_state))


def vae_checkpoint_source(path: str) -> TensorSource:
  """A VAE checkpoint as a torch-layout tensor source (ae.safetensors keys), its settings as
  `unimedvl.vae.*` metadata (so `--vae` accepts it like an ae.safetensors)."""
  from flax import nnx
  cfg_model, ae = load_vae_checkpoint(path)
  state = nnx.state(ae)
  values = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
  sd = {}
  for e in vae_entries(state):
    sd[e.keys[0]] = np.ascontiguousarray(km.to_torch_layout(values[e.path], e.transform))
  meta = {VAE_META_PREFIX + k: repr(cfg_model.vae[k]) for k in VAE_SETTINGS}
  return DictSource(sd, f'VAE checkpoint {path}', metadata=meta)


def import_vae_checkpoint(vae_src: TensorSource, out: str | None, *, dtype: str | None = None,
                          vae_flags: Mapping | None = None, set_values: Mapping | None = None,
                          allow_cast: bool = False, allow_nonfinite: bool = False,
                          report: ImportReport | None = None, save: bool = True):
  """A lone ae.safetensors -> a VAE checkpoint (`load_vae_checkpoint`). Returns (cfg_model,
  report, AutoEncoder)."""
  from flax import nnx
  report = report or ImportReport()
  report.kind = 'vae'
  settings = resolve_vae_settings(vae_src, report, vae_flags, set_values)
  vae = derive_vae(vae_src, None, report, settings)
  file_dt = check_file_dtypes(vae_src, allow_cast, report)
  pdt = dtype_name(dtype) or file_dt
  if pdt not in ('float32', 'bfloat16', 'float16'):
    raise TorchImportError(f'{vae_src.name} holds {pdt} tensors; pass --dtype')
  report.param_dtype = pdt
  from unimedvl_jax.config import model_defaults
  compute = str((set_values or {}).get('model.dtype', model_defaults().dtype))
  cfg_model = vae_model_config(vae, compute, pdt)
  graphdef, state = import_vae_state(cfg_model, vae_src, report=report,
                                     allow_nonfinite=allow_nonfinite)
  if save and out is not None:
    save_vae_checkpoint(out, cfg_model, state, report)
  return cfg_model, report, nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------- the folder

def find_model_file(torch_dir: str, required: bool = True) -> str | None:
  found = [f for f in MODEL_FILES if os.path.exists(os.path.join(torch_dir, f))]
  if len(found) > 1:
    raise TorchImportError(f'{torch_dir}: holds {" and ".join(found)}; pass --weights to choose one')
  if found:
    return os.path.join(torch_dir, found[0])
  if required:
    raise TorchImportError(f'{torch_dir}: none of {", ".join(MODEL_FILES)} found')
  return None


def open_model_source(path: str) -> SafetensorsSource:
  if path.endswith('.index.json'):
    return SafetensorsSource.from_index(path)
  return SafetensorsSource(path)


def open_vae_source(path: str) -> TensorSource:
  """--vae: an ae.safetensors file, a folder holding one, or a VAE checkpoint of ours."""
  if os.path.isdir(path):
    if is_vae_checkpoint(path):
      return vae_checkpoint_source(path)
    f = os.path.join(path, VAE_FILE_NAME)
    if not os.path.exists(f):
      raise TorchImportError(f'--vae {path}: neither {VAE_FILE_NAME} nor {VAE_CKPT_CONFIG} in it')
    return SafetensorsSource(f)
  if not os.path.exists(path):
    raise TorchImportError(f'--vae {path} does not exist')
  return SafetensorsSource(path)


def _looks_like_vae(src: TensorSource) -> bool:
  ks = src.keys()
  return bool(ks) and all(k.startswith(('encoder.', 'decoder.')) for k in ks)


def _base_config(config_path, sidecar, report, torch_dir):
  """(base config, explicit fields {dotted: where})."""
  from unimedvl_jax.config import ConfigError, default_config, load_config_file
  from unimedvl_jax.train.checkpoint import config_from_json
  explicit = {}
  if config_path:
    try:
      base = load_config_file(config_path)
    except (ConfigError, FileNotFoundError) as e:
      raise TorchImportError(f'--config {config_path}: {e}') from None
    defaults = _flat(default_config().to_dict())
    for k, v in _flat(base.to_dict()).items():
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


@dataclasses.dataclass
class Imported:
  """What `import_folder` read: the config, the report and the model, in memory."""
  cfg: object                 # the full config (for kind 'vae': the VAE's model config)
  report: ImportReport
  model: object               # UniMedVL (kind 'model') or AutoEncoder (kind 'vae')
  adapters: dict              # generation adapters kept beside a VAE-less model (torch layout)
  tokenizer_files: list
  torch_dir: str


def import_folder(torch_dir: str, *, config_path: str | None = None,
                  overrides: Sequence[str] = (), dtype: str | None = None,
                  vit_layers: int | None = None, shard: bool = False, vae: str | None = None,
                  weights: str | None = None, vae_flags: Mapping | None = None,
                  allow_cast: bool = False, allow_nonfinite: bool = False,
                  out: str | None = None) -> Imported:
  """Reads a torch checkpoint folder into memory (see `import_checkpoint`; nothing is written).

  vae: an ae.safetensors (file, folder, or our VAE checkpoint) to use instead of
  torch_dir/ae.safetensors; weights: the model file (or index) to read when the folder holds
  several; vae_flags: {norm_groups, norm_eps, scale_factor, shift_factor} given explicitly;
  out: where the checkpoint will go (for the tokenizer path recorded in the config)."""
  from flax import nnx
  report = ImportReport()
  set_values = parse_overrides(overrides)
  if os.path.isfile(torch_dir):
    weights, torch_dir = torch_dir, os.path.dirname(os.path.abspath(torch_dir))
  if not os.path.isdir(torch_dir):
    raise TorchImportError(f'--torch-dir {torch_dir} does not exist')
  model_path = weights or find_model_file(torch_dir, required=False)
  opened = []
  try:
    model_src = vae_src = None
    if model_path is not None:
      raw = open_model_source(model_path)
      opened.append(raw)
      report.files.append(model_path)
      report.note(f'weights: {model_path}')
      model_src = strip_module_prefix(raw, report)
      if _looks_like_vae(model_src):           # --torch-dir .../ae.safetensors
        if vae is not None:
          raise TorchImportError(f'{model_path} is an autoencoder (encoder.* / decoder.* keys '
                                 f'only) and --vae {vae} is another one')
        vae_src, model_src = model_src, None
    if vae_src is None:
      raw = None
      if vae is not None:
        raw = open_vae_source(vae)
      elif os.path.exists(os.path.join(torch_dir, VAE_FILE_NAME)):
        raw = SafetensorsSource(os.path.join(torch_dir, VAE_FILE_NAME))
      if raw is not None:
        opened.append(raw)
        report.files.append(raw.name)
        vae_src = strip_module_prefix(raw, report)
    if model_src is None:
      if vae_src is None:
        raise TorchImportError(f'{torch_dir}: none of {", ".join(MODEL_FILES + (VAE_FILE_NAME,))} found')
      report.note(f'{vae_src.name} alone: imported as a VAE checkpoint (load_vae_checkpoint)')
      cfg_model, report, ae = import_vae_checkpoint(
          vae_src, None, dtype=dtype, vae_flags=vae_flags, set_values=set_values,
          allow_cast=allow_cast, allow_nonfinite=allow_nonfinite, report=report, save=False)
      return Imported(cfg_model, report, ae, {}, [], torch_dir)
    sidecar = read_json(os.path.join(torch_dir, SIDECAR_CONFIG), required=False)
    base, explicit = _base_config(config_path, sidecar, report, torch_dir)
    apply_overrides(base, set_values)
    explicit.update({k: f'--set {k}' for k in set_values})
    llm_json = read_json(os.path.join(torch_dir, 'llm_config.json'), required=True)
    vit_json = read_json(os.path.join(torch_dir, 'vit_config.json'), required=False)
    settings = (resolve_vae_settings(vae_src, report, vae_flags, set_values)
                if vae_src is not None else None)
    cfg, report, ignored = derive_config(base, llm_json, vit_json, model_src, vae_src,
                                         vit_layers=vit_layers, dtype=dtype, report=report,
                                         vae_settings=settings, explicit=explicit,
                                         set_values=set_values, allow_cast=allow_cast)
    tok = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(torch_dir, f))]
    if 'tokenizer.json' in tok:
      cfg.data.tokenizer_kind = 'hf'
      where = os.path.abspath(out) if out else torch_dir
      cfg.data.tokenizer_path = os.path.join(where, 'tokenizer', 'tokenizer.json')
      report.note(f'tokenizer: {tok} go to {where}/tokenizer; data.tokenizer_kind=hf')
    mesh = None
    if shard:
      from unimedvl_jax import sharding as sh
      mesh = sh.make_mesh(cfg.mesh)
      report.note(f'placed on mesh {dict(mesh.shape)}')
    target = np_dtype(cfg.model.param_dtype)
    adapters = {}
    for k in report.generation_adapters:      # small tensors (30 M values for the 7B model)
      a = model_src.get(k)
      bad = count_nonfinite(a)
      if bad:
        report.nonfinite[k] = bad
      adapters[k] = np.array(a, dtype=target)
    graphdef, state = import_state(cfg, model_src, vae_src, ignore=ignored, mesh=mesh,
                                   report=report, allow_nonfinite=allow_nonfinite)
    if adapters:
      report.num_tensors['generation_adapters'] = len(adapters)
    return Imported(cfg, report, nnx.merge(graphdef, state), adapters, tok, torch_dir)
  finally:
    for s in opened:
      s.close()


def import_checkpoint(torch_dir: str, out: str, *, step: int = 0, save: bool = True, **kw):
  """The CLI's `import`: torch dir -> Orbax checkpoint under `out` (+ tokenizer files in
  `out/tokenizer/`, `out/import_report.json`, and `out/generation_adapters.safetensors` for a
  model without a VAE). A lone ae.safetensors gives a VAE checkpoint instead. Returns (cfg,
  report); for a VAE checkpoint cfg is the VAE's model config. Keywords: `import_folder`'s."""
  r = import_folder(torch_dir, out=out, **kw)
  if not save:
    return r.cfg, r.report
  from flax import nnx
  if r.report.kind == 'vae':
    save_vae_checkpoint(out, r.cfg, nnx.state(r.model), r.report)
    return r.cfg, r.report
  from unimedvl_jax.train.checkpoint import save_model_checkpoint
  save_model_checkpoint(out, r.cfg, r.model, step=step)
  if r.adapters:
    from unimedvl_jax.interop.st_io import StreamingWriter
    specs = {k: (a.shape, a.dtype) for k, a in r.adapters.items()}
    with StreamingWriter(os.path.join(out, ADAPTERS_FILE), specs, metadata={'format': 'pt'}) as w:
      for k, a in r.adapters.items():
        w.write(k, a)
  if r.tokenizer_files:
    os.makedirs(os.path.join(out, 'tokenizer'), exist_ok=True)
    for f in r.tokenizer_files:
      shutil.copy2(os.path.join(r.torch_dir, f), os.path.join(out, 'tokenizer', f))
  write_file_atomic(os.path.join(out, 'import_report.json'),
                    json.dumps(r.report.to_json(), indent=1, default=str))
  return r.cfg, r.report
