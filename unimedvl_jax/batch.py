"""The packed batch: the one contract between `data/` and `model/` (see DESIGN.md, "The data path").

`Geometry` holds every static budget of a pack (derived from the config once); `batch_spec`
derives from it the name, shape and dtype of every array, and nothing else describes the batch:
the packer allocates from it, the train step's shardings and the AOT plans are built from it.
Every array has a leading batch dim B (packs per step) and a static size, so one compiled step
serves every batch. Shapes use:
  T = data.seq_len              tokens per pack, in sequence order
  L = data.max_latent_tokens    generation-expert tokens (VAE latents) per pack
  U = T - L                     understanding-expert tokens per pack (text, markers, ViT, padding)
  C = data.max_label_tokens     CE targets per pack (0 in the config: C = U)
  P = data.max_vit_patches      ViT patches per pack
  N = data.max_vae_images       VAE images per pack (conditions and targets)
  K = 3 * vit.patch_size**2     one flattened ViT patch, (row, col, channel) order, channel fastest
  D = latent_patch_size**2 * vae.z_channels   one latent token

Token-level arrays, sequence order [B, T] (int32 unless noted):
  input_ids     text / marker token id; 0 at ViT and VAE token positions and at padding
  segment_ids   sample index in the pack, 1..n; 0 = padding (sees nothing, seen by nothing)
  split_ids     item index inside the pack, non-decreasing along the sequence
  split_modes   0 causal (text), 1 full (ViT image, clean VAE image), 2 noise (noised VAE target)
  positions     RoPE position (restarts at 0 per sample; every token of an image item shares one)
  token_type    0 padding, 1 text or marker, 2 ViT patch, 3 VAE latent
  label_ids     next-token target at positions with loss; 0 elsewhere
  loss_mask     float32, 1.0 where label_ids is a CE target
  label_pos     [B, C] the sequence positions with loss_mask 1, ascending, then T (padding): the
                model runs lm_head and the softmax on these rows only (the reference's
                `ce_loss_indexes`)

Expert routing (MoT, design (a) of DESIGN.md): together und_idx and gen_idx are a permutation of
range(T). Both are sorted ascending within their real entries; padding entries point at padding
positions.
  und_idx       [B, U]  sequence positions run by the understanding expert
  gen_idx       [B, L]  sequence positions run by the generation expert: exactly the VAE latent
                        tokens, in the order of the latent arrays below

ViT patches [B, P]:
  vit_patches      uint8 [B, P, K], raw pixel values (the model scales them to [-1, 1])
  vit_segment_ids  image index in the pack, 1..; 0 = padding patch
  vit_pos_ids      row * vit.grid_size + col of the patch in its image
  vit_token_idx    sequence position of the patch's token; T for padding patches (dropped)

Latent tokens [B, L] (the generation stream, in gen_idx order):
  latent_mask     float32, 1.0 for a real latent token
  latent_image    image index in the pack (0..N-1): tokens of one image share its timestep
  latent_pos_ids  row * model.max_latent_size + col (latent position table)
  latent_noised   float32, 1.0 where the token belongs to a noised target (MSE target)
  vae_image_noised  int32 [B, N] per image of the pack: 1 noised target, 0 clean (or no image);
                  N timesteps are drawn per pack, one per image

Their clean latents come from ONE of two sources (Geometry.latent_cache):
- pixels, encoded by the frozen VAE in the step, each image at its own size: images are grouped
  in size buckets (data.vae_buckets: (h, w, n) = n slots of exactly h x w pixels), never padded:
    vae_{h}x{w}        uint8 [B, n, h, w, 3] raw pixels
    vae_{h}x{w}_image  int32 [B, n] image index in the pack of each slot; -1 = empty slot
    latent_src         int32 [B, L] row of the token in the concatenation, over the buckets in
                       order, of each bucket's slots' tokens (slot-major, then row-major patches)
- the latent cache (data.latent_cache, written by `python -m unimedvl_jax.data cache-latents`):
    latent_mean, latent_logvar   float32 [B, L, D] the VAE posterior's moments (unscaled) of
                       each token; the step samples z = mean + exp(logvar / 2) * noise exactly
                       as it does after encoding pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

TOKEN_PAD, TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE = 0, 1, 2, 3
MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2


def allowed(q_seg, q_split, q_mode, q_idx, k_seg, k_split, k_mode, k_idx):
  """The attention rule of SPEC section 3, elementwise and broadcasting (numpy or jax arrays).

  A query in split a may see a key in split b iff they are in the same (non-padding) sample, and
  b < a, or b == a and (the split is full/noise, or the key is not after the query), and the
  key's split is not a noised image other than the query's own. *_idx are sequence indices (for
  causality). Written once: the dense mask, the blocked and Pallas kernels (per block), the
  KV-cache decode and the FLOPs counter all use it."""
  same = (q_seg == k_seg) & (q_seg != 0)
  earlier = k_split < q_split
  same_split = k_split == q_split
  inside = same_split & ((q_mode != MODE_CAUSAL) | (k_idx <= q_idx))
  hidden_noise = (k_mode == MODE_NOISE) & ~same_split
  return same & (earlier | inside) & ~hidden_noise


def latent_cache_path(data_cfg) -> str:
  """data.latent_cache as a directory, '' for none. 'auto' is resolved by the train loop (to
  WORKDIR/latent_cache, per stage); anywhere else (a bare iterator, `pack_samples`, AOT) it means
  no cache: VAE images are encoded from pixels."""
  v = data_cfg.get('latent_cache', '') or ''
  return '' if v == 'auto' else str(v)


def vae_downsample(cfg_model) -> int:
  """Pixels per latent cell of the VAE side: 2 ** (number of resolution levels - 1)."""
  return 2 ** (len(tuple(cfg_model.vae.channel_mult)) - 1)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The static budgets of one pack and the image rules that produce its items."""
  T: int                 # tokens per pack
  L: int                 # latent (generation-expert) tokens per pack
  P: int                 # ViT patches per pack
  N: int                 # VAE images per pack
  vit_patch: int
  vit_grid: int
  latent_px: int         # pixels per latent token side (VAE downsampling * latent_patch_size)
  max_latent_size: int
  C: int = 0             # CE targets per pack; 0 -> U
  buckets: tuple = ()    # ((h, w, n), ...) VAE pixel slots; () -> ((vae_max, vae_max, N),)
  latent_cache: bool = False   # clean latents come as cached moments instead of pixels
  latent_dim: int = 64   # D: latent_patch_size**2 * z_channels
  vit_max_size: int = 980
  vit_min_size: int = 378
  vit_max_pixels: int | None = None
  vae_max_size: int = 1024
  vae_min_size: int = 512
  max_sample_tokens: int = 1 << 30

  @property
  def U(self) -> int:
    return self.T - self.L

  @property
  def labels(self) -> int:
    """C, the CE target budget per pack."""
    return self.C if self.C > 0 else self.U

  @property
  def K(self) -> int:
    return 3 * self.vit_patch ** 2

  @property
  def vae_buckets(self) -> tuple:
    """((h, w, n), ...): pixel slots per pack by exact image size (used without a cache)."""
    if self.buckets:   # ordered by (h, w): the order of the latent_src table
      return tuple(sorted(tuple(int(x) for x in b) for b in self.buckets))
    return ((self.vae_max_size, self.vae_max_size, self.N),)

  @property
  def vit_rule(self) -> dict:
    """The ViT resize rule: keyword arguments of data.images.target_size (training and
    inference resize by it)."""
    return dict(max_size=self.vit_max_size, min_size=self.vit_min_size, stride=self.vit_patch,
                max_pixels=self.vit_max_pixels)

  @property
  def vae_rule(self) -> dict:
    """The VAE resize rule: keyword arguments of data.images.target_size."""
    return dict(max_size=self.vae_max_size, min_size=self.vae_min_size, stride=self.latent_px)

  def bucket_tokens(self, h: int, w: int) -> int:
    return (h // self.latent_px) * (w // self.latent_px)

  def bucket_offsets(self) -> list[int]:
    """Row offset of each bucket in the concatenated latent-token table (see latent_src)."""
    out, o = [], 0
    for h, w, n in self.vae_buckets:
      out.append(o)
      o += n * self.bucket_tokens(h, w)
    return out

  def bucket_index(self, h: int, w: int) -> int | None:
    for j, (bh, bw, _) in enumerate(self.vae_buckets):
      if (bh, bw) == (h, w):
        return j
    return None

  @classmethod
  def from_config(cls, cfg) -> 'Geometry':
    d, m = cfg.data, cfg.model
    f = vae_downsample(m)
    return cls(T=d.seq_len, L=d.max_latent_tokens, P=d.max_vit_patches, N=d.max_vae_images,
               vit_patch=m.vit.patch_size, vit_grid=m.vit.grid_size,
               latent_px=f * m.latent_patch_size, max_latent_size=m.max_latent_size,
               C=int(d.get('max_label_tokens', 0)),
               buckets=tuple(tuple(b) for b in d.get('vae_buckets', ())),
               latent_cache=bool(latent_cache_path(d)),
               latent_dim=m.latent_patch_size ** 2 * m.vae.z_channels,
               vit_max_size=d.vit_max_size, vit_min_size=d.vit_min_size,
               vit_max_pixels=d.vit_max_pixels or None, vae_max_size=d.vae_max_size,
               vae_min_size=d.vae_min_size, max_sample_tokens=d.max_sample_tokens)


def bucket_key(h: int, w: int) -> str:
  return f'vae_{h}x{w}'


def batch_spec(cfg_or_geom, batch_size: int | None = None
               ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (shape, dtype) of every array of a packed batch.

  `cfg_or_geom`: a config (B = data.batch_size) or a Geometry (then pass batch_size)."""
  if isinstance(cfg_or_geom, Geometry):
    g = cfg_or_geom
    if batch_size is None:
      raise ValueError('batch_spec(Geometry) needs batch_size')
    B = batch_size
  else:
    g = Geometry.from_config(cfg_or_geom)
    B = cfg_or_geom.data.batch_size if batch_size is None else batch_size
  T, L, U, C, P, K, D = g.T, g.L, g.U, g.labels, g.P, g.K, g.latent_dim
  i32, f32, u8 = np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.uint8)
  spec = {
      'input_ids': ((B, T), i32),
      'segment_ids': ((B, T), i32),
      'split_ids': ((B, T), i32),
      'split_modes': ((B, T), i32),
      'positions': ((B, T), i32),
      'token_type': ((B, T), i32),
      'label_ids': ((B, T), i32),
      'loss_mask': ((B, T), f32),
      'label_pos': ((B, C), i32),
      'und_idx': ((B, U), i32),
      'gen_idx': ((B, L), i32),
      'vit_patches': ((B, P, K), u8),
      'vit_segment_ids': ((B, P), i32),
      'vit_pos_ids': ((B, P), i32),
      'vit_token_idx': ((B, P), i32),
      'latent_mask': ((B, L), f32),
      'latent_image': ((B, L), i32),
      'latent_pos_ids': ((B, L), i32),
      'latent_noised': ((B, L), f32),
      'vae_image_noised': ((B, g.N), i32),
  }
  if g.latent_cache:
    spec['latent_mean'] = ((B, L, D), f32)
    spec['latent_logvar'] = ((B, L, D), f32)
  else:
    for h, w, n in g.vae_buckets:
      spec[bucket_key(h, w)] = ((B, n, h, w, 3), u8)
      spec[bucket_key(h, w) + '_image'] = ((B, n), i32)
    spec['latent_src'] = ((B, L), i32)
  return spec


def check_batch(batch: Mapping[str, np.ndarray], cfg) -> None:
  """Raises ValueError naming every missing, extra or mis-shaped field."""
  spec = batch_spec(cfg)
  problems = []
  for k, (shape, dtype) in spec.items():
    if k not in batch:
      problems.append(f'missing {k!r} (expected {shape} {dtype})')
      continue
    a = batch[k]
    if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
      problems.append(f'{k!r}: got {tuple(a.shape)} {a.dtype}, expected {shape} {dtype}')
  extra = sorted(set(batch) - set(spec))
  if extra:
    problems.append(f'unexpected fields {extra}')
  if problems:
    raise ValueError('packed batch does not match the config: ' + '; '.join(problems))


def empty_batch(cfg_or_geom, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """An all-padding batch of the right shapes (every token padding; permutation valid)."""
  spec = batch_spec(cfg_or_geom, batch_size)
  out = {k: np.zeros(s, dt) for k, (s, dt) in spec.items()}
  B, T = out['segment_ids'].shape
  L = out['gen_idx'].shape[1]
  perm = np.arange(T, dtype=np.int32)
  out['und_idx'][:] = perm[:T - L]
  out['gen_idx'][:] = perm[T - L:]
  out['vit_token_idx'][:] = T
  out['label_pos'][:] = T
  for k in out:
    if k.startswith('vae_') and k.endswith('_image') and k != 'vae_image_noised':
      out[k][:] = -1
  return out


zeros_batch = empty_batch


def fill_label_pos(batch: dict) -> dict:
  """Writes `label_pos` from `loss_mask` (in place; for hand-built batches). Raises ValueError
  if a pack has more CE targets than the label budget C."""
  lm = np.asarray(batch['loss_mask'])
  B, T = lm.shape
  C = batch['label_pos'].shape[1]
  for b in range(B):
    pos = np.flatnonzero(lm[b] > 0)
    if pos.size > C:
      raise ValueError(f'pack {b} has {pos.size} CE targets > data.max_label_tokens ({C})')
    batch['label_pos'][b, :pos.size] = pos
    batch['label_pos'][b, pos.size:] = T
  return batch
