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
import numpy as np
from flax import nnx

from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.infer.context import Specials
from unimedvl_jax.infer.random_init import random_model
from unimedvl_jax.model.unimedvl import inverse_permutation, packed_attend

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

  'text' adds <|im_start|>/<|im_end|> around ids; 'raw' is ids as they are (a generated text
  item: <|im_start|> ids <|im_end|>); every item is its own split. Returns dict with 'logits'
  [n_und, V] (understanding tokens in sequence order), 'und_seq' (their sequence indices),
  'velocity' [n_gen, 64] and 'gen_seq'.
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
  # Everything is padded to fixed sizes (padding tokens: segment 0, they see nothing and are
  # seen by nothing) so that one compilation serves every reference call of a test module.
  T = len(ids)
  ids, kind = np.asarray(ids), np.asarray(kind)
  und = list(np.flatnonzero(kind != 2))
  gen = list(np.flatnonzero(kind == 2))
  U_pad, L_pad = _pad_size(len(und), 64), _pad_size(len(gen), 16)
  pad = list(range(T, U_pad + L_pad))
  und_all = und + pad[:U_pad - len(und)]
  gen_all = gen + pad[U_pad - len(und):]
  n = U_pad + L_pad
  seq = lambda a, fill=0: np.concatenate([np.asarray(a), np.full(n - T, fill)])
  ids_s, pos_s = seq(ids), seq(pos)
  meta = np.stack([seq(np.ones(T)), seq(split, max(split) + 1), seq(mode)])
  a = dict(perm=np.asarray(und_all + gen_all)[None], ids_und=ids_s[und_all][None],
           pos_und=pos_s[und_all][None], pos_gen=pos_s[gen_all][None], meta=meta[:, None])
  a = {k: np.asarray(v, np.int32) for k, v in a.items()}
  K = 3 * (int(round((model.vit.embeddings.patch_embedding.kernel.shape[0] // 3) ** 0.5)) ** 2)
  P_pad = _pad_size(sum(len(x) for x in vit_pos), 32)
  npch = sum(len(x) for x in vit_pos)
  patches = np.zeros((P_pad, K), np.float32)
  vseg, vpos = np.zeros(P_pad, np.int32), np.zeros(P_pad, np.int32)
  vdest = np.full(P_pad, U_pad, np.int32)
  if vit_p:
    patches[:npch] = np.concatenate(vit_p)
    vseg[:npch] = np.concatenate([np.full(len(x), i + 1) for i, x in enumerate(vit_pos)])
    vpos[:npch] = np.concatenate(vit_pos)
    vdest[:npch] = np.searchsorted(np.asarray(und), np.concatenate(vit_tok))
  a.update(vit_patches=patches[None], vit_seg=vseg[None], vit_pos=vpos[None], vit_dest=vdest)
  nl = len(gen)
  lx, lt = np.zeros((L_pad, 64), np.float32), np.zeros(L_pad, np.float32)
  lp = np.zeros(L_pad, np.int32)
  if lat_x:
    lx[:nl], lt[:nl], lp[:nl] = (np.concatenate(lat_x), np.concatenate(lat_t),
                                 np.concatenate(lat_pos))
  a.update(lat_x=lx[None], lat_t=lt[None], lat_pos=lp[None])
  graphdef, state = nnx.split(model)
  logits, vel = _reference_jit(graphdef, state, a)
  out = dict(logits=np.asarray(logits[0, :len(und)]), und_seq=np.asarray(und),
             gen_seq=np.asarray(gen))
  if lat_x:
    out['velocity'] = np.asarray(vel[0, :nl])
  return out


def _pad_size(n, minimum):
  size = minimum
  while size < n:
    size *= 2
  return size


@functools.partial(jax.jit, static_argnums=(0,))
def _reference_jit(graphdef, state, a):
  model = nnx.merge(graphdef, state)
  perm = a['perm']
  inv = inverse_permutation(perm)
  U = a['ids_und'].shape[1]
  x_u = model.embed_text(a['ids_und'])
  vt = model.embed_vit(a['vit_patches'], a['vit_seg'], a['vit_pos'])
  x_u = x_u.at[0, a['vit_dest']].set(vt[0].astype(x_u.dtype), mode='drop')
  x_g = model.embed_latents(a['lat_x'], a['lat_t'], a['lat_pos'])
  rope_u = model.rope(a['pos_und'])
  rope_g = model.rope(a['pos_gen'])
  meta = tuple(a['meta'][i] for i in range(3))
  attend = packed_attend(perm, inv, meta, U, 'xla', 64)
  h_u, h_g, _ = model.decoder(x_u, x_g, rope_u, rope_g, attend)
  return model.logits(h_u), model.velocity(h_g)


class StubTokenizer:
  """A deterministic stand-in for data/tokenizer.py (ids 10.. from characters)."""
  im_start, im_end, vision_start, vision_end, pad_id = (SPECIALS.im_start, SPECIALS.im_end,
                                                        SPECIALS.vision_start,
                                                        SPECIALS.vision_end, 0)
  vocab_size = 1024
  path = '<stub>'

  def encode(self, text):
    return [10 + (ord(c) % 500) for c in text][:24]

  def decode(self, ids):
    return ' '.join(str(int(i)) for i in ids)
