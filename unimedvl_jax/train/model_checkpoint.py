"""Model-only checkpoints: a model's parameters written as a checkpoint, and read back.

`save_model_checkpoint` writes a params-only step (no EMA copy, no optimizer state; `convert
import`, tests) with the Checkpointer of train/checkpoint.py; `load_model` gives (cfg, UniMedVL)
from a training workdir or such a checkpoint (EMA weights by default, else `params`), strictly
(a config that describes another model is a CheckpointError naming the fields);
`load_config` reads a step's config without touching an array.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from unimedvl_jax.train.checkpoint import Checkpointer
from unimedvl_jax.train.checkpoint_format import CheckpointError, config_from_json, config_to_json


def model_states(model):
  """model -> (graphdef, params State, buffers State)."""
  from unimedvl_jax.model.embeddings import Buffer
  graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
  return graphdef, params, buffers


def save_model_checkpoint(directory: str, cfg, model_or_params, step: int = 0, *, buffers=None):
  """Writes a params-only checkpoint (params == ema, empty optimizer state) + the config.

  `model_or_params` is a UniMedVL module, or a params nnx.State (then the frozen tables are
  recomputed from the config unless `buffers` is given)."""
  if isinstance(model_or_params, nnx.Module):
    _, params, buffers = model_states(model_or_params)
  else:
    params = model_or_params
    if buffers is None:
      buffers = config_buffers(cfg)
  ck = Checkpointer(directory, max_to_keep=10, async_save=False)
  meta = {'step': np.int32(step), 'rng': np.zeros((2,), np.uint32), 'nonfinite': np.int32(0)}
  # params only (no EMA copy, no optimizer state): load_model falls back to `params`
  state = {'params': params, 'buffers': buffers, 'meta': meta}
  ck.save(step, state, data_state={}, cfg=cfg, force=True)
  ck.close()


def config_buffers(cfg):
  """The frozen sin-cos tables of a config as a buffers nnx.State (no parameter allocated)."""
  from unimedvl_jax.model.embeddings import sincos_2d_table
  from unimedvl_jax.model.layers import to_dtype
  from unimedvl_jax.model.unimedvl import abstract_model
  abstract = abstract_model(cfg.model)
  _, _, b_abs = model_states(abstract)
  grids = {'vit_pos_embed': cfg.model.vit.grid_size, 'latent_pos_embed': cfg.model.max_latent_size}
  for path, var in nnx.to_flat_state(b_abs):
    table = sincos_2d_table(cfg.model.llm.hidden_size, grids[path[0]])
    var.value = jnp.asarray(table, to_dtype(cfg.model.param_dtype))
  return b_abs


def load_model(directory: str, *, use_ema: bool = True, cfg=None, step: int | None = None):
  """(cfg, UniMedVL) from a training workdir / checkpoints folder; EMA weights by default.

  With `cfg` given, the checkpoint's config must describe the same model (else CheckpointError).
  """
  from unimedvl_jax.config_load import flat_fields
  from unimedvl_jax.model.unimedvl import abstract_model
  ck = Checkpointer(directory, async_save=False)
  s, ck_cfg = _read_config(ck, directory, step)
  if cfg is not None:
    a, b = config_to_json(cfg)['model'], config_to_json(ck_cfg)['model']
    if a != b:
      fa, fb = flat_fields(a), flat_fields(b)
      diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
      raise CheckpointError(f'checkpoint {directory} (step {s}) was written for a different model: '
                            f'fields differ: {diff[:20]}')
  abstract = abstract_model(ck_cfg.model)
  graphdef, p_abs, b_abs = model_states(abstract)
  which = 'ema' if use_ema else 'params'
  meta = ck.manager.item_metadata(s)
  if which == 'ema' and (meta is None or 'ema' not in meta or meta['ema'] is None):
    which = 'params'    # a params-only checkpoint (e.g. written by `convert import`)
  template = {which: p_abs, 'buffers': b_abs}
  _, state, _, _ = ck.restore(template, step=s, items=(which, 'buffers'))
  model = nnx.merge(graphdef, state[which], state['buffers'])
  ck.close()
  return ck_cfg, model


def _read_config(ck, directory, step):
  s = step if step is not None else ck.latest_step()
  if s is None:
    raise CheckpointError(f'no checkpoint found under {directory}')
  cfg_json = ck.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  return s, config_from_json(cfg_json)


def load_config(directory: str, step: int | None = None):
  """The config of a checkpoint (of its newest step by default), no array read."""
  ck = Checkpointer(directory, async_save=False)
  try:
    return _read_config(ck, directory, step)[1]
  finally:
    ck.close()
