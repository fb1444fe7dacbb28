"""SigLIP NaViT vision encoder as used by BAGEL / UniMedVL (SPEC sections 2 and 8).

Packed input: every image of a pack is cut into p x p patches, each flattened in
(row, col, channel) order (channel fastest), pixels in [-1, 1]; all patches of all images are
concatenated along one axis with a per-patch image index (`segment_ids`, 0 = padding) and the
patch's position `row * grid_size + col` in the learned position table (top-left sub-grid for
images smaller than the grid, no interpolation). Attention is bidirectional inside one image.

Parameter names mirror HF `SiglipVisionModel.vision_model` (so conversion is renames and
transposes only):

    embeddings.patch_embedding.{kernel [3*p*p, D], bias}    <- ...patch_embedding.{weight, bias}
    embeddings.position_embedding        [G*G, D]           <- ...position_embedding.weight
    encoder.layers.self_attn.{q,k,v,out}_proj.{kernel, bias}     (stacked: leading [L] axis)
    encoder.layers.layer_norm{1,2}.{weight, bias}
    encoder.layers.mlp.fc{1,2}.{kernel, bias}
    post_layernorm.{weight, bias}

Linear kernels are [in, out] (torch weight transposed). HF's patch embedding is a Conv2d
[D, 3, p, p]; BAGEL's checkpoint stores it already as a Linear [D, 3*p*p]
(`conv_patch_weight_to_linear`).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.model import attention as attn_lib
from unimedvl_jax.model.layers import GeluMLP, LayerNorm, Linear, make_param, normal_init, to_dtype
from unimedvl_jax.model.scan import scan_layers, stack_layers


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


def patchify_image(img, patch_size: int):
  """One image [H, W, C] (H, W multiples of p) -> ([h*w, p*p*C] patches, [h*w] position rows
  and cols) in row-major patch order, each patch flattened (row, col, channel), channel fastest.
  numpy in, numpy out (the data pipeline's layout, used by tests)."""
  H, W, C = img.shape
  p = patch_size
  h, w = H // p, W // p
  x = np.asarray(img).reshape(h, p, w, p, C).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * C)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return x, rows.reshape(-1), cols.reshape(-1)


# ------------------------------------------------------------------------------------- modules

class SiglipEmbeddings(nnx.Module):

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    v = cfg_model.vit
    pdt = to_dtype(cfg_model.param_dtype)
    self.patch_embedding = Linear(3 * v.patch_size ** 2, v.hidden_size, rngs=rngs, use_bias=True,
                                  axes=(None, 'vit_embed'), dtype=cfg_model.dtype,
                                  param_dtype=cfg_model.param_dtype, init_std=cfg_model.init_std)
    self.position_embedding = make_param(rngs, normal_init(cfg_model.init_std),
                                         (v.grid_size ** 2, v.hidden_size), ('vit_pos', 'vit_embed'),
                                         pdt)
    self.dtype = to_dtype(cfg_model.dtype)

  def __call__(self, patches, pos_ids):
    x = self.patch_embedding(patches)
    pos = jnp.take(self.position_embedding[...], pos_ids, axis=0, mode='clip')
    return x + pos.astype(self.dtype)


def vit_meta(segment_ids):
  """ViT attention metadata: one split per pack, mode full (bidirectional inside each image =
  segment, nothing across)."""
  return segment_ids, jnp.zeros_like(segment_ids), jnp.full_like(segment_ids, attn_lib.MODE_FULL)


class SiglipAttention(nnx.Module):

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    v = cfg_model.vit
    D = v.hidden_size
    kw = dict(rngs=rngs, use_bias=True, dtype=cfg_model.dtype, param_dtype=cfg_model.param_dtype,
              init_std=cfg_model.init_std)
    hd = D // v.num_heads
    self.q_proj = Linear(D, D, axes=('vit_embed', 'vit_heads'), head_dim=hd, **kw)
    self.k_proj = Linear(D, D, axes=('vit_embed', 'vit_heads'), head_dim=hd, **kw)
    self.v_proj = Linear(D, D, axes=('vit_embed', 'vit_heads'), head_dim=hd, **kw)
    self.out_proj = Linear(D, D, axes=('vit_heads', 'vit_embed'), head_dim=hd, **kw)
    self.num_heads = v.num_heads
    self.head_dim = D // v.num_heads
    self.impl = cfg_model.attention_impl
    self.platform = cfg_model.get('attention_platform', '') or None

  def __call__(self, x, segment_ids, plan=None):
    B, P, _ = x.shape
    shape = (B, P, self.num_heads, self.head_dim)
    q = self.q_proj(x).reshape(shape)
    k = self.k_proj(x).reshape(shape)
    v = self.v_proj(x).reshape(shape)
    o = attn_lib.attention(q, k, v, *vit_meta(segment_ids), impl=self.impl, plan=plan,
                            platform=self.platform)
    return self.out_proj(o.reshape(B, P, self.num_heads * self.head_dim))


class SiglipEncoderLayer(nnx.Module):
  """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)) (tanh-GELU MLP)."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    v = cfg_model.vit
    ln = dict(eps=v.layer_norm_eps, axis_name='norm', param_dtype=cfg_model.param_dtype,
              dtype=cfg_model.dtype)
    self.layer_norm1 = LayerNorm(v.hidden_size, **ln)
    self.self_attn = SiglipAttention(cfg_model, rngs=rngs)
    self.layer_norm2 = LayerNorm(v.hidden_size, **ln)
    self.mlp = GeluMLP(v.hidden_size, v.intermediate_size, v.hidden_size, rngs=rngs,
                       dtype=cfg_model.dtype, param_dtype=cfg_model.param_dtype,
                       init_std=cfg_model.init_std, axes_in=('vit_embed', 'vit_mlp'),
                       axes_out=('vit_mlp', 'vit_embed'))

  def __call__(self, x, segment_ids, plan=None):
    x = x + self.self_attn(self.layer_norm1(x), segment_ids, plan).astype(x.dtype)
    x = x + self.mlp(self.layer_norm2(x)).astype(x.dtype)
    return x


class SiglipEncoder(nnx.Module):
  """`layers`: num_layers SiglipEncoderLayers stacked on a leading 'layers' axis."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    self.layers = stack_layers(lambda r: SiglipEncoderLayer(cfg_model, rngs=r),
                               cfg_model.vit.num_layers, rngs)
    self.remat = cfg_model.remat
    self.scan = bool(cfg_model.scan_layers)
    self.impl = cfg_model.attention_impl
    self.platform = cfg_model.get('attention_platform', '') or None

  def __call__(self, x, segment_ids):
    # the attention's work list once for every layer (outside the scan)
    plan = attn_lib.attention_plan(*vit_meta(segment_ids), impl=self.impl,
                                   platform=self.platform)

    def body(layer, h, _):
      return layer(h, segment_ids, plan), None
    x, _ = scan_layers(self.layers, body, x, remat=self.remat, scan=self.scan)
    return x


class SiglipViT(nnx.Module):
  """SigLIP NaViT encoder: (patches, segment_ids, pos_ids) -> hidden states after post_layernorm.

  patches float [B, P, 3*p*p] (row, col, channel order, pixels in [-1, 1]); segment_ids int32
  [B, P] image index within the row (0 = padding patch); pos_ids int32 [B, P] = row*grid + col.
  Returns [B, P, hidden] in the compute dtype. Padding patches attend to nothing; their outputs
  are finite but meaningless (callers ignore them).
  """

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    v = cfg_model.vit
    if v.hidden_size % v.num_heads:
      raise ValueError(f'model.vit.hidden_size ({v.hidden_size}) must be divisible by '
                       f'model.vit.num_heads ({v.num_heads})')
    self.embeddings = SiglipEmbeddings(cfg_model, rngs=rngs)
    self.encoder = SiglipEncoder(cfg_model, rngs=rngs)
    self.post_layernorm = LayerNorm(v.hidden_size, eps=v.layer_norm_eps, axis_name='norm',
                                    param_dtype=cfg_model.param_dtype, dtype=cfg_model.dtype)

  def __call__(self, patches, segment_ids, pos_ids):
    x = self.embeddings(patches, pos_ids)
    x = self.encoder(x, segment_ids)
    return self.post_layernorm(x)


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
  `vae.from_flux_state_dict`) into `model`'s parameters, cast to their dtypes. Strict: every
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
