"""AOT planning checks run by test_scale_aot.py in a subprocess (libtpu loaded once, JAX_PLATFORMS
=cpu, TPU_* environment from aot.prepare_env). Not a test module.

    python -m tests.scale.scale_aot_script TOPOLOGY   (from the repo root)

Prints 'AOT_RESULT {json}' with
  plan     aot.plan() of a small tiny-config variant (2 decoder layers, 1 ViT layer, Pallas
           attention, fsdp over all chips) on TOPOLOGY
  toy      aot.scaled_cost (cost_analysis of 1- and 2-layer unrolled variants, scaled) of an
           MLP's fwd+bwd vs cost_analysis of the same program unrolled and scanned, compiled
           for TOPOLOGY
  oom      compile_or_oom() of a program whose output exceeds one chip's HBM
"""

from __future__ import annotations

import json
import sys


def main():
  topology = sys.argv[1]
  from unimedvl_jax import aot
  aot.prepare_env(topology)
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tests.helpers.scale_configs import small_config

  cfg = small_config('')
  cfg.model.attention_impl = 'pallas'
  cfg.mesh.data = 1
  cfg.mesh.fsdp = -1
  plan = aot.plan(cfg, topology)

  devices = aot.topology_devices(aot.parse_topology(topology))
  mesh = jax.sharding.Mesh(devices[:1], ('x',))
  sh = NamedSharding(mesh, P())
  n, d = 6, 256

  def loss(w, x):
    def body(c, wi):
      return jnp.tanh(c @ wi), None
    return jax.lax.scan(body, x, w)[0].sum()

  def loss_unrolled(w, x):
    for i in range(w.shape[0]):
      x = jnp.tanh(x @ w[i])
    return x.sum()

  def args(layers):
    return (jax.ShapeDtypeStruct((layers, d, d), jnp.float32, sharding=sh),
            jax.ShapeDtypeStruct((128, d), jnp.float32, sharding=sh))
  grad = lambda f, layers: jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args(layers)).compile()

  def variant_cost(layers):
    compiled = grad(loss_unrolled, layers['mlp'])
    return aot.cost_analysis(compiled), compiled.as_text()
  scaled = aot.scaled_cost(variant_cost, {'mlp': n})
  toy = {'scaled': scaled['flops'], 'loops_counted_once': scaled['loops_counted_once'],
         'xla_unrolled': aot.cost_analysis(grad(loss_unrolled, n))['flops'],
         'xla_scanned': aot.cost_analysis(grad(loss, n))['flops'],
         'matmul_flops': 3 * 2 * 128 * d * d * n}

  big = jax.jit(lambda: jnp.ones((5, 1 << 30), jnp.float32), out_shardings=sh)
  compiled, oom = aot.compile_or_oom(big.lower())
  print('AOT_RESULT ' + json.dumps({'plan': plan, 'toy': toy,
                                    'oom': oom, 'oom_compiled': compiled is not None}), flush=True)


if __name__ == '__main__':
  main()
