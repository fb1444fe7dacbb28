"""Mesh construction, the ONE logical-axis rules table, activation constraints, distributed init.

Parameters carry logical axis names (`sharding_names` metadata, set in model/layers.py).
`RULES` maps each logical name to mesh axes; a mesh axis that does not divide a dimension is
dropped for that dimension (so tiny configs shard on any mesh). Activations are constrained with
`shard(x, axes)`, a no-op unless a mesh is active (`with use_mesh(mesh): ...`).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis name -> mesh axis / axes (None = replicated). The only place this mapping lives.
RULES: dict[str, Any] = {
    # activations
    'batch': ('data', 'fsdp'),
    'length': None,
    'act_embed': None,
    'act_heads': 'tensor',
    # parameters
    'embed': 'fsdp',
    'vit_embed': 'fsdp',
    'mlp': 'tensor',
    'vit_mlp': 'tensor',
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'vit_heads': 'tensor',
    'vocab': 'tensor',
    'head_dim': None,
    'norm': None,
    'layers': None,
    'table': None,
    'vit_pos': None,
}

_ACTIVE_MESH: list[Mesh] = []


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor') from the config; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f'config.mesh: {n} devices are not divisible by the fixed axes ({known})')
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f'config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices, have {n}')
  arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """Logical names -> PartitionSpec; drops mesh axes that do not divide the dim or repeat."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f'logical axis {name!r} has no rule in unimedvl_jax.sharding.RULES')
    if target is None:
      out.append(None)
      continue
    cand = (target,) if isinstance(target, str) else tuple(target)
    keep = []
    size = 1
    for ax in cand:
      if ax in used:
        continue
      ax_size = mesh.shape[ax] if mesh is not None else 1
      if shape is not None and shape[i] % (size * ax_size):
        continue
      keep.append(ax)
      size *= ax_size
    if mesh is not None:
      keep = [a for a in keep if mesh.shape[a] > 1]
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def _var_axes(v: nnx.Variable):
  meta = v.get_metadata()
  return meta.get('out_sharding') or meta.get('sharding_names')


def state_shardings(state, mesh: Mesh):
  """nnx.State of Variables -> same-structure tree of NamedSharding (from logical names)."""
  def one(v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    axes = _var_axes(v)
    shape = v.shape if hasattr(v, 'shape') else v[...].shape
    if axes is None:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_logical_axes(state):
  """nnx.State -> tree of logical axis tuples (None where a variable has none)."""
  return jax.tree.map(lambda v: _var_axes(v), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Makes `shard` constrain activations on `mesh` (with explicit NamedShardings)."""
  if mesh is None:
    yield
    return
  _ACTIVE_MESH.append(mesh)
  try:
    yield
  finally:
    _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
  return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


def shard(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical layout on the active mesh (no-op without one)."""
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize` in one place. Returns True when it ran.

  Runs when any of these hold: a TPU pod slice (TPU_WORKER_HOSTNAMES lists several hosts, or
  MEGASCALE/TPU env set by the runtime), SLURM with more than one task, or explicit
  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID. Skipped for one process.
  """
  env = os.environ
  if env.get('UNIMEDVL_NO_DISTRIBUTED') == '1':
    return False
  if 'JAX_COORDINATOR_ADDRESS' in env and int(env.get('JAX_NUM_PROCESSES', '1')) > 1:
    jax.distributed.initialize(
        coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(env['JAX_NUM_PROCESSES']),
        process_id=int(env['JAX_PROCESS_ID']),
        local_device_ids=None)
    return True
  if int(env.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()   # SLURM cluster auto-detection
    return True
  hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    jax.distributed.initialize()   # Cloud TPU auto-detection
    return True
  return False
