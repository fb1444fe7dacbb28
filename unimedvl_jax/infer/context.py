"""Inference contexts: the cached forward and the public context operations (SPEC 3, 7).

The pieces, one job each (every public name is re-exported here, the module callers import):

    kv_cache.py   Context (the batched per-layer KV cache + packed-sequence metadata),
                  new_context, shardings, concat / take / pad, write_block
    prepared.py   prepare / Prepared (the model split once, per-layer decoder modules,
                  optionally placed on a mesh), merge, backend_jit
    blocks.py     Block (new tokens, bucketed static shapes), BlockBuilder (items laid out by
                  data.plans.item_tokens, prompts by data.plans.lay_out, as training's tokenize
                  does), make_builder, vit_patches
    context.py    (this file) the forward of a block over a context: `block_masks` from the one
                  `allowed` rule (batch.py), `cached_attention`, `forward_block`; the jitted
                  `prefill` / `run_block`; add_text, add_image, encode_vae_tokens

`forward_block` runs the decoder on a block: each layer's `attend` callback attends the new
queries over cache + new keys with the mask from `allowed` (a slot's sequence index is its slot
number), and returns the new keys/values, which are written into the cache slots `length + i` of
the valid tokens. A row with no valid token in a block is untouched. Noised images are never
written into the cache (image.py runs them with `write=False`).

Every operation takes the model as an nnx module or as a `Prepared` model (prepared.py). The
jitted functions are traced with the prepared model's mesh active (`Prepared.scope`), so the
model's activation constraints and the cache layout constraints apply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax import batch as batch_lib
from unimedvl_jax.data.plans import Specials  # noqa: F401 (the four marker ids, shared with training)
from unimedvl_jax.infer.blocks import (MIN_BUCKET, Block, BlockBuilder, bucket,  # noqa: F401
                                       make_builder, vit_patches)
from unimedvl_jax.infer.kv_cache import (KV_AXES, META_AXES, ROW_AXES, Context,  # noqa: F401
                                         ContextError, check_capacity, concat_contexts,
                                         constrain_context, context_shardings, layer_count,
                                         new_context, pad_capacity, place_context, take_rows,
                                         write_block)
from unimedvl_jax.infer.prepared import (CPU_COMPILER_OPTIONS, BackendJit,  # noqa: F401
                                         Prepared, StaticGraph, backend_jit, merge, module_of,
                                         prepare)
from unimedvl_jax.model.layers import inverse_permutation, take_rows as rows_take


# ------------------------------------------------------------------------- the cached forward

def cached_attention(q, k_cache, v_cache, k_new, v_new, mask_cache, mask_new):
  """Softmax attention of new queries over cached + new keys (one joint softmax, float32, GQA).

  q [B, n, Hq, D]; k/v_cache [B, Hkv, C, D] (the cache layout); k/v_new [B, n, Hkv, D] or None
  (the new keys are already in the cache); masks bool [B, n, C] and [B, n, n]. Rows with no
  allowed key return zeros (like `masked_attention`).

  Written as dot_generals in the canonical [batch, rows, contracted] x [batch, cols, contracted]
  and [batch, rows, contracted] x [batch, contracted, cols] forms, queries grouped per kv head as
  [B, Hkv, G*n, D] (row g*n + i = query i of group g): XLA then reads the cache buffers as they
  are (an einsum over [B, n, Hkv, G, D] queries made XLA:CPU copy a transposed K or V cache per
  layer per call).
  """
  B, n, Hq, D = q.shape
  Hkv = k_cache.shape[1]
  G = Hq // Hkv
  f32 = jnp.float32
  qg = (q.reshape(B, n, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * n, D)
        .astype(f32) * (D ** -0.5))
  pieces = [(k_cache, v_cache, mask_cache)]
  if k_new is not None:
    pieces.append((k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3), mask_new))
  qk = (((3,), (3,)), ((0, 1), (0, 1)))                                 # contract D
  pv = (((3,), (2,)), ((0, 1), (0, 1)))                                 # contract keys
  logits, masks = [], []
  for k, _, m in pieces:
    m = jnp.tile(m, (1, G, 1))[:, None]                                 # [B, 1, G*n, keys]
    logits.append(jnp.where(m, jax.lax.dot_general(qg, k.astype(f32), qk), -jnp.inf))
    masks.append(m)
  mx = functools.reduce(jnp.maximum, [jnp.max(l, -1, keepdims=True) for l in logits])
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  probs = [jnp.where(m, jnp.exp(l - mx), 0.0) for l, m in zip(logits, masks)]
  den = sum(jnp.sum(p, -1, keepdims=True) for p in probs)
  den = jnp.where(den > 0, den, 1.0)
  out = sum(jax.lax.dot_general(p, v.astype(f32), pv) for p, (_, v, _) in zip(probs, pieces))
  out = (out / den).reshape(B, Hkv, G, n, D).transpose(0, 3, 1, 2, 4)   # [B, n, Hkv, G, D]
  return out.reshape(B, n, Hq, D).astype(q.dtype)



def block_masks(ctx: Context, blk: Block, meta=None):
  """(mask over the cache [B, n, C], mask over the new keys [B, n, n]) from `allowed`.
  meta: (seg, split, mode) [B, C] of the cache to use instead of the context's own (the cache
  with the block already written into it)."""
  n = blk.valid.shape[1]
  C = ctx.capacity
  q_seg = blk.valid
  q_split = ctx.num_splits[:, None] + blk.split_off
  q_mode = blk.mode
  q_idx = ctx.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  q = lambda a: a[:, :, None]
  k = lambda a: a[:, None, :]
  c_idx = jnp.arange(C, dtype=jnp.int32)[None]
  seg, split, mode = (ctx.seg, ctx.split, ctx.mode) if meta is None else meta
  mask_c = batch_lib.allowed(q(q_seg), q(q_split), q(q_mode), q(q_idx),
                            k(seg), k(split), k(mode), k(c_idx))
  mask_n = batch_lib.allowed(q(q_seg), q(q_split), q(q_mode), q(q_idx),
                            k(q_seg), k(q_split), k(q_mode), k(q_idx))
  return mask_c, mask_n


def embed_block(model, blk: Block):
  """Block -> (x_u [B, nU, H], x_g [B, nG, H]) input embeddings."""
  B, nU = blk.und_ids.shape
  x_u = model.embed_text(blk.und_ids)
  if blk.vit_patches.shape[1] > 0 and getattr(model, 'has_vit', False):
    vt = model.embed_vit(blk.vit_patches, blk.vit_seg, blk.vit_pos)
    x_u = jax.vmap(lambda x, d, v: x.at[d].set(v.astype(x.dtype), mode='drop'))(
        x_u, blk.vit_dest, vt)
  if blk.lat_x.shape[1] > 0:
    x_g = model.embed_latents(blk.lat_x, blk.lat_t, blk.lat_pos)
  else:
    x_g = jnp.zeros((B, 0, model.hidden_size), model.dtype)
  return x_u, x_g


def forward_block(model, ctx: Context, blk: Block, *, write: bool = True, x_g=None):
  """Runs the decoder on a block over the context.

  Returns (new context, h_u [B, nU, H], h_g [B, nG, H]) with the experts' final norms applied.
  With write=False the context is returned unchanged (noise blocks of the flow sampler).
  `x_g` overrides the generation-stream embeddings (the sampler embeds x_t itself).

  `model`: a module with per-layer decoder layers (`prepare`: each layer reads its own cache
  buffer) or with stacked ones (the cache is then stacked for the scan: a copy per call). The
  block attends over cache + its own keys; its keys / values are written afterwards (reading the
  old buffer before the update lets XLA update it in place, see `CPU_COMPILER_OPTIONS`).
  """
  x_u, x_g0 = embed_block(model, blk)
  x_g = x_g0 if x_g is None else x_g
  U = blk.und_ids.shape[1]
  positions = ctx.pos[:, None] + blk.pos_off
  rope_u = model.rope(rows_take(positions, blk.und_seq))
  rope_g = model.rope(rows_take(positions, blk.gen_seq))
  if blk.gen_seq.shape[1] == 0:
    # no generation-stream tokens: the und stream is the sequence order (und_seq = 0..n-1, as
    # BlockBuilder and text.token_block build it), no permutation needed
    perm = inv = None
  else:
    perm = jnp.concatenate([blk.und_seq, blk.gen_seq], axis=1)
    inv = inverse_permutation(perm)
  mask_c, mask_n = block_masks(ctx, blk)

  def attend(qkv_u, qkv_g, kv):
    kc, vc = kv
    if perm is None:
      q, k, v = qkv_u
    else:
      to_seq = lambda a, b: rows_take(jnp.concatenate([a, b], axis=1), inv)
      q, k, v = (to_seq(a, b) for a, b in zip(qkv_u, qkv_g))
    o = cached_attention(q, kc, vc, k, v, mask_c, mask_n)
    if perm is not None:
      o = rows_take(o, perm)
    new = (k.astype(kc.dtype), v.astype(vc.dtype)) if write else None
    return (o[:, :U], o[:, U:]), new

  stacked = not isinstance(model.decoder.layers, nnx.List)
  if stacked:
    layer_xs = (jnp.stack(ctx.k), jnp.stack(ctx.v))
  else:
    layer_xs = list(zip(ctx.k, ctx.v))
  h_u, h_g, new_kv = model.decoder(x_u, x_g, rope_u, rope_g, attend, layer_xs=layer_xs)
  if not write:
    return ctx, h_u, h_g
  if stacked:
    new_kv = [(new_kv[0][i], new_kv[1][i]) for i in range(len(ctx.k))]
  return write_block(ctx, blk, new_kv), h_u, h_g



@backend_jit(static_argnums=(0,))
def _prefill_jit(graphdef, state, ctx, blk):
  model = merge(graphdef, state)
  ctx, _, _ = forward_block(model, ctx, blk, write=True)
  return ctx


@backend_jit(static_argnums=(0, 4))
def _forward_jit(graphdef, state, ctx, blk, write):
  model = merge(graphdef, state)
  return forward_block(model, ctx, blk, write=write)


def run_block(model, ctx: Context, block, *, write: bool = False):
  """Jitted `forward_block` on a `Block` or a `BlockBuilder` (built with bucketed sizes).
  Returns (context, h_u, h_g); with write=False the context is unchanged."""
  if isinstance(block, BlockBuilder):
    if write:
      check_capacity(ctx, [len(r.kind) for r in block.rows])
    block = block.build()
  p = prepare(model)
  with p.scope():
    return _forward_jit(p.static, p.state, ctx, block, bool(write))



def prefill(model, ctx: Context, builder: BlockBuilder) -> Context:
  """Writes the builder's items into the context (one jitted call, bucketed shapes)."""
  if builder.B != ctx.batch_size:
    raise ContextError(f'block has {builder.B} rows, context {ctx.batch_size}')
  if builder.empty():
    return ctx
  check_capacity(ctx, [len(r.kind) for r in builder.rows])
  blk = builder.build()
  p = prepare(model)
  with p.scope():
    return _prefill_jit(p.static, p.state, ctx, blk)


# --------------------------------------------------------------------- the public operations


def _per_row(x, B, what):
  if x is None:
    return [None] * B
  if isinstance(x, list):   # a list is one entry per row; anything else is one row's entry
    if len(x) != B:
      raise ContextError(f'{what}: {len(x)} entries for a batch of {B} rows')
    return list(x)
  if B != 1:
    raise ContextError(f'{what}: give a list of {B} entries (one per row, None to skip a row)')
  return [x]


def _wrap_flat_ids(x):
  """A flat id sequence (one row) -> [x]; a list of rows is returned as is."""
  if x is None:
    return None
  if isinstance(x, np.ndarray) or isinstance(x, jax.Array):
    return [x] if x.ndim == 1 else list(x)
  if len(x) == 0 or isinstance(x[0], (int, np.integer)):
    return [x]
  return list(x)


def add_text(model, ctx: Context, token_ids, specials: Specials) -> Context:
  """Prefills `<|im_start|>` + ids + `<|im_end|>` per row (causal, und expert, consecutive
  positions). token_ids: a list (one per row; None skips the row), or one id list for B == 1."""
  rows = _per_row(_wrap_flat_ids(token_ids), ctx.batch_size, 'add_text')
  b = make_builder(model, ctx.batch_size, specials)
  for r, ids in enumerate(rows):
    if ids is not None:
      b.text(r, ids)
  return prefill(model, ctx, b)




def encode_vae_tokens(model, pixels: np.ndarray, *, sample: bool = False, rng=None, noise=None):
  """[H, W, 3] float in [-1, 1] (multiples of 8) -> (clean latent tokens [gh*gw, 64], (gh, gw)).

  The latent mean by default (deterministic conditioning); sample=True samples it like training
  does, through the same `AutoEncoder.sample_tokens` on the token-layout moments: with the same
  `noise` ([gh*gw, D] standard normal; drawn from `rng` when None) the tokens equal the training
  step's latents of this image. A side that is a multiple of 8 but not of 16 gives an odd latent
  whose last row / column is dropped, as in the reference (gh = H // 16).
  """
  x = np.asarray(pixels, np.float32)
  f = int(getattr(model.vae, 'downsample_factor', 8))
  px = f * model.latent_patch
  H, W = x.shape[:2]
  if H % f or W % f or H < px or W < px:
    raise ContextError(f'VAE image {H}x{W}: sides must be multiples of {f} pixels and at least '
                       f'{px}')
  p = prepare(model)
  gh, gw = H // px, W // px
  if sample and noise is None:
    key = jax.random.key(0) if rng is None else rng
    noise = jax.random.normal(key, (1, gh * gw, p.latent_dim), jnp.float32)
  elif noise is not None:
    noise = jnp.asarray(noise, jnp.float32).reshape(1, gh * gw, -1)
  with p.scope():
    tok = _vae_encode_jit(p.static, p.state, jnp.asarray(x[None]), noise)
  return np.asarray(tok[0]), (gh, gw)


@functools.partial(jax.jit, static_argnums=(0,))
def _vae_encode_jit(graphdef, state, x, noise):
  model = merge(graphdef, state)
  mean, logvar = model.vae.encode_token_moments(x, model.latent_patch)
  if noise is None:
    return model.vae.sample_tokens(mean, logvar, jnp.zeros_like(mean))   # the scaled mean
  return model.vae.sample_tokens(mean, logvar, noise)


def add_image(model, ctx: Context, specials: Specials, *, vit=None, vae=None,
              vae_tokens=None, sample_vae: bool = False, rng=None) -> Context:
  """Prefills an image per row: a VAE block (gen expert for latents at t = 0, markers und) and/or
  a ViT block (und expert), VAE first; each bidirectional, each one position.

  vit / vae: pixels [H, W, 3] float in [-1, 1] (already resized to multiples of the ViT patch /
  16 pixels) per row, None to skip; vae_tokens: precomputed (tokens [gh*gw, 64], (gh, gw)) per row
  instead of `vae` pixels.
  """
  B = ctx.batch_size
  vit = _per_row(vit, B, 'add_image(vit=...)')
  vae = _per_row(vae, B, 'add_image(vae=...)')
  vae_tokens = _per_row(vae_tokens, B, 'add_image(vae_tokens=...)')
  b = make_builder(model, B, specials)
  patch = (int(round((b.vit_dim // 3) ** 0.5)) if b.vit_dim else 0)
  for r in range(B):
    if vae[r] is not None or vae_tokens[r] is not None:
      if vae_tokens[r] is None:
        if not getattr(model, 'has_vae', False):
          raise ContextError('the model has no VAE (model.vae.enabled is False)')
        key = None if rng is None else jax.random.fold_in(rng, r)
        vae_tokens[r] = encode_vae_tokens(model, vae[r], sample=sample_vae, rng=key)
      tok, grid = vae_tokens[r]
      b.vae_image(r, tok, grid)
    if vit[r] is not None:
      if not patch:
        raise ContextError('the model has no ViT (model.vit.enabled is False)')
      p, grid = vit_patches(vit[r], patch)
      b.vit_image(r, p, grid)
  return prefill(model, ctx, b)
