"""A random UniMedVL whose construction compiles nothing (for tests, benchmarks and smoke runs).

`UniMedVL(cfg, rngs=...)` initialises every parameter with eager JAX ops, which compiles one
XLA program per distinct parameter shape (about a minute for the tiny config on a loaded 2-core
CPU, mostly the VAE). `random_model` builds the module abstractly (`nnx.eval_shape`) and fills it
with numpy draws instead: kernels / embeddings ~ N(0, init_std^2) (conv kernels
~ N(0, 1/fan_in)), norm weights 1, biases 0 (or small noise with `bias_std`), and the frozen
sin-cos tables with their exact values. The numbers are NOT the model's own initialisation
(use the constructor for training); they are a deterministic function of `seed`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.model.embeddings import sincos_2d_table


def random_model(cfg_model, seed: int = 0, *, bias_std: float = 0.0, zero_llm2vae: bool = False):
  from unimedvl_jax.model.unimedvl import abstract_model
  abstract = abstract_model(cfg_model)
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  std = float(cfg_model.init_std)
  H = cfg_model.llm.hidden_size

  def fill(path, leaf):
    names = [str(p) for p in path]
    name = names[-1]
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    if name == 'pos_embed':
      grid = cfg_model.vit.grid_size if names[0] == 'vit_pos_embed' else cfg_model.max_latent_size
      return sincos_2d_table(H, grid).astype(dtype)
    if name == 'weight' and len(shape) == 1:        # RMSNorm / LayerNorm / GroupNorm scale
      return np.ones(shape, dtype)
    if name == 'bias':
      if bias_std > 0:
        return (bias_std * rng.standard_normal(shape)).astype(dtype)
      return np.zeros(shape, dtype)
    if 'llm2vae' in names and zero_llm2vae:
      return np.zeros(shape, dtype)
    if names[0] == 'vae' and name == 'kernel':      # conv HWIO or attention 1x1
      fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
      return (rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(dtype)
    return (std * rng.standard_normal(shape)).astype(dtype)

  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    return fill(path, node)

  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, walk(pure, ())))
  return nnx.merge(graphdef, state)
