"""The training loop: curriculum stages, data, checkpoints, faults, logging.

    python -m unimedvl_jax.train --config configs/tiny.py --workdir DIR [--config.KEY=VALUE ...]

- Resumes from the newest readable checkpoint in DIR (same command after a kill -9 or SIGTERM);
  metrics.jsonl lines past the restored step are dropped so the log stays the uninterrupted run's.
- SIGTERM (preemption) saves a checkpoint and exits 0.
- A non-finite loss or gradient is rejected inside the step (state unchanged), counted, and after
  train.max_nonfinite_steps the run stops with NonFiniteError; no NaN ever reaches a checkpoint.
- Stage boundaries switch the data mixture and the step's settings without restarting.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax import batch as batch_lib
from unimedvl_jax import profiling, sharding
from unimedvl_jax.config import stage_train_config, validate
from unimedvl_jax.train import step as step_lib
from unimedvl_jax.train.checkpoint import Checkpointer, CheckpointError, config_to_json


class NonFiniteError(RuntimeError):
  pass


# train fields that do not change the compiled step (host-side schedule / bookkeeping)
STAGE_DYNAMIC_FIELDS = ('lr', 'schedule', 'warmup_steps', 'min_lr', 'total_steps', 'log_every',
                        'checkpoint_every', 'keep_checkpoints', 'max_nonfinite_steps',
                        'profile_steps', 'dump_hlo')


def stage_plan(cfg) -> list[dict]:
  """[{name, kind, start, end}] in global steps; one implicit stage without a curriculum."""
  if not cfg.stages:
    return [dict(name=None, kind='lm', start=0, end=int(cfg.train.total_steps))]
  out, start = [], 0
  for name in cfg.stages:
    st = cfg.curriculum[name]
    n = int(st.steps)
    out.append(dict(name=name, kind=st.get('kind', 'lm'), start=start, end=start + n))
    start += n
  return out


class _Preempted:
  def __init__(self):
    self.flag = False

  def __call__(self, signum, frame):
    self.flag = True


class MetricsWriter:
  """metrics.jsonl (+ TensorBoard) on process 0."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):     # drop lines the resumed run will write again
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            if json.loads(line).get('step', 0) <= resume_step:
              keep.append(line)
          except json.JSONDecodeError:
            pass
      with open(self.path, 'w') as f:
        f.writelines(keep)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
    except Exception as e:  # noqa: BLE001
      print(f'WARNING: TensorBoard disabled ({e})', file=sys.stderr)

  def write(self, rec: dict):
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(rec) + '\n')
    if self.tb is not None:
      for k, v in rec.items():
        if isinstance(v, (int, float)) and k != 'step':
          self.tb.add_scalar(k, v, rec['step'])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _host_batch_to_global(batch: dict, b_sh: dict):
  if jax.process_count() == 1:
    return {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(b_sh[k], v) for k, v in batch.items()}


def prepare_data_root(cfg, workdir: str) -> str:
  """cfg.data.root, or the embedded synthetic dataset generated (once) under workdir/data."""
  if cfg.data.root:
    return cfg.data.root
  root = os.path.join(workdir, 'data')
  if not os.path.exists(os.path.join(root, 'manifest.json')):
    from unimedvl_jax.data import synthetic
    size = int(cfg.data.vae_max_size)
    print(f'generating the embedded dataset in {root} ({size}px) ...', flush=True)
    synthetic.ensure_dataset(root, seed=0, size=size)
  return root


def train(cfg, workdir: str, *, max_steps: int | None = None, quiet: bool = False) -> dict:
  """Runs (or resumes) the configured training. Returns a summary dict."""
  validate(cfg)
  sharding.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  cfg = cfg.copy_and_resolve_references()
  cfg.data.root = prepare_data_root(cfg, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_to_json(cfg), f, indent=1)

  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abstract = step_lib.abstract_state(cfg)
  st_sh = step_lib.state_shardings(abstract, mesh)
  ckpt = Checkpointer(workdir, max_to_keep=cfg.train.keep_checkpoints,
                      save_interval_steps=1, async_save=True)

  data_state: dict[str, Any] = {}
  step = 0
  if ckpt.latest_step() is not None:
    step, state, data_state, _ = ckpt.restore(abstract, shardings=st_sh)
    if not quiet:
      print(f'resumed from {ckpt.directory}/{step}', flush=True)
  else:
    init = jax.jit(lambda: step_lib.init_state(cfg)[1], out_shardings=st_sh)
    state = init()
  step = int(step)
  writer = MetricsWriter(workdir, step)
  preempt = _Preempted()
  old_handler = signal.signal(signal.SIGTERM, preempt)
  spec = batch_lib.batch_spec(cfg)
  peak = profiling.measure_matmul_peak(jnp.bfloat16 if cfg.model.dtype == 'bfloat16' else jnp.float32,
                                       n=1024, iters=3)
  flops = profiling.model_flops_per_step(cfg)['train']
  summary = {'start_step': step, 'stages': []}
  nonfinite = int(np.asarray(state['meta']['nonfinite']))
  stop_at = None if max_steps is None else step + max_steps
  profile_steps = tuple(cfg.train.profile_steps)
  pidx, pcount = jax.process_index(), jax.process_count()

  from unimedvl_jax.data import pipeline
  compiled: dict = {}

  saved = {'step': step}

  def save(s, it, stage_name, force=False):
    if saved['step'] == s:
      return
    ds = {'stage': stage_name, 'iterator': it.get_state() if it is not None else None}
    ckpt.save(s, state, data_state=ds, cfg=cfg, force=force)
    saved['step'] = s

  try:
    for st in stage_plan(cfg):
      if step >= st['end']:
        continue
      tc = stage_train_config(cfg, st['name'])
      if st['kind'] == 'vae':
        tc.freeze = ('vit', 'connector', 'adapters', 'llm')   # only the VAE learns
      # stages with the same static settings share one compiled step (the lr is an argument)
      key = (st['kind'], json.dumps({k: v for k, v in tc.to_dict().items()
                                     if k not in STAGE_DYNAMIC_FIELDS}, sort_keys=True, default=str))
      if key not in compiled:
        fn = step_lib.make_train_step(graphdef, cfg, tc, objective=st['kind'])
        compiled[key] = step_lib.jit_train_step(fn, abstract, mesh, spec)
      jitted, _, b_sh = compiled[key]
      # MFU numerator: the LM step's model FLOPs, or the autoencoder's for a 'vae' stage (whose
      # tokens_per_s still counts the packs' tokens, which that objective does not process)
      stage_flops = (profiling.vae_stage_flops_per_step(cfg, slots=step_lib.VAE_SLOTS)
                     if st['kind'] == 'vae' else flops)
      sched = step_lib.lr_schedule(tc, st['end'] - st['start'])
      it = pipeline.make_train_iterator(cfg, st['name'], process_index=pidx, process_count=pcount)
      if data_state and data_state.get('stage') == st['name'] and data_state.get('iterator'):
        it.set_state(data_state['iterator'])
      if cfg.train.dump_hlo:
        b0 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], s[1]), spec,
                          is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))
        comp = jitted.lower(abstract, b0, jnp.float32(0)).compile()
        profiling.dump_hlo(comp, os.path.join(workdir, 'hlo', f'train_step_{st["name"]}.txt'))
      bar = None
      if not quiet and sys.stderr.isatty() and pidx == 0:
        from tqdm import tqdm
        bar = tqdm(total=st['end'] - st['start'], initial=step - st['start'],
                   desc=f'{st["name"] or "train"}', dynamic_ncols=True)
      t_last = time.perf_counter()
      toks_since, steps_since = 0, 0
      for s in range(step, st['end']):
        if stop_at is not None and s >= stop_at:
          break
        if s in profile_steps:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        host_batch = next(it)
        toks_since += int(np.sum(host_batch['segment_ids'] > 0)) * pcount
        steps_since += 1
        gb = _host_batch_to_global(host_batch, b_sh)
        lr = jnp.float32(sched(s - st['start']))
        state, m = jitted(state, gb, lr)
        step = s + 1
        ok = bool(m['ok'])
        if s in profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        if not ok:
          nonfinite += 1
          print(f'WARNING: step {s}: non-finite loss/gradient rejected '
                f'({nonfinite}/{cfg.train.max_nonfinite_steps})', file=sys.stderr, flush=True)
          if nonfinite > cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f'training stopped at step {s}: {nonfinite} non-finite steps exceed '
                f'train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}; the last saved '
                f'checkpoint in {ckpt.directory} is clean (rejected steps never update the state)')
        if step % cfg.train.log_every == 0 or step == st['end']:
          now = time.perf_counter()
          dt = (now - t_last) / max(steps_since, 1)
          rec = {'step': step, 'stage': st['name'] or 'train',
                 'loss': float(m['loss']), 'ce': float(m['ce']), 'mse': float(m['mse']),
                 'grad_norm': float(m['grad_norm']), 'lr': float(m['lr']),
                 'step_time_s': dt, 'tokens_per_s': toks_since / max(now - t_last, 1e-9),
                 'mfu': stage_flops / dt / peak if dt > 0 else 0.0,
                 'nonfinite_steps': nonfinite}
          rec.update({f'data_{k}': v for k, v in it.stats().items()
                      if isinstance(v, (int, float))})
          writer.write(rec)
          t_last, toks_since, steps_since = now, 0, 0
          if bar is not None:
            bar.set_postfix(loss=f'{rec["loss"]:.3f}', ce=f'{rec["ce"]:.3f}', mse=f'{rec["mse"]:.3f}')
          elif not quiet and pidx == 0:
            print(f'[{rec["stage"]}] step {step} loss {rec["loss"]:.4f} ce {rec["ce"]:.4f} '
                  f'mse {rec["mse"]:.4f} lr {rec["lr"]:.2e} {dt:.2f}s/step', flush=True)
        if bar is not None:
          bar.update(1)
        if step % cfg.train.checkpoint_every == 0 or step == st['end']:
          save(step, it, st['name'])
        if preempt.flag:
          print(f'SIGTERM: saving step {step} and exiting', file=sys.stderr, flush=True)
          save(step, it, st['name'], force=True)
          ckpt.wait()
          summary['preempted'] = True
          return summary
      if bar is not None:
        bar.close()
      if hasattr(it, 'close'):
        it.close()
      summary['stages'].append({'name': st['name'], 'end_step': step})
      if stop_at is not None and step >= stop_at:
        break
      data_state = {}
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    signal.signal(signal.SIGTERM, old_handler)
  summary['end_step'] = step
  summary['nonfinite_steps'] = nonfinite
  return summary
