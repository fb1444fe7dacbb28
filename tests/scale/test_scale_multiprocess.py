"""Multi-host training on one machine: 2 processes x 2 CPU devices (jax.distributed over
localhost, gloo CPU collectives), through `unimedvl_jax.train.loop.train`:

  dist run, part 1: both processes train steps 1-2 and write the step-2 checkpoint (Orbax, from
                    both processes; metrics.jsonl from process 0 only), then stop (max_steps)
  dist run, part 2: the same command resumes from step 2 and trains steps 3-4
  reference:        ONE process with 4 CPU devices (the same data=4 mesh) and the same global
                    batch (tests/scale/scale_mp_worker.py concatenates the two hosts' iterators),
                    4 steps uninterrupted

The losses of every step must agree (float32 model; only the cross-process reduction order may
differ). Each process reads only its own shard of the data (process_index / process_count).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = 'tests.scale.scale_mp_worker'   # run as a module from ROOT
TIMEOUT = 1500


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, cache_dir: str, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'JAX_', 'XLA_', 'SLURM_', 'OMPI_', 'MEGASCALE'))}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p),
             # the resumed run compiles the same programs as part 1: reuse them
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.update(extra)
  return env


def _start(workdir, data_root, mode, env, max_steps=None):
  args = [sys.executable, '-m', WORKER, workdir, data_root, mode]
  if max_steps is not None:
    args.append(str(max_steps))
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)


def _finish(procs):
  results = []
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  failed = []
  for i, (rc, out, err) in enumerate(outs):
    lines = [l for l in out.splitlines() if l.startswith('WORKER_RESULT ')]
    if rc != 0 or not lines:
      err = '\n'.join(l for l in err.splitlines() if not l.startswith(('W1', 'I1')))
      failed.append(f'--- process {i}: rc={rc}\n{out[-1500:]}\n{err[-4000:]}')
    else:
      results.append(json.loads(lines[-1][len('WORKER_RESULT '):]))
  assert not failed, '\n'.join(failed)
  return results


def _dist(workdir, data_root, cache_dir, max_steps=None):
  port = _free_port()
  procs = [_start(workdir, data_root, 'dist',
                  _env(2, cache_dir, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                       JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)), max_steps)
           for i in range(2)]
  return procs


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


@pytest.mark.slow
@pytest.mark.flaky_retry(reason='a free port is picked, released, then bound by the coordinator '
                         '(another process may take it); gloo collectives between 2 + 1 '
                         'processes on a loaded 2-core machine')
def test_two_processes_match_one_process_and_resume(tmp_path):
  from unimedvl_jax.data import synthetic
  data_root = synthetic.ensure_dataset()      # generated once, shared by every process
  dist_dir, ref_dir = str(tmp_path / 'dist'), str(tmp_path / 'ref')
  cache = str(tmp_path / 'jax_cache')

  # part 1 of the 2-process run and the reference run, concurrently
  procs = _dist(dist_dir, data_root, cache, max_steps=2)
  ref = _start(ref_dir, data_root, 'ref', _env(4, cache))
  part1 = _finish(procs)
  assert sorted(r['process_index'] for r in part1) == [0, 1]
  for r in part1:
    assert r['process_count'] == 2 and r['devices'] == 4 and r['local_devices'] == 2, r
    assert r['summary']['end_step'] == 2, r
  assert os.path.isdir(os.path.join(dist_dir, 'checkpoints', '2'))

  part2 = _finish(_dist(dist_dir, data_root, cache))    # same command: resumes from step 2
  for r in part2:
    assert r['summary']['start_step'] == 2 and r['summary']['end_step'] == 4, r
  assert os.path.isdir(os.path.join(dist_dir, 'checkpoints', '4'))

  (ref_res,) = _finish([ref])
  assert ref_res['process_count'] == 1 and ref_res['devices'] == 4
  assert ref_res['summary']['end_step'] == 4

  md, mr = _metrics(dist_dir), _metrics(ref_dir)
  assert sorted(md) == sorted(mr) == [1, 2, 3, 4], (sorted(md), sorted(mr))
  for s in range(1, 5):
    for k in ('loss', 'ce', 'mse', 'grad_norm'):
      np.testing.assert_allclose(md[s][k], mr[s][k], rtol=1e-4, atol=1e-6,
                                 err_msg=f'step {s} {k}: 2 processes vs 1 process')
  assert all(np.isfinite(md[s]['loss']) for s in md)
