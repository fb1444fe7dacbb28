"""TPU chips and slice topologies for AOT planning: the chip table (HBM, bf16 peak), Cloud
accelerator-type names, the libtpu environment (`prepare_env`) and the abstract devices of a
slice (`topology_devices`); plus whether this jax can describe CUDA GPUs offline."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

# ------------------------------------------------------------------------------ chips

GIB = 1 << 30
TPU_CHIPS: dict[str, dict[str, Any]] = {
    # hbm_gib per chip, bf16 dense peak TFLOP/s per chip, Cloud accelerator-type prefix,
    # TensorCores per chip as counted in the accelerator-type suffix, torus dims
    'v4': dict(hbm_gib=32, peak_tflops=275, accel='v4', cores_in_name=2, dims=3),
    'v5e': dict(hbm_gib=16, peak_tflops=197, accel='v5litepod', cores_in_name=1, dims=2),
    'v5p': dict(hbm_gib=95, peak_tflops=459, accel='v5p', cores_in_name=2, dims=3),
    'v6e': dict(hbm_gib=32, peak_tflops=918, accel='v6e', cores_in_name=1, dims=2),
}
RESERVED_GIB = 0.5
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e', 'v6lite': 'v6e', 'v5': 'v5p'}
# standard slice shapes by chip count
_SHAPES_3D = {1: '1x1x1', 2: '1x2x1', 4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4',
              64: '4x4x4', 128: '4x4x8', 256: '4x8x8', 512: '8x8x8', 1024: '8x8x16',
              2048: '8x16x16', 4096: '16x16x16'}
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  generation: str          # v4 | v5e | v5p | v6e
  name: str                # get_topology_desc name, e.g. 'v5p:4x4x4'
  accelerator_type: str    # Cloud name, e.g. 'v5p-128'
  chips: int


def parse_topology(topology: str) -> TopologySpec:
  """'v5p:4x4x4' | 'v5p-128' | 'v5e:16x16' | 'v5e-256' | 'v5litepod-256' | 'v6e-256' | 'v4-64'.

  Cloud names count TensorCores for v4/v5p (2 per chip: v5p-128 = 64 chips = 4x4x4) and chips
  for v5e/v6e (v5e-256 = 16x16)."""
  t = topology.strip().lower()
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', t)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU_CHIPS:
      raise ValueError(f'topology {topology!r}: unknown TPU generation {m.group(1)!r}; '
                       f'known: {sorted(TPU_CHIPS)}')
    dims = [int(x) for x in m.group(2).split('x')]
    chips = math.prod(dims)
    info = TPU_CHIPS[gen]
    return TopologySpec(gen, f'{gen}:{m.group(2)}',
                        f'{info["accel"]}-{chips * info["cores_in_name"]}', chips)
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', t)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU_CHIPS:
      raise ValueError(f'topology {topology!r}: unknown TPU generation {m.group(1)!r}')
    info = TPU_CHIPS[gen]
    n = int(m.group(2))
    if n % info['cores_in_name']:
      raise ValueError(f'topology {topology!r}: {gen} names count {info["cores_in_name"]} '
                       f'cores per chip, {n} is not a multiple')
    chips = n // info['cores_in_name']
    shapes = _SHAPES_3D if info['dims'] == 3 else _SHAPES_2D
    if chips not in shapes:
      raise ValueError(f'topology {topology!r}: no standard {gen} slice of {chips} chips; '
                       f'give the shape, e.g. {gen}:{next(iter(shapes.values()))}')
    return TopologySpec(gen, f'{gen}:{shapes[chips]}', f'{info["accel"]}-{n}', chips)
  raise ValueError(f'topology {topology!r}: expected GEN:AxB[xC] (e.g. v5p:4x4x4) or a Cloud '
                   f'accelerator type (e.g. v5p-128, v5e-256)')


def prepare_env(topology: str | None = None) -> None:
  """Environment for libtpu on a machine without TPUs; call before jax loads libtpu."""
  env = os.environ
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.setdefault('TPU_SKIP_MDS_QUERY', '1')
  env.setdefault('TPU_WORKER_ID', '0')
  env.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  env.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if topology:
    env.setdefault('TPU_ACCELERATOR_TYPE', parse_topology(topology).accelerator_type)
  # jax already imported (its config read JAX_PLATFORMS at import): keep the CPU the default
  # backend when nothing chose the platforms (a backend created before this call stays as is)
  import jax
  if not jax.config.jax_platforms:
    jax.config.update('jax_platforms', 'cpu')


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec('libtpu') is not None


def target_config(cfg, topology: str, **model_fields):
  """The start of every AOT plan: (TopologySpec, a validated copy of cfg) for `topology`, with
  libtpu's environment set, `model_fields` applied (e.g. param_dtype) and the attention compiled
  for the target chips (model.attention_platform = 'tpu'), not for this process's backend."""
  spec = parse_topology(topology)
  prepare_env(topology)
  if not libtpu_available():
    raise RuntimeError("AOT planning needs libtpu: pip install 'jax[tpu]==0.10.2' "
                       '(pins libtpu==0.0.42.1)')
  from unimedvl_jax.config_validate import validate
  cfg = cfg.copy_and_resolve_references()
  for k, v in model_fields.items():
    cfg.model[k] = v
  cfg.model.attention_platform = 'tpu'
  return spec, validate(cfg)


def topology_devices(spec: TopologySpec):
  from jax.experimental import topologies
  return topologies.get_topology_desc(spec.name, 'tpu').devices


def gpu_offline_compile_check() -> dict[str, Any]:
  """Whether this jax can describe / compile for CUDA GPUs without one (an AOT topology for
  platform 'cuda' needs the jax CUDA plugin). Returns {'available': bool, 'reason': str}."""
  import importlib.util
  import jax
  plugins = [m for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
                         'jax_plugins.xla_cuda13')
             if _find_spec(m, importlib.util)]
  try:
    from jax.experimental import topologies
    topologies.get_topology_desc('8xH100', 'cuda')
  except Exception as e:  # noqa: BLE001 - report why
    return {'available': False, 'cuda_plugins_found': plugins, 'jax': jax.__version__,
            'reason': f'{type(e).__name__}: {str(e)[:400]}'}
  return {'available': True, 'cuda_plugins_found': plugins, 'jax': jax.__version__,
          'reason': 'get_topology_desc(platform="cuda") works'}


def _find_spec(name, util):
  try:
    return util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False
