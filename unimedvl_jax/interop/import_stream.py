"""Streaming the tensors of PyTorch sources into a model's concrete nnx.State.

The strict key check against the model (keymap.check_key_set) comes first; then every tensor is
read once, converted to our layout and cast, stacked layers assembled in place, each parameter
placed (optionally on a mesh) before the next is read (import_torch.py, 'Streaming', gives the
memory this keeps to). Tensors holding NaN / inf are an error naming them unless allowed.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.import_common import ImportReport, TorchImportError
from unimedvl_jax.interop.st_io import DictSource, TensorSource, count_nonfinite, np_dtype


def stream_into(entries, abs_flat, src_of, target, shardings, report: ImportReport):
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


def raise_nonfinite(report: ImportReport, allow: bool):
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
  flat = stream_into(entries, nnx.to_flat_state(abs_state),
                      lambda e: model_src if e.file == km.MODEL_FILE else vae_src,
                      np_dtype(cfg.model.param_dtype), shardings, report)
  raise_nonfinite(report, allow_nonfinite)
  return graphdef, nnx.from_flat_state(flat)


def import_state_dict(cfg, sd: Mapping, ae_sd: Mapping | None = None, **kw):
  """In-memory form (tests, notebooks): torch-layout dicts (numpy or torch) -> nnx model."""
  from flax import nnx
  graphdef, state = import_state(cfg, DictSource(sd, 'model state dict'),
                                 DictSource(ae_sd, 'ae state dict') if ae_sd is not None else None, **kw)
  return nnx.merge(graphdef, state)
