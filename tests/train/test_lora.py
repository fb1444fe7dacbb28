"""LoRA (model/lora.py, train.lora in train/step.py): an adapted projection equals its float64
numpy formula, the merged model equals the adapted one, a LoRA fine-tune lowers the loss with
the base weights bitwise unchanged and an optimizer state of 2x the adapter size (AdamW's mu
and nu), adapter files round-trip, the export with --merge-lora writes W + alpha/r * A @ B."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers.model_packs import build_batch, mixed_samples  # noqa: E402

from unimedvl_jax.infer.random_init import random_model  # noqa: E402
from unimedvl_jax.config import ConfigError, stage_train_config  # noqa: E402
from unimedvl_jax.config_load import load_config_file  # noqa: E402
from unimedvl_jax.model import lora  # noqa: E402
from unimedvl_jax.model.layers import Linear  # noqa: E402
from unimedvl_jax.train import step as S  # noqa: E402

CFG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')
TINY = ['data.batch_size=2', 'model.llm.num_layers=2', 'data.seq_len=256',
        'data.max_latent_tokens=64', 'data.max_vit_patches=64', 'data.max_vae_images=4',
        'train.warmup_steps=0', 'model.vit.num_layers=1', 'model.lora.rank=4',
        'model.lora.alpha=8.0']


def _randomise(params, key, names=lora.ADAPTER_NAMES, std=0.05):
  """Non-zero B (and llm2vae, so the generation expert reaches the loss)."""
  for i, (p, v) in enumerate(nnx.to_flat_state(params)):
    if str(p[-1]) in names or tuple(map(str, p)) == ('llm2vae', 'kernel'):
      v[...] = std * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)


@pytest.fixture(scope='module')
def env():
  cfg = load_config_file(CFG, TINY + ['stages=()', 'train.lora=True'])
  # random weights without compiling an init (infer/random_init.py); B = 0 as at init
  model = random_model(cfg.model, 0)
  for _, m in lora.lora_modules(model):
    m.lora_b[...] = jnp.zeros_like(m.lora_b[...])
  graphdef, state = S.init_state(cfg, model=model)   # optimizer state of the adapters alone
  batch = build_batch(cfg, [mixed_samples(), mixed_samples()[::-1]], seed=2)
  # latent moments in place of the pixel buckets (a latent-cache batch): the VAE encoder, not
  # what is tested here, stays out of the compiled programs
  batch = {k: v for k, v in batch.items() if not k.startswith(('vae_', 'latent_src'))
           or k == 'vae_image_noised'}
  shape = batch['latent_mask'].shape + (64,)
  batch['latent_mean'] = np.asarray(jax.random.normal(jax.random.key(8), shape))
  batch['latent_logvar'] = np.full(shape, -4.0, np.float32)
  return cfg, graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}


def test_adapted_projection_equals_float64_formula():
  base = Linear(24, 10, rngs=nnx.Rngs(0), use_bias=True, axes=('embed', 'mlp'))
  base.bias[...] = jax.random.normal(jax.random.key(1), (10,))
  m = lora.LoRALinear(base, rank=3, alpha=6.0, rngs=nnx.Rngs(2))
  m.lora_b[...] = jax.random.normal(jax.random.key(3), (3, 10))
  x = np.asarray(jax.random.normal(jax.random.key(4), (5, 24)))
  W, b, A, B = (np.asarray(v[...], np.float64) for v in (m.kernel, m.bias, m.lora_a, m.lora_b))
  want = x.astype(np.float64) @ W + b + (6.0 / 3) * (x.astype(np.float64) @ A) @ B
  np.testing.assert_allclose(np.asarray(m(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(m.merged_kernel()), W + 2.0 * A @ B, rtol=1e-6, atol=1e-6)
  # B = 0 at init: the adapted layer is the base layer
  fresh = lora.LoRALinear(base, rank=3, alpha=6.0, rngs=nnx.Rngs(5))
  assert not np.any(np.asarray(fresh.lora_b[...]))
  np.testing.assert_array_equal(np.asarray(fresh(jnp.asarray(x))), np.asarray(base(jnp.asarray(x))))


def test_adapter_placement_and_config_errors():
  cfg = load_config_file(CFG, TINY + ['model.lora.experts=gen', r'model.lora.targets=mlp/(up|down)_proj$'])
  m = nnx.eval_shape(lambda: __import__('unimedvl_jax.model.unimedvl', fromlist=['x']).UniMedVL(
      cfg.model, rngs=nnx.Rngs(0)))
  got = sorted('/'.join(p) for p, _ in lora.lora_modules(m))
  assert got == ['decoder/layers/gen/mlp/down_proj', 'decoder/layers/gen/mlp/up_proj']
  a = m.decoder.layers.gen.mlp.down_proj.lora_a
  assert a.shape == (2, 384, 4) and a.get_metadata()['out_sharding'] == ('layers', 'mlp', None)
  for ov, field in ((['model.lora.targets=(unclosed'], 'model.lora.targets'),
                    (['model.lora.targets=lm_head'], 'model.lora.targets'),
                    (['model.lora.experts=vit'], 'model.lora.experts'),
                    (['model.lora.rank=-1'], 'model.lora.rank'),
                    (['model.lora.rank=0', 'train.lora=True'], 'train.lora')):
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
      load_config_file(CFG, TINY + ov)


@functools.partial(jax.jit, static_argnums=3)
def _hidden_jit(params, buffers, batch, graphdef):
  model = nnx.merge(graphdef, params, buffers)
  noise = {k: jax.random.normal(jax.random.key(i), (2, 64, 64)) for i, k in enumerate(('vae', 'flow'))}
  h_u, h_g, _ = model.forward(batch, jax.random.key(0), noise=noise,
                              timesteps=jnp.zeros((2, batch['vae_image_noised'].shape[1])))
  return h_u, h_g


def _hidden(graphdef, params, buffers, batch):
  return tuple(np.asarray(a) for a in _hidden_jit(params, buffers, batch, graphdef))


def test_merged_model_equals_adapted_model(env):
  cfg, graphdef, state, batch = env
  base = _hidden(graphdef, state['params'], state['buffers'], batch)    # B = 0: the base model
  params = jax.tree.map(jnp.copy, state['params'])
  _randomise(params, jax.random.key(7))
  adapted = _hidden(graphdef, params, state['buffers'], batch)
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params), state['buffers'])
  lora.merge(model)
  assert not lora.lora_modules(model)
  g2, p2, b2 = nnx.split(model, nnx.Param, ...)
  assert not any(lora.is_adapter_path(p) for p, _ in nnx.to_flat_state(p2))
  merged = _hidden(g2, p2, b2, batch)
  for a, m, b in zip(adapted, merged, base):
    np.testing.assert_allclose(m, a, rtol=2e-4, atol=2e-4)
    assert np.max(np.abs(a - b)) > 100 * np.max(np.abs(a - m)) + 1e-3   # the adapters matter


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_lora_finetune_lowers_loss_base_bitwise_unchanged(env):
  cfg, graphdef, st, batch = env
  n_adapters = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(st['params'])
                   if lora.is_adapter_path(p))
  n_scalars = sum(1 for x in jax.tree.leaves(st['opt_state']) if x.ndim == 0)   # adam's count
  assert _size(st['opt_state']) - n_scalars == 2 * n_adapters
  _, full = S.abstract_state(cfg, lora=False)
  assert _size(full['opt_state']) - n_scalars == 2 * _size(full['params'])   # the full state
  assert 2 * n_adapters < _size(st['params']) / 10
  tc = stage_train_config(cfg, None)
  assert tc.lora
  tc.ema_decay = 0.9
  fn = jax.jit(S.make_train_step(graphdef, cfg, tc, schedule=optax.constant_schedule(3e-3)))
  flat = lambda t: {S.path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(t)}
  before, ema0 = flat(st['params']), flat(st['ema'])
  cur, losses = jax.tree.map(jnp.copy, st), []
  for _ in range(4):
    cur, m = fn(cur, batch)
    assert bool(m['ok'])
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 1e-3, losses
  after, ema = flat(cur['params']), flat(cur['ema'])
  for k in before:
    if lora.is_adapter_path(k.split('/')):
      continue
    assert before[k].tobytes() == after[k].tobytes(), k
    assert ema0[k].tobytes() == ema[k].tobytes(), k
  for e in ('und', 'gen'):
    assert not np.array_equal(before[f'decoder/layers/{e}/q_proj/lora_b'],
                              after[f'decoder/layers/{e}/q_proj/lora_b'])


def test_switch_optimizer_and_checkpoint_stage(env):
  from unimedvl_jax.train import loop
  _, _, state, _ = env
  full = S.switch_optimizer(stage_train_config(env[0], None), state, lora=False)
  n_sc = sum(1 for x in jax.tree.leaves(full['opt_state']) if x.ndim == 0)
  assert _size(full['opt_state']) - n_sc == 2 * _size(state['params'])
  assert full['params'] is state['params'] and full['ema'] is state['ema']
  cfg = load_config_file(CFG, TINY + ['curriculum.unified.lora=True'])   # the stage field
  assert stage_train_config(cfg, 'unified').lora and not stage_train_config(cfg, 'instruction').lora
  with pytest.raises(ConfigError, match=r'curriculum\.vae\.train\.lora'):
    load_config_file(CFG, TINY + ['curriculum.vae.lora=True'])
  plan = loop.stage_plan(cfg)
  ends = {st['name']: st['end'] for st in plan}
  assert not loop.checkpoint_lora(cfg, plan, 0)
  assert not loop.checkpoint_lora(cfg, plan, ends['instruction'])   # written by 'instruction'
  assert loop.checkpoint_lora(cfg, plan, ends['instruction'] + 1)
  assert loop.checkpoint_lora(cfg, plan, ends['unified'])


def test_adapter_file_roundtrip(tmp_path, env):
  cfg, graphdef, state, _ = env
  params = jax.tree.map(jnp.copy, state['params'])
  _randomise(params, jax.random.key(11))
  model = nnx.merge(graphdef, params, state['buffers'])
  path = str(tmp_path / 'adapters.safetensors')
  shapes = lora.save_adapters(path, model, cfg.model.lora)
  assert len(shapes) == 2 * 2 * 7 and os.path.getsize(path) < 4 * _size(params) / 10
  other = nnx.merge(graphdef, jax.tree.map(jnp.copy, state['params']), state['buffers'])
  lora.load_adapters(path, other, cfg.model.lora)
  want, got = lora.adapter_arrays(model), lora.adapter_arrays(other)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  bad = cfg.model.lora.copy_and_resolve_references()
  bad.alpha = 1.0
  with pytest.raises(lora.LoRAError, match='alpha'):
    lora.load_adapters(path, other, bad)


def test_export_merge_lora(tmp_path, env, capsys):
  from unimedvl_jax import convert
  from unimedvl_jax.interop.st_io import SafetensorsSource
  from unimedvl_jax.train.model_checkpoint import save_model_checkpoint
  cfg, graphdef, state, _ = env
  params = jax.tree.map(jnp.copy, state['params'])
  _randomise(params, jax.random.key(13))
  model = nnx.merge(graphdef, params, state['buffers'])
  ck = str(tmp_path / 'ck')
  save_model_checkpoint(ck, cfg, model)
  assert convert.main(['export', '--checkpoint', ck, '--out', str(tmp_path / 'x')]) == 2
  assert '--merge-lora' in capsys.readouterr().err
  out = tmp_path / 'pt'
  assert convert.main(['export', '--checkpoint', ck, '--out', str(out), '--merge-lora']) == 0
  src = SafetensorsSource(str(out / 'ema.safetensors'))
  q = model.decoder.layers.gen.q_proj
  W, A, B = (np.asarray(v[...], np.float64)[1] for v in (q.kernel, q.lora_a, q.lora_b))
  got = np.asarray(src.get('language_model.model.layers.1.self_attn.q_proj_moe_gen.weight'))
  np.testing.assert_allclose(got, (W + (8.0 / 4) * A @ B).T, rtol=1e-6, atol=1e-6)
  assert not any('lora' in k for k in src.keys())
  src.close()
  import json
  side = json.loads((out / 'unimedvl_config.json').read_text())
  assert side['config']['model']['lora']['rank'] == 0


@pytest.mark.slow
def test_curriculum_switches_lora_on_and_resumes(synthetic_dir, tmp_path):
  """foundation (full fine-tune) -> unified (train.lora): the base weights leave the LoRA stage
  bitwise unchanged, the optimizer state shrinks to the adapters, and a run stopped inside the
  LoRA stage resumes from its own (LoRA-structured) checkpoint."""
  from ml_collections import ConfigDict
  from unimedvl_jax.train import loop
  from unimedvl_jax.train.checkpoint import Checkpointer
  cfg = load_config_file(CFG, [
      f'data.root={synthetic_dir}', 'data.batch_size=2', 'data.seq_len=256',
      'data.max_latent_tokens=64', 'data.max_vit_patches=128', 'data.max_vae_images=4',
      'data.max_sample_tokens=256', 'model.llm.num_layers=2', 'model.vit.num_layers=1',
      'model.lora.rank=4', "stages=('foundation','unified')", 'curriculum.foundation.steps=2',
      'curriculum.unified.steps=3', 'curriculum.unified.mandatory=()', 'train.log_every=1',
      'train.checkpoint_every=2', 'train.keep_checkpoints=5', 'train.warmup_steps=0'])
  cfg.curriculum.unified.train = ConfigDict({'lora': True, 'lr': 1e-2})   # the train override
  wd = str(tmp_path / 'wd')
  loop.train(cfg, wd, max_steps=4, quiet=True)       # saves 2 (foundation) and 4 (unified)
  loop.train(cfg, wd, quiet=True)                    # resumes from 4, finishes at 5
  plan = loop.stage_plan(cfg)
  ck = Checkpointer(os.path.join(wd, 'checkpoints'), async_save=False)
  assert ck.all_steps() == [2, 4, 5]
  st = {s: ck.restore(loop_abstract(cfg, plan, s), step=s)[1] for s in (2, 5)}
  ck.close()
  flat = lambda t: {S.path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(t)}
  p2, p5 = flat(st[2]['params']), flat(st[5]['params'])
  for k in p2:
    if lora.is_adapter_path(k.split('/')):
      continue
    assert p2[k].tobytes() == p5[k].tobytes(), k
  assert any(not np.array_equal(p2[k], p5[k]) for k in p2 if k.endswith('lora_b'))
  assert not np.any(p2['decoder/layers/und/q_proj/lora_b'])     # the full stage kept them frozen
  n_ad = sum(v.size for k, v in p2.items() if lora.is_adapter_path(k.split('/')))
  n_sc = sum(1 for x in jax.tree.leaves(st[5]['opt_state']) if np.ndim(x) == 0)
  assert _size(st[5]['opt_state']) - n_sc == 2 * n_ad
  assert _size(st[2]['opt_state']) - n_sc == 2 * sum(v.size for v in p2.values())


def loop_abstract(cfg, plan, step):
  from unimedvl_jax.train import loop
  return S.abstract_state(cfg, lora=loop.checkpoint_lora(cfg, plan, step))[1]
