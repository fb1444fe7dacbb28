"""Stacked layers: build N identical layers as ONE module whose parameters carry a leading
'layers' axis, and run them with `jax.lax.scan` (or a python loop) under a remat policy.

Usage (the ViT and the decoder share this):

    self.layers = stack_layers(lambda r: Block(cfg, rngs=r), n, rngs)
    ...
    def body(layer, h, x):            # layer: ONE Block (params sliced at index i); x: xs[i]
      return layer(h, ...), None      # -> (new carry, per-layer output or None)
    h, ys = scan_layers(self.layers, body, h, remat=cfg.remat, scan=cfg.scan_layers)

Parameter paths of the stack are the ones of a single layer, e.g. ('layers', 'self_attn',
'q_proj', 'kernel') with value [n, in, out] and sharding names ('layers', in_axis, out_axis).

Restrictions: `body_fn` must be pure with respect to the layer (it may read the layer's
variables but any mutation is discarded); layers must be structurally identical (same static
attributes). Inside `body_fn` the sliced variables keep the stack's metadata (their
`sharding_names` still begin with 'layers'); use the values, not the metadata, there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `n` layers with `make_layer(rngs)` as one module with stacked parameters.

  Every Variable gets a leading axis of size n, and 'layers' is prepended to its
  `sharding_names`. Each layer is initialised from its own split of every rng stream of `rngs`
  (so layers differ). Works under `nnx.eval_shape` (abstract init).
  """
  if n < 1:
    raise ValueError(f'stack_layers: n must be >= 1, got {n}')
  make = nnx.vmap(make_layer, in_axes=0, out_axes=0,
                  transform_metadata={nnx.PARTITION_NAME: 'layers'})
  return make(rngs.split(n))


def remat_policy(remat: str):
  """'none' -> no rematerialisation; 'full' -> save nothing (recompute the whole layer);
  'dots' -> save matmul outputs; 'dots_no_batch' -> save matmul outputs without batch dims."""
  if remat == 'full':
    return None
  if remat == 'dots':
    return jax.checkpoint_policies.checkpoint_dots
  if remat == 'dots_no_batch':
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f'unknown remat policy {remat!r}; choose from {REMAT_POLICIES}')


def maybe_remat(fn: Callable, remat: str, prevent_cse: bool = True) -> Callable:
  """Wraps `fn` in `jax.checkpoint` with the named policy ('none' returns fn unchanged).

  prevent_cse=False is right (and faster) for the body of a `lax.scan`: a scan already keeps the
  rematerialised forward from being CSE'd with the original one, and the CSE barriers would
  only block fusion inside the body."""
  if remat == 'none':
    return fn
  return jax.checkpoint(fn, policy=remat_policy(remat), prevent_cse=prevent_cse)


def num_stacked(layers: nnx.Module) -> int:
  """The size of the leading 'layers' axis of a stacked module."""
  leaves = jax.tree.leaves(nnx.state(layers))
  if not leaves:
    raise ValueError('num_stacked: the stacked module has no variables')
  return int(leaves[0].shape[0])


def scan_layers(layers: nnx.Module, body_fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
                carry: Any, *, xs: Any = None, remat: str = 'none', scan: bool = True
                ) -> tuple[Any, Any]:
  """Runs `body_fn(layer_i, carry, xs[i]) -> (carry, y_i)` over the stacked layers in order.

  layers: a module built by `stack_layers`. xs: optional pytree with a leading axis of size n
  (per-layer inputs, e.g. a KV cache); `None` passes `None` to every call. remat: one of
  REMAT_POLICIES, applied per layer. scan: `jax.lax.scan` (one compiled body, the default) or a
  python loop over the slices (unrolled; same numerics, for debugging and small models).
  Returns (final carry, ys stacked on a leading axis of size n, or None if the body returns None).
  """
  graphdef, state = nnx.split(layers)
  n = num_stacked(layers)

  def step(c, inp):
    layer_state, x = inp
    return body_fn(nnx.merge(graphdef, layer_state), c, x)

  step = maybe_remat(step, remat, prevent_cse=not scan)
  if scan:
    return jax.lax.scan(step, carry, (state, xs), length=n)
  ys = []
  for i in range(n):
    inp = jax.tree.map(lambda a: a[i], (state, xs))
    carry, y = step(carry, inp)
    ys.append(y)
  if all(y is None for y in ys):
    return carry, None
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
