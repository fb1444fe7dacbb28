"""State-dict loaders of the upstream towers: HF SigLIP vision and FLUX autoencoder (SPEC 8).

The BAGEL / UniMedVL checkpoint (keymap.py, import_torch.py) carries both towers; these load a
tower from its OWN upstream checkpoint layout instead (an HF `SiglipVisionModel` state dict,
FLUX's `ae.safetensors`) into model/vit.py's `SiglipViT` / model/vae.py's `AutoEncoder`:

    from_hf_siglip_state_dict   HF SigLIP vision (or BAGEL `vit_model.`) -> nested numpy dict
    from_flux_state_dict        FLUX autoencoder -> nested numpy dict
    load_pure_dict              a nested dict -> a module's parameters (strict keys and shapes)
    conv_patch_weight_to_linear / linear_to_conv_patch_weight   the ViT patch-embedding layouts
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


# ------------------------------------------------------------------------------ weight helpers

def conv_patch_weight_to_linear(w):
  """HF Conv2d patch weight [out, C, p, p] (OIHW) -> Linear weight [out, p*p*C] (torch layout).

  The Linear's input is the patch flattened in (row, col, channel) order, channel fastest, so the
  weight is permuted to [out, p, p, C] and flattened; this is exactly BAGEL's
  `convert_conv2d_to_linear`. Our kernel is the transpose of the result ([p*p*C, out]).
  Accepts numpy/jax arrays or torch tensors; returns the same kind.
  """
  out = w.shape[0]
  if hasattr(w, 'permute'):   # torch.Tensor
    return w.permute(0, 2, 3, 1).reshape(out, -1)
  return w.transpose(0, 2, 3, 1).reshape(out, -1)


def linear_to_conv_patch_weight(w, patch_size: int, channels: int = 3):
  """Inverse of `conv_patch_weight_to_linear`: [out, p*p*C] -> [out, C, p, p]."""
  out = w.shape[0]
  w = w.reshape(out, patch_size, patch_size, channels)
  if hasattr(w, 'permute'):
    return w.permute(0, 3, 1, 2)
  return w.transpose(0, 3, 1, 2)


# ------------------------------------------------------------------ HF SigLIP state-dict import

_LAYER_LEAVES = {
    # HF suffix (after 'encoder.layers.{j}.') -> (our path inside a layer, is a Linear weight)
    'self_attn.q_proj.weight': (('self_attn', 'q_proj', 'kernel'), True),
    'self_attn.q_proj.bias': (('self_attn', 'q_proj', 'bias'), False),
    'self_attn.k_proj.weight': (('self_attn', 'k_proj', 'kernel'), True),
    'self_attn.k_proj.bias': (('self_attn', 'k_proj', 'bias'), False),
    'self_attn.v_proj.weight': (('self_attn', 'v_proj', 'kernel'), True),
    'self_attn.v_proj.bias': (('self_attn', 'v_proj', 'bias'), False),
    'self_attn.out_proj.weight': (('self_attn', 'out_proj', 'kernel'), True),
    'self_attn.out_proj.bias': (('self_attn', 'out_proj', 'bias'), False),
    'layer_norm1.weight': (('layer_norm1', 'weight'), False),
    'layer_norm1.bias': (('layer_norm1', 'bias'), False),
    'layer_norm2.weight': (('layer_norm2', 'weight'), False),
    'layer_norm2.bias': (('layer_norm2', 'bias'), False),
    'mlp.fc1.weight': (('mlp', 'fc1', 'kernel'), True),
    'mlp.fc1.bias': (('mlp', 'fc1', 'bias'), False),
    'mlp.fc2.weight': (('mlp', 'fc2', 'kernel'), True),
    'mlp.fc2.bias': (('mlp', 'fc2', 'bias'), False),
}


def _set(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def from_hf_siglip_state_dict(sd: Mapping[str, np.ndarray], num_layers: int,
                              prefix: str | None = None) -> dict:
  """HF SigLIP vision (or BAGEL `vit_model.`) state dict -> nested dict of numpy arrays in the
  layout of `nnx.state(SiglipViT)` (apply with `nnx.replace_by_pure_dict` + `nnx.update`).

  sd values: numpy arrays (float). prefix: the key prefix before 'embeddings.'; detected if None
  ('vision_model.', 'vit_model.vision_model.', or ''). The first `num_layers` encoder layers are
  used (BAGEL builds one fewer than SigLIP's 27); extra layers and the pooling head are ignored.
  The patch embedding may be a Conv2d [D, 3, p, p] or a Linear [D, 3*p*p]. The position table is
  copied as is (its row count must equal grid_size**2 of the model it is loaded into).
  Raises KeyError naming the missing key.
  """
  if prefix is None:
    cands = [k[:-len('embeddings.patch_embedding.weight')] for k in sd
             if k.endswith('embeddings.patch_embedding.weight')]
    if len(cands) != 1:
      raise KeyError(f'expected exactly one "*embeddings.patch_embedding.weight" key, found {cands}')
    prefix = cands[0]

  def get(name):
    key = prefix + name
    if key not in sd:
      raise KeyError(f'SigLIP state dict has no key {key!r}')
    return np.asarray(sd[key])

  out: dict = {}
  w = get('embeddings.patch_embedding.weight')
  if w.ndim == 4:
    w = conv_patch_weight_to_linear(w)
  _set(out, ('embeddings', 'patch_embedding', 'kernel'), w.T)
  _set(out, ('embeddings', 'patch_embedding', 'bias'), get('embeddings.patch_embedding.bias'))
  _set(out, ('embeddings', 'position_embedding'), get('embeddings.position_embedding.weight'))
  for suffix, (path, is_linear) in _LAYER_LEAVES.items():
    per_layer = [get(f'encoder.layers.{j}.{suffix}') for j in range(num_layers)]
    if is_linear:
      per_layer = [a.T for a in per_layer]
    _set(out, ('encoder', 'layers') + path, np.stack(per_layer))
  _set(out, ('post_layernorm', 'weight'), get('post_layernorm.weight'))
  _set(out, ('post_layernorm', 'bias'), get('post_layernorm.bias'))
  return out


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def load_pure_dict(model: nnx.Module, tree: Mapping) -> None:
  """Writes a nested dict of arrays (e.g. from `from_hf_siglip_state_dict` or
  `from_flux_state_dict`) into `model`'s parameters, cast to their dtypes. Strict: every
  parameter must be present with its exact shape and no extra entry may exist; errors name the
  offending paths. (Generic over modules; the VAE uses it too.)"""
  state = nnx.state(model)
  ref = {path: var for path, var in nnx.to_flat_state(state)}
  got = dict(_flatten(tree))
  fmt = lambda paths: ', '.join('/'.join(map(str, p)) for p in sorted(paths, key=str)[:10])
  missing, extra = set(ref) - set(got), set(got) - set(ref)
  if missing or extra:
    raise KeyError(f'load_pure_dict: {len(missing)} missing parameter(s) [{fmt(missing)}], '
                   f'{len(extra)} unexpected entr(y/ies) [{fmt(extra)}]')
  for path, var in ref.items():
    if tuple(np.shape(got[path])) != tuple(var.shape):
      raise ValueError(f'load_pure_dict: parameter {"/".join(map(str, path))} has shape '
                       f'{tuple(np.shape(got[path]))}, the model expects {tuple(var.shape)}')
  for path, var in ref.items():   # set_value: also fills abstract (nnx.eval_shape) models
    var.set_value(jnp.asarray(got[path], dtype=var.dtype))
  nnx.update(model, state)


# ------------------------------------------------------------------ FLUX state-dict import

def from_flux_state_dict(sd: Mapping[str, np.ndarray], prefix: str = '') -> dict:
  """FLUX `ae.safetensors` state dict (numpy values) -> nested dict in the layout of
  `nnx.state(AutoEncoder)` (load with `load_pure_dict`, which checks the
  key set and shapes both ways). Renames: conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O];
  GroupNorm `weight`/`bias` and conv `bias` keep their names; list indices become ints.
  Keys not starting with `prefix` are ignored."""
  out: dict = {}
  for key, val in sd.items():
    if not key.startswith(prefix):
      continue
    parts = [int(s) if s.isdigit() else s for s in key[len(prefix):].split('.')]
    a = np.asarray(val)
    if parts[-1] == 'weight' and a.ndim == 4:
      parts[-1], a = 'kernel', a.transpose(2, 3, 1, 0)
    node = out
    for k in parts[:-1]:
      node = node.setdefault(k, {})
    node[parts[-1]] = a
  return out
