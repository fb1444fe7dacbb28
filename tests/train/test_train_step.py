"""The pure train step: frozen modules get no update, the EMA formula, non-finite rejection,
gradient accumulation equals the full batch (global-count normalisation), lr schedule."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers.model_packs import build_batch, mixed_samples
from unimedvl_jax import batch as batch_lib, sharding
from unimedvl_jax.config import stage_plan, stage_train_config
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.train import step as S

CFG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')


@pytest.fixture(scope='module')
def env():
  cfg = load_config_file(CFG, ['data.batch_size=2', 'model.llm.num_layers=2', 'data.seq_len=256',
                               'data.max_latent_tokens=64', 'data.max_vit_patches=64',
                               'data.max_vae_images=4', 'train.warmup_steps=0',
                               'model.vit.num_layers=1'])
  graphdef, state = S.init_state(cfg)
  # non-zero llm2vae so the MSE gradient reaches the generation expert
  flat = dict(nnx.to_flat_state(state['params']))
  k = flat[('llm2vae', 'kernel')]
  k[...] = 0.02 * jax.random.normal(jax.random.key(3), k.shape)
  batch = build_batch(cfg, [mixed_samples(), mixed_samples()[::-1]], seed=2)
  return cfg, graphdef, state, batch


def flat_np(tree):
  return {S.path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


_STEPS = {}    # one compiled step per distinct train config (tests with equal configs share it)


def base_tc(cfg):
  """The train config the freeze / EMA / non-finite tests share (one compile): EMA decay 0.9 so
  the EMA formula is checked with a weight that a wrong formula cannot hide in round-off."""
  tc = stage_train_config(cfg, None)
  tc.ema_decay = 0.9
  return tc


def run_step(cfg, graphdef, state, batch, tc, lr=1e-3):
  key = (id(graphdef), repr(tc), lr)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(S.make_train_step(graphdef, cfg, tc,
                                            schedule=optax.constant_schedule(lr)))
  fn = _STEPS[key]
  st = jax.tree.map(jnp.copy, state)
  return fn(st, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize('freeze', [('vae',), ('vae', 'vit', 'gen')])
def test_frozen_modules_receive_no_update(env, freeze):
  cfg, graphdef, state, batch = env
  tc = base_tc(cfg)
  tc.freeze = freeze
  new, m = run_step(cfg, graphdef, state, batch, tc)
  assert bool(m['ok'])
  before, after = flat_np(state['params']), flat_np(new['params'])
  for k in before:
    frozen = S.is_frozen(tuple(k.split('/')), freeze)
    changed = not np.array_equal(before[k], after[k])
    if frozen:
      assert not changed, k
  assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith('decoder/layers/und'))
  if 'gen' not in freeze:
    assert not np.array_equal(before['decoder/layers/gen/q_proj/kernel'],
                              after['decoder/layers/gen/q_proj/kernel'])


def test_ema_formula(env):
  cfg, graphdef, state, batch = env
  tc = base_tc(cfg)
  new, _ = run_step(cfg, graphdef, state, batch, tc)
  e0, p1, e1 = flat_np(state['ema']), flat_np(new['params']), flat_np(new['ema'])
  for k in e0:
    np.testing.assert_allclose(e1[k], 0.9 * e0[k] + 0.1 * p1[k], rtol=1e-6, atol=1e-7)


def test_nonfinite_step_is_rejected(env):
  cfg, graphdef, state, batch = env
  bad = dict(batch)
  bad['loss_mask'] = batch['loss_mask'].copy()     # the batch's one float input on a CE row
  bad['loss_mask'][0, batch['label_pos'][0, 0]] = np.nan
  tc = base_tc(cfg)
  new, m = run_step(cfg, graphdef, state, bad, tc)
  assert not bool(m['ok'])
  assert int(new['meta']['nonfinite']) == 1 and int(new['meta']['step']) == 1
  b, a = flat_np(state['params']), flat_np(new['params'])
  assert all(np.array_equal(b[k], a[k]) for k in b)
  bo = jax.tree.leaves(state['opt_state'])
  ao = jax.tree.leaves(new['opt_state'])
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(bo, ao))


def test_gradient_accumulation_matches_full_batch(env):
  cfg, graphdef, state, batch = env
  # no VAE items: the VAE sample noise (per micro-batch rng) would change the context of the CE
  batch = build_batch(cfg, [[[('text', 5, False), ('vit', 2, 3), ('text', 6, True)]],
                            [[('text', 9, True)], [('text', 2, True)]]], seed=4)
  tc = stage_train_config(cfg, None)
  tc.ce_weight, tc.mse_weight = 1.0, 0.0
  full, m1 = run_step(cfg, graphdef, state, batch, tc)
  tc2 = stage_train_config(cfg, None)
  tc2.ce_weight, tc2.mse_weight, tc2.grad_accum = 1.0, 0.0, 2
  acc, m2 = run_step(cfg, graphdef, state, batch, tc2)
  np.testing.assert_allclose(float(m1['ce']), float(m2['ce']), rtol=1e-5)
  np.testing.assert_allclose(float(m1['grad_norm']), float(m2['grad_norm']), rtol=1e-4)
  # Adam's first moment after one step is (1 - b1) * clipped gradient: compare the gradients
  # there (the first Adam update itself is ~lr * sign(g), too sensitive to rounding near g = 0)
  ga = [np.asarray(x) for x in jax.tree.leaves(full['opt_state'])]
  gb = [np.asarray(x) for x in jax.tree.leaves(acc['opt_state'])]
  assert len(ga) == len(gb)
  scale = max(float(np.max(np.abs(x))) for x in ga)   # leaves of pure rounding noise exist
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-4 * scale)


def closed_form_lr(tc, steps: int, s: int) -> float:
  """A stage's learning rate at its step s, in float64: linear warmup, then constant or cosine."""
  if tc.warmup_steps and s < tc.warmup_steps:
    return tc.lr * (s + 1) / tc.warmup_steps
  if tc.schedule == 'cosine':
    span = max(1, steps - tc.warmup_steps)
    frac = min(1.0, (s - tc.warmup_steps) / span)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + np.cos(np.pi * frac))
  return tc.lr


def test_lr_schedule_warmup_and_cosine():
  cfg = load_config_file(CFG)
  tc = stage_train_config(cfg, None)
  tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr = 1.0, 10, 'cosine', 0.0
  f = S.stage_lr_schedule(tc, 110)
  # float32 (the schedule runs in the step): cos(pi / 2) is 4e-8 there
  assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
  assert f(60) == pytest.approx(0.5, abs=1e-7) and f(110) == pytest.approx(0.0, abs=1e-12)
  tc.schedule = 'constant'
  assert S.stage_lr_schedule(tc, 110)(100) == 1.0


def test_run_schedule_is_the_stages_closed_form_by_global_step():
  """configs/tiny.py's curriculum (a VAE stage with its own lr and warmup, three cosine LM
  stages): the optax schedule of the step, jitted, against the float64 formula of each stage at
  its own step, over every global step and past the end."""
  cfg = load_config_file(CFG)
  plan = stage_plan(cfg)
  assert len(plan) == 4
  want, lr_max = [], 0.0
  for st in plan:
    tc = stage_train_config(cfg, st['name'])
    n = st['end'] - st['start']
    want += [closed_form_lr(tc, n, s) for s in range(n)]
    lr_max = max(lr_max, tc.lr)
  last = stage_train_config(cfg, plan[-1]['name'])
  n = plan[-1]['end'] - plan[-1]['start']
  want += [closed_form_lr(last, n, n + k) for k in range(3)]
  got = np.asarray(jax.jit(jax.vmap(S.lr_schedule(cfg)))(jnp.arange(len(want), dtype=jnp.int32)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(want), rtol=2e-6, atol=1e-6 * lr_max)
  # the boundaries: the first step of each stage restarts its warmup
  for st in plan[1:]:
    tc = stage_train_config(cfg, st['name'])
    assert got[st['start']] == pytest.approx(tc.lr / tc.warmup_steps, rel=1e-6)


def test_optimizer_scales_by_the_schedule_at_the_global_step():
  """The update is -schedule(meta.step) x AdamW's: `at_step` sets the schedule's count, also on a
  state whose count lags (a rejected step keeps the whole optimizer state)."""
  cfg = load_config_file(CFG)
  tc = stage_train_config(cfg, 'foundation')
  sched = S.lr_schedule(cfg)
  tx, adam = S.make_optimizer(tc, sched), S.make_optimizer(tc, optax.constant_schedule(-1.0))
  p = {'w': jnp.linspace(-1.0, 1.0, 8)}
  g = {'w': jnp.linspace(0.5, -0.3, 8)}
  for step in (0, 7, 160, 999):
    u, new = tx.update(g, S.at_step(tx.init(p), jnp.int32(step)), p)
    ref, _ = adam.update(g, adam.init(p), p)    # AdamW's own update (the lr -1 cancels the sign)
    np.testing.assert_allclose(np.asarray(u['w']), -float(sched(step)) * np.asarray(ref['w']),
                               rtol=1e-6)
    assert isinstance(new[-1], optax.ScaleByScheduleState)    # the chain's last part
    assert int(new[-1].count) == step + 1
