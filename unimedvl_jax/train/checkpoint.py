"""Orbax checkpoints: the training state, the data iterator state and the config, per step.

Layout: `WORKDIR/checkpoints/<step>/` with items
  params     model parameters (fp32 masters)        ema        EMA of the parameters
  buffers    frozen tables (sin-cos)                 opt_state  optimizer state
  meta       step, rng, non-finite counter           data       data iterator state (JSON)
  config     the full config (JSON)
With several processes every host has its own data iterator state; each writes it to
`WORKDIR/data_state/<step>/process_<i>.json` before the step's save starts (the Orbax `data` item
holds process 0's), and each restores its own.
Items are separate so that inference restores only `ema` (or `params`) + `buffers`.

Restores are strict: the checkpoint's key set must equal the target's (a partial restore is an
error listing the missing and unexpected keys). A latest checkpoint that fails to restore
(truncated or corrupt files) is reported and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)

ARRAY_ITEMS = ('params', 'ema', 'buffers', 'opt_state', 'meta')


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model/config."""


# ------------------------------------------------------------------ nnx state <-> string-key trees

def _key_str(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _paths(x):
  """[(tuple of string keys, leaf)] in jax's flatten order (nnx.State, namedtuples included);
  an nnx Variable is one leaf named by its path (no trailing 'value')."""
  is_var = lambda v: isinstance(v, nnx.Variable)
  x = jax.tree.map(lambda v: v.get_value() if is_var(v) else v, x,
                   is_leaf=lambda v: v is None or is_var(v))
  flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda v: v is None)
  return [(tuple(_key_str(k) for k in path), leaf) for path, leaf in flat if leaf is not None]


def to_tree(x) -> Any:
  """Any pytree (nnx.State, optax states, dicts) -> nested dicts with string keys and array
  leaves (Orbax-friendly; empty containers vanish)."""
  out: dict = {}
  for keys, leaf in _paths(x):
    if not keys:
      return leaf
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def flat_keys(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flat_keys(v, prefix + (str(k),)))
  else:
    out[prefix] = tree
  return out


def from_tree(tree, template):
  """Fills `template`'s structure with the leaves of a string-key tree (strict key check)."""
  flat = flat_keys(tree)
  tmpl = _paths(template)
  _check_keys(set(flat), {k for k, _ in tmpl}, 'restored tree')
  treedef = jax.tree_util.tree_structure(template, is_leaf=lambda v: v is None)
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k, _ in tmpl])


def _check_keys(got: set, want: set, what: str):
  missing = sorted('/'.join(k) for k in want - got)
  extra = sorted('/'.join(k) for k in got - want)
  if missing or extra:
    raise CheckpointError(
        f'{what}: key mismatch ({len(missing)} missing, {len(extra)} unexpected). '
        f'missing: {missing[:20]}{" ..." if len(missing) > 20 else ""}; '
        f'unexpected: {extra[:20]}{" ..." if len(extra) > 20 else ""}')


def _abstract(template, shardings=None):
  """String-key tree of ShapeDtypeStructs for `template`; `shardings` may be a prefix tree
  (e.g. one NamedSharding per nnx Variable)."""
  def one(x, s=None):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
  if shardings is None:
    return to_tree(jax.tree.map(one, template))
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)
  full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, template,
                      is_leaf=is_sh)
  return to_tree(jax.tree.map(one, template, full))


# ------------------------------------------------------------------------------ the manager

def checkpoint_dir(path: str) -> str:
  """Accepts a workdir (-> workdir/checkpoints) or the checkpoints folder itself."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints')
  if os.path.basename(path) == 'checkpoints' or _has_steps(path):
    return path
  return os.path.join(path, 'checkpoints')


def _has_steps(path):
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


class Checkpointer:
  """Async Orbax CheckpointManager for the training state + data state + config."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    os.makedirs(self.directory, exist_ok=True)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                        save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=async_save,
                                        create=True)
    handlers = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
    handlers.update(data=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: dict, *, data_state: dict | None, cfg, force: bool = False) -> bool:
    """state: dict with the ARRAY_ITEMS (pytrees); data_state: this process's iterator state.
    Returns True if a save was started."""
    multi = jax.process_count() > 1
    if multi and (force or self.manager.should_save(step)):
      self._write_process_data(step, data_state or {})
    args = {k: ocp.args.StandardSave(to_tree(state[k])) for k in ARRAY_ITEMS if k in state}
    args['data'] = ocp.args.JsonSave(data_state or {})
    args['config'] = ocp.args.JsonSave(config_to_json(cfg))
    started = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if multi:
      self._prune_process_data()
    return started

  # per-process data iterator states (multi-process runs)
  @property
  def data_state_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'data_state')

  def _process_data_path(self, step: int) -> str:
    return os.path.join(self.data_state_dir, str(step), f'process_{jax.process_index()}.json')

  def _write_process_data(self, step: int, data_state: dict):
    path = self._process_data_path(step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(data_state, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def _prune_process_data(self):
    """Drops this process's states for steps older than the oldest kept checkpoint."""
    steps = self.all_steps()
    if not steps or not os.path.isdir(self.data_state_dir):
      return
    for d in os.listdir(self.data_state_dir):
      if d.isdigit() and int(d) < steps[0]:
        try:
          os.remove(os.path.join(self.data_state_dir, d, f'process_{jax.process_index()}.json'))
        except FileNotFoundError:
          pass
        try:
          os.rmdir(os.path.join(self.data_state_dir, d))
        except OSError:
          pass

  def _read_process_data(self, step: int, fallback: dict) -> dict:
    if jax.process_count() == 1:
      return fallback
    path = self._process_data_path(step)
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      raise CheckpointError(f'checkpoint step {step}: this process\'s data iterator state {path} '
                            'is missing (was the run saved with a different process count?)')
    except json.JSONDecodeError as e:
      raise CheckpointError(f'checkpoint step {step}: {path} is not valid JSON ({e})')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def restore(self, template_state: dict, *, shardings: dict | None = None, step: int | None = None,
              items=ARRAY_ITEMS):
    """Restores onto the structure (and shardings) of `template_state`; tries older steps if the
    requested/latest one is unreadable. Returns (step, state, data_state, config_json)."""
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    errors = []
    for s in steps:
      try:
        return (s,) + self._restore_step(s, template_state, shardings, items)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on corrupt files
        msg = f'checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: {e})'
        log.warning(msg + '; trying the previous one')
        print(f'WARNING: {msg}; trying the previous one', flush=True)
        errors.append(msg)
    raise CheckpointError('no readable checkpoint: ' + ' | '.join(errors))

  def _restore_step(self, step, template_state, shardings, items):
    for k in items:
      meta = self.manager.item_metadata(step)
      item_meta = meta[k] if meta is not None and k in meta else None
      if item_meta is None:
        raise CheckpointError(f'checkpoint step {step}: item {k!r} is missing')
      want = set(flat_keys(to_tree(template_state[k])))
      got = set(flat_keys(_meta_tree(item_meta)))
      _check_keys(got, want, f'checkpoint {self.directory}/{step} item {k!r}')
    args = {}
    for k in items:
      sh = shardings[k] if shardings is not None and k in shardings else None
      args[k] = ocp.args.StandardRestore(_abstract(template_state[k], sh))
    args['data'] = ocp.args.JsonRestore()
    args['config'] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    state = {k: from_tree(out[k], template_state[k]) for k in items}
    return state, self._read_process_data(step, out['data']), out['config']


def _meta_tree(meta):
  """Orbax item metadata -> nested dicts (keys only matter)."""
  if hasattr(meta, 'tree'):
    meta = meta.tree
  if isinstance(meta, dict):
    return {str(k): _meta_tree(v) for k, v in meta.items()}
  if isinstance(meta, (list, tuple)):
    return {str(i): _meta_tree(v) for i, v in enumerate(meta)}
  return 0


# ------------------------------------------------------------------------------ config JSON

def config_to_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_from_json(d: dict):
  from unimedvl_jax.config import default_config, validate
  cfg = default_config()
  _merge(cfg, d, 'config')
  return validate(cfg)


def _merge(node, d, where):
  for k, v in d.items():
    if k not in node:
      node[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
      continue
    if isinstance(node[k], ml_collections.ConfigDict):
      _merge(node[k], v, f'{where}.{k}')
    else:
      old = node[k]
      if isinstance(old, tuple) and isinstance(v, list):
        v = tuple(v)
      if isinstance(old, float) and isinstance(v, int):
        v = float(v)
      node[k] = v


# ------------------------------------------------------------------ model-only save / load

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
  from unimedvl_jax.model.unimedvl import UniMedVL
  abstract = nnx.eval_shape(lambda: UniMedVL(cfg.model, rngs=nnx.Rngs(0)))
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
  from unimedvl_jax.model.unimedvl import UniMedVL
  ck = Checkpointer(directory, async_save=False)
  s = step if step is not None else ck.latest_step()
  if s is None:
    raise CheckpointError(f'no checkpoint found under {directory}')
  cfg_json = ck.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  ck_cfg = config_from_json(cfg_json)
  if cfg is not None:
    a, b = config_to_json(cfg)['model'], config_to_json(ck_cfg)['model']
    if a != b:
      diff = sorted(k for k in set(_flatcfg(a)) | set(_flatcfg(b))
                    if _flatcfg(a).get(k) != _flatcfg(b).get(k))
      raise CheckpointError(f'checkpoint {directory} (step {s}) was written for a different model: '
                            f'fields differ: {diff[:20]}')
  abstract = nnx.eval_shape(lambda: UniMedVL(ck_cfg.model, rngs=nnx.Rngs(0)))
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


def _flatcfg(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatcfg(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
