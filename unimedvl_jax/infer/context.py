"""Inference contexts: a batched per-layer KV cache with the packed-sequence metadata (SPEC 3, 7).

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

A slot's sequence index is its slot number, so the SAME `allowed` rule of model/attention.py
decides what a new query may see: the cached keys (metadata above) and the new block's own keys.
Noised images are never written into the cache (image.py runs them with `write=False`).

New tokens are described by a `Block` (built on the host by `BlockBuilder`, shapes bucketed to
powers of two so a handful of compilations serve every prompt). `forward_block` runs the decoder
on a block: each layer's `attend` callback attends the new queries over cache + new keys with the
mask from `allowed`, and returns the new keys/values, which are scattered into the cache slots
`length + i` of the valid tokens. Rows are ragged: each has its own length, position and split
counter; a row with no valid token in a block is untouched.

Contexts are immutable pytrees: "copying" one for classifier-free guidance (the "cfg_text" /
"cfg_img" contexts of SPEC 7) is keeping a reference to it.

Every operation takes the model as an nnx module or as a `Prepared` model (`prepare(model)`,
done once per loaded checkpoint: the Runner does it). Preparing splits the module once
(`nnx.split` costs ~10 ms of host time per call) and cuts the decoder's stacked layers into one
module per layer (one copy of the decoder weights, made once), so the jitted inference
functions run the layers unrolled and read each layer's weights and cache buffer in place: a
scan over stacked layers re-slices (copies) every layer's weights and cache for every token on
CPU. A plain module is prepared on every call (correct, only slower).

Sharded inference: `prepare(model, mesh)` places the weights on a mesh ('data', 'fsdp',
'tensor'; sharding.py's logical rules) and every context made from it (`new_context`) with its
rows over the batch axes and its kv heads over 'tensor' (axes that do not divide a dimension are
dropped, as for training). The jitted functions are traced with the mesh active, so the model's
activation constraints and the cache layout constraints apply; XLA partitions the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax import sharding
from unimedvl_jax.data.plans import Specials  # the four marker ids, shared with training
from unimedvl_jax.model import attention as attn_lib
from unimedvl_jax.model.attention import MODE_CAUSAL, MODE_FULL, MODE_NOISE

# token kinds inside a block (host side)
_TEXT, _VIT, _LATENT = 0, 1, 2


class ContextError(ValueError):
  """A context operation that cannot be done (capacity exceeded, bad input shape, ...)."""


# --------------------------------------------------------------------------------- the context

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


def _constrain_context(ctx: Context) -> Context:
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


# ------------------------------------------------------------------------ the prepared model

class Prepared:
  """A model split once for inference: `module` (the decoder's stacked layers cut into an
  `nnx.List` of per-layer modules), its `graphdef` and `state` (what the jitted functions take).

  Attribute access falls through to the module (`prepared.has_vae`, `prepared.decoder`, ...),
  so a Prepared is accepted wherever the infer functions take a model. It is a snapshot: the
  layer weights are a copy, made once; after changing the original module's weights, prepare
  it again.
  """

  def __init__(self, module, mesh=None):
    self.module = module
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(module)
    self.static = StaticGraph(self.graphdef)
    if mesh is not None:
      self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh))
      nnx.update(module, self.state)

  def scope(self):
    """The mesh active while tracing (activation constraints); a no-op without a mesh."""
    return sharding.use_mesh(self.mesh)

  def __getattr__(self, name):
    if name.startswith('__') or name == 'module':
      raise AttributeError(name)
    return getattr(self.__dict__['module'], name)


class StaticGraph:
  """A graphdef as a static jit argument whose hash is computed once: jit hashes its static
  arguments on every call, and hashing the graphdef of the whole model costs tens of ms of host
  time per call (more than decoding 32 tokens of the tiny model)."""

  __slots__ = ('graphdef', '_hash')

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                             and self.graphdef == other.graphdef)


def merge(graph, state):
  """nnx.merge of a graphdef or a StaticGraph (inside the jitted functions)."""
  return nnx.merge(graph.graphdef if isinstance(graph, StaticGraph) else graph, state)


@jax.jit
def _unstack_jit(state):
  n = jax.tree.leaves(state)[0].shape[0]
  return tuple(jax.tree.map(lambda a: a[i], state) for i in range(n))


def _drop_layers_axis(module) -> None:
  """Per-layer variables cut from a stack keep the stack's logical names; drop the leading
  'layers' name so their sharding (unimedvl_jax.sharding) matches their shape."""
  for _, v in nnx.iter_graph(module):
    if not isinstance(v, nnx.Variable):
      continue
    names = v.get_metadata().get('out_sharding')
    if names and len(names) == v.ndim + 1 and names[0] == 'layers':
      v.set_metadata('out_sharding', tuple(names[1:]))


def prepare(model, mesh=None) -> Prepared:
  """The model prepared for inference (see the module doc), its weights placed on `mesh` when
  one is given. A Prepared is returned as is (mesh None or its own mesh). Works on an abstract
  module (nnx.eval_shape) too: then the state holds ShapeDtypeStructs (AOT planning)."""
  if isinstance(model, Prepared):
    if mesh is None or mesh is model.mesh:
      return model
    return Prepared(model.module, mesh)
  if isinstance(model.decoder.layers, nnx.List):
    return Prepared(model, mesh)
  graphdef, state = nnx.split(model)
  module = nnx.merge(graphdef, state)          # new module objects; the weights are shared
  lgd, lstate = nnx.split(module.decoder.layers)
  abstract = isinstance(jax.tree.leaves(lstate)[0], jax.ShapeDtypeStruct)
  per_layer = (jax.eval_shape(_unstack_jit, lstate) if abstract else _unstack_jit(lstate))
  layers = [nnx.merge(lgd, s) for s in per_layer]
  for layer in layers:
    _drop_layers_axis(layer)
  module.decoder.layers = nnx.List(layers)
  return Prepared(module, None if abstract else mesh)


def module_of(model):
  """The nnx module of a model or a Prepared."""
  return model.module if isinstance(model, Prepared) else model


# ------------------------------------------------------------------------------------- blocks

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Block:
  """New tokens for every row, as static-size arrays (sequence order n = nU + nG).

  Understanding stream (text, markers, ViT tokens) [B, nU]; generation stream (latents) [B, nG];
  ViT patches [B, P, K]. Sequence-order metadata [B, n] is relative to the row's counters:
  split = ctx.num_splits + split_off, position = ctx.pos + pos_off.
  """
  und_ids: jax.Array       # [B, nU] token ids (0 at ViT / padding)
  und_seq: jax.Array       # [B, nU] sequence index of each und-stream slot
  gen_seq: jax.Array       # [B, nG] sequence index of each gen-stream slot
  vit_patches: jax.Array   # [B, P, K] float32 in [-1, 1]
  vit_seg: jax.Array       # [B, P] image index (1..), 0 padding
  vit_pos: jax.Array       # [B, P] row * grid + col
  vit_dest: jax.Array      # [B, P] und-stream slot of the patch's token; nU for padding
  lat_x: jax.Array         # [B, nG, 64] latent tokens (clean, or x_t for noise blocks)
  lat_t: jax.Array         # [B, nG] timestep per latent token
  lat_pos: jax.Array       # [B, nG] row * max_latent_size + col
  valid: jax.Array         # [B, n] int32 1 for a real token
  split_off: jax.Array     # [B, n]
  mode: jax.Array          # [B, n]
  pos_off: jax.Array       # [B, n]
  n_valid: jax.Array       # [B]
  pos_adv: jax.Array       # [B] position counter advance
  split_adv: jax.Array     # [B] split counter advance


MIN_BUCKET = 16   # smallest bucketed block size (fewer distinct shapes -> fewer compilations)


def bucket(n: int, minimum: int = 1) -> int:
  """Next power of two >= max(n, minimum) (0 stays 0)."""
  if n <= 0:
    return 0
  n = max(n, minimum)
  return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class _Row:
  kind: list = dataclasses.field(default_factory=list)     # per token: _TEXT/_VIT/_LATENT
  ids: list = dataclasses.field(default_factory=list)
  split: list = dataclasses.field(default_factory=list)
  mode: list = dataclasses.field(default_factory=list)
  pos: list = dataclasses.field(default_factory=list)
  vit: list = dataclasses.field(default_factory=list)      # (patches [n, K], pos ids [n]) per image
  lat: list = dataclasses.field(default_factory=list)      # (x [n, 64], t [n], pos ids [n]) per image
  n_splits: int = 0
  pos_adv: int = 0


class BlockBuilder:
  """Host-side assembly of a `Block`: items appended per row, in order.

      b = BlockBuilder(batch_size, specials, latent_grid=model_cfg.max_latent_size, vit_grid=...)
      b.text(row, ids)                      # <|im_start|> ids <|im_end|>, causal, consecutive pos
      b.vae_image(row, tokens, (gh, gw))    # <|vision_start|> latents(t=0) <|vision_end|>, full
      b.vit_image(row, patches, (nh, nw))   # <|vision_start|> ViT tokens <|vision_end|>, full
      block = b.build()
  """

  def __init__(self, batch_size: int, specials, *, latent_grid: int, vit_grid: int,
               latent_dim: int = 64, vit_dim: int = 0):
    self.B = batch_size
    self.sp = specials
    self.latent_grid = latent_grid
    self.vit_grid = vit_grid
    self.latent_dim = latent_dim
    self.vit_dim = vit_dim
    self.rows = [_Row() for _ in range(batch_size)]

  def _check_row(self, r):
    if not 0 <= r < self.B:
      raise ContextError(f'row {r} out of range for a batch of {self.B}')
    return self.rows[r]

  def raw_text(self, r: int, ids, *, new_split: bool = True, mode: int = MODE_CAUSAL):
    """Token ids as given (no markers), causal, consecutive positions."""
    row = self._check_row(r)
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
      return self
    s = row.n_splits if new_split else row.n_splits - 1
    for i in ids:
      row.kind.append(_TEXT)
      row.ids.append(i)
      row.split.append(s)
      row.mode.append(mode)
      row.pos.append(row.pos_adv)
      row.pos_adv += 1
    if new_split:
      row.n_splits += 1
    return self

  def text(self, r: int, ids):
    """`<|im_start|>` + ids + `<|im_end|>` (SPEC 3: one text item)."""
    ids = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
    return self.raw_text(r, [self.sp.im_start] + ids + [self.sp.im_end])

  def _image(self, r, kind, payload, n, mode, advance):
    row = self._check_row(r)
    s = row.n_splits
    p = row.pos_adv
    toks = [(_TEXT, self.sp.vision_start)] + [(kind, 0)] * n + [(_TEXT, self.sp.vision_end)]
    for k, i in toks:
      row.kind.append(k)
      row.ids.append(i)
      row.split.append(s)
      row.mode.append(mode)
      row.pos.append(p)
    row.n_splits += 1
    if advance:
      row.pos_adv += 1
    (row.vit if kind == _VIT else row.lat).append(payload)
    return self

  def vae_image(self, r: int, tokens, grid, *, t: float = 0.0, mode: int = MODE_FULL,
                advance: bool = True):
    """A VAE image item: latent tokens [gh*gw, 64] of a (gh, gw) grid."""
    gh, gw = grid
    tokens = np.asarray(tokens, np.float32)
    if tokens.shape != (gh * gw, self.latent_dim):
      raise ContextError(f'VAE tokens of shape {tokens.shape}, expected {(gh * gw, self.latent_dim)}'
                         f' for a {gh}x{gw} latent grid')
    if gh > self.latent_grid or gw > self.latent_grid:
      raise ContextError(f'a {gh}x{gw} latent grid exceeds model.max_latent_size '
                         f'({self.latent_grid}): image too large')
    rr, cc = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
    pos = (rr * self.latent_grid + cc).reshape(-1)
    ts = np.full((gh * gw,), t, np.float32)
    return self._image(r, _LATENT, (tokens, ts, pos), gh * gw, mode, advance)

  def noise_image(self, r: int, x, grid, t: float = 1.0):
    """The noised target being generated: mode noise, at the current position, no advance."""
    return self.vae_image(r, x, grid, t=t, mode=MODE_NOISE, advance=False)

  def vit_image(self, r: int, patches, grid):
    """A ViT image item: patches [nh*nw, K] ((row, col, channel) flattening) of a (nh, nw) grid."""
    nh, nw = grid
    patches = np.asarray(patches, np.float32)
    if patches.ndim != 2 or patches.shape[0] != nh * nw:
      raise ContextError(f'ViT patches of shape {patches.shape}, expected ({nh * nw}, K)')
    if nh > self.vit_grid or nw > self.vit_grid:
      raise ContextError(f'a {nh}x{nw} ViT patch grid exceeds model.vit.grid_size '
                         f'({self.vit_grid}): image too large')
    if self.vit_dim and patches.shape[1] != self.vit_dim:
      raise ContextError(f'ViT patch width {patches.shape[1]}, expected {self.vit_dim}')
    rr, cc = np.meshgrid(np.arange(nh), np.arange(nw), indexing='ij')
    pos = (rr * self.vit_grid + cc).reshape(-1)
    return self._image(r, _VIT, (patches, pos), nh * nw, MODE_FULL, True)

  def counts(self):
    nU = max((sum(k != _LATENT for k in r.kind) for r in self.rows), default=0)
    nG = max((sum(k == _LATENT for k in r.kind) for r in self.rows), default=0)
    P = max((sum(len(p[1]) for p in r.vit) for r in self.rows), default=0)
    return nU, nG, P

  def empty(self) -> bool:
    return all(not r.kind for r in self.rows)

  def build(self, *, sizes: tuple[int, int, int] | None = None) -> Block:
    """The block with bucketed (or the given (nU, nG, P)) static sizes."""
    nU, nG, P = self.counts()
    if sizes is None:
      nU, nG, P = max(bucket(nU, MIN_BUCKET), 1), bucket(nG, MIN_BUCKET), bucket(P, MIN_BUCKET)
    else:
      if sizes[0] < nU or sizes[1] < nG or sizes[2] < P:
        raise ContextError(f'block needs sizes {(nU, nG, P)}, got {sizes}')
      nU, nG, P = sizes
    B, n = self.B, nU + nG
    K = self.vit_dim or max((p[0].shape[1] for r in self.rows for p in r.vit), default=1)
    a = dict(
        und_ids=np.zeros((B, nU), np.int32), und_seq=np.zeros((B, nU), np.int32),
        gen_seq=np.zeros((B, nG), np.int32),
        vit_patches=np.zeros((B, P, K), np.float32), vit_seg=np.zeros((B, P), np.int32),
        vit_pos=np.zeros((B, P), np.int32), vit_dest=np.full((B, P), nU, np.int32),
        lat_x=np.zeros((B, nG, self.latent_dim), np.float32), lat_t=np.zeros((B, nG), np.float32),
        lat_pos=np.zeros((B, nG), np.int32),
        valid=np.zeros((B, n), np.int32), split_off=np.zeros((B, n), np.int32),
        mode=np.zeros((B, n), np.int32), pos_off=np.zeros((B, n), np.int32),
        n_valid=np.zeros((B,), np.int32), pos_adv=np.zeros((B,), np.int32),
        split_adv=np.zeros((B,), np.int32))
    for b, row in enumerate(self.rows):
      m = len(row.kind)
      a['valid'][b, :m] = 1
      a['split_off'][b, :m] = row.split
      a['mode'][b, :m] = row.mode
      a['pos_off'][b, :m] = row.pos
      # padding tokens: split_off of the last item, mode full (they are invalid anyway)
      a['n_valid'][b] = m
      a['pos_adv'][b] = row.pos_adv
      a['split_adv'][b] = row.n_splits
      und = [i for i, k in enumerate(row.kind) if k != _LATENT]
      gen = [i for i, k in enumerate(row.kind) if k == _LATENT]
      pad = list(range(m, n))
      n_und_pad = nU - len(und)
      a['und_seq'][b] = und + pad[:n_und_pad]
      a['gen_seq'][b] = gen + pad[n_und_pad:]
      a['und_ids'][b, :len(und)] = [row.ids[i] for i in und]
      # ViT patches -> und-stream slots, in order of appearance
      vit_slots = [j for j, i in enumerate(und) if row.kind[i] == _VIT]
      c = 0
      for img_i, (patches, pos) in enumerate(row.vit):
        k = len(pos)
        a['vit_patches'][b, c:c + k] = patches
        a['vit_seg'][b, c:c + k] = img_i + 1
        a['vit_pos'][b, c:c + k] = pos
        a['vit_dest'][b, c:c + k] = vit_slots[c:c + k]
        c += k
      c = 0
      for x, t, pos in row.lat:
        k = len(pos)
        a['lat_x'][b, c:c + k] = x
        a['lat_t'][b, c:c + k] = t
        a['lat_pos'][b, c:c + k] = pos
        c += k
    return Block(**{k: jnp.asarray(v) for k, v in a.items()})


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


def _rows_take(x, idx):
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, idx)


def _inverse_perm(perm):
  n = perm.shape[1]
  ar = jnp.arange(n, dtype=perm.dtype)
  return jax.vmap(lambda p: jnp.zeros((n,), perm.dtype).at[p].set(ar))(perm)


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
  mask_c = attn_lib.allowed(q(q_seg), q(q_split), q(q_mode), q(q_idx),
                            k(seg), k(split), k(mode), k(c_idx))
  mask_n = attn_lib.allowed(q(q_seg), q(q_split), q(q_mode), q(q_idx),
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
  rope_u = model.rope(_rows_take(positions, blk.und_seq))
  rope_g = model.rope(_rows_take(positions, blk.gen_seq))
  if blk.gen_seq.shape[1] == 0:
    # no generation-stream tokens: the und stream is the sequence order (und_seq = 0..n-1, as
    # BlockBuilder and text.token_block build it), no permutation needed
    perm = inv = None
  else:
    perm = jnp.concatenate([blk.und_seq, blk.gen_seq], axis=1)
    inv = _inverse_perm(perm)
  mask_c, mask_n = block_masks(ctx, blk)

  def attend(qkv_u, qkv_g, kv):
    kc, vc = kv
    if perm is None:
      q, k, v = qkv_u
    else:
      to_seq = lambda a, b: _rows_take(jnp.concatenate([a, b], axis=1), inv)
      q, k, v = (to_seq(a, b) for a, b in zip(qkv_u, qkv_g))
    o = cached_attention(q, kc, vc, k, v, mask_c, mask_n)
    if perm is not None:
      o = _rows_take(o, perm)
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
  slots = _slots(ctx, blk)
  k = tuple(_put(kc, kn, slots) for kc, (kn, _) in zip(ctx.k, new_kv))
  v = tuple(_put(vc, vn, slots) for vc, (_, vn) in zip(ctx.v, new_kv))
  return _constrain_context(dataclasses.replace(_write_meta(ctx, blk, slots), k=k, v=v)), h_u, h_g


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


# ---------------------------------------------------------------------------- jitted wrappers

# XLA:CPU's default copy insertion copies a loop-carried buffer that is read and then updated
# inside a while loop (each layer's KV cache, every decoded token, twice); with region analysis
# it proves the read happens before the update and updates the buffer in place (measured in
# benchmarks/bench_decode.py). The other backends get their default options.
CPU_COMPILER_OPTIONS = {'xla_cpu_copy_insertion_use_region_analysis': True}


class BackendJit:
  """`jax.jit(fun, static_argnums=...)` that compiles with CPU_COMPILER_OPTIONS when the default
  backend is the CPU. `.plain` is the jitted function without them (AOT lowering for TPU/GPU)."""

  def __init__(self, fun, static_argnums=()):
    self.fun, self.static_argnums = fun, static_argnums
    self.plain = jax.jit(fun, static_argnums=static_argnums)
    self.cpu = jax.jit(fun, static_argnums=static_argnums, compiler_options=CPU_COMPILER_OPTIONS)
    functools.update_wrapper(self, fun)

  def _pick(self):
    return self.cpu if jax.default_backend() == 'cpu' else self.plain

  def __call__(self, *args, **kwargs):
    return self._pick()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._pick().lower(*args, **kwargs)


def backend_jit(static_argnums=()):
  return lambda fun: BackendJit(fun, static_argnums)


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


def check_capacity(ctx: Context, need) -> None:
  lengths = ctx.lengths()
  need = np.broadcast_to(np.asarray(need), lengths.shape)
  over = np.flatnonzero(lengths + need > ctx.capacity)
  if over.size:
    b = int(over[0])
    raise ContextError(f'context row {b} holds {int(lengths[b])} tokens and needs '
                       f'{int(need[b])} more, over its capacity of {ctx.capacity}; build the '
                       f'context with a larger capacity')


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

def make_builder(model, batch_size: int, specials: Specials) -> BlockBuilder:
  vit_grid = model.vit.embeddings.position_embedding.shape[0] if getattr(model, 'has_vit', False) else 1
  vit_grid = int(round(vit_grid ** 0.5))
  vit_dim = (int(model.vit.embeddings.patch_embedding.kernel.shape[0])
             if getattr(model, 'has_vit', False) else 0)
  latent_grid = (int(model.latent_pos_embed.grid) if getattr(model, 'has_vae', False) else 1)
  return BlockBuilder(batch_size, specials, latent_grid=latent_grid, vit_grid=vit_grid,
                      latent_dim=model.latent_patch ** 2 * model.latent_channels, vit_dim=vit_dim)


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


def vit_patches(pixels: np.ndarray, patch: int):
  """[H, W, 3] float in [-1, 1] (H, W multiples of patch) -> (patches [nh*nw, 3*p*p], (nh, nw))."""
  x = np.asarray(pixels, np.float32)
  H, W, Cc = x.shape
  if H % patch or W % patch:
    raise ContextError(f'ViT image {H}x{W} is not a multiple of the patch size {patch}')
  nh, nw = H // patch, W // patch
  p = x.reshape(nh, patch, nw, patch, Cc).transpose(0, 2, 1, 3, 4).reshape(nh * nw, -1)
  return p, (nh, nw)


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
