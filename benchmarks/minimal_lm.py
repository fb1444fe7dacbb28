"""A minimal pure-JAX dense decoder LM: the 'plain XLA' contestant of the side-by-side benchmark.

Qwen2-shaped (RMSNorm, q/k/v with bias, GQA, RoPE rotate_half, SwiGLU, untied lm_head), written
the way a careful JAX user would write it in one file: stacked layer weights under `lax.scan`,
bf16 x bf16 -> f32 dots, head-major [B, H, T, D] attention with a dense causal mask, optax
AdamW. Nothing of the project is imported: it is the yardstick for the project's own overhead.

    step, state, batch = build(dims, dtype='bfloat16', seed=0)
    state, loss = step(state, batch)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Dims:
  vocab: int = 8192
  hidden: int = 512
  layers: int = 8
  heads: int = 8
  kv_heads: int = 2
  head_dim: int = 64
  intermediate: int = 1408
  batch: int = 2
  seq: int = 1024
  rope_theta: float = 10000.0
  eps: float = 1e-6


def init_params(d: Dims, seed: int = 0) -> dict:
  k = iter(jax.random.split(jax.random.key(seed), 16))
  n = lambda shape: 0.02 * jax.random.normal(next(k), shape, jnp.float32)
  H, Q, KV, I, Lr = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.intermediate, d.layers
  return {
      'embed': n((d.vocab, H)), 'lm_head': n((H, d.vocab)), 'norm': jnp.ones((H,)),
      'layers': {
          'ln1': jnp.ones((Lr, H)), 'ln2': jnp.ones((Lr, H)),
          'wq': n((Lr, H, Q)), 'bq': jnp.zeros((Lr, Q)), 'wk': n((Lr, H, KV)), 'bk': jnp.zeros((Lr, KV)),
          'wv': n((Lr, H, KV)), 'bv': jnp.zeros((Lr, KV)), 'wo': n((Lr, Q, H)),
          'wg': n((Lr, H, I)), 'wu': n((Lr, H, I)), 'wd': n((Lr, I, H)),
      },
  }


def build(d: Dims, dtype: str = 'bfloat16', seed: int = 0):
  cdt = jnp.dtype(dtype)
  f32 = jnp.float32

  def dot(x, w):
    return jnp.dot(x.astype(cdt), w.astype(cdt), preferred_element_type=f32).astype(cdt)

  def rms(x, w):
    xf = x.astype(f32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + d.eps)
    return w.astype(cdt) * y.astype(cdt)

  inv = 1.0 / (d.rope_theta ** (np.arange(0, d.head_dim, 2) / d.head_dim))
  fr = np.arange(d.seq)[:, None] * inv[None]
  emb = np.concatenate([fr, fr], -1)
  cos, sin = jnp.asarray(np.cos(emb), cdt), jnp.asarray(np.sin(emb), cdt)   # [T, D]

  def rope(x):   # [B, H, T, D]
    h = d.head_dim // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin

  causal = jnp.tril(jnp.ones((d.seq, d.seq), bool))
  G = d.heads // d.kv_heads

  def layer(x, p):
    B, T, _ = x.shape
    h = rms(x, p['ln1'])
    q = (dot(h, p['wq']) + p['bq'].astype(cdt)).reshape(B, T, d.kv_heads, G, d.head_dim)
    k = (dot(h, p['wk']) + p['bk'].astype(cdt)).reshape(B, T, d.kv_heads, d.head_dim)
    v = (dot(h, p['wv']) + p['bv'].astype(cdt)).reshape(B, T, d.kv_heads, d.head_dim)
    q = rope(q.transpose(0, 2, 3, 1, 4).reshape(B, d.heads, T, d.head_dim))
    k = rope(k.transpose(0, 2, 1, 3))
    v = v.transpose(0, 2, 1, 3)
    q = q.reshape(B, d.kv_heads, G, T, d.head_dim)
    s = jnp.einsum('bhgqd,bhkd->bhgqk', q, k, preferred_element_type=f32) * d.head_dim ** -0.5
    s = jnp.where(causal, s, -1e30)
    pr = jax.nn.softmax(s, axis=-1).astype(cdt)
    o = jnp.einsum('bhgqk,bhkd->bhgqd', pr, v, preferred_element_type=f32).astype(cdt)
    o = o.reshape(B, d.heads, T, d.head_dim).transpose(0, 2, 1, 3).reshape(B, T, -1)
    x = x + dot(o, p['wo'])
    h = rms(x, p['ln2'])
    x = x + dot(jax.nn.silu(dot(h, p['wg'])) * dot(h, p['wu']), p['wd'])
    return x, None

  def loss_fn(params, ids, labels):
    x = jnp.take(params['embed'], ids, axis=0).astype(cdt)
    x, _ = jax.lax.scan(layer, x, params['layers'])
    h = rms(x, params['norm'])
    logits = jnp.dot(h.astype(cdt), params['lm_head'].astype(cdt), preferred_element_type=f32)
    lse = jax.nn.logsumexp(logits, -1)
    tgt = jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return jnp.mean(lse - tgt)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-15,
                                                                weight_decay=0.0))

  @jax.jit
  def init():
    p = init_params(d, seed)
    return {'params': p, 'opt': tx.init(p)}

  @jax.jit
  def step(state, batch):
    loss, g = jax.value_and_grad(loss_fn)(state['params'], batch['ids'], batch['labels'])
    upd, opt = tx.update(g, state['opt'], state['params'])
    return {'params': optax.apply_updates(state['params'], upd), 'opt': opt}, loss

  step = jax.jit(step.__wrapped__ if hasattr(step, '__wrapped__') else step, donate_argnums=(0,))
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, d.vocab, (d.batch, d.seq + 1)).astype(np.int32)
  batch = {'ids': jnp.asarray(ids[:, :-1]), 'labels': jnp.asarray(ids[:, 1:])}
  return step, init(), batch


def flops_per_step(d: Dims) -> float:
  """Analytic training FLOPs (3x forward; causal attention counted by allowed pairs)."""
  H, Q, KV, I = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.intermediate
  tok = d.batch * d.seq
  layer = 2.0 * tok * (H * Q + 2 * H * KV + Q * H + 3 * H * I)
  attn = 4.0 * d.head_dim * d.heads * d.batch * d.seq * (d.seq + 1) / 2
  head = 2.0 * tok * H * d.vocab
  return 3.0 * (d.layers * (layer + attn) + head)
