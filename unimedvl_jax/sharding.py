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
  arr = None
  if devices[0].platform == 'tpu':
    # ICI-aware order on TPU slices ('tensor', the last axis, gets the innermost torus links)
    try:
      from jax.experimental import mesh_utils
      arr = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - unusual shapes: fall back to the plain device order
      arr = None
  if arr is None:
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


# Variables WITHOUT logical axis names (none, or all None: e.g. the VAE's conv kernels) are
# replicated unless they hold at least this many bytes; then their largest dimension that the
# 'fsdp' axis divides is sharded over 'fsdp' (so FSDP never keeps a multi-MB tensor, or its
# optimizer moments, whole on every chip).
FSDP_UNNAMED_MIN_BYTES = 1 << 20


def unnamed_spec(shape: Sequence[int], itemsize: int, mesh: Mesh) -> P:
  """PartitionSpec of a variable without logical names (see FSDP_UNNAMED_MIN_BYTES)."""
  n = mesh.shape.get('fsdp', 1)
  whole = P(*([None] * len(shape)))
  if n <= 1 or math.prod(shape) * itemsize < FSDP_UNNAMED_MIN_BYTES:
    return whole
  dims = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
  for i in dims:
    if shape[i] % n == 0:
      return P(*[('fsdp' if j == i else None) for j in range(len(shape))])
  return whole


def state_shardings(state, mesh: Mesh):
  """nnx.State of Variables -> same-structure tree of NamedSharding (from logical names)."""
  def one(v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    axes = _var_axes(v)
    value = v[...] if not hasattr(v, 'shape') else v
    shape = tuple(value.shape)
    if axes is None or all(a is None for a in axes):
      itemsize = np.dtype(getattr(value, 'dtype', np.float32)).itemsize
      return NamedSharding(mesh, unnamed_spec(shape, itemsize, mesh))
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


def _divisible_axes(axes: Sequence[str], size: int, mesh: Mesh) -> tuple[str, ...]:
  keep, prod = [], 1
  for a in axes:
    n = mesh.shape[a]
    if n > 1 and size % (prod * n) == 0:
      keep.append(a)
      prod *= n
  return tuple(keep)


def shard_map_attention(fn, q, k, v, *meta, head_axis: int = 2):
  """Runs a per-shard attention kernel `fn(q, k, v, *meta)` under `jax.shard_map` on the active
  mesh (a plain call without one). Custom kernels (Pallas/Mosaic) cannot be partitioned by XLA,
  so each device runs the kernel on its own packs and heads: q/k/v [B, T, H, D] split over the
  batch axes ('data', 'fsdp') and over 'tensor' on the heads when both Hq and Hkv divide (so a
  kv head and its query group stay on one device); metadata [B, T] split over the batch axes.
  The sequence is never split (no context parallelism here). head_axis: 2 for [B, T, H, D]
  arrays, 1 for head-major [B, H, T, D]."""
  mesh = active_mesh()
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, *meta)
  B, Hq, Hkv = q.shape[0], q.shape[head_axis], k.shape[head_axis]
  b = _divisible_axes(RULES['batch'] if not isinstance(RULES['batch'], str)
                      else (RULES['batch'],), B, mesh)
  t = mesh.shape['tensor']
  h = 'tensor' if t > 1 and Hq % t == 0 and Hkv % t == 0 else None
  bspec = b if len(b) > 1 else (b[0] if b else None)
  x_spec = P(bspec, None, h, None) if head_axis == 2 else P(bspec, h, None, None)
  m_spec = P(bspec, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec) + (m_spec,) * len(meta),
                       out_specs=x_spec, check_vma=False)(q, k, v, *meta)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def _tpu_chips_present() -> bool:
  """True on a machine with TPU chips attached (jax's own PCI probe; no metadata query)."""
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # noqa: BLE001 - private helper; absent or failing means "no TPU here"
    return False


def _hosts(var: str) -> list[str]:
  return [h for h in os.environ.get(var, '').split(',') if h.strip()]


def distributed_plan() -> tuple[str, dict] | None:
  """How this process would join a multi-process run: (kind, initialize kwargs) or None.

  Checked in order (the first that applies wins):
    UNIMEDVL_NO_DISTRIBUTED=1                     -> None (forced single-process)
    explicit: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES (>1) + JAX_PROCESS_ID
                                                  -> ('explicit', {...}) any platform, CPU too
    SLURM: SLURM_JOB_ID and SLURM_NTASKS / SLURM_STEP_NUM_TASKS > 1 (srun)
                                                  -> ('slurm', {}) jax auto-detects the
       coordinator (first node of the step, port from the job id), process id (SLURM_PROCID)
       and, on GPUs, one device per process (SLURM_LOCALID); for one process per NODE export
       JAX_LOCAL_DEVICE_IDS=0,1,...,7 (launch/slurm.sbatch does)
    Open MPI: OMPI_COMM_WORLD_SIZE > 1 (mpirun)   -> ('ompi', {})
    TPU: TPU chips attached to this VM, or TPU_WORKER_HOSTNAMES lists several hosts (GKE sets
       it; a Cloud TPU VM pod slice has the workers in its metadata) or
       MEGASCALE_COORDINATOR_ADDRESS (multislice)  -> ('tpu', {}) jax auto-detects (GCE
       metadata / GKE env); skipped when TPU_WORKER_HOSTNAMES names a single host.
  """
  env = os.environ
  if env.get('UNIMEDVL_NO_DISTRIBUTED') == '1':
    return None
  n = int(env.get('JAX_NUM_PROCESSES', '1') or 1)
  if env.get('JAX_COORDINATOR_ADDRESS') and n > 1:
    if 'JAX_PROCESS_ID' not in env:
      raise RuntimeError('JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but '
                         'JAX_PROCESS_ID is not: every process needs its id (0..N-1)')
    return 'explicit', dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                            num_processes=n, process_id=int(env['JAX_PROCESS_ID']))
  slurm_n = int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1')) or 1)
  if 'SLURM_JOB_ID' in env and slurm_n > 1:
    return 'slurm', {}
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'ompi', {}
  hosts = _hosts('TPU_WORKER_HOSTNAMES')
  if len(hosts) > 1 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu', {}
  if not hosts and not env.get('TPU_SKIP_MDS_QUERY') and _tpu_chips_present():
    return 'tpu', {}
  return None


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize` in one place (see `distributed_plan` for the detection).

  Must run before anything initialises a jax backend; idempotent (returns True when the
  distributed runtime is, or already was, initialised; False for a single-process run). On the
  CPU backend the cross-process collectives use gloo (`jax_cpu_collectives_implementation`).
  """
  if jax.distributed.is_initialized():
    return True
  plan = distributed_plan()
  if plan is None:
    return False
  kind, kwargs = plan
  if os.environ.get('JAX_PLATFORMS', '').split(',')[0] == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  if jax.devices()[0].platform == 'cpu':
    _warm_up_cpu_collectives()
  if jax.process_index() == 0:
    print(f'distributed ({kind}): {jax.process_count()} processes, '
          f'{jax.device_count()} devices ({jax.local_device_count()} per process)', flush=True)
  return True


def _warm_up_cpu_collectives() -> None:
  """One all-device sum right after initialisation, while the processes are in step.

  XLA's gloo collectives create a context per set of participating devices, lazily, at the first
  collective over that set, with a fixed 30 s rendezvous timeout; processes whose compiles of the
  train step finish more than 30 s apart (a loaded CPU host) would fail there. The context of
  the all-device set is cached and reused by every later computation over all devices.
  """
  mesh = jax.make_mesh((jax.device_count(),), ('all',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('all')),
                                             np.ones((jax.local_device_count(),), np.float32))
  total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
  if int(total) != jax.device_count():
    raise RuntimeError(f'CPU collectives warm-up: sum over {jax.device_count()} devices gave '
                       f'{float(total)}')
