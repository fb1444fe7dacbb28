"""The model prepared for inference, and the jit wrapper of the inference functions (SPEC 7).

Every inference operation takes the model as an nnx module or as a `Prepared` model
(`prepare(model)`, done once per loaded checkpoint: the Runner does it). Preparing splits the
module once (`nnx.split` costs ~10 ms of host time per call) and cuts the decoder's stacked
layers into one module per layer (one copy of the decoder weights, made once), so the jitted
inference functions run the layers unrolled and read each layer's weights and cache buffer in
place: a scan over stacked layers re-slices (copies) every layer's weights and cache for every
token on CPU. A plain module is prepared on every call (correct, only slower).

Sharded inference: `prepare(model, mesh)` places the weights on a mesh ('data', 'fsdp',
'tensor'; sharding.py's logical rules); the jitted functions are traced with the mesh active
(`Prepared.scope`), so the model's activation constraints apply; XLA partitions the rest.

`BackendJit` / `backend_jit`: jax.jit with the XLA:CPU options that let a KV-cache buffer be
updated in place (CPU_COMPILER_OPTIONS).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from unimedvl_jax import sharding


class Prepared:
  """A model split once for inference: `module` (the decoder's stacked layers cut into an
  `nnx.List` of per-layer modules), its `graphdef` and `state` (what the jitted functions take).

  Attribute access falls through to the module (`prepared.has_vae`, `prepared.decoder`, ...),
  so a Prepared is accepted wherever the infer functions take a model. It is a snapshot: the
  layer weights are a copy, made once; after changing the original module's weights, prepare
  it again.
  """

  def __init__(self, module, mesh=None):
    self.module = module
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(module)
    self.static = StaticGraph(self.graphdef)
    if mesh is not None:
      self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh))
      nnx.update(module, self.state)

  def scope(self):
    """The mesh active while tracing (activation constraints); a no-op without a mesh."""
    return sharding.use_mesh(self.mesh)

  def __getattr__(self, name):
    if name.startswith('__') or name == 'module':
      raise AttributeError(name)
    return getattr(self.__dict__['module'], name)


class StaticGraph:
  """A graphdef as a static jit argument whose hash is computed once: jit hashes its static
  arguments on every call, and hashing the graphdef of the whole model costs tens of ms of host
  time per call (more than decoding 32 tokens of the tiny model)."""

  __slots__ = ('graphdef', '_hash')

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                             and self.graphdef == other.graphdef)


def merge(graph, state):
  """nnx.merge of a graphdef or a StaticGraph (inside the jitted functions)."""
  return nnx.merge(graph.graphdef if isinstance(graph, StaticGraph) else graph, state)


@jax.jit
def _unstack_jit(state):
  n = jax.tree.leaves(state)[0].shape[0]
  return tuple(jax.tree.map(lambda a: a[i], state) for i in range(n))


def _drop_layers_axis(module) -> None:
  """Per-layer variables cut from a stack keep the stack's logical names; drop the leading
  'layers' name so their sharding (unimedvl_jax.sharding) matches their shape."""
  for _, v in nnx.iter_graph(module):
    if not isinstance(v, nnx.Variable):
      continue
    names = v.get_metadata().get('out_sharding')
    if names and len(names) == v.ndim + 1 and names[0] == 'layers':
      v.set_metadata('out_sharding', tuple(names[1:]))


def prepare(model, mesh=None) -> Prepared:
  """The model prepared for inference (see the module doc), its weights placed on `mesh` when
  one is given. A Prepared is returned as is (mesh None or its own mesh). Works on an abstract
  module (nnx.eval_shape) too: then the state holds ShapeDtypeStructs (AOT planning)."""
  if isinstance(model, Prepared):
    if mesh is None or mesh is model.mesh:
      return model
    return Prepared(model.module, mesh)
  if isinstance(model.decoder.layers, nnx.List):
    return Prepared(model, mesh)
  graphdef, state = nnx.split(model)
  module = nnx.merge(graphdef, state)          # new module objects; the weights are shared
  lgd, lstate = nnx.split(module.decoder.layers)
  abstract = isinstance(jax.tree.leaves(lstate)[0], jax.ShapeDtypeStruct)
  per_layer = (jax.eval_shape(_unstack_jit, lstate) if abstract else _unstack_jit(lstate))
  layers = [nnx.merge(lgd, s) for s in per_layer]
  for layer in layers:
    _drop_layers_axis(layer)
  module.decoder.layers = nnx.List(layers)
  return Prepared(module, None if abstract else mesh)


def module_of(model):
  """The nnx module of a model or a Prepared."""
  return model.module if isinstance(model, Prepared) else model


# XLA:CPU's default copy insertion copies a loop-carried buffer that is read and then updated
# inside a while loop (each layer's KV cache, every decoded token, twice); with region analysis
# it proves the read happens before the update and updates the buffer in place (measured in
# benchmarks/bench_decode.py). The other backends get their default options.
CPU_COMPILER_OPTIONS = {'xla_cpu_copy_insertion_use_region_analysis': True}


class BackendJit:
  """`jax.jit(fun, static_argnums=...)` that compiles with CPU_COMPILER_OPTIONS when the default
  backend is the CPU. `.plain` is the jitted function without them (AOT lowering for TPU/GPU)."""

  def __init__(self, fun, static_argnums=()):
    self.fun, self.static_argnums = fun, static_argnums
    self.plain = jax.jit(fun, static_argnums=static_argnums)
    self.cpu = jax.jit(fun, static_argnums=static_argnums, compiler_options=CPU_COMPILER_OPTIONS)
    functools.update_wrapper(self, fun)

  def _pick(self):
    return self.cpu if jax.default_backend() == 'cpu' else self.plain

  def __call__(self, *args, **kwargs):
    return self._pick()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._pick().lower(*args, **kwargs)


def backend_jit(static_argnums=()):
  return lambda fun: BackendJit(fun, static_argnums)

