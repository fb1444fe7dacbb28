"""Orbax checkpoints: the training state, the data iterator state and the config, per step.

Layout: `WORKDIR/checkpoints/<step>/` with items
  params     model parameters (fp32 masters)        ema        EMA of the parameters
  buffers    frozen tables (sin-cos)                 opt_state  optimizer state
  meta       step, rng, non-finite counter           data       data iterator state (JSON)
  config     the full config (JSON)
and `unimedvl_checksums.json` (the sha256 and size of every file of the step, written once the
save has completed). With several processes every host has its own data iterator state; each
writes it to `WORKDIR/data_state/<step>/process_<i>.json` before the step's save starts (the
Orbax `data` item holds process 0's), and each restores its own.
Items are separate so that inference restores only `ema` (or `params`) + `buffers`.

This module is the manager (`Checkpointer`: save, poll, rotation, fallback restore, the
per-process data states). What is stored and how it maps back to a model is
checkpoint_format.py (string-key trees, key checks, config JSON, the errors); whether a step is
intact is checkpoint_integrity.py (checksums, finiteness); writing / loading a model alone is
model_checkpoint.py (`save_model_checkpoint`, `load_model`, `load_config`).

Never losing a run:
- A state holding a non-finite value is never saved (CheckpointError; the disk is untouched).
- Saves are asynchronous; `poll()` (cheap, every step) notices a finished background save at
  once: it records the step's checksums and rotates old steps, or, if the save failed (disk
  full, ...), raises CheckpointSaveError with one line naming the step directory and the cause.
  Orbax's own tracebacks for such failures are cut to their first line.
- Rotation (`max_to_keep`) is done here, not by Orbax (which deletes old steps even after a
  failed save): it keeps the newest `max_to_keep` steps and always the newest known-good one
  (checksums recorded, or verified by a restore).
- Restores are strict: the checkpoint's key set must equal the target's (a mismatch is an error
  listing the missing and unexpected keys: the model or config changed). A step that is
  unusable (an item missing, a file changed or truncated against its recorded checksum, a read
  error, a non-finite restored array) is reported and the previous step is tried; with
  `move_bad_aside=True` (training) the unusable steps are renamed `<step>.unusable` so the
  resumed run can save those steps again. Steps written before checksums existed are restored
  with the finiteness check only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

from unimedvl_jax.train.checkpoint_format import (CheckpointCorruptError, CheckpointError,
                                                  CheckpointMismatchError, CheckpointSaveError,
                                                  abstract_tree, check_keys, config_to_json,
                                                  flat_keys, from_tree, meta_tree, to_tree)
from unimedvl_jax.train.checkpoint_integrity import (CHECKSUMS, nonfinite_leaves,
                                                     verify_checksums, write_checksums)

log = logging.getLogger(__name__)

ARRAY_ITEMS = ('params', 'ema', 'buffers', 'opt_state', 'meta')
BAD_SUFFIX = '.unusable'


# ------------------------------------------------------------------ failed saves, Orbax logs

def _save_failure_cause(e: BaseException) -> str:
  """A one-line cause of a failed save: the innermost OS error (with the file), else the first
  line of the innermost exception."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  inner = seen[-1]
  for x in reversed(seen):
    if isinstance(x, OSError) and x.strerror:
      return f'{x.strerror}' + (f' ({x.filename})' if x.filename else '')
  msg = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
  m = re.search(r'Failed to write [^:]*: (.*)$', msg)   # tensorstore: "...: File too large [...]"
  files = re.findall(r'"(/[^"]+)"', msg)
  if m:
    return m.group(1) + (f' (writing {files[-1]})' if files else '')
  return f'{type(inner).__name__}: {msg[:400]}'


class _OrbaxTracebackFilter(logging.Filter):
  """Cuts Orbax's ERROR records to their first line (no traceback): a failed save is reported
  once, by CheckpointSaveError. UNIMEDVL_ORBAX_TRACEBACKS=1 keeps them."""

  def filter(self, record):
    if (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in (record.pathname or '')
        and not os.environ.get('UNIMEDVL_ORBAX_TRACEBACKS')):
      try:
        msg = record.getMessage()
      except Exception:  # noqa: BLE001
        msg = str(record.msg)
      record.msg, record.args = (msg.strip().splitlines() or [''])[0][:300], None
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


_TRACEBACK_FILTER = _OrbaxTracebackFilter()


def _install_log_filter():
  lg = logging.getLogger('absl')
  if _TRACEBACK_FILTER not in lg.filters:
    lg.addFilter(_TRACEBACK_FILTER)


# ------------------------------------------------------------------------------ the manager

def checkpoint_dir(path: str) -> str:
  """Accepts a workdir (-> workdir/checkpoints) or the checkpoints folder itself."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints')
  if os.path.basename(path) == 'checkpoints' or _has_steps(path):
    return path
  return os.path.join(path, 'checkpoints')


def _has_steps(path):
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


class Checkpointer:
  """Async Orbax CheckpointManager for the training state + data state + config, with
  checksums, finiteness checks, fallback and our own rotation (see the module docstring)."""

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    os.makedirs(self.directory, exist_ok=True)
    _install_log_filter()
    self.max_to_keep = max_to_keep
    self.async_save = async_save
    opts = ocp.CheckpointManagerOptions(max_to_keep=None,    # rotation: self._rotate
                                        save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=async_save,
                                        create=True)
    handlers = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
    handlers.update(data=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)
    self._pending: list[int] = []        # saves started, not yet finished here
    self._hasher = None                  # (thread, steps, result box) hashing finished saves
    self._failed: CheckpointSaveError | None = None
    # known-good: checksums recorded when saved (this run or earlier), or verified by a restore
    self._good = {s for s in self.all_steps()
                  if os.path.exists(os.path.join(self.step_dir(s), CHECKSUMS))}

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def newest_good_step(self) -> int | None:
    good = [s for s in self.all_steps() if s in self._good]
    return good[-1] if good else None

  def save(self, step: int, state: dict, *, data_state: dict | None, cfg, force: bool = False) -> bool:
    """state: dict with the ARRAY_ITEMS (pytrees); data_state: this process's iterator state.
    Returns True if a save was started. Raises CheckpointError for a non-finite state (nothing
    is written) and CheckpointSaveError if this or the previous save failed."""
    self.poll(block=True)             # the previous save: finished, checksummed, rotated
    if not force and not self.manager.should_save(step):
      return False
    bad = [f'{k}/{p}' for k in ARRAY_ITEMS if k in state for p in nonfinite_leaves(state[k])]
    if bad:
      raise CheckpointError(
          f'refusing to save step {step} to {self.directory}: {len(bad)} array(s) hold NaN or '
          f'infinite values ({", ".join(bad[:8])}{" ..." if len(bad) > 8 else ""}); the '
          f'checkpoints on disk are kept (newest known-good: step {self.newest_good_step()})')
    multi = jax.process_count() > 1
    try:
      if multi:
        self._write_process_data(step, data_state or {})
      args = {k: ocp.args.StandardSave(to_tree(state[k])) for k in ARRAY_ITEMS if k in state}
      args['data'] = ocp.args.JsonSave(data_state or {})
      args['config'] = ocp.args.JsonSave(config_to_json(cfg))
      started = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except StepAlreadyExistsError:
      raise
    except Exception as e:  # noqa: BLE001  (the synchronous part of the save failed)
      raise self._save_failed(step, e) from None
    if started:
      self._pending.append(int(step))
      if not self.async_save:
        self.poll(block=True)
    if multi:
      self._prune_process_data()
    return started

  def poll(self, block: bool = False) -> None:
    """Finishes saves that have completed in the background: hashes their files (in a thread,
    checksums written by process 0), then marks them known-good and rotates old steps. Raises
    CheckpointSaveError (one line: the step directory and the cause) if a save failed; the run
    must stop. Cheap when nothing finished (no device sync, no file I/O); block=True waits for
    a save and its hashing in progress."""
    if self._failed is not None:
      raise self._failed
    if self._pending and (block or not self.manager.is_saving_in_progress()):
      try:
        self.manager.wait_until_finished()     # returns at once here unless block=True
      except Exception as e:  # noqa: BLE001  (tensorstore / OS errors of the background writer)
        step = self._pending[-1]
        self._pending = []
        raise self._save_failed(step, e) from None
      if block or jax.process_count() == 1:   # (multi-process: rotation holds barriers, so it
        done, self._pending = self._pending, []   # waits for a save / wait all processes reach)
        self._good.update(self._join_hasher())    # (an earlier hashing still running: finish it)
        for step in done:
          if not os.path.isdir(self.step_dir(step)):
            raise self._save_failed(step, FileNotFoundError(f'{self.step_dir(step)} was not '
                                                            'written'))
        self._start_hasher(done)
    if self._hasher is not None and (block or not self._hasher[0].is_alive()):
      steps = self._join_hasher()
      self._good.update(steps)
      self._rotate()

  def _start_hasher(self, steps: list[int]) -> None:
    box: dict = {}

    def run():
      for st in steps:
        try:
          if jax.process_index() == 0:
            write_checksums(self.step_dir(st))
        except Exception as e:  # noqa: BLE001  (reported by _join_hasher)
          box['error'] = (st, e)
          return
    t = threading.Thread(target=run, name='checkpoint_checksums', daemon=True)
    t.start()
    self._hasher = (t, steps, box)

  def _join_hasher(self) -> list[int]:
    if self._hasher is None:
      return []
    t, steps, box = self._hasher
    t.join()
    self._hasher = None
    if 'error' in box:
      raise self._save_failed(*box['error']) from None
    return steps

  def _save_failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    prev = [s for s in self.all_steps() if s != step and s in self._good]
    self._failed = CheckpointSaveError(
        f'checkpoint step {step} could not be saved to {self.step_dir(step)}: '
        f'{_save_failure_cause(e)}. The run stops; the newest complete checkpoint is '
        + (f'step {prev[-1]} ({self.step_dir(prev[-1])})' if prev else 'none')
        + ' and the same command resumes from it once the cause is fixed.')
    return self._failed

  def _rotate(self):
    """Keeps the newest max_to_keep steps and the newest known-good one; deletes the rest."""
    if not self.max_to_keep:
      return
    steps = self.all_steps()
    keep = set(steps[-self.max_to_keep:])
    good = self.newest_good_step()
    if good is not None:
      keep.add(good)
    for s in steps:
      if s not in keep:
        self.manager.delete(s)
        self._good.discard(s)

  # per-process data iterator states (multi-process runs)
  @property
  def data_state_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'data_state')

  def _process_data_path(self, step: int) -> str:
    return os.path.join(self.data_state_dir, str(step), f'process_{jax.process_index()}.json')

  def _write_process_data(self, step: int, data_state: dict):
    path = self._process_data_path(step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(data_state, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def _prune_process_data(self):
    """Drops this process's states for steps older than the oldest kept checkpoint."""
    steps = self.all_steps()
    if not steps or not os.path.isdir(self.data_state_dir):
      return
    for d in os.listdir(self.data_state_dir):
      if d.isdigit() and int(d) < steps[0]:
        try:
          os.remove(os.path.join(self.data_state_dir, d, f'process_{jax.process_index()}.json'))
        except FileNotFoundError:
          pass
        try:
          os.rmdir(os.path.join(self.data_state_dir, d))
        except OSError:
          pass

  def _read_process_data(self, step: int, fallback: dict) -> dict:
    if jax.process_count() == 1:
      return fallback
    path = self._process_data_path(step)
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      raise CheckpointError(f'checkpoint step {step}: this process\'s data iterator state {path} '
                            'is missing (was the run saved with a different process count?)')
    except json.JSONDecodeError as e:
      raise CheckpointCorruptError(f'checkpoint step {step}: {path} is not valid JSON ({e})')

  def wait(self):
    """Waits for a save in progress and finishes it (raises CheckpointSaveError if it failed,
    unless that failure was already raised)."""
    if self._failed is None:
      self.poll(block=True)

  def close(self):
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001  (the failed save Orbax re-raises was reported already)
        if self._failed is None:
          raise

  def restore(self, template_state: dict, *, shardings: dict | None = None, step: int | None = None,
              items=ARRAY_ITEMS, move_bad_aside: bool = False):
    """Restores onto the structure (and shardings) of `template_state`; tries older steps if the
    requested/latest one is unusable (see the module docstring). Returns (step, state,
    data_state, config_json). move_bad_aside: rename the unusable newer steps to
    `<step>.unusable` once an older one restored (training resumes and saves those steps anew).
    template_state / shardings may be functions of the step (the structure of the state can
    differ between steps: train.lora keeps the optimizer state of the LoRA adapters alone)."""
    self.poll(block=True)
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    errors, bad = [], []
    for s in steps:
      try:
        out = self._restore_step(s, template_state(s) if callable(template_state) else template_state,
                                 shardings(s) if callable(shardings) else shardings, items)
      except CheckpointMismatchError:
        raise
      except CheckpointCorruptError as e:
        msg = f'checkpoint step {s} in {self.directory} is unusable ({e})'
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on corrupt files
        msg = (f'checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: '
               f'{str(e).strip()[:500]})')
      else:
        self._good.add(s)
        if bad and move_bad_aside:
          self._move_aside(bad)
        return (s,) + out
      log.warning(msg + '; trying the previous one')
      print(f'WARNING: {msg}; trying the previous one', flush=True)
      errors.append(msg)
      bad.append(s)
    raise CheckpointError('no usable checkpoint: ' + ' | '.join(errors))

  def _move_aside(self, steps):
    if jax.process_index() == 0:
      for s in steps:
        d = self.step_dir(s)
        dest, i = d + BAD_SUFFIX, 1
        while os.path.exists(dest):
          dest, i = f'{d}{BAD_SUFFIX}.{i}', i + 1
        os.replace(d, dest)
        print(f'WARNING: moved the unusable checkpoint {d} to {dest}', flush=True)
    self._good.difference_update(steps)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('unimedvl_jax:move_bad_aside')
    self.manager.reload()

  def _restore_step(self, step, template_state, shardings, items):
    d = self.step_dir(step)
    verified = verify_checksums(d, set(items) | {'data', 'config'})
    meta = self.manager.item_metadata(step)
    for k in tuple(items) + ('data', 'config'):   # (JSON items have None metadata)
      if meta is None or k not in meta or (k in items and meta[k] is None):
        raise CheckpointCorruptError(f'item {k!r} is missing')
    for k in items:
      want = set(flat_keys(to_tree(template_state[k])))
      got = set(flat_keys(meta_tree(meta[k])))
      check_keys(got, want, f'checkpoint {self.directory}/{step} item {k!r}')
    args = {}
    for k in items:
      sh = shardings[k] if shardings is not None and k in shardings else None
      args[k] = ocp.args.StandardRestore(abstract_tree(template_state[k], sh))
    args['data'] = ocp.args.JsonRestore()
    args['config'] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    bad = [f'{k}/{p}' for k in items for p in nonfinite_leaves(out[k])]
    if bad:
      raise CheckpointCorruptError(f'{len(bad)} restored array(s) hold NaN or infinite values '
                                   f'({", ".join(bad[:8])}{" ..." if len(bad) > 8 else ""})')
    if not verified:
      log.warning('checkpoint step %d in %s has no recorded checksums (written by an older '
                  'version, or interrupted before they were recorded): restored with the '
                  'finiteness check only', step, self.directory)
    state = {k: from_tree(out[k], template_state[k]) for k in items}
    return state, self._read_process_data(step, out['data']), out['config']
