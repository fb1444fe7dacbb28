"""The whole UniMedVL model: packed batch -> hidden states -> CE / flow-matching MSE losses.

The packed batch contract is `unimedvl_jax/batch.py`. The model never reads files and never
knows the mesh shape; activations are constrained through `unimedvl_jax.sharding.shard`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unimedvl_jax import sharding
from unimedvl_jax.batch import TOKEN_VIT
from unimedvl_jax.model import attention as attn_lib
from unimedvl_jax.model.decoder import MoTDecoder, Rope
from unimedvl_jax.model.embeddings import Connector, PositionTable, TimestepEmbedder
from unimedvl_jax.model.layers import Linear, dense, make_param, normal_init, rope_cos_sin, to_dtype
from unimedvl_jax.model.layers import inverse_permutation  # noqa: F401 (re-exported)
from unimedvl_jax.model.layers import take_rows as _take_rows


class LossOutput(NamedTuple):
  loss: jax.Array          # ce_weight * ce + mse_weight * mse
  ce: jax.Array            # sum of token CE / ce_denominator
  mse: jax.Array           # sum of per-token MSE (mean over channels) / mse_denominator
  ce_tokens: jax.Array     # number of CE target tokens in this batch
  mse_tokens: jax.Array    # number of noised latent tokens in this batch


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """t <- s*t / (1 + (s-1)*t) (SPEC sections 4 and 7)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def chunked_cross_entropy(h: jax.Array, w: jax.Array, labels: jax.Array, mask: jax.Array,
                          chunk: int, dtype) -> jax.Array:
  """sum(mask * CE(h @ w, labels)) without materialising all logits at once.

  h [B, n, H] (the label rows only), w [H, V], labels/mask [B, n]. Logits are computed per chunk
  of rows with compute-dtype operands and float32 accumulation (`layers.dense`), reduced in
  float32; each chunk is rematerialised in the backward pass.
  """
  Hd = h.shape[-1]
  hf = h.reshape(-1, Hd)
  lf = labels.reshape(-1)
  mf = mask.reshape(-1).astype(jnp.float32)
  n = hf.shape[0]
  chunk = max(1, min(chunk, n))
  pad = (-n) % chunk
  if pad:
    hf = jnp.pad(hf, ((0, pad), (0, 0)))
    lf = jnp.pad(lf, (0, pad))
    mf = jnp.pad(mf, (0, pad))
  hc = hf.reshape(-1, chunk, Hd)
  lc = lf.reshape(-1, chunk)
  mc = mf.reshape(-1, chunk)
  wd = w.astype(dtype)

  @jax.checkpoint
  def one(args):
    hh, ll, mm = args
    logits = dense(hh.astype(dtype), wd)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, ll[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - tgt) * mm)

  if hc.shape[0] == 1:
    return one((hc[0], lc[0], mc[0]))
  return jnp.sum(jax.lax.map(one, (hc, lc, mc)))


def _pixels_to_unit(x: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], exactly data.images.to_unit_range: (x/255 - 0.5)/0.5."""
  return (x.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def _ext(a: jax.Array, fill=0) -> jax.Array:
  """[B, T, ...] -> [B, T + 1, ...] with `fill` at index T (the padding index of position lists)."""
  pad = jnp.full((a.shape[0], 1) + a.shape[2:], fill, a.dtype)
  return jnp.concatenate([a, pad], axis=1)


def vae_bucket_keys(batch) -> list[str]:
  """The pixel-bucket arrays of a batch ('vae_{h}x{w}'), in the order of the latent_src table:
  by (h, w), as batch.Geometry.vae_buckets orders them."""
  sizes = {k: tuple(int(x) for x in m.groups()) for k in batch
           if (m := re.fullmatch(r'vae_(\d+)x(\d+)', k))}
  return sorted(sizes, key=sizes.get)


def packed_attend(perm, inv, meta, U: int, impl: str, block: int = 64,
                  platform: str | None = None):
  """The decoder's attention for a packed sequence whose experts run on permuted streams.

  q/k/v of the two experts are concatenated (expert order: the understanding stream, then the
  generation stream). Backends that take any token order (the blocked and the dense XLA
  attention) run on that order directly, with the permuted metadata and each token's sequence
  index; the others (Pallas) get q/k/v gathered into sequence order and the output gathered back.
  The output is split [:U] / [U:]. platform: the attention's target platform
  (`attn_lib.resolve_platform`; config `model.attention_platform`).
  """
  if attn_lib.resolve_impl(impl, platform) in attn_lib.ANY_ORDER_IMPLS:
    pmeta = tuple(_take_rows(a, perm) for a in meta)
    # one work list for every layer (computed here, outside the decoder's layer scan)
    plan = attn_lib.attention_plan(*pmeta, perm, impl=impl, block=block, platform=platform)

    def attend(qkv_u, qkv_g, extra):
      q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in zip(qkv_u, qkv_g))
      o = attn_lib.attention(q, k, v, *pmeta, perm, impl=impl, block=block, plan=plan,
                             platform=platform)
      return (o[:, :U], o[:, U:]), extra
    return attend

  def attend(qkv_u, qkv_g, extra):
    to_seq = lambda a, b: _take_rows(jnp.concatenate([a, b], axis=1), inv)
    q, k, v = (to_seq(a, b) for a, b in zip(qkv_u, qkv_g))
    o = attn_lib.attention(q, k, v, *meta, impl=impl, platform=platform)
    o = _take_rows(o, perm)
    return (o[:, :U], o[:, U:]), extra
  return attend


class UniMedVL(nnx.Module):

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    llm = cfg_model.llm
    H = llm.hidden_size
    self.dtype = to_dtype(cfg_model.dtype)
    pdt = cfg_model.param_dtype
    kw = dict(rngs=rngs, dtype=cfg_model.dtype, param_dtype=pdt, init_std=cfg_model.init_std)
    self.hidden_size = H
    self.head_dim = llm.head_dim
    self.rope_theta = float(llm.rope_theta)
    self.attention_impl = cfg_model.attention_impl
    self.attention_platform = cfg_model.get('attention_platform', '') or None
    self.attention_block = int(cfg_model.get('attention_block', 64))
    self.ce_chunk = int(cfg_model.get('ce_chunk', 8192))
    self.latent_patch = cfg_model.latent_patch_size
    self.latent_channels = cfg_model.vae.z_channels
    latent_dim = self.latent_patch ** 2 * self.latent_channels
    self.latent_dim = latent_dim

    self.embed_tokens = make_param(rngs, normal_init(cfg_model.init_std), (llm.vocab_size, H),
                                   ('vocab', 'embed'), to_dtype(pdt))
    self.lm_head = Linear(H, llm.vocab_size, use_bias=False, axes=('embed', 'vocab'), **kw)
    self.decoder = MoTDecoder(cfg_model, rngs=rngs)

    self.has_vit = bool(cfg_model.vit.enabled)
    if self.has_vit:
      from unimedvl_jax.model.vit import SiglipViT
      self.vit = SiglipViT(cfg_model, rngs=rngs)
      self.connector = Connector(cfg_model.vit.hidden_size, H, **kw)
      self.vit_pos_embed = PositionTable(H, cfg_model.vit.grid_size, param_dtype=pdt)

    self.has_vae = bool(cfg_model.vae.enabled)
    if self.has_vae:
      from unimedvl_jax.model.vae import AutoEncoder
      self.vae = AutoEncoder(cfg_model, rngs=rngs)
      self.vae2llm = Linear(latent_dim, H, axes=(None, 'embed'), **kw)
      self.llm2vae = Linear(H, latent_dim, axes=('embed', None), zero_init=True, **kw)
      self.time_embedder = TimestepEmbedder(H, cfg_model.timestep_freq_dim, **kw)
      self.latent_pos_embed = PositionTable(H, cfg_model.max_latent_size, param_dtype=pdt)

    from unimedvl_jax.model import lora
    if (lc := lora.lora_config(cfg_model)) is not None:   # last: the base init is unchanged
      lora.add_adapters(self, lc, rngs)

  # ----------------------------------------------------------------------- embeddings / heads

  def embed_text(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)

  def embed_vit(self, patches, segment_ids, pos_ids) -> jax.Array:
    """ViT patches -> LLM-width tokens: ViT, connector, + the 2-D sin-cos table."""
    feats = self.vit(patches, segment_ids, pos_ids)
    return self.connector(feats) + self.vit_pos_embed(pos_ids, self.dtype)

  def embed_latents(self, x_t, t, pos_ids) -> jax.Array:
    """vae2llm(x_t) + timestep_embed(t) + latent_pos(row, col); x_t [..., 64], t [...]."""
    return (self.vae2llm(x_t) + self.time_embedder(t) + self.latent_pos_embed(pos_ids, self.dtype))

  def logits(self, h_u: jax.Array) -> jax.Array:
    return self.lm_head(h_u).astype(jnp.float32)

  def velocity(self, h_g: jax.Array) -> jax.Array:
    return self.llm2vae(h_g).astype(jnp.float32)

  def rope(self, positions: jax.Array) -> Rope:
    return Rope(*rope_cos_sin(positions, self.head_dim, self.rope_theta))

  def bucket_latent_moments(self, batch) -> tuple[jax.Array, jax.Array]:
    """Frozen VAE on the batch's pixel buckets, each image at its own size -> the posterior's
    (mean, logvar) of every latent token, float32 [B, L, D] each (gathered by latent_src)."""
    from unimedvl_jax.model.vae import patchify
    means, logvars = [], []
    for key in vae_bucket_keys(batch):
      px = batch[key]
      B, n, h, w = px.shape[:4]
      mean, logvar = self.vae.encode_moments(_pixels_to_unit(px.reshape(B * n, h, w, 3)))
      tok = lambda z: patchify(z, self.latent_patch).reshape(B, -1, self.latent_dim)
      means.append(tok(mean))
      logvars.append(tok(logvar))
    src = batch['latent_src'][..., None]
    pick = lambda parts: jnp.take_along_axis(jnp.concatenate(parts, axis=1), src, axis=1)
    return jax.lax.stop_gradient(pick(means)), jax.lax.stop_gradient(pick(logvars))

  def clean_latents(self, batch, noise: jax.Array) -> jax.Array:
    """x0 [B, L, D] float32: the latent tokens sampled from the VAE posterior with the given
    standard-normal token noise, from the cached moments or from the pixels."""
    if 'latent_mean' in batch:
      mean, logvar = batch['latent_mean'], batch['latent_logvar']
    else:
      mean, logvar = self.bucket_latent_moments(batch)
    return jax.lax.stop_gradient(self.vae.sample_tokens(mean, logvar, noise))

  # ---------------------------------------------------------------------------- training pass

  def forward(self, batch, rng, timestep_shift: float = 1.0, *, noise=None, timesteps=None):
    """Packed batch -> (h_u [B,U,H], h_g [B,L,H], velocity target [B,L,D]).

    Reproducibility: `noise` = {'vae': [B, L, D], 'flow': [B, L, D]} standard-normal token noise
    of the posterior sample and of x_t (drawn from `rng` where missing); `timesteps` [B, N] the
    per-image normal draws n (t = sigmoid(n), then the shift), as the reference's packed
    timesteps."""
    input_ids = batch['input_ids']
    B, T = input_ids.shape
    und_idx, gen_idx = batch['und_idx'], batch['gen_idx']
    U, L = und_idx.shape[1], gen_idx.shape[1]
    perm = jnp.concatenate([und_idx, gen_idx], axis=1)
    inv = inverse_permutation(perm)
    positions = batch['positions']

    # understanding stream: text/marker embeddings, ViT tokens scattered in
    x_u = self.embed_text(_take_rows(input_ids, und_idx))
    if self.has_vit and batch['vit_patches'].shape[1] > 0:
      patches = _pixels_to_unit(batch['vit_patches'])
      with jax.named_scope('vit'):
        vit_tok = self.embed_vit(patches, batch['vit_segment_ids'], batch['vit_pos_ids'])
      dest = _take_rows(_ext(inv, U), batch['vit_token_idx'])      # U (dropped) for padding
      x_u = jax.vmap(lambda x, d, v: x.at[d].set(v.astype(x.dtype), mode='drop'))(x_u, dest, vit_tok)
    x_u = sharding.shard(x_u, ('batch', 'length', 'act_embed'))

    # generation stream: noised / clean latent tokens
    k_vae, k_t, k_eps = jax.random.split(rng, 3)
    noise = dict(noise or {})
    if L > 0:
      D = self.latent_dim
      n_vae = noise.get('vae')
      if n_vae is None:
        n_vae = jax.random.normal(k_vae, (B, L, D), jnp.float32)
      with jax.named_scope('vae'):
        x0 = self.clean_latents(batch, n_vae)
      N = batch['vae_image_noised'].shape[1]
      if timesteps is None:
        timesteps = jax.random.normal(k_t, (B, N), jnp.float32)
      t_img = shift_timesteps(jax.nn.sigmoid(timesteps.astype(jnp.float32)), timestep_shift)
      t_tok = jnp.take_along_axis(t_img, batch['latent_image'], axis=1) * batch['latent_noised']
      eps = noise.get('flow')
      if eps is None:
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
      x_t = (1.0 - t_tok[..., None]) * x0 + t_tok[..., None] * eps
      target = eps - x0
      x_g = self.embed_latents(x_t, t_tok, batch['latent_pos_ids'])
    else:
      target = jnp.zeros((B, 0, self.latent_dim), jnp.float32)
      x_g = jnp.zeros((B, 0, self.hidden_size), self.dtype)
    x_g = sharding.shard(x_g, ('batch', 'length', 'act_embed'))

    rope_u = self.rope(_take_rows(positions, und_idx))
    rope_g = self.rope(_take_rows(positions, gen_idx))
    meta = (batch['segment_ids'], batch['split_ids'], batch['split_modes'])
    attend = packed_attend(perm, inv, meta, U, self.attention_impl, self.attention_block,
                           self.attention_platform)
    h_u, h_g, _ = self.decoder(x_u, x_g, rope_u, rope_g, attend)
    return h_u, h_g, target

  def __call__(self, batch, rng, *, ce_weight=1.0, mse_weight=1.0, timestep_shift=1.0,
               ce_denominator=None, mse_denominator=None, noise=None, timesteps=None
               ) -> LossOutput:
    """Training losses of SPEC section 4.

    Both losses are SUMS over tokens divided by a GLOBAL token count: by default the counts of
    this (global) batch; pass the step's totals when accumulating gradients over micro-batches.
    The CE runs lm_head on the label rows only (`label_pos`).
    """
    h_u, h_g, target = self.forward(batch, rng, timestep_shift, noise=noise,
                                    timesteps=timesteps)
    # CE rows: sequence positions -> rows of the understanding stream (XLA CSEs this with the
    # forward's identical inverse permutation)
    inv = inverse_permutation(jnp.concatenate([batch['und_idx'], batch['gen_idx']], axis=1))
    pos = batch['label_pos']                                      # [B, C], T = padding
    rows = jnp.minimum(_take_rows(_ext(inv), pos), h_u.shape[1] - 1)
    labels = _take_rows(_ext(batch['label_ids']), pos)
    mask = _take_rows(_ext(batch['loss_mask']), pos).astype(jnp.float32)
    ce_tokens = jnp.sum(mask)
    with jax.named_scope('lm_head_ce'):
      ce_sum = chunked_cross_entropy(_take_rows(h_u, rows), self.lm_head.kernel[...], labels,
                                     mask, self.ce_chunk, self.dtype)
    if h_g.shape[1] > 0:
      pred = self.velocity(h_g)
      mse_mask = batch['latent_noised'] * batch['latent_mask']
      mse_tokens = jnp.sum(mse_mask)
      mse_sum = jnp.sum(jnp.mean(jnp.square(pred - target), axis=-1) * mse_mask)
    else:
      mse_tokens = jnp.zeros((), jnp.float32)
      mse_sum = jnp.zeros((), jnp.float32)
    ce_den = ce_tokens if ce_denominator is None else ce_denominator
    mse_den = mse_tokens if mse_denominator is None else mse_denominator
    ce = ce_sum / jnp.maximum(ce_den, 1.0)
    mse = mse_sum / jnp.maximum(mse_den, 1.0)
    return LossOutput(ce_weight * ce + mse_weight * mse, ce, mse, ce_tokens, mse_tokens)


def abstract_model(cfg_model) -> 'UniMedVL':
  """UniMedVL built abstractly (nnx.eval_shape): every variable a ShapeDtypeStruct, nothing
  allocated. The one way the package builds the model without weights (counting, sharding
  plans, checkpoint restore targets, import keymaps)."""
  return nnx.eval_shape(lambda: UniMedVL(cfg_model, rngs=nnx.Rngs(0)))
