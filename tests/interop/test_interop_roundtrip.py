"""JAX -> PyTorch safetensors -> JAX round trips (bit exact, fp32 and bf16), the CLI through
Orbax, config derivation from the JSON files (incl. the UniMedVL 25/26 ViT-layer case), and
strictness (missing / unexpected / mis-shaped keys are errors that list them)."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
from flax import nnx
from safetensors import safe_open

from tests.helpers.interop import TINY, assert_bit_exact, random_model, tiny_cfg
from unimedvl_jax import convert
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.export_torch import export_state_dict, write_torch_dir
from unimedvl_jax.interop.import_config import derive_config
from unimedvl_jax.interop.import_stream import import_state, import_state_dict
from unimedvl_jax.interop.st_io import DictSource, SafetensorsSource


@pytest.fixture(scope='module')
def fp32_setup():
  cfg = tiny_cfg()
  return cfg, random_model(cfg)


def test_export_files_and_cli_roundtrip_through_orbax(fp32_setup, tmp_path):
  """model -> torch dir -> `convert import` (Orbax) -> load_model: bit exact and the same model
  config; -> `convert export` -> the same tensors and JSON files as the first export."""
  cfg, model = fp32_setup
  d1 = tmp_path / 'torch1'
  write_torch_dir(cfg, model, str(d1))
  (d1 / 'tokenizer.json').write_text('{"dummy": true}')
  # the files: exact key set, torch-loadable, metadata format pt
  with safe_open(str(d1 / 'ema.safetensors'), 'pt') as f:
    assert f.metadata() == {'format': 'pt'}
  sd = safetensors.torch.load_file(str(d1 / 'ema.safetensors'))
  assert {k: tuple(v.shape) for k, v in sd.items()} == km.expected_torch_keys(cfg)
  ae = safetensors.torch.load_file(str(d1 / 'ae.safetensors'))
  assert {k: tuple(v.shape) for k, v in ae.items()} == km.flux_ae_keys(cfg.model.vae)
  vit_json = json.loads((d1 / 'vit_config.json').read_text())
  assert vit_json['num_hidden_layers'] == cfg.model.vit.num_layers + 1
  llm_json = json.loads((d1 / 'llm_config.json').read_text())
  assert llm_json['qk_norm'] is True and llm_json['num_hidden_layers'] == 2

  ck = tmp_path / 'ckpt'
  assert convert.main(['import', '--torch-dir', str(d1), '--out', str(ck), '--config', TINY]) == 0
  from unimedvl_jax.train.model_checkpoint import load_model
  cfg2, model2 = load_model(str(ck))
  assert cfg2.model.to_dict() == cfg.model.to_dict()
  assert cfg2.data.tokenizer_kind == 'hf'
  assert_bit_exact(model, model2)
  report = json.loads((ck / 'import_report.json').read_text())
  assert report['num_tensors']['model'] == len(sd)

  d2 = tmp_path / 'torch2'
  assert convert.main(['export', '--checkpoint', str(ck), '--out', str(d2)]) == 0
  for name in ('ema.safetensors', 'ae.safetensors'):
    a = safetensors.torch.load_file(str(d1 / name))
    b = safetensors.torch.load_file(str(d2 / name))
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k
  for name in ('llm_config.json', 'vit_config.json'):
    assert json.loads((d1 / name).read_text()) == json.loads((d2 / name).read_text())
  assert (d2 / 'tokenizer.json').read_text() == '{"dummy": true}'


def test_bf16_roundtrip_bit_exact_and_dtype_preserved(tmp_path):
  cfg = tiny_cfg('bfloat16')
  model = random_model(cfg, seed=1)
  d = tmp_path / 'bf16'
  write_torch_dir(cfg, model, str(d))
  src = SafetensorsSource(str(d / 'ema.safetensors'))
  assert {np.dtype(src.dtype(k)) for k in src.keys()} == {np.dtype(ml_dtypes.bfloat16)}
  vae = SafetensorsSource(str(d / 'ae.safetensors'))
  llm_json = json.loads((d / 'llm_config.json').read_text())
  vit_json = json.loads((d / 'vit_config.json').read_text())
  cfg2, report, ignored = derive_config(tiny_cfg(), llm_json, vit_json, src, vae)
  assert cfg2.model.param_dtype == 'bfloat16' and not ignored
  assert cfg2.model.to_dict() == cfg.model.to_dict()
  from unimedvl_jax import sharding
  graphdef, state = import_state(cfg2, src, vae, mesh=sharding.make_mesh(cfg2.mesh))
  assert_bit_exact(model, nnx.merge(graphdef, state))
  # --dtype fp32 on export: exact widening
  d32 = tmp_path / 'fp32'
  write_torch_dir(cfg, model, str(d32), dtype='fp32')
  a = safetensors.torch.load_file(str(d / 'ema.safetensors'))
  b = safetensors.torch.load_file(str(d32 / 'ema.safetensors'))
  for k in a:
    assert str(b[k].dtype) == 'torch.float32' and a[k].float().equal(b[k]), k


def test_vit_layer_convention_and_unimedvl_26_case(fp32_setup, tmp_path):
  """vit_config.json num_hidden_layers = built + 1 (BAGEL subtracts 1). UniMedVL's release wrote
  26 while its file holds 26 layers: PyTorch builds 25; we build from the weights and say so, or
  build exactly N with --vit-layers N and list the ignored layer."""
  cfg, model = fp32_setup
  n = cfg.model.vit.num_layers
  d = tmp_path / 't'
  write_torch_dir(cfg, model, str(d))
  vit_json = json.loads((d / 'vit_config.json').read_text())
  llm_json = json.loads((d / 'llm_config.json').read_text())
  src = SafetensorsSource(str(d / 'ema.safetensors'))
  vae = SafetensorsSource(str(d / 'ae.safetensors'))
  # the normal convention: no note about the ViT depth
  c0, rep, _ = derive_config(tiny_cfg(), llm_json, vit_json, src, vae)
  assert not [x for x in rep.notes if x.startswith('ViT')]
  # BAGEL's own llm_config.json has no qk_norm / head_dim / MoT fields (set in code)
  bagel_llm = {k: v for k, v in llm_json.items() if k not in ('qk_norm', 'head_dim', 'layer_module')}
  c0b, repb, _ = derive_config(tiny_cfg(), bagel_llm, vit_json, src, vae)
  assert c0b.model.to_dict() == c0.model.to_dict() == cfg.model.to_dict()
  assert any('qk_norm=True from the weights' in x for x in repb.notes)
  # the UniMedVL release case: JSON says n (PyTorch builds n-1) while the file holds n layers
  vit_json['num_hidden_layers'] = n
  c1, rep1, ign1 = derive_config(tiny_cfg(), llm_json, vit_json, src, vae)
  assert c1.model.vit.num_layers == n and not ign1
  assert any(f'builds {n - 1} layers' in x and f'we built {n}' in x for x in rep1.notes), rep1.notes
  c2, rep2, ign2 = derive_config(tiny_cfg(), llm_json, vit_json, src, vae, vit_layers=n - 1)
  assert c2.model.vit.num_layers == n - 1
  assert len(ign2) == 16 and all(f'encoder.layers.{n - 1}.' in k for k in ign2)
  graphdef, state = import_state(c2, src, vae, ignore=ign2)
  m2 = nnx.merge(graphdef, state)
  got = np.asarray(m2.vit.encoder.layers.mlp.fc1.kernel.get_value())
  np.testing.assert_array_equal(got, np.asarray(model.vit.encoder.layers.mlp.fc1.kernel.get_value())[:n - 1])
  # without the explicit choice, the extra layer is an unexpected key, not silently dropped
  with pytest.raises(km.KeySetError, match=f'encoder.layers.{n - 1}'):
    import_state(c2, src, vae)


def test_strict_missing_unexpected_misshaped(fp32_setup):
  cfg, model = fp32_setup
  sd, ae = export_state_dict(model)
  gone = 'language_model.model.layers.1.self_attn.q_norm_moe_gen.weight'
  extra = 'language_model.model.layers.1.self_attn.o_proj.bias'
  bad = 'connector.fc1.weight'

  def run(s):
    with pytest.raises(km.KeySetError) as e:
      import_state(cfg, DictSource(s), DictSource(ae))
    return str(e.value)

  s = dict(sd)
  del s[gone]
  msg = run(s)
  assert '1 missing' in msg and gone in msg
  s = dict(sd, **{extra: np.zeros(128, np.float32)})
  msg = run(s)
  assert '1 unexpected' in msg and extra in msg
  s = dict(sd, **{bad: sd[bad].T})
  msg = run(s)
  assert '1 mis-shaped' in msg and bad in msg and str(list(sd[bad].shape)) in msg
  s = dict(sd, **{extra: np.zeros(128, np.float32), bad: sd[bad].T})
  del s[gone]
  msg = run(s)
  assert all(x in msg for x in (gone, extra, bad))
  ae2 = dict(ae)
  ae2.pop('decoder.conv_out.bias')
  with pytest.raises(km.KeySetError, match='decoder.conv_out.bias'):
    import_state(cfg, DictSource(sd), DictSource(ae2))
  # and the untouched dicts import bit exactly
  assert_bit_exact(model, import_state_dict(cfg, sd, ae))


def test_cli_import_refuses_a_bad_file_and_lists_the_keys(fp32_setup, tmp_path, capsys):
  cfg, model = fp32_setup
  d = tmp_path / 't'
  write_torch_dir(cfg, model, str(d))
  sd = safetensors.torch.load_file(str(d / 'ema.safetensors'))
  gone = 'vit_model.vision_model.encoder.layers.0.self_attn.k_proj.bias'
  bad = 'time_embedder.mlp.2.weight'
  del sd[gone]
  sd[bad] = sd[bad][:, :-1].contiguous()
  sd['language_model.model.layers.0.self_attn.o_proj.bias'] = sd['llm2vae.bias'].new_zeros(128)
  safetensors.torch.save_file(sd, str(d / 'ema.safetensors'), metadata={'format': 'pt'})
  rc = convert.main(['import', '--torch-dir', str(d), '--out', str(tmp_path / 'ck'), '--config', TINY])
  err = capsys.readouterr().err
  assert rc == 2
  assert '1 missing, 1 unexpected, 1 mis-shaped' in err
  assert gone in err and bad in err and 'o_proj.bias' in err
  assert not (tmp_path / 'ck').exists()
