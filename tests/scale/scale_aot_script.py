"""AOT planning checks run by test_scale_aot.py in a subprocess (libtpu loaded once, JAX_PLATFORMS
=cpu, TPU_* environment from aot.prepare_env). Not a test module.

    python -m tests.scale.scale_aot_script TOPOLOGY   (from the repo root)

Prints 'AOT_RESULT {json}' with
  plan     aot.plan() of a small tiny-config variant (2 decoder layers, 1 ViT layer, Pallas
           attention, fsdp over all chips) on TOPOLOGY
  toy      the HLO FLOP counter on a scanned MLP (fwd+bwd) vs XLA's cost_analysis of the same
           program unrolled, compiled for TOPOLOGY
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
    for i in range(n):
      x = jnp.tanh(x @ w[i])
    return x.sum()
  args = (jax.ShapeDtypeStruct((n, d, d), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((128, d), jnp.float32, sharding=sh))
  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))
  scanned = grad(loss).lower(*args).compile()
  unrolled = grad(loss_unrolled).lower(*args).compile()
  toy = {'hlo_scanned': aot.analyze_hlo(scanned.as_text())['flops'],
         'hlo_unrolled': aot.analyze_hlo(unrolled.as_text())['flops'],
         'xla_unrolled': float((unrolled.cost_analysis() or {}).get('flops', -1)),
         'matmul_flops': 3 * 2 * 128 * d * d * n}
  c = scanned.cost_analysis()
  toy['xla_scanned'] = float((c[0] if isinstance(c, (list, tuple)) else c).get('flops', -1))

  big = jax.jit(lambda: jnp.ones((5, 1 << 30), jnp.float32), out_shardings=sh)
  compiled, oom = aot.compile_or_oom(big.lower())
  print('AOT_RESULT ' + json.dumps({'plan': plan, 'toy': toy,
                                    'oom': oom, 'oom_compiled': compiled is not None}), flush=True)


if __name__ == '__main__':
  main()
