"""VAE checkpoints: a lone ae.safetensors imported as our Orbax checkpoint of an AutoEncoder.

`import_vae_checkpoint` derives the VAE config (import_config.py) and streams the tensors;
`save_vae_checkpoint` writes OUT/vae_config.json + OUT/params; `load_vae_checkpoint` reads it
back strictly; `vae_checkpoint_source` offers it as an ae.safetensors-like tensor source (so
`convert import --vae` accepts it).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.import_common import (VAE_CKPT_CONFIG, VAE_META_PREFIX, VAE_SETTINGS,
                                                ImportReport, TorchImportError, dtype_name,
                                                read_json)
from unimedvl_jax.interop.import_config import (check_file_dtypes, derive_vae,
                                                resolve_vae_settings)
from unimedvl_jax.interop.import_stream import raise_nonfinite, stream_into
from unimedvl_jax.interop.st_io import DictSource, TensorSource, np_dtype, write_file_atomic


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
  flat = stream_into(entries, nnx.to_flat_state(abs_state), lambda e: vae_src,
                      np_dtype(cfg_model.param_dtype), None, report)
  raise_nonfinite(report, allow_nonfinite)
  return graphdef, nnx.from_flat_state(flat)


def save_vae_checkpoint(out: str, cfg_model, state, report: ImportReport | None = None) -> None:
  """OUT/vae_config.json (the VAE config) + OUT/params (Orbax) [+ OUT/import_report.json]."""
  import orbax.checkpoint as ocp
  from unimedvl_jax.train.checkpoint_format import to_tree
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
  from unimedvl_jax.config import ConfigError, model_defaults
  from unimedvl_jax.config_validate import validate_model
  from unimedvl_jax.train.checkpoint_format import (abstract_tree, check_keys, flat_keys,
                                                    from_tree, meta_tree, to_tree)
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
    check_keys(set(flat_keys(meta_tree(getattr(meta, 'item_metadata', meta)))),
                set(flat_keys(to_tree(abs_state))), f'VAE checkpoint {path}')
    tree = ck.restore(params, abstract_tree(abs_state))
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
