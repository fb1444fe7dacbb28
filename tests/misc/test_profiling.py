"""profiling.model_flops_per_step reads train.freeze as the step does (regexes over parameter
paths, config.FREEZE_ALIASES; train/step.py is_frozen): the ViT counts as frozen (forward only)
iff every one of its parameters is frozen, whichever way the freeze is written."""

import os

from unimedvl_jax import profiling
from unimedvl_jax.config_load import load_config_file

CFG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')


def _flops(freeze):
  cfg = load_config_file(CFG)
  return profiling.model_flops_per_step(cfg, frozen=tuple(freeze))


def test_a_regex_freezing_the_vit_counts_as_the_alias():
  alias = _flops(('vae', 'vit'))
  assert 'vit_frozen_fwd' in alias and 'fwd_vit' not in alias
  for regex in (r'vit/.*', r'vit/(embeddings|encoder|post_layernorm)(/.*)?', r'(vae|vit)/.*'):
    assert _flops(('vae', regex)) == alias, regex
  cfg = load_config_file(CFG, [r"train.freeze=('vit/.*',)"])
  assert profiling.model_flops_per_step(cfg) == alias      # cfg.train.freeze is the default


def test_the_vit_not_all_frozen_is_trained():
  trained = _flops(('vae',))
  assert 'fwd_vit' in trained and 'vit_frozen_fwd' not in trained
  partly = _flops(('vae', r'vit/embeddings/.*'))             # only the patch embedding frozen
  assert partly == trained
  frozen = _flops(('vae', 'vit'))
  assert partly['train'] - frozen['train'] == 2.0 * trained['fwd_vit'] > 0


def test_vit_frozen():
  cfg = load_config_file(CFG).model
  assert profiling.vit_frozen(cfg, ('vit',)) and profiling.vit_frozen(cfg, ('.*',))
  assert not profiling.vit_frozen(cfg, ())
  assert not profiling.vit_frozen(cfg, ('vae', 'connector', 'vit/encoder/.*'))
