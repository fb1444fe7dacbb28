"""The AOT plan of the training step (`plan`; see the package docstring for what it reports)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from unimedvl_jax.aot.hlo_stats import analyze_hlo
from unimedvl_jax.aot.memory import compile_or_oom, conservative_bytes, state_bytes_per_chip
from unimedvl_jax.aot.topology import GIB, RESERVED_GIB, TPU_CHIPS, target_config, topology_devices
from unimedvl_jax.batch import latent_cache_path

def _first_lm_stage(cfg):
  for name in cfg.stages:
    if cfg.curriculum[name].get('kind', 'lm') == 'lm':
      return name
  return None



def attention_impl_resolved(cfg) -> str:
  from unimedvl_jax.model import attention as attn_lib
  return attn_lib.resolve_impl(cfg.model.attention_impl,
                               cfg.model.get('attention_platform', '') or None)


def plan(cfg, topology: str, *, stage: str | None = None, reserved_gib: float = RESERVED_GIB,
         adjust_batch: bool = False, hlo_path: str | None = None) -> dict[str, Any]:
  """AOT-compiles the training step of `cfg` for a TPU `topology`; see the module docstring.

  stage: the curriculum stage whose train settings (freeze, loss weights) are used; default the
  first 'lm' stage (or the plain `train` settings without a curriculum).
  adjust_batch: when data.batch_size is not a multiple of the batch-sharding axes
  (data * fsdp), round it up to the next multiple (reported as `batch.adjusted_from`); off by
  default: such a batch is a ConfigError naming the batch and the mesh, as in training.
  hlo_path: also write the optimized HLO text there.
  """
  spec, cfg = target_config(cfg, topology)
  import jax
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax import profiling, sharding
  from unimedvl_jax.config import stage_train_config
  from unimedvl_jax.train import step as step_lib

  t0 = time.perf_counter()
  devices = topology_devices(spec)
  chip = TPU_CHIPS[spec.generation]
  per_chip = max(1, len(devices) // spec.chips)       # devices per chip (v4 may list cores)
  hbm = chip['hbm_gib'] * GIB / per_chip
  peak = chip['peak_tflops'] * 1e12 / per_chip
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.Rules.from_config(cfg)
  shards = math.prod(mesh.shape[a] for a in rules.batch_axes())
  B0 = int(cfg.data.batch_size)
  if B0 % shards and adjust_batch:
    cfg.data.batch_size = -(-B0 // shards) * shards
  sharding.check_batch(cfg.data.batch_size, mesh, rules)   # ConfigError naming both
  stage = stage if stage is not None else _first_lm_stage(cfg)
  tc = stage_train_config(cfg, stage)

  graphdef, abstract = step_lib.abstract_state(cfg)
  fn = step_lib.make_train_step(graphdef, cfg, tc, objective='lm')
  bspec = batch_lib.batch_spec(cfg)
  jitted, st_sh, b_sh = step_lib.jit_train_step(fn, abstract, mesh, bspec, rules)
  abatch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in bspec.items()}
  flops_model = profiling.model_flops_per_step(cfg, frozen=tuple(tc.freeze))
  counts = profiling.param_counts(cfg.model)

  out: dict[str, Any] = {
      'topology': spec.name, 'accelerator_type': spec.accelerator_type,
      'generation': spec.generation, 'chips': spec.chips, 'devices': len(devices),
      'device_kind': devices[0].device_kind,
      'mesh': dict(mesh.shape),
      'model': {'params_total': counts['total'], 'vae_params': counts['vae'],
                'attention_impl': cfg.model.attention_impl, 'remat': cfg.model.remat,
                'scan_layers': bool(cfg.model.scan_layers), 'dtype': cfg.model.dtype,
                'freeze': list(tc.freeze), 'stage': stage},
      'batch': {'batch_size': int(cfg.data.batch_size), 'packs_per_chip':
                int(cfg.data.batch_size) / shards, 'seq_len': int(cfg.data.seq_len),
                'max_latent_tokens': int(cfg.data.max_latent_tokens),
                'max_vit_patches': int(cfg.data.max_vit_patches),
                'max_vae_images': int(cfg.data.max_vae_images),
                'vae_buckets': [list(b) for b in batch_lib.Geometry.from_config(cfg).vae_buckets],
                'max_label_tokens': int(batch_lib.Geometry.from_config(cfg).labels),
                'latent_cache': bool(latent_cache_path(cfg.data)),
                'grad_accum': int(tc.grad_accum),
                'tokens_per_step': int(cfg.data.batch_size) * int(cfg.data.seq_len)},
      'hbm': {'per_chip_gib': chip['hbm_gib'], 'per_device_bytes': int(hbm),
              'reserved_gib': reserved_gib,
              'usable_bytes': int(hbm - reserved_gib * GIB / per_chip)},
      'peak_tflops_per_chip': chip['peak_tflops'],
  }
  if int(cfg.data.batch_size) != B0:
    out['batch']['adjusted_from'] = B0
  out['memory'] = {'state_bytes': state_bytes_per_chip(abstract, st_sh)}

  out['notes'] = []
  lowered = jitted.lower(abstract, abatch)
  t1 = time.perf_counter()
  out['lower_seconds'] = round(t1 - t0, 1)
  compiled, oom = compile_or_oom(lowered)
  if compiled is None:
    out['compile_seconds'] = round(time.perf_counter() - t1, 1)
    out['fits'] = False
    out['oom'] = oom
    out['flops'] = {'analytic': flops_model['train']}
    return out
  out['compile_seconds'] = round(time.perf_counter() - t1, 1)
  mem = profiling.compiled_memory(compiled)
  out['memory'].update(mem)
  peak_bytes = mem.get('peak_memory_in_bytes')
  if not peak_bytes:   # older runtimes: arguments + outputs + temporaries - aliased
    peak_bytes = (mem.get('argument_size_in_bytes', 0) + mem.get('output_size_in_bytes', 0)
                  + mem.get('temp_size_in_bytes', 0) - mem.get('alias_size_in_bytes', 0))
    out['memory']['peak_estimated'] = True
  out['memory']['peak_gib'] = round(peak_bytes / GIB, 2)
  out['fits'] = bool(peak_bytes <= out['hbm']['usable_bytes'])
  # a conservative total: every argument, non-aliased output, the whole temp pool and the code
  cons = conservative_bytes(mem)
  out['memory']['conservative_bytes'] = cons
  out['fits_conservative'] = bool(cons <= out['hbm']['usable_bytes'])

  text = compiled.as_text()
  if hlo_path:
    os.makedirs(os.path.dirname(hlo_path) or '.', exist_ok=True)
    with open(hlo_path, 'w') as f:
      f.write(text)
  out['flops'] = {'analytic': flops_model['train'],
                  'analytic_breakdown': {k: v for k, v in flops_model.items()
                                         if k.startswith('fwd_')},
                  'xla_cost_analysis_raw': profiling.compiled_cost(compiled)['flops']}
  update_from_hlo(out, text)
  return out


def update_from_hlo(out: dict[str, Any], text: str) -> dict[str, Any]:
  """Fills out['flops'] (compiled), out['step_time'] and out['collectives'] from optimized HLO."""
  hlo = analyze_hlo(text)
  n_dev = int(out['devices'])
  per_dev = max(1, n_dev // int(out['chips']))
  peak = TPU_CHIPS[out['generation']]['peak_tflops'] * 1e12 / per_dev
  per_chip_flops = hlo['flops']
  fl = out.setdefault('flops', {})
  analytic = fl['analytic']
  fl.update({
      'compiled_per_chip': per_chip_flops,
      'compiled_total': per_chip_flops * n_dev,
      'compiled_custom_calls_per_chip': hlo['flops_custom_calls'],
      'compiled_over_analytic': per_chip_flops * n_dev / analytic if analytic else None,
      'while_trip_counts': hlo['while_trip_counts'],
      'unknown_trip_counts': hlo['unknown_trip_counts'],
      'method': 'optimized-HLO dot/convolution (XLA HloCostAnalysis rule) + Mosaic '
                'CostEstimate FLOPs, x while-loop trip counts',
  })
  t_compute = per_chip_flops / peak if per_chip_flops else None
  out['step_time'] = {
      'compute_bound_s': t_compute,
      'mfu_upper_bound': analytic / (n_dev * per_chip_flops) if per_chip_flops else None,
      'at_mfu': {f'{p:.2f}': analytic / (n_dev * peak * p) for p in (0.4, 0.5)},
      'tokens_per_s_per_chip_at_bound': (out['batch']['tokens_per_step'] / n_dev / t_compute
                                         if t_compute else None),
  }
  out['collectives'] = hlo['collectives']
  return out
