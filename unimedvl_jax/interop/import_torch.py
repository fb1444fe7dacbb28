"""Import a PyTorch BAGEL / UniMedVL checkpoint directory into an Orbax checkpoint.

    python -m unimedvl_jax.convert import --torch-dir DIR --out CKPT [--config configs/x.py]

DIR holds `ema.safetensors` (or `model.safetensors`, or a sharded `*.safetensors.index.json`),
`ae.safetensors`, `llm_config.json`, `vit_config.json` and optionally the Qwen2 tokenizer files.

The model config is DERIVED from the JSON files and the tensor shapes (`derive_config`); the
data / train / mesh sections come from `--config` (default: `default_config()`). Loading is
strict: every missing, unexpected or mis-shaped key is listed in one error. Tensors stream one
at a time (`safe_open`); a stacked [L, ...] parameter is assembled into one preallocated array,
layer by layer, then handed to JAX (optionally placed on a mesh) before the next parameter is
read, so peak host memory is the imported model plus about one parameter (measured on
configs/small.py, 233 MiB fp32: anonymous RSS +310 MiB over the start; the memory-mapped file
pages come on top but are page cache, dropped when the file is closed). Dtype is preserved
(bf16 stays bf16) unless `dtype` is given; the config's `model.param_dtype` is set to match.

ViT depth: BAGEL's loaders build `vit_config.json:num_hidden_layers - 1` layers. We build the
number of layers whose weights are in the file; when that differs from the JSON convention (the
UniMedVL release: JSON 26 -> PyTorch builds 25 while the file holds layers 0..25) the report says
so. `vit_layers=N` builds only the first N layers and reports the layers it leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Mapping, Sequence

import numpy as np

from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.st_io import DictSource, SafetensorsSource, TensorSource, np_dtype

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                   'special_tokens_map.json', 'added_tokens.json', 'generation_config.json',
                   'chat_template.jinja')
MODEL_FILES = ('ema.safetensors', 'model.safetensors', 'model.safetensors.index.json')
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


# ------------------------------------------------------------------------- config derivation

def _req(d: Mapping, key: str, where: str):
  if key not in d:
    raise TorchImportError(f'{where}: field {key!r} is missing')
  return d[key]


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
    raise TorchImportError(f'{src.name}: ViT layer indices are not contiguous from 0: {present}')
  json_layers = vit_json.get('num_hidden_layers')
  conv = int(json_layers) - 1 if json_layers is not None else None
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


def derive_vae(vae_src: TensorSource | None, model_src: TensorSource, report: ImportReport) -> dict:
  """FLUX autoencoder shapes -> our `model.vae` section (norm_groups / scale / shift are not in
  the file: they keep the base config's values, FLUX's by default)."""
  has_gen = 'vae2llm.weight' in model_src
  if vae_src is None:
    if has_gen:
      raise TorchImportError(f'{model_src.name} holds the generation adapters (vae2llm, ...) but '
                         'ae.safetensors is missing')
    report.note('no ae.safetensors and no generation adapters: the VAE / generation path is '
                'disabled')
    return dict(enabled=False)
  if not has_gen:
    raise TorchImportError(f'ae.safetensors is present but {model_src.name} has no vae2llm.*; '
                           'a generation-less model cannot carry a VAE')
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
  return dict(enabled=True, in_channels=int(cin), base_channels=int(ch),
              channel_mult=tuple(int(m) for m in mult), num_res_blocks=int(nrb), z_channels=int(zc))


def derive_config(base_cfg, llm_json: Mapping, vit_json: Mapping | None, model_src: TensorSource,
                  vae_src: TensorSource | None, *, vit_layers: int | None = None,
                  dtype: str | None = None, report: ImportReport | None = None):
  """(config, report, ignored keys): `base_cfg` with its model section derived from the files."""
  from unimedvl_jax.config import ConfigError, validate
  report = report or ImportReport()
  cfg = base_cfg.copy_and_resolve_references()
  m = cfg.model
  m.llm.update(derive_llm(llm_json, model_src, report))
  vit, ignored = derive_vit(vit_json, model_src, report, vit_layers)
  m.vit.update(vit)
  vae = derive_vae(vae_src, model_src, report)
  m.vae.update(vae)
  if vae['enabled']:
    lp = 'latent_pos_embed.pos_embed'
    if lp in model_src:
      m.max_latent_size = km.isqrt_exact(model_src.shape(lp)[0], lp)
    in_dim = model_src.shape('vae2llm.weight')[1]
    p2 = in_dim // vae['z_channels']
    p = int(round(p2 ** 0.5))
    if p * p * vae['z_channels'] != in_dim:
      raise TorchImportError(f'vae2llm.weight takes {in_dim} inputs: not p*p*{vae["z_channels"]}')
    m.latent_patch_size = p
    te = 'time_embedder.mlp.0.weight'
    if te in model_src:
      m.timestep_freq_dim = int(model_src.shape(te)[1])
  # dtype: --dtype, else the one dtype of the file (mixed files: the dtype of most elements)
  by_dtype: dict = {}
  for src in (model_src, vae_src):
    if src is None:
      continue
    for k in src.keys():
      dn = np.dtype(src.dtype(k)).name
      by_dtype[dn] = by_dtype.get(dn, 0) + int(np.prod(src.shape(k), dtype=np.int64))
  report.source_dtypes = by_dtype
  if dtype is not None:
    m.param_dtype = dtype_name(dtype)
  else:
    main = max(by_dtype, key=by_dtype.get)
    if main not in ('float32', 'bfloat16', 'float16'):
      raise TorchImportError(f'the checkpoint holds {main} tensors; pass --dtype')
    m.param_dtype = main
    if len(by_dtype) > 1:
      report.note(f'mixed dtypes {by_dtype}: everything is stored as {main} (pass --dtype to choose)')
  report.param_dtype = m.param_dtype
  try:
    validate(cfg)
  except ConfigError as e:
    raise TorchImportError(f'the derived model config does not fit the base config: {e} '
                           '(pass a --config whose data section fits this model)') from None
  return cfg, report, ignored


# ---------------------------------------------------------------------------- the conversion

def import_state(cfg, model_src: TensorSource, vae_src: TensorSource | None = None, *,
                 ignore: Sequence[str] = (), mesh=None, report: ImportReport | None = None):
  """Streams the tensors of the two sources into a concrete nnx.State of UniMedVL(cfg.model).

  Strict key check first (nothing is read before it passes). Every leaf is cast to
  `cfg.model.param_dtype`. With `mesh`, each leaf is placed with its logical sharding
  (`sharding.state_shardings`) right after it is assembled. Returns (graphdef, state).
  """
  import jax
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
    km.check_key_set(vae_src.shapes(), want_vae, vae_src.name)
  report.ignored_keys = sorted(ignore)
  report.num_tensors = {'model': len(want_model), 'vae': len(want_vae)}
  shardings = None
  if mesh is not None:
    from unimedvl_jax import sharding as sh
    shardings = dict(nnx.to_flat_state(sh.state_shardings(abs_state, mesh)))
  target = np_dtype(cfg.model.param_dtype)
  flat = []
  for e, (path, var) in zip(entries, nnx.to_flat_state(abs_state)):
    assert e.path == tuple(path)
    src = model_src if e.file == km.MODEL_FILE else vae_src
    if e.stacked:
      out = np.empty(e.shape, target)
      for i, k in enumerate(e.keys):
        out[i] = km.from_torch_layout(src.get(k), e.transform)   # casts on assignment
    else:
      t = src.get(e.keys[0])
      out = np.ascontiguousarray(km.from_torch_layout(t, e.transform)).astype(target, copy=False)
      del t
    if shardings is not None:
      arr = jax.device_put(out, shardings[tuple(path)])
    else:
      arr = jax.device_put(out)
    del out
    flat.append((tuple(path), var.replace(arr)))
  state = nnx.from_flat_state(flat)
  return graphdef, state


def import_state_dict(cfg, sd: Mapping, ae_sd: Mapping | None = None, **kw):
  """In-memory form (tests, notebooks): torch-layout dicts (numpy or torch) -> nnx model."""
  from flax import nnx
  graphdef, state = import_state(cfg, DictSource(sd, 'model state dict'),
                                 DictSource(ae_sd, 'ae state dict') if ae_sd is not None else None, **kw)
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------- the folder

def find_model_file(torch_dir: str) -> str:
  for f in MODEL_FILES:
    p = os.path.join(torch_dir, f)
    if os.path.exists(p):
      return p
  raise TorchImportError(f'{torch_dir}: none of {", ".join(MODEL_FILES)} found')


def open_model_source(path: str) -> SafetensorsSource:
  if path.endswith('.index.json'):
    return SafetensorsSource.from_index(path)
  return SafetensorsSource(path)


def _read_json(path: str, required: bool):
  if not os.path.exists(path):
    if required:
      raise TorchImportError(f'{path} is missing')
    return None
  with open(path) as fh:
    return json.load(fh)


def import_checkpoint(torch_dir: str, out: str, *, config_path: str | None = None,
                      overrides: Sequence[str] = (), dtype: str | None = None,
                      vit_layers: int | None = None, shard: bool = False, step: int = 0,
                      save: bool = True):
  """The CLI's `import`: torch dir -> Orbax checkpoint under `out` (+ tokenizer files in
  `out/tokenizer/` and `out/import_report.json`). Returns (cfg, report)."""
  from unimedvl_jax.config import default_config, load_config_file
  report = ImportReport()
  if config_path:
    base = load_config_file(config_path, overrides)
  else:
    if overrides:
      raise TorchImportError('--set overrides need --config')
    base = default_config()
  model_path = find_model_file(torch_dir)
  report.note(f'weights: {model_path}')
  model_src = open_model_source(model_path)
  ae_path = os.path.join(torch_dir, 'ae.safetensors')
  vae_src = SafetensorsSource(ae_path) if os.path.exists(ae_path) else None
  try:
    llm_json = _read_json(os.path.join(torch_dir, 'llm_config.json'), required=True)
    vit_json = _read_json(os.path.join(torch_dir, 'vit_config.json'), required=False)
    cfg, report, ignored = derive_config(base, llm_json, vit_json, model_src, vae_src,
                                         vit_layers=vit_layers, dtype=dtype, report=report)
    tok = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(torch_dir, f))]
    if 'tokenizer.json' in tok:
      cfg.data.tokenizer_kind = 'hf'
      cfg.data.tokenizer_path = os.path.join(os.path.abspath(out), 'tokenizer', 'tokenizer.json')
      report.note(f'tokenizer: copied {tok} to {out}/tokenizer; data.tokenizer_kind=hf')
    mesh = None
    if shard:
      from unimedvl_jax import sharding as sh
      mesh = sh.make_mesh(cfg.mesh)
      report.note(f'placed on mesh {dict(mesh.shape)}')
    graphdef, state = import_state(cfg, model_src, vae_src, ignore=ignored, mesh=mesh, report=report)
  finally:
    model_src.close()
    if vae_src is not None:
      vae_src.close()
  if save:
    from flax import nnx
    from unimedvl_jax.train.checkpoint import save_model_checkpoint
    model = nnx.merge(graphdef, state)
    del state
    save_model_checkpoint(out, cfg, model, step=step)
    if tok:
      os.makedirs(os.path.join(out, 'tokenizer'), exist_ok=True)
      for f in tok:
        shutil.copy2(os.path.join(torch_dir, f), os.path.join(out, 'tokenizer', f))
    with open(os.path.join(out, 'import_report.json'), 'w') as fh:
      json.dump(report.to_json(), fh, indent=1)
  return cfg, report
