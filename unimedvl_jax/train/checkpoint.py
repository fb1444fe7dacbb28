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

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

log = logging.getLogger(__name__)

ARRAY_ITEMS = ('params', 'ema', 'buffers', 'opt_state', 'meta')


CHECKSUMS = 'unimedvl_checksums.json'
BAD_SUFFIX = '.unusable'


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model/config."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's arrays do not match the model/config (no fallback: every step would)."""


class CheckpointCorruptError(CheckpointError):
  """One step is unusable (item missing, checksum mismatch, non-finite); restore falls back."""


class CheckpointSaveError(CheckpointError):
  """A save failed (e.g. the disk is full); the run must stop."""


# ------------------------------------------------------------------ nnx state <-> string-key trees

def _key_str(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _paths(x):
  """[(tuple of string keys, leaf)] in jax's flatten order (nnx.State, namedtuples included);
  an nnx Variable is one leaf named by its path (no trailing 'value')."""
  is_var = lambda v: isinstance(v, nnx.Variable)
  x = jax.tree.map(lambda v: v.get_value() if is_var(v) else v, x,
                   is_leaf=lambda v: v is None or is_var(v))
  flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda v: v is None)
  return [(tuple(_key_str(k) for k in path), leaf) for path, leaf in flat if leaf is not None]


def to_tree(x) -> Any:
  """Any pytree (nnx.State, optax states, dicts) -> nested dicts with string keys and array
  leaves (Orbax-friendly; empty containers vanish)."""
  out: dict = {}
  for keys, leaf in _paths(x):
    if not keys:
      return leaf
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def flat_keys(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flat_keys(v, prefix + (str(k),)))
  else:
    out[prefix] = tree
  return out


def from_tree(tree, template):
  """Fills `template`'s structure with the leaves of a string-key tree (strict key check)."""
  flat = flat_keys(tree)
  tmpl = _paths(template)
  _check_keys(set(flat), {k for k, _ in tmpl}, 'restored tree')
  treedef = jax.tree_util.tree_structure(template, is_leaf=lambda v: v is None)
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k, _ in tmpl])


def _check_keys(got: set, want: set, what: str):
  missing = sorted('/'.join(k) for k in want - got)
  extra = sorted('/'.join(k) for k in got - want)
  if missing or extra:
    raise CheckpointMismatchError(
        f'{what}: key mismatch ({len(missing)} missing, {len(extra)} unexpected). '
        f'missing: {missing[:20]}{" ..." if len(missing) > 20 else ""}; '
        f'unexpected: {extra[:20]}{" ..." if len(extra) > 20 else ""}')


def _abstract(template, shardings=None):
  """String-key tree of ShapeDtypeStructs for `template`; `shardings` may be a prefix tree
  (e.g. one NamedSharding per nnx Variable)."""
  def one(x, s=None):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
  if shardings is None:
    return to_tree(jax.tree.map(one, template))
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)
  full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, template,
                      is_leaf=is_sh)
  return to_tree(jax.tree.map(one, template, full))


# ------------------------------------------------------------------ checksums and finiteness

def _sha256(path: str, chunk: int = 1 << 23) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while True:
      b = f.read(chunk)
      if not b:
        return h.hexdigest()
      h.update(b)


def _step_files(step_dir: str) -> list[str]:
  """Relative ('/'-separated) paths of the files of a step directory, the checksum file aside."""
  out = []
  for r, _, files in os.walk(step_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(r, f), step_dir).replace(os.sep, '/')
      if rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def _hash_files(step_dir: str, rels: list[str]) -> list[str]:
  paths = [os.path.join(step_dir, *r.split('/')) for r in rels]
  if len(paths) <= 1:
    return [_sha256(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as ex:
    return list(ex.map(_sha256, paths))     # hashlib releases the GIL on large buffers


def write_checksums(step_dir: str) -> dict:
  """Records sha256 + size of every file of a completed step in `step_dir/CHECKSUMS`."""
  rels = _step_files(step_dir)
  digests = _hash_files(step_dir, rels)
  rec = {'version': 1, 'algorithm': 'sha256',
         'files': {r: {'size': os.path.getsize(os.path.join(step_dir, *r.split('/'))),
                       'sha256': d} for r, d in zip(rels, digests)}}
  path = os.path.join(step_dir, CHECKSUMS)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(rec, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return rec


def verify_checksums(step_dir: str, items) -> bool:
  """Checks the files of `items` against the recorded checksums. False if none are recorded;
  raises CheckpointCorruptError naming the files that are missing or changed."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(f'{path} is unreadable ({type(e).__name__}: {e})') from None
  items = set(items)
  want = {r: v for r, v in files.items() if r.split('/')[0] in items}
  problems, to_hash = [], []
  for r, v in sorted(want.items()):
    p = os.path.join(step_dir, *r.split('/'))
    try:
      size = os.path.getsize(p)
    except OSError:
      problems.append(f'{r} is missing')
      continue
    if size != v['size']:
      problems.append(f'{r} has {size} bytes, {v["size"]} were written')
    else:
      to_hash.append(r)
  for r, d in zip(to_hash, _hash_files(step_dir, to_hash)):
    if d != want[r]['sha256']:
      problems.append(f'{r} changed since it was written (sha256 mismatch)')
  if problems:
    raise CheckpointCorruptError(f'{len(problems)} file(s) fail their recorded checksum: '
                                 + '; '.join(problems[:5]) + (' ...' if len(problems) > 5 else ''))
  return True


def nonfinite_leaves(tree) -> list[str]:
  """'/'-joined paths of the floating-point leaves of `tree` holding a NaN or an infinity (one
  device reduction per leaf, one transfer of booleans)."""
  checks = {}
  for keys, leaf in flat_keys(to_tree(tree)).items():
    dt = getattr(leaf, 'dtype', None)
    if dt is None or not jnp.issubdtype(dt, jnp.inexact):
      continue
    checks['/'.join(keys)] = jnp.all(jnp.isfinite(leaf))
  got = jax.device_get(checks)
  return sorted(k for k, ok in got.items() if not bool(ok))


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
      got = set(flat_keys(_meta_tree(meta[k])))
      _check_keys(got, want, f'checkpoint {self.directory}/{step} item {k!r}')
    args = {}
    for k in items:
      sh = shardings[k] if shardings is not None and k in shardings else None
      args[k] = ocp.args.StandardRestore(_abstract(template_state[k], sh))
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


def _meta_tree(meta):
  """Orbax item metadata -> nested dicts (keys only matter)."""
  if hasattr(meta, 'tree'):
    meta = meta.tree
  if isinstance(meta, dict):
    return {str(k): _meta_tree(v) for k, v in meta.items()}
  if isinstance(meta, (list, tuple)):
    return {str(i): _meta_tree(v) for i, v in enumerate(meta)}
  return 0


# ------------------------------------------------------------------------------ config JSON

def config_to_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_from_json(d: dict):
  """A checkpoint's config. Only the model and data sections are validated: a checkpoint stays
  loadable (inference, export) even if its training fields predate the current validation."""
  from unimedvl_jax.config import default_config, validate_data, validate_model
  cfg = default_config()
  _merge(cfg, d, '')
  validate_model(cfg.model)
  validate_data(cfg.data, cfg.model)
  return cfg


def _merge(node, d, where):
  """The JSON `d` into the ConfigDict `node`: fields unknown to the schema are added, known ones
  set as config.assign sets them (JSON lists become tuples)."""
  from unimedvl_jax.config import assign
  for k, v in d.items():
    field = f'{where}.{k}' if where else k
    if k not in node:
      node[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
      continue
    if isinstance(node[k], ml_collections.ConfigDict):
      _merge(node[k], v, field)
    else:
      assign(node, k, v, field)


# ------------------------------------------------------------------ model-only save / load

def model_states(model):
  """model -> (graphdef, params State, buffers State)."""
  from unimedvl_jax.model.embeddings import Buffer
  graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
  return graphdef, params, buffers


def save_model_checkpoint(directory: str, cfg, model_or_params, step: int = 0, *, buffers=None):
  """Writes a params-only checkpoint (params == ema, empty optimizer state) + the config.

  `model_or_params` is a UniMedVL module, or a params nnx.State (then the frozen tables are
  recomputed from the config unless `buffers` is given)."""
  if isinstance(model_or_params, nnx.Module):
    _, params, buffers = model_states(model_or_params)
  else:
    params = model_or_params
    if buffers is None:
      buffers = config_buffers(cfg)
  ck = Checkpointer(directory, max_to_keep=10, async_save=False)
  meta = {'step': np.int32(step), 'rng': np.zeros((2,), np.uint32), 'nonfinite': np.int32(0)}
  # params only (no EMA copy, no optimizer state): load_model falls back to `params`
  state = {'params': params, 'buffers': buffers, 'meta': meta}
  ck.save(step, state, data_state={}, cfg=cfg, force=True)
  ck.close()


def config_buffers(cfg):
  """The frozen sin-cos tables of a config as a buffers nnx.State (no parameter allocated)."""
  from unimedvl_jax.model.embeddings import sincos_2d_table
  from unimedvl_jax.model.layers import to_dtype
  from unimedvl_jax.model.unimedvl import abstract_model
  abstract = abstract_model(cfg.model)
  _, _, b_abs = model_states(abstract)
  grids = {'vit_pos_embed': cfg.model.vit.grid_size, 'latent_pos_embed': cfg.model.max_latent_size}
  for path, var in nnx.to_flat_state(b_abs):
    table = sincos_2d_table(cfg.model.llm.hidden_size, grids[path[0]])
    var.value = jnp.asarray(table, to_dtype(cfg.model.param_dtype))
  return b_abs


def load_model(directory: str, *, use_ema: bool = True, cfg=None, step: int | None = None):
  """(cfg, UniMedVL) from a training workdir / checkpoints folder; EMA weights by default.

  With `cfg` given, the checkpoint's config must describe the same model (else CheckpointError).
  """
  from unimedvl_jax.model.unimedvl import abstract_model
  ck = Checkpointer(directory, async_save=False)
  s, ck_cfg = _read_config(ck, directory, step)
  if cfg is not None:
    a, b = config_to_json(cfg)['model'], config_to_json(ck_cfg)['model']
    if a != b:
      diff = sorted(k for k in set(_flatcfg(a)) | set(_flatcfg(b))
                    if _flatcfg(a).get(k) != _flatcfg(b).get(k))
      raise CheckpointError(f'checkpoint {directory} (step {s}) was written for a different model: '
                            f'fields differ: {diff[:20]}')
  abstract = abstract_model(ck_cfg.model)
  graphdef, p_abs, b_abs = model_states(abstract)
  which = 'ema' if use_ema else 'params'
  meta = ck.manager.item_metadata(s)
  if which == 'ema' and (meta is None or 'ema' not in meta or meta['ema'] is None):
    which = 'params'    # a params-only checkpoint (e.g. written by `convert import`)
  template = {which: p_abs, 'buffers': b_abs}
  _, state, _, _ = ck.restore(template, step=s, items=(which, 'buffers'))
  model = nnx.merge(graphdef, state[which], state['buffers'])
  ck.close()
  return ck_cfg, model


def _read_config(ck, directory, step):
  s = step if step is not None else ck.latest_step()
  if s is None:
    raise CheckpointError(f'no checkpoint found under {directory}')
  cfg_json = ck.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  return s, config_from_json(cfg_json)


def load_config(directory: str, step: int | None = None):
  """The config of a checkpoint (of its newest step by default), no array read."""
  ck = Checkpointer(directory, async_save=False)
  try:
    return _read_config(ck, directory, step)[1]
  finally:
    ck.close()


def _flatcfg(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatcfg(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
