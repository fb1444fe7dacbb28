"""What every part of a PyTorch checkpoint import shares (see import_torch.py for the import).

The file names of a BAGEL / UniMedVL checkpoint folder and of what we write beside it, the VAE
settings no tensor shape determines (with the released FLUX values), `TorchImportError`, the
`ImportReport` every step writes its notes into, dtype names, and reading the folder's JSON
files and `module.`-prefixed sources.
"""

from __future__ import annotations

import dataclasses
import os

from unimedvl_jax.interop.st_io import PrefixStrippedSource, TensorSource, read_json_file

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


# ------------------------------------------------------------------------------- reading

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
