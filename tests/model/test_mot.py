"""The MoT decoder (permuted expert streams) against a float64 numpy reference that runs BOTH
experts densely on every token and selects per token type, with the SPEC mask."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers.attention_rule import literal_rule
from tests.helpers.model_packs import build_batch, mixed_samples
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.model.decoder import MoTDecoder, Rope
from unimedvl_jax.model.layers import rope_cos_sin
from unimedvl_jax.model.unimedvl import inverse_permutation, packed_attend, _take_rows

import os
CFG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')


def np_rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def np_rope(x, pos, theta):
  D = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
  f = pos[:, None] * inv
  emb = np.concatenate([f, f], -1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
  rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
  return x * cos + rot * sin


def np_expert(p, x, pos, llm):
  """Returns (q, k, v) for all tokens with one expert's params p (dict of float64 arrays)."""
  T = x.shape[0]
  h = np_rms(x, p['input_layernorm']['weight'], llm.rms_norm_eps)
  q = (h @ p['q_proj']['kernel'] + p['q_proj']['bias']).reshape(T, llm.num_heads, llm.head_dim)
  k = (h @ p['k_proj']['kernel'] + p['k_proj']['bias']).reshape(T, llm.num_kv_heads, llm.head_dim)
  v = (h @ p['v_proj']['kernel'] + p['v_proj']['bias']).reshape(T, llm.num_kv_heads, llm.head_dim)
  q = np_rms(q, p['q_norm']['weight'], llm.rms_norm_eps)
  k = np_rms(k, p['k_norm']['weight'], llm.rms_norm_eps)
  return np_rope(q, pos, llm.rope_theta), np_rope(k, pos, llm.rope_theta), v


def np_attention(q, k, v, mask):
  T, Hq, D = q.shape
  G = Hq // k.shape[1]
  out = np.zeros_like(q)
  for h in range(Hq):
    lg = q[:, h] @ k[:, h // G].T / np.sqrt(D)
    lg = np.where(mask, lg, -np.inf)
    mx = np.max(lg, -1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    pr = np.where(mask, np.exp(lg - mx), 0)
    s = pr.sum(-1, keepdims=True)
    out[:, h] = (pr / np.where(s > 0, s, 1)) @ v[:, h // G]
  return out


def np_finish(p, x, a, llm):
  x = x + a.reshape(x.shape[0], -1) @ p['o_proj']['kernel']
  h = np_rms(x, p['post_attention_layernorm']['weight'], llm.rms_norm_eps)
  g = h @ p['mlp']['gate_proj']['kernel']
  u = h @ p['mlp']['up_proj']['kernel']
  return x + ((g / (1 + np.exp(-g))) * u) @ p['mlp']['down_proj']['kernel']


def test_mot_decoder_matches_dense_select_reference():
  cfg = load_config_file(CFG, ['model.llm.num_layers=2'])
  llm = cfg.model.llm
  dec = MoTDecoder(cfg.model, rngs=nnx.Rngs(3))
  # make the norms non-trivial
  st = nnx.state(dec, nnx.Param)
  key = jax.random.key(7)
  for path, v in nnx.to_flat_state(st):
    if 'norm' in str(path[-2]) or path[-2] in ('input_layernorm', 'post_attention_layernorm'):
      key, sub = jax.random.split(key)
      v[...] = 1.0 + 0.3 * jax.random.normal(sub, v.shape)
  b = build_batch(cfg, [mixed_samples(), mixed_samples()[::-1]], seed=1)
  B, T = b['input_ids'].shape
  U = b['und_idx'].shape[1]
  rng = np.random.default_rng(0)
  x_seq = rng.normal(size=(B, T, llm.hidden_size)).astype(np.float32)
  perm = jnp.asarray(np.concatenate([b['und_idx'], b['gen_idx']], 1))
  inv = inverse_permutation(perm)
  xs = _take_rows(jnp.asarray(x_seq), perm)
  pos = jnp.asarray(b['positions'])
  rope_u = Rope(*rope_cos_sin(_take_rows(pos, jnp.asarray(b['und_idx'])), llm.head_dim, llm.rope_theta))
  rope_g = Rope(*rope_cos_sin(_take_rows(pos, jnp.asarray(b['gen_idx'])), llm.head_dim, llm.rope_theta))
  meta = tuple(jnp.asarray(b[k]) for k in ('segment_ids', 'split_ids', 'split_modes'))
  attend = packed_attend(perm, inv, meta, U, 'xla')
  h_u, h_g, _ = dec(xs[:, :U], xs[:, U:], rope_u, rope_g, attend)
  h_seq = np.asarray(_take_rows(jnp.concatenate([h_u, h_g], 1), inv))

  params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(dec, nnx.Param)))
  for r in range(B):
    is_gen = np.zeros(T, bool)
    is_gen[b['gen_idx'][r]] = True
    mask = literal_rule(b['segment_ids'][r], b['split_ids'][r], b['split_modes'][r])
    x = x_seq[r].astype(np.float64)
    posr = b['positions'][r].astype(np.float64)
    for i in range(llm.num_layers):
      lp = jax.tree.map(lambda a: a[i], params['layers'])
      qu, ku, vu = np_expert(lp['und'], x, posr, llm)
      qg, kg, vg = np_expert(lp['gen'], x, posr, llm)
      sel = lambda a, g: np.where(is_gen[:, None, None], g, a)
      a = np_attention(sel(qu, qg), sel(ku, kg), sel(vu, vg), mask)
      x = np.where(is_gen[:, None], np_finish(lp['gen'], x, a, llm), np_finish(lp['und'], x, a, llm))
    ref = np.where(is_gen[:, None], np_rms(x, params['norm_moe_gen']['weight'], llm.rms_norm_eps),
                   np_rms(x, params['norm']['weight'], llm.rms_norm_eps))
    # compare real tokens only (padding rows are don't-care)
    real = b['segment_ids'][r] > 0
    np.testing.assert_allclose(h_seq[r][real], ref[real], rtol=2e-4, atol=2e-4)
