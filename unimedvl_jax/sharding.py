"""Mesh construction, logical-axis rules, activation constraints, distributed init.

Parameters carry logical axis names (`out_sharding` metadata, set in model/layers.py). The rules
that map logical names to mesh axes are config (`config.mesh.rules`: an ordered list of
(logical name, mesh axes) pairs, MaxText-style; `Rules.from_config`). A name may have several
rules: the first whose mesh axes divide the dimension wins (the next ones are fallbacks); inside
one rule a mesh axis that does not divide the dimension is dropped (so tiny configs shard on any
mesh). A parameter carrying `head_dim` metadata (the attention projections, whose 2-D kernels are
[embed, heads * head_dim]) is sharded on its head axes ('q_heads', 'kv_heads', 'vit_heads') only
where the shard count divides the number of heads, never mid-head.

Start-up errors (`ConfigError`, naming the field and the mesh): a batch that does not divide over
the batch axes (`check_batch`), and a parameter of `mesh.max_replicated_bytes` or more that no
mesh axis of its rules can split, which would be replicated on every chip (`state_shardings`).

The mesh comes from jax's own mesh context: `use_mesh(mesh)` (`jax.set_mesh`, outside jit) or
`use_abstract_mesh(mesh)` (`jax.sharding.use_abstract_mesh`, inside a traced function), which
also bind the rules for activations (flax's `nnx.logical_axis_rules`, as MaxText does).
`shard(x, axes)` constrains an activation on that mesh; a no-op without one.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimedvl_jax.config import MESH_AXES, ConfigError, mesh_defaults

# the logical names of head-structured dims of parameters (sized heads * head_dim)
HEAD_AXES = ('q_heads', 'kv_heads', 'vit_heads')


class Rules:
  """Ordered (logical name, mesh axes) rules; mesh axes: None (replicated), a mesh axis name or a
  tuple of them. `max_replicated_bytes`: see `state_shardings` (0 = no check)."""

  def __init__(self, pairs, max_replicated_bytes: int = 0):
    self.pairs = tuple((str(n), _axes_tuple(t)) for n, t in pairs)
    self.max_replicated_bytes = int(max_replicated_bytes)
    self._by_name: dict[str, list] = {}
    for n, t in self.pairs:
      self._by_name.setdefault(n, []).append(t)

  @classmethod
  def from_config(cls, cfg) -> 'Rules':
    """From a full config (`cfg.mesh`) or its mesh section."""
    m = cfg.mesh if 'mesh' in cfg else cfg
    d = mesh_defaults()
    return cls(m.get('rules', d.rules), m.get('max_replicated_bytes', d.max_replicated_bytes))

  def candidates(self, name: str) -> list:
    if name not in self._by_name:
      raise KeyError(f'logical axis {name!r} has no rule in config.mesh.rules')
    return self._by_name[name]

  def batch_axes(self) -> tuple[str, ...]:
    """The mesh axes of the first 'batch' rule (the axes a global batch is split over)."""
    for t in self.candidates('batch'):
      if t:
        return t
    return ()

  def flax_rules(self):
    """The rules as flax's `nnx.logical_axis_rules` takes them (first rule of each name)."""
    seen, out = set(), []
    for n, t in self.pairs:
      if n not in seen:
        seen.add(n)
        out.append((n, None if not t else t[0] if len(t) == 1 else t))
    return tuple(out)


def _axes_tuple(target) -> tuple[str, ...] | None:
  if target is None:
    return None
  return (target,) if isinstance(target, str) else tuple(target)


DEFAULT_RULES = Rules.from_config(mesh_defaults())


def current_rules() -> Rules:
  """The rules bound with the mesh (`use_mesh` / `use_abstract_mesh`), else the defaults."""
  bound = flax_spmd.get_logical_axis_rules()
  if isinstance(bound, _BoundRules):
    return bound.rules
  return DEFAULT_RULES


class _BoundRules(tuple):
  """flax's logical-axis-rules context holding a `Rules` (a tuple of flax pairs, plus ours)."""

  def __new__(cls, rules: Rules):
    obj = super().__new__(cls, rules.flax_rules())
    obj.rules = rules
    return obj


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor') from the config; one -1 entry takes the remaining devices.
  The axes are Auto (XLA's sharding propagation between the constraints)."""
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


def _mesh_text(mesh) -> str:
  return ', '.join(f'{a}={n}' for a, n in dict(mesh.shape).items())


def _dim_spec(name, size, mesh, rules: Rules, used: set, unit: int):
  """(mesh axes kept for one dim, whether its rules asked for a mesh axis of size > 1)."""
  wanted = False
  for target in rules.candidates(name):
    if target is None:
      return [], wanted
    keep, prod = [], 1
    for ax in target:
      ax_size = mesh.shape[ax] if mesh is not None else 1
      wanted |= ax_size > 1
      if ax in used:
        continue
      if size is not None and (size % unit or (size // unit) % (prod * ax_size)):
        continue
      keep.append(ax)
      prod *= ax_size
    if mesh is not None:
      keep = [a for a in keep if mesh.shape[a] > 1]
    if keep:
      return keep, wanted
  return [], wanted


def _spec(axes, shape, mesh, rules: Rules, head_dim: int | None = None):
  used: set[str] = set()
  out, wanted = [], False
  for i, name in enumerate(axes):
    if name is None:
      out.append(None)
      continue
    unit = head_dim if (head_dim and name in HEAD_AXES) else 1
    keep, w = _dim_spec(name, None if shape is None else shape[i], mesh, rules, used, unit)
    wanted |= w
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out), wanted


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Rules | None = None,
                    head_dim: int | None = None) -> P:
  """Logical names -> PartitionSpec under `rules` (default: those bound with the mesh, else
  config.mesh_defaults()); drops mesh axes that do not divide the dim (in units of `head_dim`
  on the head axes) or repeat, and falls back to a name's next rule when none is left."""
  return _spec(axes, shape, mesh, rules or current_rules(), head_dim)[0]


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


def state_shardings(state, mesh: Mesh, rules: Rules | None = None, *,
                    check_replicated: bool = False):
  """nnx.State of Variables -> same-structure tree of NamedSharding (from logical names).

  check_replicated (the training state, `train.step.state_shardings`): raise ConfigError when a
  variable of `rules.max_replicated_bytes` or more would be replicated although its rules (or,
  without logical names, 'fsdp') name a mesh axis of size > 1 that none of its dims divides:
  FSDP / tensor parallelism would silently keep it whole on every chip. (Inference meshes
  replicate e.g. the k/v projections when 'tensor' exceeds the kv heads, by design.)"""
  rules = rules or current_rules()
  limit = rules.max_replicated_bytes if check_replicated else 0
  bad: list[str] = []

  def one(path, v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    axes = _var_axes(v)
    value = v[...] if not hasattr(v, 'shape') else v
    shape = tuple(value.shape)
    itemsize = np.dtype(getattr(value, 'dtype', np.float32)).itemsize
    nbytes = math.prod(shape) * itemsize
    if axes is None or all(a is None for a in axes):
      spec = unnamed_spec(shape, itemsize, mesh)
      wanted = mesh.shape.get('fsdp', 1) > 1 and nbytes >= FSDP_UNNAMED_MIN_BYTES
      names = 'no logical names (fsdp on any dim)'
    else:
      spec, wanted = _spec(axes, shape, mesh, rules, v.get_metadata().get('head_dim'))
      names = ', '.join(f'{a}->{rules.candidates(a)}' for a in axes if a is not None)
    if limit and wanted and nbytes >= limit and all(s is None for s in spec):
      bad.append(f'{jax.tree_util.keystr(path)} {list(shape)} ({nbytes / (1 << 20):.1f} MiB; '
                 f'{names})')
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(one, state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable))
  if bad:
    more = f' (and {len(bad) - 8} more)' if len(bad) > 8 else ''
    raise ConfigError(
        f'config.mesh: on the mesh {_mesh_text(mesh)} these parameters of '
        f'>= mesh.max_replicated_bytes={limit} would be replicated on every device (no mesh '
        f'axis of their rules divides their dims): {"; ".join(bad[:8])}{more}. Change '
        f'mesh.data/fsdp/tensor or mesh.rules (or raise mesh.max_replicated_bytes; 0 = no check)')
  return out


def tree_logical_axes(state):
  """nnx.State -> tree of logical axis tuples (None where a variable has none)."""
  return jax.tree.map(lambda v: _var_axes(v), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules | None = None):
  """Outside jit: makes `mesh` jax's mesh (`jax.set_mesh`) and `rules` the activation rules, so
  `shard` constrains activations and the kernels run under shard_map. None: no-op."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), _bind_rules(rules):
    yield


@contextlib.contextmanager
def use_abstract_mesh(mesh: Mesh | None, rules: Rules | None = None):
  """`use_mesh` for the inside of a traced function (`jax.sharding.use_abstract_mesh`)."""
  if mesh is None:
    yield
    return
  abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
  with jax.sharding.use_abstract_mesh(abstract), _bind_rules(rules):
    yield


def _bind_rules(rules: Rules | None):
  if rules is None:
    return contextlib.nullcontext()
  return nnx.logical_axis_rules(_BoundRules(rules))


def active_mesh():
  """jax's current (abstract) mesh, or None when none is set."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def shard(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical layout on the active mesh (no-op without one)."""
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def check_batch(batch_size: int, mesh, rules: Rules | None = None,
                field: str = 'data.batch_size') -> None:
  """ConfigError unless the global batch divides over the batch axes of the mesh."""
  rules = rules or current_rules()
  axes = [a for a in rules.batch_axes() if a in mesh.shape]
  shards = math.prod(mesh.shape[a] for a in axes)
  if int(batch_size) % shards:
    sizes = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
    raise ConfigError(
        f'config.{field}={batch_size} does not divide over the batch axes of the mesh '
        f'({sizes} = {shards} shards; mesh {_mesh_text(mesh)}): use a multiple of {shards} '
        f'(next: {-(-int(batch_size) // shards) * shards}) or change config.mesh')


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
  b = _divisible_axes(current_rules().batch_axes(), B, mesh)
  t = mesh.shape['tensor']
  h = 'tensor' if t > 1 and Hq % t == 0 and Hkv % t == 0 else None
  bspec = b if len(b) > 1 else (b[0] if b else None)
  x_spec = P(bspec, None, h, None) if head_axis == 2 else P(bspec, h, None, None)
  m_spec = P(bspec, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec) + (m_spec,) * len(meta),
                       out_specs=x_spec, check_vma=False)(q, k, v, *meta)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules | None = None) -> NamedSharding:
  """Leading (batch) dim over the 'batch' rule's axes (('data', 'fsdp')), the rest replicated."""
  axes = (rules or current_rules()).batch_axes()
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


_GOOGLE_PCI_VENDOR = '0x1ae0'
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, TPU7x), the ids jax's own probe knows
_TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')


def _tpu_chips_present() -> bool:
  """True on a machine with TPU chips attached (a PCI probe, as jax does; no metadata query)."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), 'device')) as f:
        if f.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
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
