"""The AOT plan of image generation: one guided text-to-image flow step (`plan_generation`).

The prepared model runs its decoder layers one by one (no layer scan), so XLA's cost_analysis
of the compiled step counts every layer: its FLOPs / bytes are reported as they are."""

from __future__ import annotations

import os
import time
from typing import Any

from unimedvl_jax.aot.cost import cost_analysis, loops_counted_once
from unimedvl_jax.aot.hlo_stats import analyze_hlo
from unimedvl_jax.aot.memory import (_with_shardings, compile_or_oom, conservative_bytes,
                                     state_bytes_per_chip)
from unimedvl_jax.aot.topology import GIB, RESERVED_GIB, TPU_CHIPS, target_config, topology_devices
from unimedvl_jax.batch import vae_downsample

def _parse_mesh(mesh: str | dict | None, chips_or_devices: int) -> dict[str, int]:
  """'data=1,tensor=8' (axes not named are 1; one may be -1) -> {'data', 'fsdp', 'tensor'}."""
  if mesh is None:
    return {'data': 1, 'fsdp': 1, 'tensor': -1}
  if isinstance(mesh, str):
    out = {}
    for part in mesh.split(','):
      k, _, v = part.partition('=')
      if k.strip() not in ('data', 'fsdp', 'tensor') or not v.strip().lstrip('-').isdigit():
        raise ValueError(f'mesh {mesh!r}: expected e.g. data=1,tensor=8 (axes data, fsdp, '
                         f'tensor)')
      out[k.strip()] = int(v)
    mesh = out
  return {a: int(mesh.get(a, 1)) for a in ('data', 'fsdp', 'tensor')}


def plan_generation(cfg, topology: str, *, image_size: int = 1024, batch: int = 1,
                    prompt_tokens: int = 128, mesh: str | dict | None = None,
                    param_dtype: str | None = None, reserved_gib: float = RESERVED_GIB,
                    hlo_path: str | None = None) -> dict[str, Any]:
  """AOT-compiles ONE guided text-to-image flow step for a TPU `topology` (libtpu, no TPUs) and
  reports its per-chip memory: what every step of `infer.image.generate_latents` runs (the
  prepared model, the full and "cfg_text" contexts batched into one model call, the noise block
  of image_size^2 / 16^2 latent tokens per request). The sampler's fori_loop only carries the
  latents between such steps, so its peak is this step's peak.

  The weights are the prepared model's (per-layer decoder modules, infer/context.py) in
  `param_dtype` (default the config's: fp32 masters, as a checkpoint loads) sharded by
  sharding.py's rules on the ('data', 'fsdp', 'tensor') mesh (`mesh`, default all chips on
  'tensor'); the contexts' rows over the batch axes, their kv heads over 'tensor' (dropped when
  it does not divide the kv heads). Requests: `batch` prompts of `prompt_tokens` text tokens.
  FLOPs / bytes: cost_analysis of the compiled step (`flops_per_chip`,
  `bytes_accessed_per_chip`; `loops_counted_once` lists loops counted once, see aot/cost.py);
  collectives: hlo_stats.
  """
  spec, cfg = target_config(cfg, topology, **({'param_dtype': param_dtype} if param_dtype else {}))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ml_collections import ConfigDict
  from unimedvl_jax import profiling, sharding
  from unimedvl_jax.infer import context as C
  from unimedvl_jax.infer import image as I
  from unimedvl_jax.model.unimedvl import abstract_model

  t0 = time.perf_counter()
  devices = topology_devices(spec)
  chip = TPU_CHIPS[spec.generation]
  per_chip = max(1, len(devices) // spec.chips)
  hbm = chip['hbm_gib'] * GIB / per_chip
  mesh_axes = _parse_mesh(mesh, len(devices))
  mesh_obj = sharding.make_mesh(ConfigDict(mesh_axes), devices)
  px = vae_downsample(cfg.model) * int(cfg.model.latent_patch_size)
  if image_size % px:
    raise ValueError(f'image_size {image_size} is not a multiple of {px} pixels')
  g = image_size // px
  if g > int(cfg.model.max_latent_size):
    raise ValueError(f'a {image_size}px image needs a {g}x{g} latent grid, over '
                     f'model.max_latent_size ({cfg.model.max_latent_size})')

  abstract = abstract_model(cfg.model)
  p = C.prepare(abstract)                                 # abstract per-layer modules
  rules = sharding.Rules.from_config(cfg)
  st_sh = sharding.state_shardings(p.state, mesh_obj, rules)
  state = _with_shardings(p.state, st_sh)
  sp = C.Specials(3, 4, 5, 6)
  cap = C.bucket(prompt_tokens + 2, 64)
  ctx0 = jax.eval_shape(lambda: C.new_context(p, batch, cap))
  ctx = _with_shardings(ctx0, C.context_shardings(ctx0, mesh_obj))
  settings = I.TEXT_TO_IMAGE                               # s_text 4: full + cfg_text contexts
  bld = C.make_builder(p, batch, sp)
  for r in range(batch):
    bld.noise_image(r, np.zeros((g * g, bld.latent_dim), np.float32), (g, g))
  blk0 = bld.build()
  rows = lambda a: jax.sharding.NamedSharding(mesh_obj, sharding.logical_to_spec(
      ('batch',) + (None,) * (a.ndim - 1), a.shape, mesh_obj))
  blk = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows(a)), blk0)
  x = jax.ShapeDtypeStruct(blk0.lat_x.shape, jnp.float32, sharding=rows(blk0.lat_x))
  t = jax.ShapeDtypeStruct((), jnp.float32)
  counts = profiling.param_counts(cfg.model)
  out: dict[str, Any] = {
      'kind': 'text_to_image_flow_step',
      'topology': spec.name, 'accelerator_type': spec.accelerator_type,
      'generation': spec.generation, 'chips': spec.chips, 'devices': len(devices),
      'device_kind': devices[0].device_kind, 'mesh': dict(mesh_obj.shape),
      'model': {'params_total': counts['total'], 'param_dtype': cfg.model.param_dtype,
                'dtype': cfg.model.dtype, 'decoder_layers': 'per-layer (prepared)'},
      'request': {'batch': batch, 'image_size': image_size, 'latent_tokens': g * g,
                  'prompt_tokens': prompt_tokens, 'context_capacity': cap,
                  'contexts': 2, 'cfg': 'batched (one model call per step)',
                  'rows_per_model_call': 2 * batch},
      'hbm': {'per_chip_gib': chip['hbm_gib'], 'per_device_bytes': int(hbm),
              'reserved_gib': reserved_gib,
              'usable_bytes': int(hbm - reserved_gib * GIB / per_chip)},
      'memory': {'weights_bytes': state_bytes_per_chip(state, st_sh),
                 'contexts_bytes': 2 * state_bytes_per_chip(ctx, C.context_shardings(ctx0,
                                                                                     mesh_obj))},
  }
  # keep_unused: every weight is an argument (the ViT / VAE weights the step does not read stay
  # resident during generation), so XLA's argument and peak bytes are the process's per chip
  step = I._step_velocity_jit
  jitted = jax.jit(step.fun, static_argnums=step.static_argnums, keep_unused=True)
  with sharding.use_mesh(mesh_obj, rules):
    lowered = jitted.lower(p.static, state, (ctx, ctx), blk, x, t, settings, True)
  t1 = time.perf_counter()
  out['lower_seconds'] = round(t1 - t0, 1)
  compiled, oom = compile_or_oom(lowered)
  out['compile_seconds'] = round(time.perf_counter() - t1, 1)
  if compiled is None:
    out['fits'] = False
    out['oom'] = oom
    return out
  mem = profiling.compiled_memory(compiled)
  out['memory'].update(mem)
  peak = mem.get('peak_memory_in_bytes') or (
      mem.get('argument_size_in_bytes', 0) + mem.get('output_size_in_bytes', 0)
      + mem.get('temp_size_in_bytes', 0) - mem.get('alias_size_in_bytes', 0))
  out['memory']['peak_gib'] = round(peak / GIB, 2)
  out['memory']['conservative_bytes'] = conservative_bytes(mem)
  out['fits'] = bool(peak <= out['hbm']['usable_bytes'])
  out['fits_conservative'] = bool(conservative_bytes(mem) <= out['hbm']['usable_bytes'])
  text = compiled.as_text()
  if hlo_path:
    os.makedirs(os.path.dirname(hlo_path) or '.', exist_ok=True)
    with open(hlo_path, 'w') as f:
      f.write(text)
  cost = cost_analysis(compiled)
  out['flops_per_chip'] = cost['flops']
  out['bytes_accessed_per_chip'] = cost['bytes_accessed']
  out['loops_counted_once'] = loops_counted_once(text)
  out['collectives'] = analyze_hlo(text)['collectives']
  return out
