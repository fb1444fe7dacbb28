"""The inference KV cache: a batched per-layer cache with the packed-sequence metadata (SPEC 3, 7).

A `Context` is a pytree holding, for B independent conversations (rows):

    k, v        tuples of `layers` arrays [B, Hkv, C, D]: keys / values of every cached token
                (C = capacity, static), one buffer per layer in the layout attention reads (the
                contraction axes of q.k and p.v are the trailing ones: no transposed copy)
    seg         [B, C] int32             1 for a filled slot, 0 for an empty one
    split       [B, C] int32             item (split) index of the slot's token
    mode        [B, C] int32             0 causal (text), 1 full (ViT / clean VAE image)
    length      [B]    int32             filled slots (tokens are appended at slot `length`)
    pos         [B]    int32             the next RoPE position
    num_splits  [B]    int32             items added so far (the next item gets this split id)

A slot's sequence index is its slot number, so the SAME `allowed` rule (unimedvl_jax/batch.py)
decides what a new query may see (context.py's `block_masks`). Rows are ragged: each has its own
length, position and split counter. This module holds the cache itself: making, sharding,
batching / slicing / growing it, and writing a block's keys, values and metadata into its slots
(`write_block`).

Contexts are immutable pytrees: "copying" one for classifier-free guidance (the "cfg_text" /
"cfg_img" contexts of SPEC 7) is keeping a reference to it. A context made from a model
prepared on a mesh (`new_context`) has its rows over the batch axes and its kv heads over
'tensor' (axes that do not divide a dimension are dropped, as for training).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax import sharding
from unimedvl_jax.infer.prepared import Prepared

if TYPE_CHECKING:
  from unimedvl_jax.infer.blocks import Block


class ContextError(ValueError):
  """A context operation that cannot be done (capacity exceeded, bad input shape, ...)."""



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
  k: tuple      # per layer [B, Hkv, C, D]
  v: tuple
  seg: jax.Array
  split: jax.Array
  mode: jax.Array
  length: jax.Array
  pos: jax.Array
  num_splits: jax.Array

  @property
  def batch_size(self) -> int:
    return int(self.seg.shape[0])

  @property
  def capacity(self) -> int:
    return int(self.seg.shape[1])

  def lengths(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.length))

  def positions(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.pos))


def layer_count(model) -> int:
  """Decoder layers of a stacked module or a prepared one."""
  layers = model.decoder.layers
  if isinstance(layers, nnx.List):
    return len(layers)
  return int(layers.und.k_proj.kernel.shape[0])


def _kv_heads(model) -> int:
  layers = model.decoder.layers
  return int((layers[0] if isinstance(layers, nnx.List) else layers).und.num_kv_heads)


def new_context(model, batch_size: int, capacity: int, dtype=None) -> Context:
  """An empty context for `batch_size` rows of `capacity` token slots each (placed on the mesh
  of a model prepared with one)."""
  n_layers = layer_count(model)
  dtype = model.dtype if dtype is None else dtype
  kv = jnp.zeros((batch_size, _kv_heads(model), capacity, model.head_dim), dtype)
  zi = jnp.zeros((batch_size, capacity), jnp.int32)
  zb = jnp.zeros((batch_size,), jnp.int32)
  ctx = Context((kv,) * n_layers, (kv,) * n_layers, zi, zi, zi, zb, zb, zb)
  mesh = model.mesh if isinstance(model, Prepared) else None
  return ctx if mesh is None else place_context(ctx, mesh)


# logical axes of the context's arrays (unimedvl_jax.sharding.RULES)
KV_AXES = ('batch', 'act_heads', 'length', None)      # [B, Hkv, C, D]
META_AXES = ('batch', 'length')                       # [B, C]
ROW_AXES = ('batch',)                                 # [B]


def context_shardings(ctx: Context, mesh) -> Context:
  """The NamedShardings of a context's arrays on `mesh` (same pytree structure)."""
  spec = lambda a, axes: jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(axes, a.shape, mesh))
  return Context(k=tuple(spec(a, KV_AXES) for a in ctx.k),
                 v=tuple(spec(a, KV_AXES) for a in ctx.v),
                 seg=spec(ctx.seg, META_AXES), split=spec(ctx.split, META_AXES),
                 mode=spec(ctx.mode, META_AXES), length=spec(ctx.length, ROW_AXES),
                 pos=spec(ctx.pos, ROW_AXES), num_splits=spec(ctx.num_splits, ROW_AXES))


def place_context(ctx: Context, mesh) -> Context:
  """The context's arrays on `mesh` (rows over the batch axes, kv heads over 'tensor')."""
  return jax.device_put(ctx, context_shardings(ctx, mesh))


def constrain_context(ctx: Context) -> Context:
  """Keeps a context computed inside a jitted function in its mesh layout (no-op without an
  active mesh, see sharding.use_mesh)."""
  if sharding.active_mesh() is None:
    return ctx
  sh = lambda a, axes: sharding.shard(a, axes)
  return Context(k=tuple(sh(a, KV_AXES) for a in ctx.k), v=tuple(sh(a, KV_AXES) for a in ctx.v),
                 seg=sh(ctx.seg, META_AXES), split=sh(ctx.split, META_AXES),
                 mode=sh(ctx.mode, META_AXES), length=sh(ctx.length, ROW_AXES),
                 pos=sh(ctx.pos, ROW_AXES), num_splits=sh(ctx.num_splits, ROW_AXES))


def concat_contexts(ctxs: Sequence[Context]) -> Context:
  """Rows of several contexts (same capacity) as one batched context (every leaf has the rows
  on its leading axis)."""
  caps = {c.capacity for c in ctxs}
  if len(caps) != 1:
    ctxs = [pad_capacity(c, max(caps)) for c in ctxs]
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *ctxs)


def take_rows(ctx: Context, rows) -> Context:
  """The sub-context of the given row indices."""
  rows = jnp.asarray(rows, jnp.int32)
  return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), ctx)


def pad_capacity(ctx: Context, capacity: int) -> Context:
  """The same context with more (empty) slots."""
  extra = capacity - ctx.capacity
  if extra < 0:
    raise ContextError(f'cannot shrink a context of capacity {ctx.capacity} to {capacity}')
  if extra == 0:
    return ctx
  pad4 = lambda kv: tuple(jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0))) for a in kv)
  pad2 = lambda a: jnp.pad(a, ((0, 0), (0, extra)))
  return dataclasses.replace(ctx, k=pad4(ctx.k), v=pad4(ctx.v), seg=pad2(ctx.seg),
                             split=pad2(ctx.split), mode=pad2(ctx.mode))


def check_capacity(ctx: Context, need) -> None:
  """Raises ContextError when a row cannot take `need` (per row, or one count) more tokens."""
  lengths = ctx.lengths()
  need = np.broadcast_to(np.asarray(need), lengths.shape)
  over = np.flatnonzero(lengths + need > ctx.capacity)
  if over.size:
    b = int(over[0])
    raise ContextError(f'context row {b} holds {int(lengths[b])} tokens and needs '
                       f'{int(need[b])} more, over its capacity of {ctx.capacity}; build the '
                       f'context with a larger capacity')


# ------------------------------------------------------------------------- writing a block

def write_block(ctx: Context, blk: Block, new_kv) -> Context:
  """The context with a block written: each layer's new keys / values (new_kv: per layer
  (k, v) [B, n, Hkv, D], sequence order) at slots length + i of the valid tokens, the block's
  metadata in the same slots, the counters advanced; kept in its mesh layout."""
  slots = _slots(ctx, blk)
  k = tuple(_put(kc, kn, slots) for kc, (kn, _) in zip(ctx.k, new_kv))
  v = tuple(_put(vc, vn, slots) for vc, (_, vn) in zip(ctx.v, new_kv))
  return constrain_context(dataclasses.replace(_write_meta(ctx, blk, slots), k=k, v=v))


def _slots(ctx: Context, blk: Block):
  """(rows, slots) [B, n]: the valid new tokens (sequence order, the first n_valid of each row)
  go to slots length + i; padding tokens to slot C (dropped). Slots past the capacity are
  dropped too (callers check capacity beforehand)."""
  n = blk.valid.shape[1]
  ar = jnp.arange(n, dtype=jnp.int32)[None]
  slot = jnp.where(blk.valid > 0, ctx.length[:, None] + ar, ctx.capacity)
  rows = jnp.broadcast_to(jnp.arange(ctx.batch_size, dtype=jnp.int32)[:, None], slot.shape)
  return rows, slot


def _put(buf, new, slots):
  """Writes new [B, n, Hkv, D] into a cache buffer [B, Hkv, C, D] at the slots."""
  rows, slot = slots
  # buf.at[rows, :, slot]: the advanced indices' shape [B, n] comes first, then Hkv, D
  return buf.at[rows, :, slot].set(new.astype(buf.dtype), mode='drop')


def _write_meta(ctx: Context, blk: Block, slots) -> Context:
  """The context with the block's metadata written and its counters advanced (k, v as given)."""
  rows, slot = slots
  meta_set = lambda a, val: a.at[rows, slot].set(val, mode='drop')
  split = ctx.num_splits[:, None] + blk.split_off
  return Context(
      k=ctx.k, v=ctx.v,
      seg=meta_set(ctx.seg, jnp.ones_like(slot)),
      split=meta_set(ctx.split, split),
      mode=meta_set(ctx.mode, blk.mode),
      length=ctx.length + blk.n_valid,
      pos=ctx.pos + blk.pos_adv,
      num_splits=ctx.num_splits + blk.split_adv)

