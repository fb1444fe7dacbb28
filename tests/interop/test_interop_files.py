"""Real checkpoint folders both ways, without workarounds (issue 14), against files the project
writes in the reference layout (a tiny random model):

  * no --config: the model comes from the files; an export re-imports with no flags to the same
    config, bit exact, from the single-file and from the sharded (transformers / vLLM) layout;
  * data settings that do not fit the imported model: adjusted with a note, or (set explicitly)
    an error naming both; --set works without --config; a --set model field the files
    contradict is an error;
  * VAE GroupNorm groups / scale / shift: from the ae.safetensors metadata our exports write,
    else explicit flags with the released defaults, and the report says which;
  * a lone ema.safetensors (no VAE) and a lone ae.safetensors (a VAE checkpoint) import, export
    back bit exactly, and combine with --vae into the full model;
  * `module.` key prefixes; strictness: missing ViT layers, a tensor of another dtype
    (--allow-cast), NaN / inf tensors named, malformed JSON / safetensors headers (one line,
    exit 2, no traceback), sharded indexes pointing outside the folder.
"""

import json
import shutil
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

from tests.helpers.interop import assert_bit_exact, flat_np, random_model, tiny_cfg
from unimedvl_jax import convert
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.export_torch import write_torch_dir
from unimedvl_jax.interop.import_common import TorchImportError
from unimedvl_jax.interop.import_torch import import_checkpoint, import_folder
from unimedvl_jax.interop.st_io import CheckpointFormatError, SafetensorsSource, plan_shards
from unimedvl_jax.interop.vae_checkpoint import load_vae_checkpoint
from unimedvl_jax.train.checkpoint_format import config_to_json


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The tiny model and its export in the reference layout (single file), written once."""
  cfg = tiny_cfg()
  model = random_model(cfg, seed=3)
  d = tmp_path_factory.mktemp('ref') / 'torch'
  write_torch_dir(cfg, model, str(d))
  return cfg, model, d


def copy_dir(src, dst, drop=()):
  shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in drop])
  return dst


def load_st(path):
  return safetensors.torch.load_file(str(path))


def assert_same_tensors(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k


def model_facts(c):
  """The model fields a checkpoint determines (not the run settings such as the compute dtype)."""
  m = c.model.to_dict()
  return {k: m[k] for k in ('llm', 'vit', 'vae', 'latent_patch_size', 'max_latent_size',
                            'timestep_freq_dim', 'param_dtype')}


def run_cli(argv, capsys):
  rc = convert.main(argv)
  out = capsys.readouterr()
  return rc, out.out, out.err


# --------------------------------------------------------------------- no flags, both layouts

def test_no_flag_roundtrip_single_file_and_sharded(setup, tmp_path, capsys):
  """reference layout -> import (no flags) -> sharded export -> import (no flags) -> export:
  every tensor bit exact, the same full config each time (export's unimedvl_config.json holds
  the checkpoint's config)."""
  cfg, model, d = setup
  ck = tmp_path / 'ck'
  rc, out, err = run_cli(['import', '--torch-dir', str(d), '--out', str(ck)], capsys)
  assert rc == 0, err
  rep = json.loads((ck / 'import_report.json').read_text())
  assert {k: v['source'] for k, v in rep['vae_settings'].items()} == {
      k: f'{d / "ae.safetensors"} metadata' for k in ('norm_groups', 'norm_eps', 'scale_factor',
                                                       'shift_factor')}
  assert rep['vae_settings']['norm_groups']['value'] == cfg.model.vae.norm_groups == 8

  # sharded export: transformers' names and index; the shards hold exactly ema.safetensors
  ds = tmp_path / 'sharded'
  size = (sum(v.numel() * v.element_size() for v in load_st(d / 'ema.safetensors').values())
          // 3)
  rc, out, err = run_cli(['export', '--checkpoint', str(ck), '--out', str(ds),
                          '--shard-size', str(size)], capsys)
  assert rc == 0, err
  assert json.loads((ds / 'unimedvl_config.json').read_text())['config'] == config_to_json(cfg)
  idx = json.loads((ds / 'model.safetensors.index.json').read_text())
  files = sorted(set(idx['weight_map'].values()))
  n = len(files)
  assert n >= 3 and files == [f'model-{k:05d}-of-{n:05d}.safetensors' for k in range(1, n + 1)]
  assert not (ds / 'ema.safetensors').exists()
  merged, total = {}, 0
  for f in files:
    part = load_st(ds / f)
    assert all(idx['weight_map'][k] == f for k in part)
    total += sum(v.numel() * v.element_size() for v in part.values())
    merged.update(part)
  assert idx['metadata']['total_size'] == total
  ema = load_st(d / 'ema.safetensors')
  assert_same_tensors(merged, ema)
  # the shards are the ones huggingface_hub / transformers cut (tensors in the writing order)
  order = SafetensorsSource(str(d / 'ema.safetensors')).keys()
  assert idx['weight_map'] == hf_split({k: ema[k] for k in order}, size)
  assert_same_tensors(load_st(ds / 'ae.safetensors'), load_st(d / 'ae.safetensors'))
  # ... and it re-imports with no flags: the model and config of the start, bit exact
  r = import_folder(str(ds))
  assert any('model.safetensors.index.json' in n for n in r.report.notes)
  assert config_to_json(r.cfg) == config_to_json(cfg)
  assert_bit_exact(model, r.model)
  # an export refuses a folder holding the other layout (ambiguous on re-import)
  rc, _, err = run_cli(['export', '--checkpoint', str(ck), '--out', str(ds)], capsys)
  assert rc == 2 and 'model-00001-of' in err and len(err.strip().splitlines()) == 1


def hf_split(tensors, max_bytes):
  """huggingface_hub's sharding (what transformers' save_pretrained writes): key -> file."""
  from huggingface_hub import split_torch_state_dict_into_shards
  return split_torch_state_dict_into_shards(tensors, max_shard_size=max_bytes).tensor_to_filename


def test_shard_plan_is_huggingface_hubs():
  # 40, 120 (alone: too big), 20, 24, 80 bytes at most 100 per shard
  specs = {'a': ((10,), np.float32), 'b': ((30,), np.float32), 'c': ((5,), np.float32),
           'd': ((6,), np.float32), 'e': ((20,), np.float32)}
  ours = {k: f for f, ks in plan_shards(specs, 100) for k in ks}
  assert ours == hf_split({k: torch.zeros(s) for k, (s, _) in specs.items()}, 100)
  assert ours == {'b': 'model-00001-of-00003.safetensors', 'a': 'model-00002-of-00003.safetensors',
                  'c': 'model-00002-of-00003.safetensors', 'd': 'model-00002-of-00003.safetensors',
                  'e': 'model-00003-of-00003.safetensors'}
  from unimedvl_jax.interop.st_io import parse_size
  assert parse_size('5GB') == 5 * 10 ** 9 and parse_size('5GiB') == 5 * 2 ** 30
  assert parse_size('1.5MB') == 1_500_000 and parse_size(123) == 123
  with pytest.raises(ValueError, match='5 parsecs'):
    parse_size('5 parsecs')


def test_no_sidecar_defaults_adjust_or_fail_naming_both(setup, tmp_path, capsys):
  """A folder as BAGEL / UniMedVL release it (no unimedvl_config.json, no VAE metadata)."""
  cfg, model, d = setup
  bare = copy_dir(d, tmp_path / 'bare', drop=('unimedvl_config.json',))
  ae = load_st(d / 'ae.safetensors')
  safetensors.torch.save_file(ae, str(bare / 'ae.safetensors'), metadata={'format': 'pt'})
  # the released default of 32 groups does not divide the tiny VAE's 16 channels: say so
  rc, _, err = run_cli(['import', '--torch-dir', str(bare), '--out', str(tmp_path / 'x')], capsys)
  assert rc == 2 and 'norm_groups=32 (released default' in err and '--vae-norm-groups' in err
  # explicit flags; the defaults' data section (1024 px, latent grid 64) does not fit the tiny
  # model's 4x4 latent_pos_embed: adjusted with a note; --set works without --config
  cfg2, rep = import_checkpoint(str(bare), str(tmp_path / 'ck'), save=False,
                                overrides=['data.seq_len=16384', 'model.dtype=float32'],
                                vae_flags={'norm_groups': 8})
  notes = '\n'.join(rep.notes)
  assert 'norm_groups=8 (--vae-norm-groups)' in notes
  assert 'scale_factor=0.3611 (released default' in notes
  assert 'shift_factor=0.1159 (released default' in notes
  assert rep.vae_settings['norm_eps'] == {'value': 1e-6,
                                          'source': 'released default (not recorded in the file)'}
  assert 'data.vae_max_size: 1024 -> 64' in notes and 'max_latent_size 4' in notes
  assert model_facts(cfg2) == model_facts(cfg) and cfg2.model.dtype == 'float32'
  assert cfg2.data.seq_len == 16384 and cfg2.data.vae_max_size == 64
  assert cfg2.data.vit_max_size == cfg.model.vit.grid_size * cfg.model.vit.patch_size
  # the same setting made explicitly is not silently changed: an error naming both
  rc, _, err = run_cli(['import', '--torch-dir', str(bare), '--out', str(tmp_path / 'y'),
                        '--vae-norm-groups', '8', '--set', 'data.vae_max_size=1024'], capsys)
  assert rc == 2 and 'data.vae_max_size=1024 (--set data.vae_max_size)' in err
  assert 'max_latent_size 4' in err and 'latent_pos_embed' in err
  # a --set model field that the files contradict
  rc, _, err = run_cli(['import', '--torch-dir', str(bare), '--out', str(tmp_path / 'z'),
                        '--vae-norm-groups', '8', '--set', 'model.llm.num_layers=3'], capsys)
  assert rc == 2 and 'model.llm.num_layers=3' in err and 'give 2' in err
  assert not any((tmp_path / n).exists() for n in ('x', 'y', 'z'))


# ---------------------------------------------------------------------------- files on their own

def test_lone_ema_lone_ae_and_recombined(setup, tmp_path, capsys):
  cfg, model, d = setup
  ema, ae_sd = load_st(d / 'ema.safetensors'), load_st(d / 'ae.safetensors')
  # a lone ema.safetensors + json configs (as released): imports, adapters kept bit exact
  lone = copy_dir(d, tmp_path / 'lone_ema', drop=('ae.safetensors', 'unimedvl_config.json'))
  ck = tmp_path / 'ck_ema'
  rc, out, err = run_cli(['import', '--torch-dir', str(lone), '--out', str(ck)], capsys)
  assert rc == 0, err
  assert 'imported without a VAE' in out and 'generation_adapters.safetensors' in out
  kept = load_st(ck / 'generation_adapters.safetensors')
  assert set(kept) == set(km.gen_adapter_keys(cfg.model))
  assert_same_tensors(kept, {k: ema[k] for k in kept})
  # ... and exports back to the very same ema.safetensors (the checkpoint has no VAE)
  e1 = tmp_path / 'e1'
  rc, _, err = run_cli(['export', '--checkpoint', str(ck), '--out', str(e1)], capsys)
  assert rc == 0, err
  assert_same_tensors(load_st(e1 / 'ema.safetensors'), ema)
  assert not (e1 / 'ae.safetensors').exists()
  saved = json.loads((e1 / 'unimedvl_config.json').read_text())['config']['model']
  assert saved['vae']['enabled'] is False and saved['max_latent_size'] == cfg.model.max_latent_size

  # a lone ae.safetensors: a VAE checkpoint, bit exact, exported back with its settings
  lone_ae = tmp_path / 'lone_ae'
  lone_ae.mkdir()
  shutil.copy(d / 'ae.safetensors', lone_ae / 'ae.safetensors')
  vck = tmp_path / 'vae_ck'
  rc, out, err = run_cli(['import', '--torch-dir', str(lone_ae), '--out', str(vck)], capsys)
  assert rc == 0, err
  assert '"kind": "vae"' in out
  vcfg, ae = load_vae_checkpoint(str(vck))
  assert dict(vcfg.vae) == dict(cfg.model.vae)
  ref_vae = {p[1:]: a for p, a in flat_np(model).items() if p[0] == 'vae'}
  got_vae = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ae))}
  assert set(got_vae) == set(ref_vae)
  for p in ref_vae:
    np.testing.assert_array_equal(got_vae[p].view(np.uint8), ref_vae[p].view(np.uint8))
  e2 = tmp_path / 'e2'
  rc, _, err = run_cli(['export', '--checkpoint', str(vck), '--out', str(e2)], capsys)
  assert rc == 0, err
  meta = SafetensorsSource(str(e2 / 'ae.safetensors')).metadata()
  assert meta['unimedvl.vae.norm_groups'] == '8' and meta['unimedvl.vae.scale_factor'] == '0.3611'
  assert_same_tensors(load_st(e2 / 'ae.safetensors'), ae_sd)

  # the two recombined: --vae takes the VAE checkpoint (or an ae.safetensors elsewhere)
  for vae in (vck, d / 'ae.safetensors'):
    r = import_folder(str(lone), vae=str(vae))
    assert model_facts(r.cfg) == model_facts(cfg) and not r.adapters
    assert_bit_exact(model, r.model)


def test_module_prefix_imports_with_a_note(setup, tmp_path):
  cfg, model, d = setup
  pre = copy_dir(d, tmp_path / 'pre', drop=('unimedvl_config.json',))
  sd = load_st(d / 'ema.safetensors')
  safetensors.torch.save_file({f'module.{k}': v for k, v in sd.items()},
                              str(pre / 'ema.safetensors'), metadata={'format': 'pt'})
  cfg2, report = import_checkpoint(str(pre), str(tmp_path / 'ck'), save=False)
  assert any(f"{len(sd)} of {len(sd)} keys start with 'module.'" in n for n in report.notes)
  assert model_facts(cfg2) == model_facts(cfg)
  # a prefixed autoencoder named directly (--torch-dir FILE): a VAE checkpoint, bit exact
  ae = load_st(d / 'ae.safetensors')
  safetensors.torch.save_file({f'module.{k}': v for k, v in ae.items()},
                              str(pre / 'prefixed_ae.safetensors'))
  r = import_folder(str(pre / 'prefixed_ae.safetensors'), vae_flags={'norm_groups': 8})
  assert r.report.kind == 'vae' and dict(r.cfg.vae) == dict(cfg.model.vae)
  got = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(r.model))}
  for p, a in flat_np(model).items():
    if p[0] == 'vae':
      np.testing.assert_array_equal(got[p[1:]].view(np.uint8), a.view(np.uint8))


# ------------------------------------------------------------------------------- strictness

def test_missing_vit_layers_are_an_error(setup, tmp_path):
  cfg, model, d = setup
  n = cfg.model.vit.num_layers
  t = copy_dir(d, tmp_path / 't')
  vj = json.loads((d / 'vit_config.json').read_text())
  vj['num_hidden_layers'] = n + 2          # BAGEL builds n + 1 layers; the file holds n
  (t / 'vit_config.json').write_text(json.dumps(vj))
  with pytest.raises(TorchImportError, match=rf'num_hidden_layers={n + 2}.*{n + 1} ViT layers.*'
                                              rf'only {n}.*\[{n}\] are missing'):
    import_checkpoint(str(t), str(tmp_path / 'ck'), save=False)
  # a hole in the layer indices
  sd = load_st(d / 'ema.safetensors')
  gap = {k: v for k, v in sd.items() if '.encoder.layers.1.' not in k}
  safetensors.torch.save_file(gap, str(t / 'ema.safetensors'), metadata={'format': 'pt'})
  shutil.copy(d / 'vit_config.json', t / 'vit_config.json')
  with pytest.raises(TorchImportError, match=r'ViT layers \[1\] are missing'):
    import_checkpoint(str(t), str(tmp_path / 'ck'), save=False)


def test_odd_dtype_needs_allow_cast_and_nonfinite_named(setup, tmp_path):
  cfg, model, d = setup
  t = copy_dir(d, tmp_path / 't')
  sd = load_st(d / 'ema.safetensors')
  odd = 'connector.fc2.bias'
  sd16 = dict(sd, **{odd: sd[odd].half()})
  safetensors.torch.save_file(sd16, str(t / 'ema.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(TorchImportError, match=rf'1 tensors are not float32.*{odd} \(float16\).*'
                                              '--allow-cast'):
    import_checkpoint(str(t), str(tmp_path / 'ck'), save=False)
  cfg2, rep = import_checkpoint(str(t), str(tmp_path / 'ck'), save=False, allow_cast=True)
  assert any(odd in n and '--allow-cast' in n for n in rep.notes)
  assert cfg2.model.param_dtype == 'float32'
  # NaN / inf: named, with their count; --allow-nonfinite imports and still lists them
  bad = dict(sd)
  k1 = 'language_model.model.layers.1.mlp_moe_gen.up_proj.weight'
  k2 = 'vae2llm.bias'
  bad[k1] = sd[k1].clone()
  bad[k1][0, :3] = float('nan')
  bad[k2] = sd[k2].clone()
  bad[k2][1] = float('inf')
  safetensors.torch.save_file(bad, str(t / 'ema.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(TorchImportError, match=rf'2 tensors hold NaN or inf: .*{k1} \(3 values\).*'
                                              rf'{k2} \(1 values\)'):
    import_checkpoint(str(t), str(tmp_path / 'ck'), save=False)
  _, rep = import_checkpoint(str(t), str(tmp_path / 'ck'), save=False, allow_nonfinite=True)
  assert rep.nonfinite == {k1: 3, k2: 1}


def _one_line_error(capsys, argv, *needles):
  rc, _, err = run_cli(argv, capsys)
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in err, err
  for s in needles:
    assert s in lines[0], lines[0]
  return lines[0]


def test_malformed_files_give_one_line_exit_2(setup, tmp_path, capsys):
  cfg, model, d = setup
  t = copy_dir(d, tmp_path / 't')
  base = ['import', '--torch-dir', str(t), '--out', str(tmp_path / 'ck')]
  good_llm = (t / 'llm_config.json').read_text()
  (t / 'llm_config.json').write_text(good_llm[:-20])
  _one_line_error(capsys, base, str(t / 'llm_config.json'), 'malformed JSON')
  (t / 'llm_config.json').write_text(good_llm)
  ema = t / 'ema.safetensors'
  raw = ema.read_bytes()
  (n,) = struct.unpack('<Q', raw[:8])
  # a header that is not JSON, a header length past the end, a file shorter than 8 bytes,
  # tensor data past the end (truncated download)
  for blob, what in [(raw[:8] + b'{"x": [' + raw[15:], 'not JSON'),
                     (struct.pack('<Q', len(raw)) + raw[8:], 'header length'),
                     (b'\x01\x02', 'no header'),
                     (raw[:-100], 'truncated')]:
    ema.write_bytes(blob)
    _one_line_error(capsys, base, str(ema), what)
  ema.write_bytes(raw)
  assert not (tmp_path / 'ck').exists()


def test_sharded_index_is_read_and_checked(setup, tmp_path, capsys):
  cfg, model, d = setup
  t = copy_dir(d, tmp_path / 't', drop=('ema.safetensors',))
  sd = load_st(d / 'ema.safetensors')
  keys = sorted(sd)
  half = len(keys) // 2
  parts = {'model-00001-of-00002.safetensors': keys[:half],
           'model-00002-of-00002.safetensors': keys[half:]}
  for f, ks in parts.items():
    safetensors.torch.save_file({k: sd[k] for k in ks}, str(t / f), metadata={'format': 'pt'})
  wm = {k: f for f, ks in parts.items() for k in ks}
  index = t / 'model.safetensors.index.json'

  def write(weight_map):
    index.write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))

  write(wm)
  cfg2, rep = import_checkpoint(str(t), str(tmp_path / 'ck'), save=False)
  assert rep.num_tensors['model'] == len(sd)
  base = ['import', '--torch-dir', str(t), '--out', str(tmp_path / 'ck')]
  outside = tmp_path / 'outside.safetensors'
  shutil.copy(t / 'model-00002-of-00002.safetensors', outside)
  for target in ('../outside.safetensors', str(outside)):
    write({**wm, keys[-1]: target})
    _one_line_error(capsys, base, str(index), 'points outside', 'refused')
  write({**wm, keys[0]: 'model-00002-of-00002.safetensors'})
  _one_line_error(capsys, base, keys[0], "but it is in 'model-00001-of-00002.safetensors'")
  write({k: v for k, v in wm.items() if k != keys[-1]})
  _one_line_error(capsys, base, 'not in the weight_map', keys[-1])
  write({**wm, keys[0]: 'model-00003-of-00003.safetensors'})
  _one_line_error(capsys, base, 'does not exist', 'model-00003-of-00003.safetensors')
  index.write_text('{"weight_map": ')
  _one_line_error(capsys, base, str(index), 'malformed JSON')
  # both layouts in one folder: ambiguous unless --weights picks one
  write(wm)
  shutil.copy(d / 'ema.safetensors', t / 'ema.safetensors')
  _one_line_error(capsys, base, 'ema.safetensors and model.safetensors.index.json', '--weights')
  cfg3, _ = import_checkpoint(str(t), str(tmp_path / 'ck'), save=False,
                              weights=str(t / 'ema.safetensors'))
  assert cfg3.model.to_dict() == cfg2.model.to_dict()
  with pytest.raises(CheckpointFormatError, match='nope.index.json'):
    SafetensorsSource.from_index(str(tmp_path / 'nope.index.json'))
