"""Config validation names the offending field; overrides parse; shipped configs validate."""

import os

import pytest

from unimedvl_jax.config import ConfigError, default_config, load_config_file, validate

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
    ('mesh.fsdp=0', 'mesh.fsdp'),
    ('curriculum.foundation.steps=0', 'curriculum.foundation.steps'),
])
def test_bad_values_fail_naming_the_field(override, field):
  with pytest.raises(ConfigError, match=f'config.{field}'):
    load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'), [override])


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
