"""Config validation names the offending field; overrides parse; shipped configs validate."""

import os

import pytest

from unimedvl_jax.config import ConfigError, default_config
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.config_validate import validate

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')


@pytest.mark.parametrize('name', ['tiny', 'small', 'unimedvl_7b'])
def test_shipped_configs_validate(name):
  cfg = load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  assert cfg.model.llm.num_heads % cfg.model.llm.num_kv_heads == 0


@pytest.mark.parametrize('override,field', [
    ('model.llm.num_kv_heads=5', 'model.llm.num_heads'),
    ('model.attention_impl=cuda', 'model.attention_impl'),
    ('model.remat=some', 'model.remat'),
    ('data.max_latent_tokens=600', 'data.max_latent_tokens'),
    ('data.cfg_dropout_vit=1.5', 'data.cfg_dropout_vit'),
    ('train.freeze=("vae","decoderx")', 'train.freeze'),
    ('train.freeze=("vit/(",)', 'train.freeze'),
    ('mesh.fsdp=0', 'mesh.fsdp'),
    ('model.attention_platform=metal', 'model.attention_platform'),
    ('mesh.rules=(("embed", "model"),)', 'mesh.rules'),
    ('mesh.rules=(("embed", "fsdp"),)', 'mesh.rules'),
    ('mesh.max_replicated_bytes=-1', 'mesh.max_replicated_bytes'),
    ('curriculum.foundation.steps=0', 'curriculum.foundation.steps'),
    ('model.llm.qk_norm_init=0.0', 'model.llm.qk_norm_init'),
])
def test_bad_values_fail_naming_the_field(override, field):
  with pytest.raises(ConfigError, match=f'config.{field}'):
    load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'), [override])


@pytest.mark.parametrize('override,field', [
    ('train.keep_checkpoints=0', 'train.keep_checkpoints'),
    ('train.checkpoint_every=0', 'train.checkpoint_every'),
    ('train.log_every=0', 'train.log_every'),
    ('train.grad_clip=0.0', 'train.grad_clip'),
    ('train.grad_clip=-1.0', 'train.grad_clip'),
    ('train.b1=-0.1', 'train.b1'),
    ('train.b1=1.0', 'train.b1'),
    ('train.b2=1.0', 'train.b2'),
    ('train.eps=0.0', 'train.eps'),
    ('train.weight_decay=-0.01', 'train.weight_decay'),
    ('train.min_lr=-1e-6', 'train.min_lr'),
    ('train.max_nonfinite_steps=-1', 'train.max_nonfinite_steps'),
    ('train.lr=float("nan")', 'train.lr'),
    ('train.lr=1e400', 'train.lr'),
    ('train.warmup_steps=-1', 'train.warmup_steps'),
    ('train.grad_accum=0', 'train.grad_accum'),
    ('train.ce_weight=-1.0', 'train.ce_weight'),
    ('train.total_steps=-5', 'train.total_steps'),
    ('train.profile_steps=(-1,)', 'train.profile_steps'),
])
def test_every_train_field_is_validated(override, field):
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  key, _, raw = override.partition('=')
  section, name = key.split('.')
  cfg[section][name] = eval(raw)   # noqa: S307  (test literals; nan / inf need float())
  with pytest.raises(ConfigError, match=f'config.{field}: '):
    validate(cfg)


def test_stage_train_overrides_are_validated():
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  stage = cfg.stages[0]
  cfg.curriculum[stage].train.keep_checkpoints = 0
  with pytest.raises(ConfigError, match=f'config.curriculum.{stage}.train.keep_checkpoints'):
    validate(cfg)


def test_boundary_values_are_accepted():
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'),
                         ['train.keep_checkpoints=1', 'train.checkpoint_every=1',
                          'train.log_every=1', 'train.b1=0.0', 'train.weight_decay=0.0',
                          'train.min_lr=0.0', 'train.max_nonfinite_steps=0',
                          'data.allow_outside_root=True'])
  assert cfg.train.keep_checkpoints == 1 and cfg.data.allow_outside_root is True
  assert default_config().data.allow_outside_root is False
  with pytest.raises(ConfigError, match='config.data.allow_outside_root'):
    load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'), ['data.allow_outside_root=yes'])


def test_unknown_field_is_an_error():
  with pytest.raises(ConfigError, match='no such field'):
    load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'), ['model.llm.num_layerz=2'])


def test_overrides_parse_types():
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'),
                         ['model.llm.num_layers=2', 'train.lr=1', "model.dtype='bfloat16'",
                          'train.freeze=["vae","vit"]'])
  assert cfg.model.llm.num_layers == 2 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
  assert cfg.model.dtype == 'bfloat16' and cfg.train.freeze == ('vae', 'vit')
  assert validate(default_config()) is not None


def test_one_override_parser_for_config_files_and_the_importer():
  """`config_load.parse_override` parses both `load_config_file` overrides and `convert import
  --set`: the same literals, the same strings, the same error for a missing '='."""
  from unimedvl_jax.config_load import parse_override
  from unimedvl_jax.interop.import_common import TorchImportError
  from unimedvl_jax.interop.import_config import parse_overrides
  assert parse_override('--config.train.lr=1e-3') == ('train.lr', 1e-3)
  assert parse_override('model.dtype=bfloat16') == ('model.dtype', 'bfloat16')
  assert parse_override('train.freeze=["vae"]') == ('train.freeze', ['vae'])
  assert parse_overrides(['--config.train.lr=1e-3', 'model.dtype=bfloat16']) == {
      'train.lr': 1e-3, 'model.dtype': 'bfloat16'}
  with pytest.raises(ConfigError, match="override 'model.llm.num_layers': expected KEY=VALUE"):
    load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'), ['model.llm.num_layers'])
  with pytest.raises(TorchImportError, match="--set: override '=2': expected KEY=VALUE"):
    parse_overrides(['=2'])


def test_freeze_takes_module_names_and_regexes():
  from unimedvl_jax.config import FREEZE_ALIASES, freeze_patterns, stage_train_config
  cfg = load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'),
                         ['train.freeze=("vae", "decoder/layers/gen/.*")'])
  assert freeze_patterns(cfg.train.freeze) == (FREEZE_ALIASES['vae'], 'decoder/layers/gen/.*')
  # the 'vae' stage kind declares its own frozen set: everything but the autoencoder
  assert stage_train_config(cfg, 'vae').freeze == ('vit', 'connector', 'adapters', 'llm')
  assert stage_train_config(cfg, 'foundation').freeze == cfg.train.freeze
  cfg.curriculum.foundation.train.freeze = ('decoder/layers/moe/.*',)
  with pytest.raises(ConfigError, match=r'config\.curriculum\.foundation\.train\.freeze: .* '
                                        'matches no parameter'):
    validate(cfg)
