"""Blocks: the new tokens of one inference call, built on the host (SPEC 3, 7).

A `Block` holds the new tokens of every row as static-size arrays; `BlockBuilder` assembles
one from items appended per row, each item's tokens laid out by `data.plans.item_tokens`, the
same function training's `plans.tokenize` uses (markers, one shared position per image, the
split counter). A prompt comes in as a whole plan layout (`BlockBuilder.layout` of
`data.plans.lay_out`, the function `tokenize` is built from; infer/runner.py). Shapes are
bucketed to powers of two so a handful of compilations serve every prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax.batch import MODE_CAUSAL, TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT
from unimedvl_jax.data import images as imlib
from unimedvl_jax.data import plans
from unimedvl_jax.data.plans import Specials
from unimedvl_jax.infer.kv_cache import ContextError


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
  kind: list = dataclasses.field(default_factory=list)     # per token: batch.TOKEN_* type
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
      b.layout(row, items, plans.lay_out(items, ...), payloads)   # a laid-out plan (prompts)
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
    """Token ids as given (no markers), causal, consecutive positions: decoded tokens continuing
    the row's open text item (new_split=False) or a text piece of their own."""
    row = self._check_row(r)
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
      return self
    s = row.n_splits if new_split else row.n_splits - 1
    for i in ids:
      row.kind.append(TOKEN_TEXT)
      row.ids.append(i)
      row.split.append(s)
      row.mode.append(mode)
      row.pos.append(row.pos_adv)
      row.pos_adv += 1
    if new_split:
      row.n_splits += 1
    return self

  def _item(self, r: int, tok: plans.ItemTokens):
    """Appends one item's tokens (data.plans.item_tokens) as the row's next split."""
    row = self._check_row(r)
    m = tok.ids.size
    row.kind += tok.token_type.tolist()
    row.ids += tok.ids.tolist()
    row.split += [row.n_splits] * m
    row.mode += [tok.mode] * m
    row.pos += tok.positions.tolist()
    row.n_splits += 1
    row.pos_adv += tok.advance
    return self

  def text(self, r: int, ids):
    """`<|im_start|>` + ids + `<|im_end|>` (SPEC 3: one text item)."""
    row = self._check_row(r)
    return self._item(r, plans.item_tokens('text', self.sp, row.pos_adv, ids=ids))

  def _check_vae(self, tokens, grid) -> np.ndarray:
    gh, gw = grid
    tokens = np.asarray(tokens, np.float32)
    if tokens.shape != (gh * gw, self.latent_dim):
      raise ContextError(f'VAE tokens of shape {tokens.shape}, expected {(gh * gw, self.latent_dim)}'
                         f' for a {gh}x{gw} latent grid')
    if gh > self.latent_grid or gw > self.latent_grid:
      raise ContextError(f'a {gh}x{gw} latent grid exceeds model.max_latent_size '
                         f'({self.latent_grid}): image too large')
    return tokens

  def _check_vit(self, patches, grid) -> np.ndarray:
    nh, nw = grid
    patches = np.asarray(patches, np.float32)
    if patches.ndim != 2 or patches.shape[0] != nh * nw:
      raise ContextError(f'ViT patches of shape {patches.shape}, expected ({nh * nw}, K)')
    if nh > self.vit_grid or nw > self.vit_grid:
      raise ContextError(f'a {nh}x{nw} ViT patch grid exceeds model.vit.grid_size '
                         f'({self.vit_grid}): image too large')
    if self.vit_dim and patches.shape[1] != self.vit_dim:
      raise ContextError(f'ViT patch width {patches.shape[1]}, expected {self.vit_dim}')
    return patches

  def vae_image(self, r: int, tokens, grid, *, t: float = 0.0, noised: bool = False):
    """A VAE image item: latent tokens [gh*gw, 64] of a (gh, gw) grid, at timestep t (0: a clean
    condition, full; noised: the target being generated, see noise_image)."""
    tokens = self._check_vae(tokens, grid)
    row = self._check_row(r)
    tok = plans.item_tokens('vae', self.sp, row.pos_adv, grid=tuple(grid), noised=noised,
                            pos_grid=self.latent_grid)
    row.lat.append((tokens, np.full((tokens.shape[0],), t, np.float32), tok.pos_ids))
    return self._item(r, tok)

  def noise_image(self, r: int, x, grid, t: float = 1.0):
    """The noised target being generated: mode noise, at the current position, no advance."""
    return self.vae_image(r, x, grid, t=t, noised=True)

  def vit_image(self, r: int, patches, grid):
    """A ViT image item: patches [nh*nw, K] ((row, col, channel) flattening) of a (nh, nw) grid."""
    patches = self._check_vit(patches, grid)
    row = self._check_row(r)
    tok = plans.item_tokens('vit', self.sp, row.pos_adv, grid=tuple(grid), pos_grid=self.vit_grid)
    row.vit.append((patches, tok.pos_ids))
    return self._item(r, tok)

  def layout(self, r: int, items, lay: plans.Layout, payloads, start: int = 0,
             stop: int | None = None):
    """Appends the segments [start:stop] of `lay` = `data.plans.lay_out(items, ...)` (the layout
    training's `tokenize` is built from) to row r: each item's ids, token kinds, mode and
    positions exactly as laid out, the positions shifted to the row's counter, one split each.
    payloads[i]: the data of items[i]: ViT patches [k, K] (float, [-1, 1]) or clean VAE latent
    tokens [k, D] (a prompt holds no noised target); None for text."""
    row = self._check_row(r)
    segs = lay.segments[start:stop]
    if not segs:
      return self
    after = start + len(segs)
    base = int(segs[0].tokens.positions[0])   # an item's first token sits at the counter before it
    end = lay.end if after >= len(lay.segments) else int(lay.segments[after].tokens.positions[0])
    pos0 = row.pos_adv
    for i, _, tok in segs:
      it = items[i]
      if it.kind != 'text':
        stride = self.vit_grid if it.kind == 'vit' else self.latent_grid
        if not np.array_equal(tok.pos_ids, plans.grid_pos_ids(*it.grid, stride)):
          raise ContextError(f'the layout of a {it.kind} item was made with another position '
                             f'grid than the model\'s ({stride})')
      if it.kind == 'vit':
        row.vit.append((self._check_vit(payloads[i], it.grid), tok.pos_ids))
      elif it.kind == 'vae':
        if it.noised:
          raise ContextError('a prompt holds no noised VAE item (the target is generated)')
        lat = self._check_vae(payloads[i], it.grid)
        row.lat.append((lat, np.zeros((lat.shape[0],), np.float32), tok.pos_ids))
      self._item(r, tok._replace(positions=tok.positions - base + pos0))
    row.pos_adv = pos0 + end - base
    return self

  def tokens(self, r: int) -> dict:
    """Row r's tokens so far, in sequence order, as the TokenSample fields of training's
    `plans.tokenize` (positions and split ids relative to the row's start)."""
    row = self._check_row(r)
    arr = lambda x: np.asarray(x, np.int32)
    return dict(input_ids=arr(row.ids), token_type=arr(row.kind), positions=arr(row.pos),
                split=arr(row.split), modes=arr(row.mode))

  def counts(self):
    nU = max((sum(k != TOKEN_VAE for k in r.kind) for r in self.rows), default=0)
    nG = max((sum(k == TOKEN_VAE for k in r.kind) for r in self.rows), default=0)
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
      und = [i for i, k in enumerate(row.kind) if k != TOKEN_VAE]
      gen = [i for i, k in enumerate(row.kind) if k == TOKEN_VAE]
      pad = list(range(m, n))
      n_und_pad = nU - len(und)
      a['und_seq'][b] = und + pad[:n_und_pad]
      a['gen_seq'][b] = gen + pad[n_und_pad:]
      a['und_ids'][b, :len(und)] = [row.ids[i] for i in und]
      # ViT patches -> und-stream slots, in order of appearance
      vit_slots = [j for j, i in enumerate(und) if row.kind[i] == TOKEN_VIT]
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



def make_builder(model, batch_size: int, specials: Specials) -> BlockBuilder:
  """A BlockBuilder with the model's grids and token widths."""
  vit_grid = model.vit.embeddings.position_embedding.shape[0] if getattr(model, 'has_vit', False) else 1
  vit_grid = int(round(vit_grid ** 0.5))
  vit_dim = (int(model.vit.embeddings.patch_embedding.kernel.shape[0])
             if getattr(model, 'has_vit', False) else 0)
  latent_grid = (int(model.latent_pos_embed.grid) if getattr(model, 'has_vae', False) else 1)
  return BlockBuilder(batch_size, specials, latent_grid=latent_grid, vit_grid=vit_grid,
                      latent_dim=model.latent_patch ** 2 * model.latent_channels, vit_dim=vit_dim)



def vit_patches(pixels: np.ndarray, patch: int):
  """[H, W, 3] float in [-1, 1] (H, W multiples of patch) -> (patches [nh*nw, 3*p*p], (nh, nw)),
  the layout of training's patches (data.images.vit_patchify)."""
  x = np.asarray(pixels, np.float32)
  H, W = x.shape[:2]
  if H % patch or W % patch:
    raise ContextError(f'ViT image {H}x{W} is not a multiple of the patch size {patch}')
  p, nh, nw = imlib.vit_patchify(x, patch)
  return p, (nh, nw)
