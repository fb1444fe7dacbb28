"""The Mixture-of-Transformers decoder (Qwen2.5 shape, two experts per layer).

Every layer owns two full sets of weights: `und` (text, markers, ViT tokens) and `gen` (VAE latent
tokens). Routing is by token type and never doubles FLOPs: the two experts run on two static-size
residual streams, x_u [B, U, H] and x_g [B, L, H] (design (a) of DESIGN.md); only q/k/v (into
sequence order) and the attention output (back into expert order) are permuted, because the ONE
shared attention works on the packed sequence so that kernels can skip blocks.

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan` (one compiled body),
each step optionally rematerialised with the configured policy.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.model.layers import Linear, RMSNorm, SwiGLU, apply_rope, to_dtype
from unimedvl_jax import sharding
from unimedvl_jax.model.scan import scan_layers, stack_layers

class Rope(NamedTuple):
  cos: jax.Array   # [B, n, D] float32
  sin: jax.Array


class Expert(nnx.Module):
  """One expert of one layer: attention projections + QK-norm + the two norms + SwiGLU MLP."""

  def __init__(self, llm, *, rngs: nnx.Rngs, dtype, param_dtype, init_std):
    H, D = llm.hidden_size, llm.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, init_std=init_std)
    self.num_heads, self.num_kv_heads, self.head_dim = llm.num_heads, llm.num_kv_heads, D
    self.q_proj = Linear(H, llm.num_heads * D, use_bias=True, axes=('embed', 'q_heads'),
                         head_dim=D, **kw)
    self.k_proj = Linear(H, llm.num_kv_heads * D, use_bias=True, axes=('embed', 'kv_heads'),
                         head_dim=D, **kw)
    self.v_proj = Linear(H, llm.num_kv_heads * D, use_bias=True, axes=('embed', 'kv_heads'),
                         head_dim=D, **kw)
    self.o_proj = Linear(llm.num_heads * D, H, use_bias=False, axes=('q_heads', 'embed'),
                         head_dim=D, **kw)
    nkw = dict(eps=llm.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
    self.qk_norm = bool(llm.qk_norm)
    if self.qk_norm:
      w0 = float(llm.get('qk_norm_init', 1.0))   # initial weight (a from-scratch model's knob)
      self.q_norm = RMSNorm(D, axis_name='head_dim', init=w0, **nkw)
      self.k_norm = RMSNorm(D, axis_name='head_dim', init=w0, **nkw)
    self.input_layernorm = RMSNorm(H, **nkw)
    self.post_attention_layernorm = RMSNorm(H, **nkw)
    self.mlp = SwiGLU(H, llm.intermediate_size, **kw)

  def qkv(self, x: jax.Array, rope: Rope):
    """x [B, n, H] -> q [B, n, Hq, D], k, v [B, n, Hkv, D]; QK-norm then RoPE (HF order)."""
    B, n, _ = x.shape
    h = self.input_layernorm(x)
    q = self.q_proj(h).reshape(B, n, self.num_heads, self.head_dim)
    k = self.k_proj(h).reshape(B, n, self.num_kv_heads, self.head_dim)
    v = self.v_proj(h).reshape(B, n, self.num_kv_heads, self.head_dim)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin), v

  def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual around o_proj(attn), then around the MLP."""
    B, n = attn.shape[:2]
    x = x + self.o_proj(attn.reshape(B, n, self.num_heads * self.head_dim)).astype(x.dtype)
    x = sharding.shard(x, ('batch', 'length', 'act_embed'))
    return x + self.mlp(self.post_attention_layernorm(x)).astype(x.dtype)


# attend((q_u, k_u, v_u), (q_g, k_g, v_g), extra) -> ((a_u, a_g), new_extra)
AttendFn = Callable


class MoTLayer(nnx.Module):

  def __init__(self, llm, *, rngs: nnx.Rngs, dtype, param_dtype, init_std):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, init_std=init_std)
    self.und = Expert(llm, **kw)
    self.gen = Expert(llm, **kw)

  def __call__(self, x_u, x_g, rope_u: Rope, rope_g: Rope, attend: AttendFn, extra=None):
    # named scopes: the profile breakdown of benchmarks/ (projections + MLP vs attention)
    with jax.named_scope('layers'):
      qkv_u = self.und.qkv(x_u, rope_u)
      qkv_g = self.gen.qkv(x_g, rope_g)
    with jax.named_scope('attention'):
      (a_u, a_g), extra = attend(qkv_u, qkv_g, extra)
    with jax.named_scope('layers'):
      return self.und.finish(x_u, a_u), self.gen.finish(x_g, a_g), extra


class MoTDecoder(nnx.Module):
  """Stacked MoT layers + the per-expert final norms (`norm`, `norm_moe_gen`)."""

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    llm = cfg_model.llm
    kw = dict(dtype=cfg_model.dtype, param_dtype=cfg_model.param_dtype,
              init_std=cfg_model.init_std)
    self.remat = cfg_model.remat
    self.scan = bool(cfg_model.scan_layers)
    self.layers = stack_layers(lambda r: MoTLayer(llm, rngs=r, **kw), llm.num_layers, rngs)
    nkw = dict(eps=llm.rms_norm_eps, param_dtype=cfg_model.param_dtype, dtype=cfg_model.dtype)
    self.norm = RMSNorm(llm.hidden_size, **nkw)
    self.norm_moe_gen = RMSNorm(llm.hidden_size, **nkw)

  def __call__(self, x_u, x_g, rope_u: Rope, rope_g: Rope, attend: AttendFn, layer_xs=None):
    """Runs all layers. `layer_xs` is an optional pytree with a leading layers axis handed to
    `attend` per layer (e.g. a KV cache); returns (h_u, h_g, stacked outputs of attend).

    Inference may replace `self.layers` by an `nnx.List` of per-layer modules (the stack cut
    once, infer/context.py `prepare`): then the layers run unrolled, `layer_xs` is a sequence
    with one entry per layer and the outputs of attend are returned as a list."""
    if isinstance(self.layers, nnx.List):
      ys = []
      for i, layer in enumerate(self.layers):
        x_u, x_g, y = layer(x_u, x_g, rope_u, rope_g, attend,
                            None if layer_xs is None else layer_xs[i])
        ys.append(y)
      return self.norm(x_u), self.norm_moe_gen(x_g), ys

    def body(layer, carry, extra):
      x_u, x_g = carry
      x_u, x_g, extra = layer(x_u, x_g, rope_u, rope_g, attend, extra)
      return (x_u, x_g), extra

    carry, ys = scan_layers(self.layers, body, (x_u, x_g), xs=layer_xs, remat=self.remat,
                            scan=self.scan)
    x_u, x_g = carry
    return self.norm(x_u), self.norm_moe_gen(x_g), ys
