"""The inference CLI function (`python -m unimedvl_jax.infer`) on a saved random tiny checkpoint:
vqa on a NIfTI volume, generate (PNG + JSON sidecar), edit; clear errors for an
unreadable input, an image too large, and a checkpoint whose config does not match."""

import json
import os

import numpy as np
import pytest

from tests.helpers.infer_ref import TINY, tiny_cfg
from unimedvl_jax.infer import cli
from unimedvl_jax.infer.loading import LoadError
from unimedvl_jax.infer.random_init import random_model


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  from unimedvl_jax.data import synthetic
  from unimedvl_jax.train.model_checkpoint import save_model_checkpoint
  d = str(tmp_path_factory.mktemp('cli'))
  synthetic.generate(os.path.join(d, 'data'), seed=0, size=32, n_subjects=4, include_real=False,
                     vocab_size=600)
  cfg = tiny_cfg(f'data.tokenizer_path={d}/data/tokenizer.model')
  save_model_checkpoint(os.path.join(d, 'ck'), cfg, random_model(cfg.model, 0), step=0)
  img = os.path.join(d, 'data', 'images', 'train', 's000000.png')
  return d, os.path.join(d, 'ck'), img


def test_vqa_report_generate_edit(ckpt, tmp_path):
  d, ck, img = ckpt
  # vqa on a NIfTI volume (its middle axial slice), the answer written as JSON
  import nibabel as nib
  vol = np.random.RandomState(0).uniform(0, 1000, (40, 40, 5)).astype(np.float32)
  nii = str(tmp_path / 'v.nii.gz')
  nib.save(nib.Nifti1Image(vol, np.eye(4)), nii)
  r = cli.run('vqa', ck, image=nii, question='Is there a lesion?', max_new_tokens=3,
              out=str(tmp_path / 'a.json'))
  assert isinstance(r['answer'], str)
  assert json.load(open(tmp_path / 'a.json'))['answer'] == r['answer']
  out = str(tmp_path / 'g.png')
  r = cli.run('generate', ck, prompt='Generate a chest X-ray with one lesion.', size='32x32',
              num_steps=2, out=out)
  from unimedvl_jax.data.images import load_image
  assert load_image(out).shape == (32, 32, 3)
  side = json.load(open(out + '.json'))
  assert side['sampler']['num_steps'] == 2 and side['image_shape'] == [32, 32, 3]
  r = cli.run('edit', ck, image=img, task='counterfactual', num_steps=2, max_new_tokens=3,
              out=str(tmp_path / 'e.png'))
  assert r['image'].shape == (32, 32, 3) and isinstance(r['explanation'], str)


def test_cli_errors(ckpt, tmp_path):
  d, ck, img = ckpt
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'not an image at all')
  with pytest.raises(cli.InputError, match='cannot read image'):
    cli.run('vqa', ck, image=str(bad), question='?')
  with pytest.raises(cli.InputError, match='cannot read image'):
    cli.run('vqa', ck, image=str(tmp_path / 'missing.png'), question='?')
  with pytest.raises(cli.InputError, match='too large'):
    cli.run('vqa', ck, image=img, question='?', max_input_pixels=100)
  with pytest.raises(cli.InputError, match='--mesh'):
    cli.run('vqa', ck, image=img, question='?', mesh='rows=2')
  with pytest.raises(ValueError, match='devices'):
    cli.run('vqa', ck, image=img, question='?', mesh='data=64')
  from unimedvl_jax.infer.context import ContextError
  with pytest.raises(ContextError, match='too large'):
    cli.run('generate', ck, prompt='x', size='4096x4096', num_steps=2)
  with pytest.raises(LoadError, match='different model'):
    cli.run('vqa', ck, image=img, question='?', config=TINY)
  with pytest.raises(LoadError, match='does not exist'):
    cli.run('vqa', str(tmp_path / 'nope'), image=img, question='?')
