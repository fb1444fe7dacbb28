"""Shared helpers of the inference tests: a tiny random model and a full-recompute reference.

The reference builds the WHOLE sequence of a conversation (items in order) as one packed
sequence, runs the model's decoder with `packed_attend` (the reference XLA attention with the
dense `attention_mask`), and returns the logits / velocities at every position. It shares no code
with infer/context.py (index building, positions and splits are re-derived here from SPEC 3).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.config import load_config_file
from unimedvl_jax.infer.context import Specials
from unimedvl_jax.infer.random_init import random_model
from unimedvl_jax.model.unimedvl import UniMedVL, inverse_permutation, packed_attend

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
SPECIALS = Specials(3, 4, 5, 6)


def tiny_cfg(*overrides):
  return load_config_file(TINY, ['model.llm.num_layers=2', 'model.vit.num_layers=1',
                                 'model.init_std=0.1',
                                 *overrides])


_MODELS = {}


def tiny_model(*overrides, seed=0):
  """A random tiny model (float32), cached per (overrides, seed) within the test process.

  Built by `random_model` (no compile at init); llm2vae is random (non-zero velocities).
  """
  key = (overrides, seed)
  if key not in _MODELS:
    cfg = tiny_cfg(*overrides)
    _MODELS[key] = (cfg, random_model(cfg.model, seed, bias_std=0.02))
  return _MODELS[key]


def reference_forward(model, items, *, vit_patch=None):
  """items: list of ('text', ids) | ('raw', ids) | ('vit', patches, (nh, nw)) |
  ('vae', tokens, (gh, gw)) | ('noise', x, (gh, gw), t) for ONE conversation (B = 1).

  'text' adds <|im_start|>/<|im_end|> around ids; 'raw' is ids as they are, continuing a text
  split if the previous item was 'raw' with cont=True -- here every 'raw' item is its own split.
  Returns dict with 'logits' [n_und, V] in sequence order of und tokens, 'und_seq' (their
  sequence indices), 'velocity' [n_gen, 64] and 'gen_seq'.
  """
  sp = SPECIALS
  lg = int(model.latent_pos_embed.grid) if getattr(model, 'has_vae', False) else 1
  vg = (int(round(model.vit.embeddings.position_embedding.shape[0] ** 0.5))
        if getattr(model, 'has_vit', False) else 1)
  ids, kind, split, mode, pos = [], [], [], [], []
  vit_p, vit_pos, vit_tok = [], [], []
  lat_x, lat_t, lat_pos = [], [], []
  p = 0
  for s, it in enumerate(items):
    if it[0] in ('text', 'raw'):
      toks = list(it[1]) if it[0] == 'raw' else [sp.im_start, *it[1], sp.im_end]
      for tkn in toks:
        ids.append(int(tkn)); kind.append(0); split.append(s); mode.append(0); pos.append(p)
        p += 1
    else:
      grid = it[2]
      n = grid[0] * grid[1]
      md = {'vit': 1, 'vae': 1, 'noise': 2}[it[0]]
      k = 1 if it[0] == 'vit' else 2
      seq = [(0, sp.vision_start)] + [(k, 0)] * n + [(0, sp.vision_end)]
      rr, cc = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
      if it[0] == 'vit':
        start = len(ids) + 1
        vit_p.append(np.asarray(it[1], np.float32))
        vit_pos.append((rr * vg + cc).reshape(-1))
        vit_tok.append(np.arange(start, start + n))
      else:
        lat_x.append(np.asarray(it[1], np.float32))
        lat_t.append(np.full((n,), 0.0 if it[0] == 'vae' else it[3], np.float32))
        lat_pos.append((rr * lg + cc).reshape(-1))
      for kk, tkn in seq:
        ids.append(tkn); kind.append(kk); split.append(s); mode.append(md); pos.append(p)
      if it[0] != 'noise':
        p += 1
  T = len(ids)
  ids, kind = np.asarray(ids), np.asarray(kind)
  und = np.flatnonzero(kind != 2)
  gen = np.flatnonzero(kind == 2)
  pos = np.asarray(pos)
  a = dict(perm=np.concatenate([und, gen])[None], ids_und=ids[und][None],
           pos_und=pos[und][None], pos_gen=pos[gen][None],
           meta=np.stack([np.ones(T), split, mode])[:, None])
  a = {k: np.asarray(v, np.int32) for k, v in a.items()}
  if vit_p:
    a['vit_patches'] = np.concatenate(vit_p)[None]
    a['vit_seg'] = np.concatenate([np.full(len(x), i + 1) for i, x in enumerate(vit_pos)])[None]
    a['vit_pos'] = np.concatenate(vit_pos)[None]
    a['vit_dest'] = np.searchsorted(und, np.concatenate(vit_tok))
  if lat_x:
    a['lat_x'] = np.concatenate(lat_x)[None]
    a['lat_t'] = np.concatenate(lat_t)[None]
    a['lat_pos'] = np.concatenate(lat_pos)[None]
  graphdef, state = nnx.split(model)
  logits, vel = _reference_jit(graphdef, state, a)
  out = dict(logits=np.asarray(logits[0]), und_seq=und, gen_seq=gen)
  if lat_x:
    out['velocity'] = np.asarray(vel[0])
  return out


@functools.partial(jax.jit, static_argnums=(0,))
def _reference_jit(graphdef, state, a):
  model = nnx.merge(graphdef, state)
  perm = a['perm']
  inv = inverse_permutation(perm)
  U = a['ids_und'].shape[1]
  x_u = model.embed_text(a['ids_und'])
  if 'vit_patches' in a:
    vt = model.embed_vit(a['vit_patches'], a['vit_seg'].astype(jnp.int32),
                         a['vit_pos'].astype(jnp.int32))
    x_u = x_u.at[0, a['vit_dest']].set(vt[0].astype(x_u.dtype))
  if 'lat_x' in a:
    x_g = model.embed_latents(a['lat_x'], a['lat_t'], a['lat_pos'].astype(jnp.int32))
  else:
    x_g = jnp.zeros((1, 0, model.hidden_size), model.dtype)
  rope_u = model.rope(a['pos_und'])
  rope_g = model.rope(a['pos_gen'])
  meta = tuple(a['meta'][i] for i in range(3))
  attend = packed_attend(perm, inv, meta, U, 'xla')
  h_u, h_g, _ = model.decoder(x_u, x_g, rope_u, rope_g, attend)
  vel = model.velocity(h_g) if 'lat_x' in a else None
  return model.logits(h_u), vel
