"""MoT routing does not double FLOPs: XLA's cost analysis of ONE compiled decoder layer equals one
expert per token (DESIGN.md, "MoT routing"); a dense both-experts layer, the negative control,
comes out at about 2x. FLOPs of a compiled program are deterministic, so this is a valid test
(no timings). benchmarks/bench_mot_flops.py prints the same numbers for any config.

The 'streams' layer attends with an elementwise stand-in (the projections and MLPs alone); the
'permuted' and 'gathered' layers run the model's own attention (`packed_attend`, as
UniMedVL.forward builds it) on permuted streams: the dense XLA attention on the permuted order
('xla') and a sequence-order backend with its gathers into sequence order and back ('cudnn',
XLA's dot_product_attention off GPU), counted as the expert layers plus the dense attention's
closed form."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from unimedvl_jax import profiling
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.model.decoder import MoTDecoder, Rope
from unimedvl_jax.model.layers import rope_cos_sin
from unimedvl_jax.batch import MODE_CAUSAL
from unimedvl_jax.model.unimedvl import _take_rows, inverse_permutation, packed_attend

CFG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')
B, U, L = 2, 96, 32


def _cheap(q, k, v):
  """Elementwise stand-in for attention that uses q, k and v (no projection can be dropped)."""
  return q * jnp.repeat(k + v, q.shape[2] // k.shape[2], axis=2)


@pytest.fixture(scope='module')
def setup():
  cfg = load_config_file(CFG, ['model.llm.num_layers=1', 'model.scan_layers=False'])
  llm = cfg.model.llm
  graphdef, params = nnx.split(MoTDecoder(cfg.model, rngs=nnx.Rngs(0)))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x_u = jax.random.normal(k1, (B, U, llm.hidden_size), jnp.float32)
  x_g = jax.random.normal(k2, (B, L, llm.hidden_size), jnp.float32)
  perm = jax.vmap(lambda k: jax.random.permutation(k, U + L))(jax.random.split(k3, B))
  perm = perm.astype(jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(U + L, dtype=jnp.int32), (B, U + L))
  rope = lambda p: Rope(*rope_cos_sin(p, llm.head_dim, llm.rope_theta))
  expected = profiling.expert_layer_flops(cfg, B * U) + profiling.expert_layer_flops(cfg, B * L)
  return cfg, graphdef, params, (x_u, x_g, perm, pos), rope, expected


def _dense_attention_flops(cfg) -> float:
  """Closed form of one layer's dense attention: QK^T and PV (2 * 2 * D FLOPs) for every (query
  head, key) pair of the [B, T, T] score matrix (a dense backend computes the masked pairs too)."""
  llm = cfg.model.llm
  return 4.0 * llm.head_dim * llm.num_heads * B * (U + L) ** 2


def _meta():
  """Packed metadata [B, T] in sequence order: one causal text segment per pack."""
  T = U + L
  return (jnp.ones((B, T), jnp.int32), jnp.zeros((B, T), jnp.int32),
          jnp.full((B, T), MODE_CAUSAL, jnp.int32))


def _flops(fn, *args) -> float:
  return profiling.cost_analysis(jax.jit(fn).lower(*args).compile())['flops']


def test_mot_layer_flops_are_one_expert_per_token(setup):
  cfg, graphdef, params, args, rope, expected = setup

  def streams(params, x_u, x_g, perm, pos):
    attend = lambda qu, qg, extra: ((_cheap(*qu), _cheap(*qg)), extra)
    h_u, h_g, _ = nnx.merge(graphdef, params)(x_u, x_g, rope(pos[:, :U]), rope(pos[:, U:]), attend)
    return h_u, h_g

  def real_attention(impl):
    def layer(params, x_u, x_g, perm, pos, meta):
      attend = packed_attend(perm, inverse_permutation(perm), meta, U, impl, platform='cpu')
      h_u, h_g, _ = nnx.merge(graphdef, params)(
          x_u, x_g, rope(_take_rows(pos, perm[:, :U])), rope(_take_rows(pos, perm[:, U:])), attend)
      return h_u, h_g
    return layer

  with_attention = expected + cfg.model.llm.num_layers * _dense_attention_flops(cfg)
  for name, fn, want, extra in (('streams', streams, expected, ()),
                                ('permuted', real_attention('xla'), with_attention, (_meta(),)),
                                ('gathered', real_attention('cudnn'), with_attention, (_meta(),))):
    ratio = _flops(fn, params, *args, *extra) / want
    assert abs(ratio - 1.0) <= 0.05, f'{name}: compiled / one-expert FLOPs = {ratio:.4f}'


def test_dense_both_experts_control_is_about_2x(setup):
  """The check has teeth: running both experts on every token shows up as ~2x."""
  cfg, graphdef, params, args, rope, expected = setup

  def dense(params, x_u, x_g, perm, pos):
    dec = nnx.merge(graphdef, params)
    lg, ls = nnx.split(dec.layers)
    lay = nnx.merge(lg, jax.tree.map(lambda a: a[0], ls))
    x = jnp.concatenate([x_u, x_g], axis=1)
    is_gen = (perm >= U)[:, :, None]               # runtime per-token expert choice
    r = rope(pos)
    qu, qg = lay.und.qkv(x, r), lay.gen.qkv(x, r)
    a = _cheap(*(jnp.where(is_gen[..., None], g, u) for u, g in zip(qu, qg)))
    return jnp.where(is_gen, lay.gen.finish(x, a), lay.und.finish(x, a))

  ratio = _flops(dense, params, *args) / expected
  assert 1.9 <= ratio <= 2.1, f'dense control: compiled / one-expert FLOPs = {ratio:.4f}'
