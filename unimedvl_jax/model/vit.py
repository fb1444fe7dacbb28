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
(`interop.hf_loaders.conv_patch_weight_to_linear`; the HF SigLIP state-dict loader is there too).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.model import attention as attn_lib
from unimedvl_jax.model.layers import GeluMLP, LayerNorm, Linear, make_param, normal_init, to_dtype
from unimedvl_jax.model.scan import scan_layers, stack_layers


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
