"""Host memory of `convert import` / `convert export`: are they streaming?

    JAX_PLATFORMS=cpu python -m unimedvl_jax.interop.measure_memory [--config configs/small.py]

Writes a random model of the config in the reference layout (ema.safetensors, ae.safetensors),
then, each in a fresh process, (1) imports it in memory (`import_folder`, no Orbax save) and
(2) restores an Orbax checkpoint of it and writes the torch files (`convert export`'s two steps),
sampling the process's resident memory every 5 ms. Prints the model size, its largest tensor and,
per phase, the peak growth over the phase's start of the anonymous resident memory (RssAnon:
what the process allocated) and of the whole resident set (VmRSS: also counts mapped file
pages). Streaming means: import peak ~ the model + one tensor (the imported model itself must
live somewhere), the export's writing ~ one or two tensors on top of the restored model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def _status():
  out = {}
  with open('/proc/self/status') as fh:
    for line in fh:
      if line.startswith(('RssAnon:', 'VmRSS:')):
        k, v = line.split(':')
        out[k] = int(v.split()[0]) * 1024
  return out


class Sampler:
  def __init__(self):
    self.base = _status()
    self.peak = dict(self.base)
    self._stop = False
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()

  def _run(self):
    while not self._stop:
      for k, v in _status().items():
        self.peak[k] = max(self.peak[k], v)
      time.sleep(0.005)

  def stop(self) -> dict:
    self._stop = True
    self._t.join()
    for k, v in _status().items():
      self.peak[k] = max(self.peak[k], v)
    return {f'{k}_peak_growth_MiB': round((self.peak[k] - self.base[k]) / 2 ** 20, 1)
            for k in self.base}


def _child(phase: str, src: str, dst: str) -> dict:
  import jax  # noqa: F401  (imported before the baseline)
  from unimedvl_jax.interop import export_torch, import_torch
  from unimedvl_jax.train import model_checkpoint
  if phase == 'import':
    s = Sampler()
    r = import_torch.import_folder(src)
    out = s.stop()
    del r
  else:
    s = Sampler()
    cfg, model = model_checkpoint.load_model(src)
    out = {'restore_' + k: v for k, v in s.stop().items()}
    s = Sampler()
    export_torch.write_torch_dir(cfg, model, dst)
    out.update({'write_' + k: v for k, v in s.stop().items()})
  return out


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', '..',
                                                   'configs', 'small.py'))
  ap.add_argument('--child', nargs=3, default=None, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    print(json.dumps(_child(*a.child)))
    return
  import numpy as np
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.infer.random_init import random_model
  from unimedvl_jax.interop.export_torch import write_torch_dir
  from unimedvl_jax.train.model_checkpoint import save_model_checkpoint
  from flax import nnx
  cfg = load_config_file(a.config, ['model.param_dtype=float32'])
  model = random_model(cfg.model, 0)
  sizes = [int(np.prod(v.get_value().shape)) * v.get_value().dtype.itemsize
           for _, v in nnx.to_flat_state(nnx.state(model))]
  nbytes = sum(sizes)
  with tempfile.TemporaryDirectory() as tmp:
    tdir, ck, out = (os.path.join(tmp, n) for n in ('torch', 'ck', 'out'))
    write_torch_dir(cfg, model, tdir)
    save_model_checkpoint(ck, cfg, model)
    res = {'config': a.config, 'model_MiB': round(nbytes / 2 ** 20, 1),
           'largest_parameter_MiB': round(max(sizes) / 2 ** 20, 1),
           'ema_file_MiB': round(os.path.getsize(os.path.join(tdir, 'ema.safetensors')) / 2 ** 20, 1)}
    for phase, src, dst in (('import', tdir, '-'), ('export', ck, out)):
      p = subprocess.run([sys.executable, '-m', 'unimedvl_jax.interop.measure_memory', '--child',
                          phase, src, dst], capture_output=True, text=True, check=True)
      res[phase] = json.loads(p.stdout.strip().splitlines()[-1])
  print(json.dumps(res, indent=1))


if __name__ == '__main__':
  main()
