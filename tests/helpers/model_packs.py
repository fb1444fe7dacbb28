"""A small hand-rolled packer for model tests (independent of unimedvl_jax.data).

Builds packs from item lists following SPEC section 3 literally, so model tests do not depend on
the data pipeline. Items: ('text', n_tokens, loss) | ('vit', rows, cols) | ('vae', rows, cols, noised).
"""

from __future__ import annotations

import numpy as np

from unimedvl_jax.batch import Geometry, bucket_key, fill_label_pos, zeros_batch

IM_START, IM_END, VS, VE = 3, 4, 5, 6   # arbitrary special ids for tests


def build_batch(cfg, samples_per_row, seed=0):
  """samples_per_row: list (len B) of lists of samples; a sample is a list of items."""
  rng = np.random.default_rng(seed)
  b = zeros_batch(cfg)
  d, m = cfg.data, cfg.model
  T, L = d.seq_len, d.max_latent_tokens
  p = m.vit.patch_size
  geom = Geometry.from_config(cfg)
  px = geom.latent_px
  offsets = geom.bucket_offsets()
  V = m.llm.vocab_size
  for r, samples in enumerate(samples_per_row):
    t = 0          # sequence cursor
    split = 0
    vit_cursor = 0
    vit_img = 0
    image = 0
    used = [0] * len(geom.vae_buckets)
    und, gen = [], []
    for s_i, sample in enumerate(samples):
      seg = s_i + 1
      pos = 0
      for item in sample:
        kind = item[0]
        if kind == 'text':
          n, loss = item[1], item[2]
          ids = rng.integers(10, V, size=n)
          toks = np.concatenate([[IM_START], ids, [IM_END]])
          sl = slice(t, t + len(toks))
          b['input_ids'][r, sl] = toks
          b['positions'][r, sl] = pos + np.arange(len(toks))
          b['split_modes'][r, sl] = 0
          b['token_type'][r, sl] = 1
          if loss:
            b['label_ids'][r, t:t + len(toks) - 1] = toks[1:]
            b['loss_mask'][r, t:t + len(toks) - 1] = 1.0
          pos += len(toks)
          und += list(range(t, t + len(toks)))
        elif kind == 'vit':
          rows, cols = item[1], item[2]
          n = rows * cols
          toks_n = n + 2
          sl = slice(t, t + toks_n)
          b['input_ids'][r, t] = VS
          b['input_ids'][r, t + toks_n - 1] = VE
          b['token_type'][r, sl] = 2
          b['token_type'][r, t] = b['token_type'][r, t + toks_n - 1] = 1
          b['positions'][r, sl] = pos
          b['split_modes'][r, sl] = 1
          vit_img += 1
          K = 3 * p * p
          b['vit_patches'][r, vit_cursor:vit_cursor + n] = rng.integers(0, 256, (n, K))
          b['vit_segment_ids'][r, vit_cursor:vit_cursor + n] = vit_img
          rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
          b['vit_pos_ids'][r, vit_cursor:vit_cursor + n] = (rr * m.vit.grid_size + cc).reshape(-1)
          b['vit_token_idx'][r, vit_cursor:vit_cursor + n] = np.arange(t + 1, t + 1 + n)
          vit_cursor += n
          pos += 1
          und += list(range(t, t + toks_n))
        elif kind == 'vae':
          rows, cols, noised = item[1], item[2], item[3]
          n = rows * cols
          toks_n = n + 2
          sl = slice(t, t + toks_n)
          b['input_ids'][r, t] = VS
          b['input_ids'][r, t + toks_n - 1] = VE
          b['token_type'][r, sl] = 3
          b['token_type'][r, t] = b['token_type'][r, t + toks_n - 1] = 1
          b['positions'][r, sl] = pos
          b['split_modes'][r, sl] = 2 if noised else 1
          h, w = rows * px, cols * px
          j = geom.bucket_index(h, w)
          assert j is not None, f'no data.vae_buckets entry for {h}x{w}'
          key = bucket_key(h, w)
          b[key][r, used[j]] = rng.integers(0, 256, (h, w, 3))
          b[key + '_image'][r, used[j]] = image
          b['vae_image_noised'][r, image] = int(noised)
          gi = len(gen)
          rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
          b['latent_mask'][r, gi:gi + n] = 1.0
          b['latent_image'][r, gi:gi + n] = image
          b['latent_src'][r, gi:gi + n] = offsets[j] + used[j] * n + np.arange(n)
          b['latent_pos_ids'][r, gi:gi + n] = (rr * m.max_latent_size + cc).reshape(-1)
          b['latent_noised'][r, gi:gi + n] = float(noised)
          used[j] += 1
          und += [t, t + toks_n - 1]
          gen += list(range(t + 1, t + 1 + n))
          image += 1
          if not noised:
            pos += 1
        else:
          raise ValueError(kind)
        b['segment_ids'][r, t:t + (toks_n if kind != 'text' else len(toks))] = seg
        b['split_ids'][r, t:t + (toks_n if kind != 'text' else len(toks))] = split
        t += toks_n if kind != 'text' else len(toks)
        split += 1
    assert t <= T and len(gen) <= L and vit_cursor <= d.max_vit_patches, (t, len(gen), vit_cursor)
    b['split_ids'][r, t:] = split       # padding: its own trailing split (non-decreasing)
    pad = list(range(t, T))
    n_gen_pad = L - len(gen)
    gen_all = gen + pad[:n_gen_pad]
    und_all = sorted(und + pad[n_gen_pad:])
    assert len(und_all) == T - L, (len(und_all), T - L)
    b['und_idx'][r] = und_all
    b['gen_idx'][r] = gen_all
  return fill_label_pos(b)


def mixed_samples():
  """Two samples exercising every mode: VQA-like and counterfactual-like."""
  return [
      [('text', 5, False), ('vit', 2, 3), ('text', 6, True)],
      [('text', 4, False), ('vae', 2, 2, False), ('vit', 2, 2), ('vae', 2, 2, True), ('text', 5, True)],
  ]
