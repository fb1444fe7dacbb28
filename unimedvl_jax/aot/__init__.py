"""AOT planning without hardware: compile the REAL training step for a TPU pod slice on this CPU.

    python -m unimedvl_jax.inspect --config configs/unimedvl_7b.py --topology v5p:4x4x4 \
        --config.model.attention_impl=pallas [--config.mesh.tensor=4 ...]

`plan(cfg, topology)` uses the libtpu wheel (`pip install 'jax[tpu]==0.10.2'`, which pins
`libtpu==0.0.42.1`) and `jax.experimental.topologies.get_topology_desc` to get abstract TPU
devices, builds the config's mesh over them (`sharding.make_mesh`, topology-aware device order),
and AOT-compiles exactly what `train.loop` runs: `step.make_train_step` + `step.jit_train_step`
on the abstract training state (`step.abstract_state`: fp32 masters, AdamW moments, EMA, frozen
tables) and an abstract packed batch of `batch.batch_spec(cfg)` (full pack: both experts, ViT,
VAE encode, CE + flow loss, grad-norm clip, EMA), with the config's attention implementation and
remat policy. The XLA:TPU compiler then does buffer assignment for the real chip, so the memory
numbers are the ones a pod would see (an out-of-memory compile is reported, not raised).

Environment. libtpu reads TPU_SKIP_MDS_QUERY=1, TPU_ACCELERATOR_TYPE, TPU_WORKER_ID=0 and
TPU_WORKER_HOSTNAMES=localhost when it loads; JAX_PLATFORMS=cpu keeps the CPU backend the default
(no TPU is attached). `prepare_env` sets all of them (setdefault) and must run before libtpu is
loaded; `unimedvl_jax.inspect` calls it before it imports jax when --topology is given.
ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set too, so several planning processes can run at once.

Attention dispatch. `model/attention.py` picks the implementation for 'auto', the Pallas backend
and interpret mode from the platform it is given (config `model.attention_platform`), not from
this process's backend (the CPU). `plan` and `plan_generation` set `attention_platform='tpu'` on
their copy of the config, so `attention_impl='pallas'|'auto'` lowers the Mosaic TPU
flash-attention kernels, not interpret mode; nothing global is patched. `attention_impl='xla'`
lowers the reference attention (a dense [T, T] mask: it does not fit at 20k tokens; that is
reported as such).

Modules: `topology` (chips, slice names, libtpu environment, abstract devices), `cost`
(FLOPs / bytes: cost_analysis of unrolled 1- and 2-layer variants scaled to the full depth),
`hlo_stats` (collectives and while-loop trip counts of optimized HLO), `memory`
(compile-or-OOM, per-chip bytes), `train_plan` (`plan`, `train_step_cost`, `update_from_cost`,
`update_from_hlo`), `generation_plan` (`plan_generation`).

What the returned dict holds (all memory numbers are per chip):
  fits            peak_memory_in_bytes <= the chip's usable HBM (or False when XLA:TPU refused
                  the program for lack of memory; then `oom` holds the compiler's numbers)
  fits_conservative  the same for arguments + outputs - aliased + temporaries + code (XLA's
                  temp_size is the whole temporary pool, larger than the live peak)
  memory          XLA's memory_analysis: argument / output / temp / alias / peak bytes; plus
                  `state_bytes` (sharded train state, computed from the shardings)
  hbm             the chip's HBM per generation (v4 32 GiB, v5e 16, v5p 95, v6e 32 GiB). The
                  runtime reserves a little of it (program binary, DMA/semaphore scratch; the
                  compiler's own limit is printed in its OOM message, e.g. 95.74G on v5p, 15.75G
                  on v5e); `fits` uses the table minus `reserved_gib` (0.5 GiB) to stay honest.
  flops           `analytic`: profiling.model_flops_per_step (global, the MFU numerator).
                  `compiled_per_chip`: FLOPs of the partitioned program of one chip, from XLA's
                  cost_analysis. cost_analysis counts a while body ONCE (scanned layers would
                  be counted once; it is reported raw for the scanned step as
                  `xla_cost_analysis_raw`), so it is taken of UNROLLED variants of the step
                  with 1 and 2 decoder / ViT layers (also the CE loss in one chunk and no
                  micro-batch loop) and scaled linearly to the config's depth (aot/cost.py:
                  `per_layer`, `variants`; `bytes_accessed_per_chip`,
                  `transcendentals_per_chip` the same way; `cost_seconds` the variants'
                  compiles; none of it when a variant runs out of memory, see `notes`).
                  `loops_counted_once` lists while loops the variants still hold (then the
                  count is low). tests/scale/
                  test_scale_aot.py checks the scaled count against cost_analysis of the fully
                  unrolled step. Remat recomputation is included in the compiled count
                  (hardware FLOPs), not in the analytic one (model FLOPs). `while_trip_counts`:
                  the loops of the scanned step's optimized HLO (hlo_stats).
  step_time       `compute_bound_s` = compiled_per_chip / chip peak (bf16 peak: v4 275, v5e 197,
                  v5p 459, v6e 918 TFLOP/s): a LOWER bound on the step time (no communication,
                  100% MXU use), and `mfu_upper_bound` = analytic / (chips * peak * that time) =
                  analytic / (chips * compiled_per_chip). `at_mfu` gives step times at 40% / 50%
                  MFU, the range large-model JAX trainers report on TPU.
  collectives     counts of all-gather / reduce-scatter / all-reduce / all-to-all /
                  collective-permute in the optimized HLO of the scanned step (hlo_stats: what
                  cost_analysis does not give): `static` (instructions in the program) and
                  `per_step` (weighted by loop trip counts).
"""

from unimedvl_jax.aot.cost import cost_analysis, scaled_cost
from unimedvl_jax.aot.generation_plan import plan_generation
from unimedvl_jax.aot.hlo_stats import COLLECTIVES, analyze_hlo
from unimedvl_jax.aot.memory import compile_or_oom, conservative_bytes, state_bytes_per_chip
from unimedvl_jax.aot.topology import (GIB, RESERVED_GIB, TPU_CHIPS, TopologySpec,
                                       gpu_offline_compile_check, libtpu_available,
                                       parse_topology, prepare_env, topology_devices)
from unimedvl_jax.aot.train_plan import (attention_impl_resolved, plan, train_step_cost,
                                         update_from_cost, update_from_hlo)

__all__ = ['COLLECTIVES', 'GIB', 'RESERVED_GIB', 'TPU_CHIPS', 'TopologySpec', 'analyze_hlo',
           'attention_impl_resolved', 'compile_or_oom', 'conservative_bytes', 'cost_analysis',
           'gpu_offline_compile_check', 'libtpu_available', 'parse_topology', 'plan',
           'plan_generation', 'prepare_env', 'scaled_cost', 'state_bytes_per_chip',
           'topology_devices', 'train_step_cost', 'update_from_cost', 'update_from_hlo']
