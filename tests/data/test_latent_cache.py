"""The latent cache (data/latent_cache.py): training from cached moments gives exactly the latents
of training from pixels for the same noise; stale, missing and other-VAE caches are errors naming
the image / cache; the `cache-latents` CLI writes a cache the pipeline reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.data import latent_cache as lc
from unimedvl_jax.data import pipeline
from unimedvl_jax.data.jsonl import RawLine, parse_record
from unimedvl_jax.model.unimedvl import UniMedVL

CFG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')


@pytest.fixture(scope='module')
def built(synthetic_dir, tmp_path_factory):
  cfg = load_config_file(CFG, [f'data.root={synthetic_dir}', 'model.llm.num_layers=1',
                               'model.vit.num_layers=1', 'data.batch_size=2'])
  model = UniMedVL(cfg.model, rngs=nnx.Rngs(0))
  out = str(tmp_path_factory.mktemp('cache') / 'latent_cache')
  summary = lc.build(cfg, model, str(synthetic_dir), out, log=lambda *a: None)
  return cfg, model, out, summary


def _edit_records(root, n=3):
  with open(os.path.join(root, 'train', 'edit.jsonl')) as f:
    return [json.loads(next(f)) for _ in range(n)]


def test_cache_latents_equal_pixel_latents_for_the_same_noise(built, synthetic_dir):
  cfg, model, out, summary = built
  assert summary['images'] > 50 and summary['token_rows'] > summary['images']
  recs = _edit_records(synthetic_dir)
  b_px = pipeline.pack_samples(cfg, recs, batch_size=2)
  cfg_c = cfg.copy_and_resolve_references()
  cfg_c.data.latent_cache = out
  b_c = pipeline.pack_samples(cfg_c, recs, batch_size=2)
  assert 'latent_mean' in b_c and 'vae_64x64' not in b_c and 'vae_64x64' in b_px
  for k in ('latent_mask', 'latent_image', 'latent_noised', 'gen_idx', 'input_ids'):
    np.testing.assert_array_equal(b_px[k], b_c[k])
  B, L = b_px['latent_mask'].shape
  noise = jax.random.normal(jax.random.key(3), (B, L, 64), jnp.float32)
  f = lambda b: model.clean_latents({k: jnp.asarray(v) for k, v in b.items()}, noise)
  real = b_px['latent_mask'] > 0
  assert real.sum() >= 3 * 16
  x_px, x_c = np.asarray(f(b_px)), np.asarray(f(b_c))
  np.testing.assert_allclose(x_c[real], x_px[real], rtol=1e-5, atol=1e-5)
  # and these are z = scale * (mean + exp(logvar/2) * noise - shift) of a float64 recomputation
  mean, logvar = b_c['latent_mean'].astype(np.float64), b_c['latent_logvar'].astype(np.float64)
  want = 0.3611 * (mean + np.exp(0.5 * logvar) * np.asarray(noise, np.float64) - 0.1159)
  np.testing.assert_allclose(x_c[real], want[real], rtol=1e-5, atol=1e-5)


def test_stale_missing_and_other_vae_are_errors(built, synthetic_dir, tmp_path):
  cfg, model, out, _ = built
  cache = lc.LatentCache(out, str(synthetic_dir), cfg)
  rec = _edit_records(synthetic_dir, 1)[0]
  sample = parse_record(RawLine('edit.jsonl', 1, json.dumps(rec)), str(synthetic_dir))
  ref = sample.output_img[0]
  (mean, logvar), size = cache.lookup(ref)
  assert mean.shape == (16, 64) and size == (64, 64)
  # a file changed after caching
  st = os.stat(ref.path)
  os.utime(ref.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
  try:
    with pytest.raises(lc.LatentCacheError, match='stale') as e:
      cache.lookup(ref)
    assert ref.path in str(e.value)
  finally:
    os.utime(ref.path, ns=(st.st_atime_ns, st.st_mtime_ns))
  # an image the cache never saw
  other = ref.__class__(str(tmp_path / 'new.png'))
  with pytest.raises(lc.LatentCacheError, match='no entry') as e:
    cache.lookup(other)
  assert 'new.png' in str(e.value)
  # a cache of another VAE
  model2 = UniMedVL(cfg.model, rngs=nnx.Rngs(1))
  with pytest.raises(lc.LatentCacheError, match='another VAE'):
    cache.check_vae(lc.vae_fingerprint(nnx.state(model2.vae, nnx.Param)))
  cache.check_vae(lc.vae_fingerprint(nnx.state(model.vae, nnx.Param)))
  # the pipeline stops on it instead of skipping the sample
  cfg_c = cfg.copy_and_resolve_references()
  cfg_c.data.latent_cache = out
  proc = pipeline.SampleProcessor(cfg_c, 'edit', str(synthetic_dir))
  os.utime(ref.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
  try:
    with pytest.raises(lc.LatentCacheError):
      proc(RawLine('edit.jsonl', 1, json.dumps(rec)))
  finally:
    os.utime(ref.path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cli_writes_a_cache(synthetic_dir, tmp_path):
  out = tmp_path / 'c'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'unimedvl_jax.data', 'cache-latents', '--config', CFG,
                      '--data', str(synthetic_dir), '--out', str(out),
                      '--set', 'model.llm.num_layers=1', '--set', 'model.vit.num_layers=1'],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  summary = json.loads(r.stdout[r.stdout.index('{'):])
  idx = json.loads((out / 'index.json').read_text())
  assert summary['images'] == len(idx['entries']) > 50
  bad = subprocess.run([sys.executable, '-m', 'unimedvl_jax.data', 'cache-latents', '--config', CFG,
                        '--data', str(tmp_path / 'nowhere')], capture_output=True, text=True,
                       env=env, timeout=600)
  assert bad.returncode == 2 and 'nowhere' in bad.stdout
