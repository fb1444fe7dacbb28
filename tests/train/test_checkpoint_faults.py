"""Checkpoint faults injected on a tiny state (no model, no training run): flipped bytes are caught
by the recorded checksums, a missing item or a non-finite restored array falls back to the
previous step, a non-finite state is never saved, rotation never deletes the newest known-good
step, a failed asynchronous save (file size limit = disk full) surfaces at once as one line, and
a second run on a locked workdir fails naming the holder."""

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unimedvl_jax.config import default_config
from unimedvl_jax.train import checkpoint as C
from unimedvl_jax.train import checkpoint_format as F
from unimedvl_jax.train import checkpoint_integrity as I
from unimedvl_jax.train.workdir import WorkdirBusyError, WorkdirLock

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CFG = default_config()


def _state(v, n=2048):
  return {'params': {'w': jnp.full((n,), v, jnp.float32), 'b': jnp.arange(4, dtype=jnp.float32)},
          'meta': {'step': np.int32(v), 'rng': np.zeros((2,), np.uint32)}}


def _template():
  return _state(0)


def _save(ck, step, state=None):
  assert ck.save(step, state or _state(step), data_state={'k': step}, cfg=CFG, force=True)
  ck.wait()


def _restore(wd, **kw):
  ck = C.Checkpointer(wd, async_save=False)
  try:
    return ck.restore(_template(), items=('params', 'meta'), **kw), ck
  finally:
    ck.close()


def _largest_file(step_dir, item='params'):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, item)) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.fixture
def two_steps(tmp_path):
  wd = str(tmp_path / 'wd')
  ck = C.Checkpointer(wd, max_to_keep=5, async_save=False)
  _save(ck, 1)
  _save(ck, 2)
  ck.close()
  return wd, os.path.join(wd, 'checkpoints')


def test_checksums_recorded_per_file(two_steps):
  import hashlib
  _, d = two_steps
  rec = json.load(open(os.path.join(d, '2', I.CHECKSUMS)))
  files = [os.path.relpath(os.path.join(r, f), os.path.join(d, '2'))
           for r, _, fs in os.walk(os.path.join(d, '2')) for f in fs if f != I.CHECKSUMS]
  assert sorted(rec['files']) == sorted(files) and rec['algorithm'] == 'sha256'
  for rel, v in rec['files'].items():   # against hashlib directly
    data = open(os.path.join(d, '2', rel), 'rb').read()
    assert v == {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
  assert {r.split('/')[0] for r in rec['files']} >= {'params', 'meta', 'data', 'config'}


def test_flipped_bytes_fall_back_and_are_moved_aside(two_steps):
  wd, d = two_steps
  victim = _largest_file(os.path.join(d, '2'))
  size = os.path.getsize(victim)
  with open(victim, 'r+b') as f:       # same size, a few bytes changed in the middle
    f.seek(size // 2)
    b = f.read(4)
    f.seek(size // 2)
    f.write(bytes(x ^ 0xFF for x in b))
  assert os.path.getsize(victim) == size
  with pytest.raises(F.CheckpointCorruptError, match='sha256 mismatch'):
    I.verify_checksums(os.path.join(d, '2'), ['params'])
  (step, state, data, _), _ = _restore(wd, move_bad_aside=True)
  assert step == 1 and float(state['params']['w'][0]) == 1.0 and data == {'k': 1}
  assert os.path.isdir(os.path.join(d, '2' + C.BAD_SUFFIX)) and not os.path.exists(
      os.path.join(d, '2'))
  ck = C.Checkpointer(wd, max_to_keep=5, async_save=False)
  assert ck.all_steps() == [1]
  _save(ck, 2)                          # the resumed run can write step 2 again
  assert ck.restore(_template(), items=('params', 'meta'))[0] == 2
  ck.close()


@pytest.mark.parametrize('with_checksums', [True, False])
def test_missing_item_falls_back(two_steps, with_checksums):
  wd, d = two_steps
  shutil.rmtree(os.path.join(d, '2', 'params'))
  if not with_checksums:               # a checkpoint of an older version: metadata check only
    os.remove(os.path.join(d, '2', I.CHECKSUMS))
  (step, state, _, _), _ = _restore(wd)
  assert step == 1 and float(state['params']['w'][0]) == 1.0


def test_nonfinite_restored_arrays_fall_back(two_steps):
  wd, d = two_steps
  # step 3 written around our save (no checksums, NaN inside): restore must refuse it
  ck = C.Checkpointer(wd, async_save=False)
  bad = _state(3)
  bad['params']['w'] = bad['params']['w'].at[7].set(jnp.nan)
  args = {k: ocp.args.StandardSave(F.to_tree(bad[k])) for k in ('params', 'meta')}
  ck.manager.save(3, args=ocp.args.Composite(**args, data=ocp.args.JsonSave({}),
                                             config=ocp.args.JsonSave({})), force=True)
  ck.close()
  (step, _, _, _), _ = _restore(wd)
  assert step == 2


def test_key_mismatch_is_an_error_not_a_fallback(two_steps):
  wd, _ = two_steps
  t = _template()
  t['params']['extra'] = jnp.zeros(3)
  ck = C.Checkpointer(wd, async_save=False)
  with pytest.raises(F.CheckpointMismatchError, match=r"item 'params': key mismatch.*missing: \['extra'\]"):
    ck.restore(t, items=('params', 'meta'))
  ck.close()


def test_nonfinite_state_is_never_saved(two_steps):
  wd, d = two_steps
  ck = C.Checkpointer(wd, max_to_keep=1, async_save=False)
  bad = _state(3)
  bad['params']['b'] = bad['params']['b'].at[1].set(jnp.inf)
  with pytest.raises(F.CheckpointError, match=r'refusing to save step 3.*params/b'):
    ck.save(3, bad, data_state={}, cfg=CFG, force=True)
  assert ck.all_steps() == [1, 2] and sorted(os.listdir(d)) == ['1', '2']
  ck.close()


def test_rotation_keeps_the_newest_known_good_step(two_steps):
  wd, d = two_steps
  ck = C.Checkpointer(wd, max_to_keep=1, async_save=False)
  for s in (3, 4):     # newer steps without recorded checksums (e.g. killed before recording)
    args = {k: ocp.args.StandardSave(F.to_tree(_state(s)[k])) for k in ('params', 'meta')}
    ck.manager.save(s, args=ocp.args.Composite(**args, data=ocp.args.JsonSave({}),
                                               config=ocp.args.JsonSave({})), force=True)
  ck.manager.reload()
  assert ck.newest_good_step() == 2
  ck._rotate()
  assert ck.all_steps() == [2, 4]      # newest (max_to_keep=1) + newest known-good
  _save(ck, 5)
  assert ck.all_steps() == [5]
  ck.close()


@pytest.mark.flaky_retry(reason="Orbax's background save thread must finish within 60 s")
def test_async_saves_finished_by_poll(tmp_path):
  wd = str(tmp_path / 'wd')
  ck = C.Checkpointer(wd, max_to_keep=2, async_save=True)
  for step in (1, 2, 3):
    assert ck.save(step, _state(step), data_state={}, cfg=CFG, force=True)
    t0 = time.time()
    while (ck._pending or ck._hasher) and time.time() - t0 < 60:   # as the loop: once a step
      ck.poll()
      time.sleep(0.01)
    assert not ck._pending and ck._hasher is None
    assert os.path.exists(os.path.join(ck.step_dir(step), I.CHECKSUMS))
  assert ck.all_steps() == [2, 3] and ck.newest_good_step() == 3
  ck.close()


def _limit_file_size(nbytes):
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a signal
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

  def undo():
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_sig)
  return undo


@pytest.mark.flaky_retry(reason="Orbax's background save thread must fail within 60 s")
def test_failed_async_save_surfaces_at_once_as_one_line(tmp_path, caplog):
  wd = str(tmp_path / 'wd')
  ck = C.Checkpointer(wd, max_to_keep=1, async_save=True)
  _save(ck, 1)
  big = _state(2, n=1 << 19)       # 2 MiB of float32 per array
  big['params']['w'] = jnp.asarray(np.random.default_rng(0).standard_normal(1 << 19), jnp.float32)
  undo = _limit_file_size(1 << 20)  # no file may grow past 1 MiB: the write fails like ENOSPC
  try:
    with caplog.at_level(logging.ERROR, logger='absl'):
      assert ck.save(2, big, data_state={}, cfg=CFG, force=True)   # returns: the write is async
      t0 = time.time()
      while ck.manager.is_saving_in_progress() and time.time() - t0 < 60:
        time.sleep(0.05)
  finally:
    undo()
  with pytest.raises(F.CheckpointSaveError) as e:
    ck.poll()                        # the per-step call of the training loop
  msg = str(e.value)
  assert '\n' not in msg and len(msg) < 800, msg
  assert os.path.join(ck.directory, '2') in msg and 'File too large' in msg, msg
  assert 'newest complete checkpoint is step 1' in msg
  assert all(r.exc_info is None for r in caplog.records)       # no Orbax tracebacks
  with pytest.raises(F.CheckpointSaveError):                   # and the run cannot go on saving
    ck.save(3, _state(3), data_state={}, cfg=CFG, force=True)
  ck.wait()
  ck.close()                        # already reported: no second error
  assert C.Checkpointer(wd, async_save=False).all_steps() == [1]   # rotation did not delete it


def test_failed_checksum_write_names_path_and_cause(tmp_path, monkeypatch):
  import errno
  wd = str(tmp_path / 'wd')
  ck = C.Checkpointer(wd, async_save=False)

  def full(step_dir):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(step_dir, I.CHECKSUMS))
  monkeypatch.setattr(C, 'write_checksums', full)      # the name the Checkpointer calls
  with pytest.raises(F.CheckpointSaveError) as e:
    ck.save(1, _state(1), data_state={}, cfg=CFG, force=True)
  msg = str(e.value)
  assert 'No space left on device' in msg and os.path.join(ck.directory, '1') in msg, msg
  ck.close()


# ----------------------------------------------------------------------------------- the lock


def test_workdir_lock_names_the_holder_and_is_released(tmp_path):
  wd = str(tmp_path / 'wd')
  with WorkdirLock(wd):
    with pytest.raises(WorkdirBusyError) as e:
      WorkdirLock(wd).acquire()
    assert f'pid {os.getpid()}' in str(e.value) and wd in str(e.value)
  with WorkdirLock(wd) as lk:         # released: free again
    assert lk.held


def test_stale_lock_of_a_killed_process_does_not_block(tmp_path):
  wd = str(tmp_path / 'wd')
  code = ('import sys, time; from unimedvl_jax.train.workdir import WorkdirLock; '
          'lk = WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); time.sleep(120)')
  p = subprocess.Popen([sys.executable, '-c', code, wd], stdout=subprocess.PIPE, text=True,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  try:
    assert p.stdout.readline().strip() == 'held'
    with pytest.raises(WorkdirBusyError, match=f'pid {p.pid} on host'):
      WorkdirLock(wd).acquire()
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert str(p.pid) in open(os.path.join(wd, '.lock')).read()   # the stale file is still there
  with WorkdirLock(wd) as lk:
    assert lk.held


@pytest.mark.flaky_retry(reason='a wall-clock bound: the refusal must come within 30 s')
def test_train_refuses_a_locked_workdir(tmp_path):
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.train.loop import train
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  wd = str(tmp_path / 'wd')
  t0 = time.time()
  with WorkdirLock(wd):
    with pytest.raises(WorkdirBusyError, match='in use by another run'):
      train(cfg, wd)
  assert time.time() - t0 < 30 and not os.path.exists(os.path.join(wd, 'checkpoints'))


# ------------------------------------------------------------- through the training command


def _train_cmd(workdir, data_root):
  return [sys.executable, '-m', 'unimedvl_jax.train', '--config',
          os.path.join(ROOT, 'configs', 'tiny.py'), '--workdir', str(workdir),
          f'--config.data.root={data_root}', '--config.data.batch_size=2',
          '--config.data.seq_len=256', '--config.data.max_latent_tokens=64',
          '--config.data.max_vit_patches=128', '--config.data.max_vae_images=4',
          '--config.data.max_sample_tokens=256', '--config.model.llm.num_layers=2',
          '--config.model.vit.num_layers=1', "--config.stages=('foundation','unified')",
          '--config.curriculum.foundation.steps=2', '--config.curriculum.unified.steps=2',
          '--config.curriculum.unified.mandatory=()', '--config.train.log_every=1',
          '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=3',
          '--config.train.warmup_steps=2']


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


@pytest.mark.slow
def test_second_run_refused_and_corrupt_latest_resumed_past(synthetic_dir, tmp_path):
  # the XLA compilation cache of tests/conftest.py comes with os.environ
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  wd = tmp_path / 'run'
  first = subprocess.Popen(_train_cmd(wd, synthetic_dir), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  lock = wd / '.lock'
  t0 = time.time()
  while not (lock.exists() and lock.read_text().strip()):
    assert first.poll() is None and time.time() - t0 < 300, first.stderr.read()[-3000:]
    time.sleep(0.1)
  second = subprocess.run(_train_cmd(wd, synthetic_dir), env=env, capture_output=True, text=True,
                          timeout=300)
  out, err = first.communicate(timeout=900)
  assert first.returncode == 0, err[-3000:]
  assert second.returncode == 1 and 'Traceback' not in second.stderr, second.stderr[-3000:]
  assert f'WorkdirBusyError: workdir {wd} is in use by another run: pid {first.pid}' in \
      second.stderr
  ref = _losses(wd)
  assert sorted(ref) == [1, 2, 3, 4]
  ck = wd / 'checkpoints'
  assert sorted(os.listdir(ck)) == ['2', '4']
  victim = _largest_file(str(ck / '4'))
  with open(victim, 'r+b') as f:     # silent corruption of the newest checkpoint, same size
    f.seek(os.path.getsize(victim) // 2)
    f.write(b'\0\xff\0\xff')
  r = subprocess.run(_train_cmd(wd, synthetic_dir), env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'checkpoint step 4' in r.stdout and 'sha256 mismatch' in r.stdout
  assert f'resumed from {ck}/2' in r.stdout
  assert _losses(wd) == ref                   # steps 3 and 4 trained again, identically
  assert sorted(os.listdir(ck)) == ['2', '4', '4' + C.BAD_SUFFIX]
  assert I.verify_checksums(str(ck / '4'), C.ARRAY_ITEMS + ('data', 'config'))


def test_checkpoint_config_with_old_train_fields_still_loads():
  d = F.config_to_json(default_config())
  d['train']['grad_clip'] = 0.0          # "no clip" was accepted before train fields were checked
  d['train']['keep_checkpoints'] = 0
  cfg = F.config_from_json(d)
  assert cfg.train.grad_clip == 0.0 and cfg.model.llm.num_layers == 28
  d['model']['llm']['num_kv_heads'] = 5
  with pytest.raises(Exception, match='config.model.llm.num_heads'):
    F.config_from_json(d)
