"""Golden per-parameter partition specs of the 7b config (tests/scale/golden_7b_specs.json).

    python -m tests.scale.regen_golden          # rewrite the JSON after an intended rules change

Computed abstractly: `step.abstract_state` (jax.eval_shape, nothing allocated) and
`step.state_shardings` on a `jax.sharding.AbstractMesh` data=1, fsdp=16, tensor=4 (64 chips), so
no fake devices are needed. The JSON maps every parameter path to its PartitionSpec (one entry per
dimension: null, a mesh axis, or a list of mesh axes) and the shape it was computed for.
"""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden_7b_specs.json')
MESH = {'data': 1, 'fsdp': 16, 'tensor': 4}


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', os.path.join(ROOT, 'configs',
                                                                           f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def abstract_mesh(sizes: dict):
  import jax
  from jax.sharding import AbstractMesh, AxisType
  from unimedvl_jax.sharding import MESH_AXES
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_json(spec) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def state_specs(cfg=None, mesh_sizes=None):
  """(abstract state, shardings) of the 7b training state on the abstract mesh."""
  from unimedvl_jax.train import step as step_lib
  cfg = cfg if cfg is not None else load_config('unimedvl_7b')
  _, abstract = step_lib.abstract_state(cfg)
  return abstract, step_lib.state_shardings(abstract, abstract_mesh(mesh_sizes or MESH))


def param_specs(abstract, shardings) -> dict:
  from flax import nnx
  shapes = dict(nnx.to_flat_state(abstract['params']))
  out = {}
  for path, sh in nnx.to_flat_state(shardings['params']):
    key = '/'.join(str(p) for p in path)
    out[key] = {'spec': spec_json(sh.spec), 'shape': list(shapes[path].shape)}
  return dict(sorted(out.items()))


def compute() -> dict:
  abstract, shardings = state_specs()
  return {'mesh': MESH, 'config': 'configs/unimedvl_7b.py',
          'params': param_specs(abstract, shardings)}


def main():
  golden = compute()
  with open(GOLDEN, 'w') as f:
    json.dump(golden, f, indent=1, sort_keys=False)
    f.write('\n')
  print(f'wrote {len(golden["params"])} parameter specs to {GOLDEN}')


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  main()
