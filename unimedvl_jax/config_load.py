"""Overrides and config files: the dotted-field setter, the `key=value` parser, the nested-dict
flattener, and `load_config_file` (get_config() + overrides, validated).

The value coercion of a field (`assign`) belongs to the schema (unimedvl_jax.config), which
applies it to a curriculum stage's `train` overrides as well.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

from ml_collections import ConfigDict

from unimedvl_jax.config import ConfigError, assign
from unimedvl_jax.config_validate import validate


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
