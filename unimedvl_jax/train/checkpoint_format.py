"""What a checkpoint stores, in the form it is stored: string-key trees and the config as JSON.

Orbax saves nested dicts with string keys; `to_tree` turns any pytree (nnx.State, optax states,
dicts) into one and `from_tree` fills a template's structure back from it, after a strict key
check (`check_keys`: a mismatch lists the missing and unexpected keys). `abstract_tree` gives
the ShapeDtypeStruct tree a restore reads onto, `meta_tree` the key structure of Orbax item
metadata. A checkpoint's config is stored as JSON (`config_to_json`) and read back onto the
current schema (`config_from_json`).

Also the errors of every checkpoint module (train/checkpoint.py, checkpoint_integrity.py,
model_checkpoint.py): CheckpointError and its kinds.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model/config."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's arrays do not match the model/config (no fallback: every step would)."""


class CheckpointCorruptError(CheckpointError):
  """One step is unusable (item missing, checksum mismatch, non-finite); restore falls back."""


class CheckpointSaveError(CheckpointError):
  """A save failed (e.g. the disk is full); the run must stop."""


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
  check_keys(set(flat), {k for k, _ in tmpl}, 'restored tree')
  treedef = jax.tree_util.tree_structure(template, is_leaf=lambda v: v is None)
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k, _ in tmpl])


def check_keys(got: set, want: set, what: str):
  missing = sorted('/'.join(k) for k in want - got)
  extra = sorted('/'.join(k) for k in got - want)
  if missing or extra:
    raise CheckpointMismatchError(
        f'{what}: key mismatch ({len(missing)} missing, {len(extra)} unexpected). '
        f'missing: {missing[:20]}{" ..." if len(missing) > 20 else ""}; '
        f'unexpected: {extra[:20]}{" ..." if len(extra) > 20 else ""}')


def abstract_tree(template, shardings=None):
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


def meta_tree(meta):
  """Orbax item metadata -> nested dicts (keys only matter)."""
  if hasattr(meta, 'tree'):
    meta = meta.tree
  if isinstance(meta, dict):
    return {str(k): meta_tree(v) for k, v in meta.items()}
  if isinstance(meta, (list, tuple)):
    return {str(i): meta_tree(v) for i, v in enumerate(meta)}
  return 0


# ------------------------------------------------------------------------------ config JSON

def config_to_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_from_json(d: dict):
  """A checkpoint's config. Only the model and data sections are validated: a checkpoint stays
  loadable (inference, export) even if its training fields predate the current validation."""
  from unimedvl_jax.config import default_config
  from unimedvl_jax.config_validate import validate_data, validate_model
  cfg = default_config()
  _merge(cfg, d, '')
  validate_model(cfg.model)
  validate_data(cfg.data, cfg.model)
  return cfg


def _merge(node, d, where):
  """The JSON `d` into the ConfigDict `node`: fields unknown to the schema are added, known ones
  set as config.assign sets them (JSON lists become tuples)."""
  from unimedvl_jax.config import assign
  for k, v in d.items():
    field = f'{where}.{k}' if where else k
    if k not in node:
      node[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
      continue
    if isinstance(node[k], ml_collections.ConfigDict):
      _merge(node[k], v, field)
    else:
      assign(node, k, v, field)
