"""One training process of tests/scale/test_scale_multiprocess.py (not a test module).

    python -m tests.scale.scale_mp_worker WORKDIR DATA_ROOT MODE [MAX_STEPS]   (from the repo root)

MODE 'dist': one process of a multi-process run (jax.distributed from JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, set by the test; CPU collectives over gloo).
MODE 'ref': the single-process reference with the SAME global batch: the data iterator is
replaced by the concatenation of the iterators of hosts 0 and 1 of 2 (what the two processes of
the 'dist' run read), so the global batch, its row order and hence every loss must match.
The environment (XLA_FLAGS device count, JAX_PLATFORMS=cpu) is set by the parent before start.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.helpers.scale_configs import small_config

NUM_HOSTS = 2


class ConcatIterator:
  """The batches of several hosts' iterators, concatenated along the batch axis."""

  def __init__(self, parts):
    self.parts = parts

  def __iter__(self):
    return self

  def __next__(self):
    bs = [next(p) for p in self.parts]
    return {k: np.concatenate([b[k] for b in bs], axis=0) for k in bs[0]}

  def stats(self):
    out = {}
    for p in self.parts:
      for k, v in p.stats().items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          out[k] = out.get(k, 0) + v
    return out

  def get_state(self):
    return {'parts': [p.get_state() for p in self.parts]}

  def set_state(self, state):
    for p, s in zip(self.parts, state['parts']):
      p.set_state(s)

  def close(self):
    for p in self.parts:
      if hasattr(p, 'close'):
        p.close()


def main():
  workdir, data_root, mode = sys.argv[1:4]
  max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else None
  from unimedvl_jax.train import loop
  if mode == 'ref':
    from unimedvl_jax.data import pipeline
    orig = pipeline.make_train_iterator

    def merged(cfg, stage=None, *, process_index=0, process_count=1, **kw):
      assert process_count == 1, process_count
      return ConcatIterator([orig(cfg, stage, process_index=i, process_count=NUM_HOSTS, **kw)
                             for i in range(NUM_HOSTS)])
    pipeline.make_train_iterator = merged
  cfg = small_config(data_root)
  summary = loop.train(cfg, workdir, max_steps=max_steps, quiet=True)
  import jax
  print('WORKER_RESULT ' + json.dumps({
      'process_index': jax.process_index(), 'process_count': jax.process_count(),
      'devices': jax.device_count(), 'local_devices': jax.local_device_count(),
      'summary': summary}, default=str), flush=True)


if __name__ == '__main__':
  main()
