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
from unimedvl_jax.config import stage_plan, stage_train_config
from unimedvl_jax.config_validate import validate
from unimedvl_jax.data.locate import data_root
from unimedvl_jax.train import step as step_lib
from unimedvl_jax.train.checkpoint import Checkpointer
from unimedvl_jax.train.checkpoint_format import config_to_json
from unimedvl_jax.train.workdir import WorkdirLock


class NonFiniteError(RuntimeError):
  pass


# train fields that do not change the compiled step: the learning-rate schedule (the step's
# optimizer holds the whole run's, step.lr_schedule(cfg)) and host-side bookkeeping
STAGE_DYNAMIC_FIELDS = ('lr', 'schedule', 'warmup_steps', 'min_lr', 'total_steps', 'log_every',
                        'checkpoint_every', 'keep_checkpoints', 'max_nonfinite_steps',
                        'profile_steps', 'dump_hlo')


def stage_lora(cfg, st: dict) -> bool:
  return bool(stage_train_config(cfg, st['name']).get('lora', False))


def checkpoint_lora(cfg, plan: list[dict], step: int) -> bool:
  """train.lora of the stage that wrote the checkpoint of `step` (the stage ending at or running
  through it; the first stage for step 0)."""
  for st in plan:
    if st['start'] < step <= st['end']:
      return stage_lora(cfg, st)
  return stage_lora(cfg, plan[0] if step <= plan[0]['start'] else plan[-1])


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
    if self.tb is not None:   # tags '<stage>/<metric>': one TensorBoard section per stage
      stage = rec.get('stage') or 'train'
      for k, v in rec.items():
        if isinstance(v, (int, float)) and k != 'step':
          self.tb.add_scalar(f'{stage}/{k}', v, rec['step'])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _host_batch_to_global(batch: dict, b_sh: dict):
  if jax.process_count() == 1:
    return {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(b_sh[k], v) for k, v in batch.items()}


class DevicePrefetch:
  """Global device batches `depth` steps ahead of the train step, from a background thread.

  Each item is (device batch, host token count, the data iterator's state right after that
  batch): a checkpoint saves the state of the batches the step has consumed, not of the ones
  prefetched. The thread produces at most `limit` batches (the rest of the stage); an exception
  in it (a DataError) is raised in the consumer at the batch where it happened.
  """

  def __init__(self, it, b_sh: dict, depth: int, limit: int, scale_tokens: int = 1):
    import queue
    import threading
    self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()

    def run():
      try:
        for _ in range(limit):
          if self._stop.is_set():
            return
          host = next(it)
          toks = int(np.sum(host['segment_ids'] > 0)) * scale_tokens
          item = (_host_batch_to_global(host, b_sh), toks, it.get_state())
          while not self._stop.is_set():
            try:
              self._q.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
      except BaseException as e:  # noqa: BLE001 - handed to the consumer
        self._q.put(e)

    self._thread = threading.Thread(target=run, name='device-prefetch', daemon=True)
    self._thread.start()

  def __next__(self):
    item = self._q.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._q.get(timeout=0.05)
      except Exception:  # noqa: BLE001 - empty queue
        pass
    self._thread.join()


def _log_record(step, stage_name, ms: list, dt, toks, flops, peak, nonfinite, it_stats) -> dict:
  """The metrics.jsonl record of a log interval: means of the interval's device metrics (fetched
  here, one host sync per log interval) and the host-side throughput."""
  host = jax.device_get(ms)
  mean = lambda k: float(np.mean([m[k] for m in host if bool(m['ok'])] or [np.nan]))
  rec = {'step': step, 'stage': stage_name or 'train',
         'loss': mean('loss'), 'ce': mean('ce'), 'mse': mean('mse'),
         'grad_norm': mean('grad_norm'), 'lr': float(host[-1]['lr']),
         'step_time_s': dt, 'tokens_per_s': toks / max(dt * len(ms), 1e-9),
         'mfu': flops / dt / peak if dt > 0 else 0.0, 'nonfinite_steps': nonfinite}
  rec.update({f'data_{k}': v for k, v in it_stats.items() if isinstance(v, (int, float))})
  return rec


def stage_latent_cache(cfg, kind: str, workdir: str, graphdef, state, *, quiet=False) -> str:
  """The latent cache a stage trains from ('' = pixels), built or checked against the VAE of the
  current state. data.latent_cache: '' (never), a directory (written by `python -m
  unimedvl_jax.data cache-latents`; its VAE must be this model's) or 'auto' (WORKDIR/latent_cache,
  written here from the current VAE before the first stage that uses it, and rewritten when the
  VAE has changed since, e.g. after a 'vae' stage). A 'vae' stage always trains on pixels."""
  from unimedvl_jax.data import latent_cache as lc
  want = cfg.data.get('latent_cache', '')
  if not want or kind == 'vae' or not cfg.model.vae.enabled or cfg.data.max_latent_tokens == 0:
    return ''
  from flax import nnx
  params = jax.device_get(state['params'])
  model = nnx.merge(graphdef, params, jax.device_get(state['buffers']))
  fp = lc.vae_fingerprint(nnx.state(model.vae, nnx.Param))
  path = os.path.join(workdir, 'latent_cache') if want == 'auto' else want
  try:
    cache = lc.LatentCache(path, cfg.data.root, cfg)
    cache.check_vae(fp)
    return path
  except lc.LatentCacheError as e:
    if want != 'auto':
      raise
    if not quiet:
      print(f'latent cache: (re)building {path} ({e})', flush=True)
  if jax.process_index() == 0:
    lc.build(cfg, model, cfg.data.root, path, log=(lambda *a: None) if quiet else print)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('latent_cache')
  lc.LatentCache(path, cfg.data.root, cfg).check_vae(fp)
  return path


def train(cfg, workdir: str, *, max_steps: int | None = None, quiet: bool = False) -> dict:
  """Runs (or resumes) the configured training. Returns a summary dict. Holds the workdir lock
  (train/workdir.py) throughout: a second run on the same workdir fails at once."""
  validate(cfg)
  sharding.maybe_initialize_distributed()
  with WorkdirLock(workdir, jax.process_index()):
    return _train(cfg, workdir, max_steps=max_steps, quiet=quiet)


def _train(cfg, workdir: str, *, max_steps: int | None = None, quiet: bool = False) -> dict:
  os.makedirs(workdir, exist_ok=True)
  cfg = cfg.copy_and_resolve_references()
  cfg.data.root = data_root(cfg, workdir)   # empty: the embedded dataset under workdir/data
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_to_json(cfg), f, indent=1)

  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.Rules.from_config(cfg)
  sharding.check_batch(cfg.data.batch_size, mesh, rules)
  plan = stage_plan(cfg)
  skipped = [n for n in cfg.get('curriculum', {}) if n not in {st['name'] for st in plan}]
  if skipped and not quiet:   # config.stages selects and orders the stages that run
    print(f'config.stages {tuple(cfg.stages)}: curriculum stage(s) {skipped} will not run',
          flush=True)
  # the state's structure depends on train.lora (the optimizer state holds the adapters alone)
  abstracts: dict = {}

  def abstract_for(lora: bool):
    if lora not in abstracts:
      g, a = step_lib.abstract_state(cfg, lora=lora)
      abstracts[lora] = (g, a, step_lib.state_shardings(a, mesh, rules))
    return abstracts[lora]

  graphdef, _, _ = abstract_for(stage_lora(cfg, plan[0]))
  ckpt = Checkpointer(workdir, max_to_keep=cfg.train.keep_checkpoints,
                      save_interval_steps=1, async_save=True)

  data_state: dict[str, Any] = {}
  step = 0
  if ckpt.latest_step() is not None:
    # each step is restored onto the structure of the stage that wrote it
    step, state, data_state, _ = ckpt.restore(
        lambda s: abstract_for(checkpoint_lora(cfg, plan, s))[1],
        shardings=lambda s: abstract_for(checkpoint_lora(cfg, plan, s))[2], move_bad_aside=True)
    if not quiet:
      print(f'resumed from {ckpt.directory}/{step}', flush=True)
  else:
    lora0 = stage_lora(cfg, plan[0])
    init = jax.jit(lambda: step_lib.init_state(cfg, lora=lora0)[1],
                   out_shardings=abstract_for(lora0)[2])
    state = init()
  step = int(step)
  cur_lora = checkpoint_lora(cfg, plan, step)
  writer = MetricsWriter(workdir, step)
  preempt = _Preempted()
  old_handler = signal.signal(signal.SIGTERM, preempt)
  peak = profiling.measure_matmul_peak(jnp.bfloat16 if cfg.model.dtype == 'bfloat16' else jnp.float32,
                                       n=1024, iters=3)
  summary = {'start_step': step, 'stages': []}
  nonfinite = int(np.asarray(state['meta']['nonfinite']))
  stop_at = None if max_steps is None else step + max_steps
  profile_steps = tuple(cfg.train.profile_steps)
  pidx, pcount = jax.process_index(), jax.process_count()

  from unimedvl_jax.data import pipeline
  compiled: dict = {}

  saved = {'step': step}

  def save(s, it_state, stage_name, force=False):
    if saved['step'] == s:
      return
    ds = {'stage': stage_name, 'iterator': it_state}
    ckpt.save(s, state, data_state=ds, cfg=cfg, force=force)
    saved['step'] = s

  try:
    for st in plan:
      if step >= st['end']:
        continue
      tc = stage_train_config(cfg, st['name'])
      lora = bool(tc.get('lora', False))
      _, abstract, st_sh = abstract_for(lora)
      if lora != cur_lora:     # train.lora switched on/off: a fresh optimizer state
        state = step_lib.switch_optimizer(tc, state, lora, st_sh)
        cur_lora = lora
        if not quiet:
          print(f'[{st["name"]}] train.lora={lora}: optimizer state for '
                f'{"the LoRA adapters alone" if lora else "every parameter"}', flush=True)
      scfg = cfg.copy_and_resolve_references()      # this stage's data source (latent cache)
      scfg.data.latent_cache = stage_latent_cache(cfg, st['kind'], workdir, graphdef, state,
                                                  quiet=quiet)
      spec = batch_lib.batch_spec(scfg)
      # stages with the same static settings share one compiled step (its schedule is the run's)
      key = (st['kind'], bool(scfg.data.latent_cache),
             json.dumps({k: v for k, v in tc.to_dict().items()
                         if k not in STAGE_DYNAMIC_FIELDS}, sort_keys=True, default=str))
      if key not in compiled:
        fn = step_lib.make_train_step(graphdef, cfg, tc, objective=st['kind'])
        compiled[key] = step_lib.jit_train_step(fn, abstract, mesh, spec, rules)
      jitted, _, b_sh = compiled[key]
      # MFU numerator: the LM step's model FLOPs, or the autoencoder's for a 'vae' stage (whose
      # tokens_per_s still counts the packs' tokens, which that objective does not process)
      stage_flops = (profiling.vae_stage_flops_per_step(cfg, slots=step_lib.VAE_SLOTS)
                     if st['kind'] == 'vae' else profiling.model_flops_per_step(scfg)['train'])
      it = pipeline.make_train_iterator(scfg, st['name'], process_index=pidx, process_count=pcount)
      if data_state and data_state.get('stage') == st['name'] and data_state.get('iterator'):
        it.set_state(data_state['iterator'])
      if cfg.train.dump_hlo:
        b0 = {k: jax.ShapeDtypeStruct(shape, dt) for k, (shape, dt) in spec.items()}
        comp = jitted.lower(abstract, b0).compile()
        profiling.dump_hlo(comp, os.path.join(workdir, 'hlo', f'train_step_{st["name"]}.txt'))
      bar = None
      if not quiet and sys.stderr.isatty() and pidx == 0:
        from tqdm import tqdm
        bar = tqdm(total=st['end'] - st['start'], initial=step - st['start'],
                   desc=f'{st["name"] or "train"}', dynamic_ncols=True)
      end = st['end'] if stop_at is None else min(st['end'], stop_at)
      it_state = {'v': it.get_state()}    # from here on only the prefetch thread touches `it`
      feed = DevicePrefetch(it, b_sh, depth=cfg.data.prefetch, limit=max(0, end - step),
                            scale_tokens=pcount)
      t_last = time.perf_counter()
      toks_since, pending_metrics = 0, []
      try:
        for s in range(step, end):
          if s in profile_steps:
            jax.profiler.start_trace(os.path.join(workdir, 'profile'))
          gb, toks, it_state['v'] = next(feed)
          toks_since += toks
          with jax.profiler.StepTraceAnnotation('train', step_num=s + 1):
            state, m = jitted(state, gb)
          pending_metrics.append(m)
          step = s + 1
          if s in profile_steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
          if step % cfg.train.log_every == 0 or step == st['end']:
            # the one host sync per log interval: metrics and the rejected-step counter
            oks = [bool(x) for x in jax.device_get([x['ok'] for x in pending_metrics])]
            first = step - len(oks) + 1
            for i, ok in enumerate(oks):
              if not ok:
                nonfinite += 1
                print(f'WARNING: step {first + i}: non-finite loss/gradient rejected '
                      f'({nonfinite}/{cfg.train.max_nonfinite_steps})', file=sys.stderr,
                      flush=True)
            if nonfinite > cfg.train.max_nonfinite_steps:
              raise NonFiniteError(
                  f'training stopped at step {step}: {nonfinite} non-finite steps exceed '
                  f'train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}; the last saved '
                  f'checkpoint in {ckpt.directory} is clean (rejected steps never update the '
                  'state)')
            now = time.perf_counter()
            dt = (now - t_last) / max(len(pending_metrics), 1)
            rec = _log_record(step, st['name'], pending_metrics, dt, toks_since, stage_flops,
                              peak, nonfinite, pipeline.state_stats(it_state['v']))
            writer.write(rec)
            t_last, toks_since, pending_metrics = now, 0, []
            if bar is not None:
              bar.set_postfix(loss=f'{rec["loss"]:.3f}', ce=f'{rec["ce"]:.3f}',
                              mse=f'{rec["mse"]:.3f}')
            elif not quiet and pidx == 0:
              print(f'[{rec["stage"]}] step {step} loss {rec["loss"]:.4f} ce {rec["ce"]:.4f} '
                    f'mse {rec["mse"]:.4f} lr {rec["lr"]:.2e} {dt:.2f}s/step', flush=True)
          if bar is not None:
            bar.update(1)
          ckpt.poll()   # a failed background save stops the run now (CheckpointSaveError)
          if step % cfg.train.checkpoint_every == 0 or step == st['end']:
            save(step, it_state['v'], st['name'])
          if preempt.flag:
            print(f'SIGTERM: saving step {step} and exiting', file=sys.stderr, flush=True)
            save(step, it_state['v'], st['name'], force=True)
            ckpt.wait()
            summary['preempted'] = True
            return summary
      finally:
        feed.close()
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
