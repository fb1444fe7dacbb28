"""Loading a checkpoint + tokenizer for inference and evaluation (used by the CLIs).

Errors are `LoadError` with a message naming the offending path or field: a missing checkpoint,
a checkpoint whose config does not match the one given (`CheckpointError` from
train/model_checkpoint.py), a tokenizer that is missing or does not fit the model's vocabulary.
"""

from __future__ import annotations

import os


class LoadError(RuntimeError):
  """A checkpoint / config / tokenizer that cannot be used."""


def load_config(path: str | None, overrides=()):
  if not path:
    return None
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.config_load import load_config_file
  try:
    return load_config_file(path, overrides)
  except (ConfigError, FileNotFoundError) as e:
    raise LoadError(f'--config {path}: {e}') from None


def load_checkpoint(directory: str, *, config_path: str | None = None, use_ema: bool = True,
                    int8: bool = False):
  """(cfg, model) from a training workdir or its checkpoints/ folder. With `config_path`, the
  checkpoint must have been written for the same model config. LoRA adapters (model.lora) are
  merged into the base weights (model/lora.py); int8: the decoder's projections and MLPs as
  int8 weights with per-channel scales (model/quant.py)."""
  from unimedvl_jax.model import lora, quant
  from unimedvl_jax.train.checkpoint_format import CheckpointError
  from unimedvl_jax.train.model_checkpoint import load_model
  if not directory or not os.path.exists(directory):
    raise LoadError(f'--checkpoint {directory!r} does not exist')
  want = load_config(config_path)
  try:
    cfg, model = load_model(directory, use_ema=use_ema, cfg=want)
    if lora.lora_modules(model):      # serve the merged weights (the config says so)
      lora.merge(model)
      cfg = lora.merged_config(cfg)
    if int8:
      quant.quantize(model)
    return cfg, model
  except CheckpointError as e:
    msg = str(e)
    raise LoadError(msg if directory in msg else f'checkpoint {directory}: {msg}') from None
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise LoadError(f'checkpoint {directory} cannot be read: {type(e).__name__}: {e}') from None


def load_tokenizer(cfg, path: str | None = None, data_root: str | None = None):
  """The tokenizer by data/locate.py's rule: `path` (--tokenizer), else
  config.data.tokenizer_path, else tokenizer.model under `data_root` when it holds one, else
  under the configured data root. Checks it fits the model."""
  from unimedvl_jax.data import locate
  from unimedvl_jax.data import tokenizer as toklib
  from unimedvl_jax.data.jsonl import DataError
  if data_root and not os.path.isfile(os.path.join(os.path.expanduser(data_root),
                                                   locate.TOKENIZER_FILE)):
    data_root = None
  try:
    return locate.load_tokenizer(cfg, data_root, path)
  except (toklib.TokenizerError, DataError, OSError) as e:
    raise LoadError(f'tokenizer: {e}') from None
