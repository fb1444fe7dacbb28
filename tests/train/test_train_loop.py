"""The training loop: kill -9 and resume reproduces the uninterrupted losses, SIGTERM saves and
exits 0, stages switch the mixture, divergence stops with a clear error and never reaches a
checkpoint, a corrupt latest checkpoint falls back to the previous one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CFG = os.path.join(ROOT, 'configs', 'tiny.py')

pytestmark = pytest.mark.slow


def overrides(data_root, steps=(6, 6), every=2):
  return [
      f'--config.data.root={data_root}', '--config.data.batch_size=2', '--config.data.seq_len=256',
      '--config.data.max_latent_tokens=64', '--config.data.max_vit_patches=128',
      '--config.data.max_vae_images=4', '--config.data.max_sample_tokens=256',
      '--config.model.llm.num_layers=2', '--config.model.vit.num_layers=1',
      "--config.stages=('foundation','unified')",
      f'--config.curriculum.foundation.steps={steps[0]}',
      f'--config.curriculum.unified.steps={steps[1]}',
      '--config.curriculum.unified.mandatory=()',
      '--config.train.log_every=1', f'--config.train.checkpoint_every={every}',
      '--config.train.keep_checkpoints=3', '--config.train.warmup_steps=2',
  ]


def cmd(workdir, data_root, **kw):
  return [sys.executable, '-m', 'unimedvl_jax.train', '--config', CFG, '--workdir', str(workdir)] + \
      overrides(data_root, **kw)


# every run here compiles the same few programs: they share them through the persistent XLA
# cache that tests/conftest.py puts in os.environ (a hit is the same executable)
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      out[r['step']] = (r['stage'], r['loss'], r['ce'], r['mse'])
  return out


@pytest.fixture(scope='module')
def reference_run(synthetic_dir, tmp_path_factory):
  wd = tmp_path_factory.mktemp('ref')
  r = subprocess.run(cmd(wd, synthetic_dir), env=ENV, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return wd, losses(wd)


def test_stages_switch_without_restart(reference_run):
  _, ref = reference_run
  assert sorted(ref) == list(range(1, 13))
  assert {ref[s][0] for s in range(1, 7)} == {'foundation'}
  assert {ref[s][0] for s in range(7, 13)} == {'unified'}
  assert all(np.isfinite(v[1]) for v in ref.values())


def _wait_for_checkpoint(workdir, min_step, proc, timeout=600):
  ck = os.path.join(workdir, 'checkpoints')
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError('training ended before the checkpoint appeared: ' + proc.stderr.read()[-3000:])
    if os.path.isdir(ck):
      steps = [int(d) for d in os.listdir(ck) if d.isdigit()]
      if any(s >= min_step for s in steps):
        return max(steps)
    time.sleep(0.2)
  raise AssertionError('no checkpoint appeared')


def test_kill9_and_resume_reproduces_losses(reference_run, synthetic_dir, tmp_path):
  _, ref = reference_run
  wd = tmp_path / 'killed'
  p = subprocess.Popen(cmd(wd, synthetic_dir), env=ENV, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(wd, 4, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  r = subprocess.run(cmd(wd, synthetic_dir), env=ENV, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  assert 'resumed from' in r.stdout
  got = losses(wd)
  assert sorted(got) == sorted(ref)
  for s in ref:
    assert got[s] == ref[s], (s, got[s], ref[s])


@pytest.mark.flaky_retry(reason='signal timing against wall-clock bounds (3 logged steps within '
                         '600 s, save and exit within 300 s of SIGTERM)')
def test_sigterm_saves_and_exits_zero(synthetic_dir, tmp_path):
  wd = tmp_path / 'term'
  p = subprocess.Popen(cmd(wd, synthetic_dir, steps=(200, 6), every=1000), env=ENV,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # wait until training has logged a few steps
  t0 = time.time()
  mpath = os.path.join(wd, 'metrics.jsonl')
  while time.time() - t0 < 600:
    assert p.poll() is None, p.stderr.read()[-3000:]
    if os.path.exists(mpath) and sum(1 for _ in open(mpath)) >= 3:
      break
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert 'SIGTERM' in err
  steps = [int(d) for d in os.listdir(os.path.join(wd, 'checkpoints')) if d.isdigit()]
  assert steps and max(steps) >= 3


def test_divergence_stops_and_never_reaches_a_checkpoint(synthetic_dir, tmp_path):
  wd = tmp_path / 'nan'
  c = cmd(wd, synthetic_dir, steps=(6, 6), every=1) + ['--config.train.max_nonfinite_steps=2',
                                                        '--config.train.warmup_steps=0',
                                                        '--config.train.lr=1e38']
  r = subprocess.run(c, env=ENV, capture_output=True, text=True, timeout=900)
  assert r.returncode != 0
  assert 'NonFiniteError' in r.stderr and 'max_nonfinite_steps=2' in r.stderr
  from unimedvl_jax.train.model_checkpoint import load_model
  for use_ema in (True, False):
    _, model = load_model(str(wd), use_ema=use_ema)
    from flax import nnx
    import jax
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)


def test_corrupt_latest_checkpoint_falls_back(reference_run, tmp_path):
  import shutil
  src, _ = reference_run
  wd = tmp_path / 'corrupt'
  shutil.copytree(src, wd)
  ck = wd / 'checkpoints'
  steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
  assert len(steps) >= 2
  latest = ck / str(steps[-1]) / 'params'
  victims = sorted((p for p in latest.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  for v in victims[-3:]:          # truncate the largest data files
    with open(v, 'r+b') as f:
      f.truncate(max(1, v.stat().st_size // 3))
  from unimedvl_jax.train.checkpoint import Checkpointer
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.train import step as S
  cfg = load_config_file(CFG, [o.removeprefix('--') for o in overrides(str(wd))])
  _, abstract = S.abstract_state(cfg)
  step, state, _, _ = Checkpointer(str(wd), async_save=False).restore(abstract)
  assert step == steps[-2]
