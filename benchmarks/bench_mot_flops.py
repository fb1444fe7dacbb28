"""MoT routing FLOPs: compiled cost_analysis of ONE decoder layer vs one expert per token.

    JAX_PLATFORMS=cpu python -m benchmarks.bench_mot_flops                 # tiny dims
    python -m benchmarks.bench_mot_flops --config configs/small.py --B 2 --U 768 --L 256 --grad

Builds the real `MoTDecoder` with num_layers=1 and scan_layers=False, runs it forward on random
x_u [B, U, H] and x_g [B, L, H] with a cheap elementwise `attend` (q * (k + v) with the KV heads
repeated: it uses every projection, so XLA cannot drop one, and adds no matmul FLOPs), compiles,
and compares `compiled.cost_analysis()['flops']` with the analytic FLOPs of one expert per token:

    expected = profiling.expert_layer_flops(cfg, B*U) + profiling.expert_layer_flops(cfg, B*L)

Routings compiled (same weights, same inputs):
  streams    the model's design (a): each expert on its own static-size stream (decoder.py);
  permuted   the same plus the model's q/k/v permutation gathers into sequence order and back
             (unimedvl.packed_attend's data movement, with the cheap attend in sequence order);
  dense      a negative control: BOTH experts on all B*(U+L) tokens, output selected per token
             by a runtime mask (the naive MoT). It must come out near 2x, showing the check can
             fail.
With --grad, also the forward+backward of the streams routing (expected about 3x).
Elementwise ops (norms, RoPE, SiLU, residuals) are counted by XLA but not by the analytic
convention, so ratios sit slightly above 1.
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from unimedvl_jax import profiling  # noqa: E402
from unimedvl_jax.config_load import load_config_file  # noqa: E402
from unimedvl_jax.model.decoder import MoTDecoder, Rope  # noqa: E402
from unimedvl_jax.model.layers import inverse_permutation, rope_cos_sin, take_rows  # noqa: E402


def _cheap(q, k, v):
  G = q.shape[2] // k.shape[2]
  return q * jnp.repeat(k + v, G, axis=2)


def cheap_attend(qkv_u, qkv_g, extra):
  """a = q * repeat(k + v) per stream: every projection is used, no matmul FLOPs added."""
  return (_cheap(*qkv_u), _cheap(*qkv_g)), extra


def permuted_attend(perm, inv, U):
  """The model's packed_attend data movement (gather to sequence order and back), cheap attend."""
  def attend(qkv_u, qkv_g, extra):
    to_seq = lambda a, b: take_rows(jnp.concatenate([a, b], axis=1), inv)
    q, k, v = (to_seq(a, b) for a, b in zip(qkv_u, qkv_g))
    o = take_rows(_cheap(q, k, v), perm)
    return (o[:, :U], o[:, U:]), extra
  return attend


def layer_config(config_path: str, overrides=()):
  return load_config_file(config_path, ['model.llm.num_layers=1', 'model.scan_layers=False']
                          + list(overrides))


def make_inputs(cfg, B: int, U: int, L: int, seed: int = 0):
  llm = cfg.model.llm
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  dt = jnp.dtype(cfg.model.dtype)
  x_u = jax.random.normal(k1, (B, U, llm.hidden_size), jnp.float32).astype(dt)
  x_g = jax.random.normal(k2, (B, L, llm.hidden_size), jnp.float32).astype(dt)
  perm = jax.vmap(lambda k: jax.random.permutation(k, U + L))(jax.random.split(k3, B))
  perm = perm.astype(jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(U + L, dtype=jnp.int32), (B, U + L))
  return x_u, x_g, perm, pos


def compiled_flops(cfg, B: int, U: int, L: int, routing: str = 'streams', grad: bool = False
                   ) -> float:
  """cost_analysis FLOPs of one MoT layer (cfg must have num_layers=1, scan_layers=False)."""
  llm = cfg.model.llm
  dec = MoTDecoder(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(dec)
  x_u, x_g, perm, pos = make_inputs(cfg, B, U, L)
  rope = lambda p: Rope(*rope_cos_sin(p, llm.head_dim, llm.rope_theta))

  def fwd(params, x_u, x_g, perm, pos):
    d = nnx.merge(graphdef, params)
    if routing == 'streams':
      h_u, h_g, _ = d(x_u, x_g, rope(pos[:, :U]), rope(pos[:, U:]), cheap_attend)
      return h_u, h_g
    if routing == 'permuted':
      inv = inverse_permutation(perm)
      h_u, h_g, _ = d(x_u, x_g, rope(take_rows(pos, perm[:, :U])),
                      rope(take_rows(pos, perm[:, U:])), permuted_attend(perm, inv, U))
      return h_u, h_g
    if routing == 'dense':
      # naive MoT: every expert on every token, then a per-token select
      x = jnp.concatenate([x_u, x_g], axis=1)
      is_gen = (perm >= U)[:, :, None]          # a runtime mask (not foldable by XLA)
      r = rope(pos)
      lg, ls = nnx.split(d.layers)
      lay = nnx.merge(lg, jax.tree.map(lambda a: a[0], ls))    # the one layer, unstacked
      qu, ku, vu = lay.und.qkv(x, r)
      qg, kg, vg = lay.gen.qkv(x, r)
      sel = lambda a, b: jnp.where(is_gen[..., None], b, a)
      a = _cheap(sel(qu, qg), sel(ku, kg), sel(vu, vg))
      y = jnp.where(is_gen, lay.gen.finish(x, a), lay.und.finish(x, a))
      return d.norm(y), d.norm_moe_gen(y)
    raise ValueError(routing)

  if grad:
    def loss(params, *a):
      h_u, h_g = fwd(params, *a)
      return jnp.sum(h_u.astype(jnp.float32)) + jnp.sum(h_g.astype(jnp.float32))
    f = jax.jit(jax.grad(loss))
  else:
    f = jax.jit(fwd)
  comp = f.lower(params, x_u, x_g, perm, pos).compile()
  return profiling.cost_analysis(comp)['flops']


def check(cfg, B: int, U: int, L: int, grad: bool = False) -> dict:
  expected = profiling.expert_layer_flops(cfg, B * U) + profiling.expert_layer_flops(cfg, B * L)
  out = {'B': B, 'U': U, 'L': L, 'hidden': cfg.model.llm.hidden_size, 'dtype': cfg.model.dtype,
         'expected_one_expert_per_token': expected}
  for routing in ('streams', 'permuted', 'dense'):
    f = compiled_flops(cfg, B, U, L, routing)
    out[routing] = {'compiled_flops': f, 'ratio': f / expected}
  if grad:
    f = compiled_flops(cfg, B, U, L, 'streams', grad=True)
    out['streams_fwd_bwd'] = {'compiled_flops': f, 'ratio_to_3x': f / (3 * expected)}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--config', default=os.path.join(ROOT, 'configs', 'tiny.py'))
  ap.add_argument('--B', type=int, default=2)
  ap.add_argument('--U', type=int, default=96)
  ap.add_argument('--L', type=int, default=32)
  ap.add_argument('--dtype', default=None, choices=[None, 'bfloat16', 'float32'])
  ap.add_argument('--grad', action='store_true', help='also forward+backward (streams)')
  ap.add_argument('--json', default=None)
  args = ap.parse_args(argv)
  cfg = layer_config(args.config, [f'model.dtype={args.dtype}'] if args.dtype else [])
  res = check(cfg, args.B, args.U, args.L, grad=args.grad)
  res['config'] = os.path.relpath(os.path.abspath(args.config), ROOT)
  profiling.print_json(res)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == '__main__':
  main()
