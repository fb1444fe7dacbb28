"""stack_layers / scan_layers: stacking metadata, scan == python loop == unstacked reference,
every remat policy gives the same values and gradients, per-layer xs/ys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimedvl_jax.model.layers import LayerNorm, Linear
from unimedvl_jax.model.scan import (REMAT_POLICIES, maybe_remat, num_stacked, remat_policy,
                                     scan_layers, stack_layers)

N, D = 3, 8


class Block(nnx.Module):

  def __init__(self, rngs):
    self.norm = LayerNorm(D)
    self.fc = Linear(D, D, rngs=rngs, axes=('embed', 'mlp'), init_std=0.5)

  def __call__(self, x):
    return x + jnp.tanh(self.fc(self.norm(x)))


def test_stack_metadata_and_distinct_init():
  layers = stack_layers(Block, N, nnx.Rngs(0))
  assert num_stacked(layers) == N
  k = layers.fc.kernel
  assert k.shape == (N, D, D)
  meta = k.get_metadata()
  names = meta.get('sharding_names', meta.get('out_sharding'))
  assert tuple(names) == ('layers', 'embed', 'mlp')
  assert layers.norm.weight.shape == (N, D)
  assert not np.allclose(k[0], k[1])
  with pytest.raises(ValueError):
    stack_layers(Block, 0, nnx.Rngs(0))


def test_stack_under_eval_shape():
  abstract = nnx.eval_shape(lambda: stack_layers(Block, N, nnx.Rngs(0)))
  assert abstract.fc.kernel.shape == (N, D, D)


def _reference(layers, x):
  """Unstacked loop over explicitly sliced parameters (independent of scan_layers)."""
  k, b = layers.fc.kernel[...], layers.fc.bias[...]
  w, c = layers.norm.weight[...], layers.norm.bias[...]
  for i in range(N):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    h = (x - mu) / jnp.sqrt(var + 1e-6) * w[i] + c[i]
    x = x + jnp.tanh(h @ k[i] + b[i])
  return x


def test_scan_loop_remat_equivalence():
  layers = stack_layers(Block, N, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 5, D))
  ref = _reference(layers, x)
  graphdef, state = nnx.split(layers)

  def run(state, x, remat, scan):
    body = lambda layer, h, _: (layer(h), None)
    return scan_layers(nnx.merge(graphdef, state), body, x, remat=remat, scan=scan)[0]

  def loss(s, x, remat, scan):
    y = run(s, x, remat, scan)
    return jnp.sum(y ** 2), y

  cases = [('none', True), ('none', False), ('full', True), ('dots', False), ('dots_no_batch', True)]
  assert {r for r, _ in cases} == set(REMAT_POLICIES)
  base_grad = None
  for remat, scan in cases:
    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), g = jax.jit(vg, static_argnums=(2, 3))(state, x, remat, scan)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    base_grad = g if base_grad is None else base_grad
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, base_grad)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(s, x, remat, scan)[0]))(state))
    assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == (remat != 'none'), remat


def test_xs_and_ys():
  layers = stack_layers(Block, N, nnx.Rngs(3))
  x = jnp.ones((2, D))
  xs = {'scale': jnp.arange(1.0, N + 1.0)}

  def body(layer, h, xi):
    h = layer(h) * xi['scale']
    return h, {'mean': h.mean(), 'scale': xi['scale']}

  h1, ys1 = scan_layers(layers, body, x, xs=xs, scan=True)
  h2, ys2 = scan_layers(layers, body, x, xs=xs, scan=False)
  np.testing.assert_allclose(h1, h2, rtol=1e-6)
  assert ys1['mean'].shape == (N,)
  np.testing.assert_allclose(ys1['mean'], ys2['mean'], rtol=1e-6)
  np.testing.assert_array_equal(ys1['scale'], xs['scale'])
  _, none_ys = scan_layers(layers, lambda l, h, _: (l(h), None), x, scan=False)
  assert none_ys is None


def test_remat_policy_names():
  assert remat_policy('full') is None
  assert remat_policy('dots') is jax.checkpoint_policies.checkpoint_dots
  assert remat_policy('dots_no_batch') is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  f = lambda x: x * 2
  assert maybe_remat(f, 'none') is f
  with pytest.raises(ValueError, match='unknown remat'):
    remat_policy('everything')
