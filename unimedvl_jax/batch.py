"""The packed batch: the one contract between `data/` and `model/` (see DESIGN.md, "The data path").

Every array has a leading batch dim B (packs per step) and a static size fixed by the config, so one
compiled step serves every batch. Shapes use:
  T = data.seq_len              tokens per pack, in sequence order
  L = data.max_latent_tokens    generation-expert tokens (VAE latents) per pack
  U = T - L                     understanding-expert tokens per pack (text, markers, ViT, padding)
  P = data.max_vit_patches      ViT patches per pack
  N = data.max_vae_images       VAE image slots per pack
  S = data.vae_buffer_size      VAE pixel buffer side per slot
  K = 3 * vit.patch_size**2     one flattened ViT patch, (row, col, channel) order, channel fastest

Token-level arrays, sequence order [B, T] (int32 unless noted):
  input_ids     text / marker token id; 0 at ViT and VAE token positions and at padding
  segment_ids   sample index in the pack, 1..n; 0 = padding (sees nothing, seen by nothing)
  split_ids     item index inside the pack, non-decreasing along the sequence
  split_modes   0 causal (text), 1 full (ViT image, clean VAE image), 2 noise (noised VAE target)
  positions     RoPE position (restarts at 0 per sample; every token of an image item shares one)
  token_type    0 padding, 1 text or marker, 2 ViT patch, 3 VAE latent
  label_ids     next-token target at positions with loss; 0 elsewhere
  loss_mask     float32, 1.0 where label_ids is a CE target

Expert routing (MoT, design (a) of DESIGN.md): together und_idx and gen_idx are a permutation of
range(T). Both are sorted ascending within their real entries; padding entries point at padding
positions.
  und_idx       [B, U]  sequence positions run by the understanding expert
  gen_idx       [B, L]  sequence positions run by the generation expert: exactly the VAE latent
                        tokens, in the order of the latent arrays below

ViT patches [B, P]:
  vit_patches      float32 [B, P, K], pixels scaled to [-1, 1]
  vit_segment_ids  image index in the pack, 1..; 0 = padding patch
  vit_pos_ids      row * vit.grid_size + col of the patch in its image
  vit_token_idx    sequence position of the patch's token; T for padding patches (dropped)

VAE images and latent tokens:
  vae_images        float32 [B, N, S, S, 3], pixels in [-1, 1], each image at the top-left
  vae_image_noised  int32 [B, N], 1 if the slot is a noised target (gets t ~ sigmoid(N(0,1)))
  latent_mask       float32 [B, L], 1.0 for a real latent token
  latent_image      [B, L]  slot index (0..N-1) of the token's image
  latent_patch      [B, L]  index of the token's 2x2 latent patch in the slot's full buffer grid:
                            row * (S // 16) + col
  latent_pos_ids    [B, L]  row * model.max_latent_size + col (latent position table)
  latent_noised     float32 [B, L], 1.0 where the token belongs to a noised target (MSE target)
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

TOKEN_PAD, TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE = 0, 1, 2, 3
MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2


def batch_spec(cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (shape, dtype) of every array of a packed batch for the config `cfg`."""
  d, m = cfg.data, cfg.model
  B, T, L, P, N, S = (d.batch_size, d.seq_len, d.max_latent_tokens, d.max_vit_patches,
                      d.max_vae_images, d.vae_buffer_size)
  U = T - L
  K = 3 * m.vit.patch_size ** 2
  i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
  spec = {
      'input_ids': ((B, T), i32),
      'segment_ids': ((B, T), i32),
      'split_ids': ((B, T), i32),
      'split_modes': ((B, T), i32),
      'positions': ((B, T), i32),
      'token_type': ((B, T), i32),
      'label_ids': ((B, T), i32),
      'loss_mask': ((B, T), f32),
      'und_idx': ((B, U), i32),
      'gen_idx': ((B, L), i32),
      'vit_patches': ((B, P, K), f32),
      'vit_segment_ids': ((B, P), i32),
      'vit_pos_ids': ((B, P), i32),
      'vit_token_idx': ((B, P), i32),
      'vae_images': ((B, N, S, S, 3), f32),
      'vae_image_noised': ((B, N), i32),
      'latent_mask': ((B, L), f32),
      'latent_image': ((B, L), i32),
      'latent_patch': ((B, L), i32),
      'latent_pos_ids': ((B, L), i32),
      'latent_noised': ((B, L), f32),
  }
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


def zeros_batch(cfg) -> dict[str, np.ndarray]:
  """An all-padding batch of the right shapes (every token padding; permutation valid)."""
  out = {k: np.zeros(s, dt) for k, (s, dt) in batch_spec(cfg).items()}
  B, T = cfg.data.batch_size, cfg.data.seq_len
  L = cfg.data.max_latent_tokens
  perm = np.arange(T, dtype=np.int32)
  out['und_idx'][:] = perm[:T - L]
  out['gen_idx'][:] = perm[T - L:]
  out['vit_token_idx'][:] = T
  return out
