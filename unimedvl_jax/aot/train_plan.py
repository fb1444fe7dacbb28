"""The AOT plan of the training step (`plan`; see the package docstring for what it reports), and
its per-chip FLOPs / bytes (`train_step_cost`: cost_analysis of unrolled 1- and 2-layer
variants of the step scaled to the config's depth, aot/cost.py)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from unimedvl_jax.aot.cost import cost_analysis, scaled_cost
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
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax import profiling, sharding
  from unimedvl_jax.config import stage_train_config

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

  lowered, abstract, st_sh = lower_train_step(cfg, tc, mesh, rules)
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
  t2 = time.perf_counter()
  cost = train_step_cost(cfg, tc, mesh, rules)
  out['cost_seconds'] = round(time.perf_counter() - t2, 1)
  out['flops'] = {'analytic': flops_model['train'],
                  'analytic_breakdown': {k: v for k, v in flops_model.items()
                                         if k.startswith('fwd_')},
                  'xla_cost_analysis_raw': cost_analysis(compiled)['flops']}
  update_from_cost(out, cost)
  update_from_hlo(out, text)
  return out


def lower_train_step(cfg, tc, mesh, rules):
  """(jax Lowered, abstract state, state shardings) of the training step of `cfg` with the
  stage train settings `tc`, on an abstract packed batch of `batch.batch_spec(cfg)`."""
  import jax
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax.train import step as step_lib
  graphdef, abstract = step_lib.abstract_state(cfg)
  fn = step_lib.make_train_step(graphdef, cfg, tc, objective='lm')
  bspec = batch_lib.batch_spec(cfg)
  jitted, st_sh, _ = step_lib.jit_train_step(fn, abstract, mesh, bspec, rules)
  abatch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in bspec.items()}
  return jitted.lower(abstract, abatch), abstract, st_sh


def unrolled_variant(cfg, tc, layers: dict[str, int]):
  """(cfg, tc) of the loop-free variant of the step that `train_step_cost` compiles: `layers`
  ({'llm': n, 'vit': m}) decoder / ViT layers unrolled (model.scan_layers=False), the CE loss
  in one chunk (model.ce_chunk = all label rows; the chunked loss only adds the padding rows of
  its last chunk) and no gradient accumulation loop (grad_accum=1 on the whole batch: the same
  FLOPs but the micro-batch gradient sums) and the VAE's chunked mid-block attention unrolled
  (model.unroll_loops)."""
  from ml_collections import ConfigDict
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax.config_validate import validate
  v = cfg.copy_and_resolve_references()
  v.model.scan_layers = False
  v.model.unroll_loops = True
  v.model.llm.num_layers = int(layers['llm'])
  v.model.vit.num_layers = int(layers['vit'])
  v.model.ce_chunk = int(v.data.batch_size) * int(batch_lib.Geometry.from_config(v).labels)
  tv = ConfigDict(tc.to_dict())
  tv.grad_accum = 1
  return validate(v), tv


def train_step_cost(cfg, tc, mesh, rules, *, lower_only: bool = False) -> dict[str, Any] | None:
  """Per-chip cost_analysis (flops, bytes_accessed, transcendentals) of the training step of
  `cfg` on `mesh`, scaled from unrolled 1- and 2-layer variants (`unrolled_variant`,
  cost.scaled_cost); None when a variant does not compile for lack of memory.

  lower_only: cost_analysis of the lowered variants instead, without compiling them (the
  unoptimized program before partitioning: global, no fusion or remat decisions); a fast check
  of the scaling."""
  def variant_cost(layers):
    v, tv = unrolled_variant(cfg, tc, layers)
    lowered = lower_train_step(v, tv, mesh, rules)[0]
    if lower_only:
      return cost_analysis(lowered), lowered.as_text(dialect='hlo', debug_info=True)
    compiled = compile_or_oom(lowered)[0]
    return None if compiled is None else (cost_analysis(compiled), compiled.as_text())
  return scaled_cost(variant_cost, {'llm': int(cfg.model.llm.num_layers),
                                    'vit': int(cfg.model.vit.num_layers)})


def update_from_cost(out: dict[str, Any], cost: dict[str, Any] | None) -> dict[str, Any]:
  """Fills out['flops'] (compiled) and out['step_time'] from `train_step_cost`'s estimate."""
  fl = out.setdefault('flops', {})
  if cost is None:
    out['notes'].append('an unrolled 1- or 2-layer variant did not compile (out of memory): no '
                        'compiled FLOPs')
    return out
  n_dev = int(out['devices'])
  per_dev = max(1, n_dev // int(out['chips']))
  peak = TPU_CHIPS[out['generation']]['peak_tflops'] * 1e12 / per_dev
  per_chip_flops = cost['flops']
  analytic = fl['analytic']
  fl.update({
      'compiled_per_chip': per_chip_flops,
      'compiled_total': per_chip_flops * n_dev,
      'compiled_over_analytic': per_chip_flops * n_dev / analytic if analytic else None,
      'bytes_accessed_per_chip': cost['bytes_accessed'],
      'transcendentals_per_chip': cost['transcendentals'],
      'per_layer': cost['per_layer'],
      'variants': cost['variants'],
      'loops_counted_once': cost['loops_counted_once'],
      'method': 'XLA cost_analysis of unrolled 1- and 2-layer variants (LLM, ViT) of the '
                'compiled step, scaled linearly to the full depth',
  })
  if cost['loops_counted_once']:
    out['notes'].append(f'the unrolled variants still hold while loops whose bodies '
                        f'cost_analysis counts once (compiled FLOPs are low): '
                        f'{cost["loops_counted_once"]}')
  t_compute = per_chip_flops / peak if per_chip_flops else None
  out['step_time'] = {
      'compute_bound_s': t_compute,
      'mfu_upper_bound': analytic / (n_dev * per_chip_flops) if per_chip_flops else None,
      'at_mfu': {f'{p:.2f}': analytic / (n_dev * peak * p) for p in (0.4, 0.5)},
      'tokens_per_s_per_chip_at_bound': (out['batch']['tokens_per_step'] / n_dev / t_compute
                                         if t_compute else None),
  }
  return out


def update_from_hlo(out: dict[str, Any], text: str) -> dict[str, Any]:
  """Fills out['collectives'] and out['flops']['while_trip_counts'] from the optimized HLO of
  the (scanned) step."""
  hlo = analyze_hlo(text)
  fl = out.setdefault('flops', {})
  fl['while_trip_counts'] = hlo['while_trip_counts']
  fl['unknown_trip_counts'] = hlo['unknown_trip_counts']
  out['collectives'] = hlo['collectives']
  return out
