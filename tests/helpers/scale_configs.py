"""The small training config of the multi-process / sharded / AOT scale checks (tests/scale/)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def small_config(data_root: str):
  """configs/tiny.py, one short lm stage, a smaller model (compile time dominates here)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('tiny_cfg', os.path.join(ROOT, 'configs', 'tiny.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.model.llm.num_layers = 2
  cfg.model.vit.num_layers = 1
  cfg.model.vae.base_channels = 8
  cfg.data.root = data_root
  cfg.data.batch_size = 4
  cfg.stages = ('foundation',)
  cfg.curriculum.foundation.steps = STEPS
  cfg.train.warmup_steps = 2
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 2
  cfg.train.keep_checkpoints = 3
  cfg.mesh.data = -1
  cfg.mesh.fsdp = 1
  cfg.mesh.tensor = 1
  return cfg
