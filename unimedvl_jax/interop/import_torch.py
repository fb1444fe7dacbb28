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

This module reads the folder (`import_folder`) and writes the checkpoint (`import_checkpoint`).
The parts: import_config.py derives the config from the files, import_stream.py streams the
tensors into the model's state, vae_checkpoint.py handles a lone ae.safetensors, and
import_common.py holds the file names, the error and the report they share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Mapping, Sequence

import numpy as np

from unimedvl_jax.data.locate import CHECKPOINT_TOKENIZER_DIR
from unimedvl_jax.interop.import_common import (ADAPTERS_FILE, MODEL_FILES, SIDECAR_CONFIG,
                                                TOKENIZER_FILES, VAE_CKPT_CONFIG, VAE_FILE_NAME,
                                                ImportReport, TorchImportError, read_json,
                                                strip_module_prefix)
from unimedvl_jax.interop.import_config import (apply_overrides, base_config, derive_config,
                                                parse_overrides, resolve_vae_settings)
from unimedvl_jax.interop.import_stream import import_state
from unimedvl_jax.interop.st_io import (SafetensorsSource, TensorSource, count_nonfinite,
                                        np_dtype, write_file_atomic)
from unimedvl_jax.interop.vae_checkpoint import (import_vae_checkpoint, is_vae_checkpoint,
                                                 save_vae_checkpoint, vae_checkpoint_source)


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
    base, explicit = base_config(config_path, sidecar, report, torch_dir)
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
      cfg.data.tokenizer_path = os.path.join(where, CHECKPOINT_TOKENIZER_DIR, 'tokenizer.json')
      report.note(f'tokenizer: {tok} go to {where}/{CHECKPOINT_TOKENIZER_DIR}; '
                  'data.tokenizer_kind=hf')
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
  from unimedvl_jax.train.model_checkpoint import save_model_checkpoint
  save_model_checkpoint(out, r.cfg, r.model, step=step)
  if r.adapters:
    from unimedvl_jax.interop.st_io import StreamingWriter
    specs = {k: (a.shape, a.dtype) for k, a in r.adapters.items()}
    with StreamingWriter(os.path.join(out, ADAPTERS_FILE), specs, metadata={'format': 'pt'}) as w:
      for k, a in r.adapters.items():
        w.write(k, a)
  if r.tokenizer_files:
    os.makedirs(os.path.join(out, CHECKPOINT_TOKENIZER_DIR), exist_ok=True)
    for f in r.tokenizer_files:
      shutil.copy2(os.path.join(r.torch_dir, f), os.path.join(out, CHECKPOINT_TOKENIZER_DIR, f))
  write_file_atomic(os.path.join(out, 'import_report.json'),
                    json.dumps(r.report.to_json(), indent=1, default=str))
  return r.cfg, r.report
