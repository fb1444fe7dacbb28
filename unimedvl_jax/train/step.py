"""The pure, jitted training step: AdamW + clip + EMA, frozen modules, non-finite rejection.

State (a dict of pytrees, the unit of checkpointing):
  params     nnx.State of every nnx.Param (fp32 masters)
  buffers    nnx.State of the frozen sin-cos tables (never updated)
  opt_state  optax state over params (frozen leaves keep zero moments); with train.lora over
             the LoRA adapters alone (`optimizer_params`); its last part is the learning-rate
             schedule's count
  ema        EMA of params (decay from the stage config; frozen leaves stay equal)
  meta       {'step': int32, 'rng': uint32[2] base key data, 'nonfinite': int32}

`train_step(state, batch) -> (state, metrics)` is a pure function of its inputs: the step's
randomness is fold_in(base key, step) and its learning rate the optimizer's schedule (the whole
run's, `lr_schedule`) at that step, so a resumed run reproduces the uninterrupted one exactly.
Frozen modules (train.freeze: regexes over parameter paths, config.FREEZE_ALIASES) get no
gradient computed (we differentiate w.r.t. the trainable subset only).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unimedvl_jax import sharding
from unimedvl_jax.config import freeze_patterns, stage_plan, stage_train_config
from unimedvl_jax.model.embeddings import Buffer
from unimedvl_jax.model.lora import ADAPTER_NAMES, is_adapter_path
from unimedvl_jax.model.unimedvl import LossOutput, UniMedVL

# LoRA (model/lora.py): the adapters, and everything but the adapters
ADAPTERS = rf'.*/({"|".join(ADAPTER_NAMES)})'
NOT_ADAPTERS = rf'(?!{ADAPTERS}$).*'


def stage_freeze(tc) -> tuple:
  """What a stage's step freezes (regexes): with train.lora everything but the LoRA adapters,
  else train.freeze and the adapters (a model without adapters is unaffected by the latter)."""
  if tc.get('lora', False):
    return (NOT_ADAPTERS,)
  return freeze_patterns(tc.freeze) + (ADAPTERS,)


def first_stage_lora(cfg) -> bool:
  """train.lora of the first curriculum stage (of `train` without a curriculum)."""
  return bool(stage_train_config(cfg, cfg.stages[0] if cfg.stages else None).get('lora', False))


def optimizer_params(params: nnx.State, lora: bool) -> nnx.State:
  """The parameters the optimizer state is kept for: all, or (train.lora) the adapters."""
  if not lora:
    return params
  return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if is_adapter_path(p)])


@functools.lru_cache(maxsize=64)
def _freeze_regex(freeze: tuple) -> re.Pattern | None:
  pats = freeze_patterns(freeze)
  return re.compile('|'.join(f'(?:{p})' for p in pats)) if pats else None


def is_frozen(path: tuple, freeze) -> bool:
  """Whether the parameter at `path` matches (in full, '/'-joined) an entry of `freeze`
  (regexes or config.FREEZE_ALIASES names)."""
  rx = _freeze_regex(tuple(freeze))
  return rx is not None and rx.fullmatch(path_key(path)) is not None


def path_key(path: tuple) -> str:
  return '/'.join(str(x) for x in path)


def split_trainable(params: nnx.State, freeze) -> tuple[dict, dict]:
  """params -> (trainable, frozen) flat dicts keyed by 'a/b/c' path strings."""
  flat = nnx.to_flat_state(params)
  tr = {path_key(p): v for p, v in flat if not is_frozen(p, freeze)}
  fr = {path_key(p): v for p, v in flat if is_frozen(p, freeze)}
  return tr, fr


def join_params(template: nnx.State, *flats) -> nnx.State:
  """Inverse of split_trainable, on the structure of `template`."""
  merged = {}
  for f in flats:
    merged.update(f)
  return nnx.from_flat_state([(p, merged[path_key(p)]) for p, _ in nnx.to_flat_state(template)])


def stage_lr_schedule(tc, steps: int) -> optax.Schedule:
  """One stage's learning rate over its own steps 0, 1, ...: a linear warmup to tc.lr at step
  tc.warmup_steps - 1 (step s: tc.lr * (s + 1) / tc.warmup_steps), then constant or cosine to
  tc.min_lr at step `steps`."""
  lr, warmup = float(tc.lr), int(tc.warmup_steps)
  if tc.schedule == 'cosine':
    min_lr = float(tc.min_lr)
    decay = optax.cosine_decay_schedule(lr - min_lr, max(1, steps - warmup))
    main = lambda count: min_lr + decay(count)
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  ramp = lambda count: lr * (count + 1) / warmup   # (optax.linear_schedule's form loses digits)
  return optax.join_schedules([ramp, main], [warmup])


def lr_schedule(cfg) -> optax.Schedule:
  """The whole run's learning rate by global step: each curriculum stage's schedule (its train
  settings, over its own steps), joined at the stage boundaries."""
  plan = stage_plan(cfg)
  parts = [stage_lr_schedule(stage_train_config(cfg, st['name']), st['end'] - st['start'])
           for st in plan]
  if len(parts) == 1:
    return parts[0]
  return optax.join_schedules(parts, [st['start'] for st in plan[1:]])


def make_optimizer(tc, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps, weight decay) after a global-norm clip, scaled by -schedule(count)."""
  parts = []
  if tc.grad_clip and tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=tc.eps))
  if tc.weight_decay:
    parts.append(optax.add_decayed_weights(tc.weight_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def at_step(opt_state, step):
  """`opt_state` with the schedule's count set to the global step `step`: the learning rate is
  the schedule at meta.step, also after a rejected step (which keeps the whole optimizer state)
  and on the fresh optimizer state of a train.lora switch."""
  is_sched = lambda s: isinstance(s, optax.ScaleByScheduleState)
  return jax.tree.map(lambda s: s._replace(count=step) if is_sched(s) else s, opt_state,
                      is_leaf=is_sched)


def init_state(cfg, seed: int | None = None, lora: bool | None = None,
               model: UniMedVL | None = None) -> tuple[Any, dict]:
  """(graphdef, state) of a freshly initialised model (or of `model`, e.g. a random_model in
  tests). lora: optimizer state for the adapters alone (default: the first stage's train.lora)."""
  seed = cfg.seed if seed is None else seed
  lora = first_stage_lora(cfg) if lora is None else lora
  if model is None:
    model = UniMedVL(cfg.model, rngs=nnx.Rngs(seed))
  graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
  tx = make_optimizer(cfg.train, lr_schedule(cfg))
  state = {
      'params': params,
      'buffers': buffers,
      'opt_state': tx.init(optimizer_params(params, lora)),
      'ema': jax.tree.map(jnp.copy, params),
      'meta': {'step': jnp.zeros((), jnp.int32),
               'rng': jax.random.key_data(jax.random.key(seed + 1)),
               'nonfinite': jnp.zeros((), jnp.int32)},
  }
  return graphdef, state


def abstract_state(cfg, lora: bool | None = None):
  """(graphdef, state of ShapeDtypeStructs): nothing allocated."""
  out = {}

  def build():
    g, s = init_state(cfg, lora=lora)
    out['g'] = g
    return s
  abstract = jax.eval_shape(build)
  return out['g'], abstract


def state_shardings(abstract, mesh, rules=None):
  """Shardings of the whole training state from the parameters' logical axes (`rules`:
  sharding.Rules of the config, default config.mesh_defaults()). A large tensor the rules cannot
  split on this mesh is a ConfigError (sharding.state_shardings), not silently replicated."""
  sh = lambda tree: sharding.state_shardings(tree, mesh, rules, check_replicated=True)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {
      'params': sh(abstract['params']),
      'buffers': sh(abstract['buffers']),
      'opt_state': sh(abstract['opt_state']),
      'ema': sh(abstract['ema']),
      'meta': jax.tree.map(lambda _: rep, abstract['meta']),
  }


def _microbatches(batch, k):
  """[B, ...] -> [k, B/k, ...] with micro-batch i = packs i, i+k, i+2k, ...: strided, so every
  micro-batch spans every data shard (the batch axis is sharded in contiguous blocks) and each
  device keeps working on its own packs in every micro-batch."""
  def split(a):
    B = a.shape[0]
    return a.reshape((B // k, k) + a.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


# VAE slots per size bucket and pack that the 'vae' objective trains on
# (profiling.vae_stage_flops_per_step)
VAE_SLOTS = 2


def vae_objective(model, batch, rng, kl_weight: float = 1e-6, max_slots: int = VAE_SLOTS):
  """Autoencoder reconstruction (for toy VAEs that must be trained): MSE of decode(sample(x)) on
  the pack's used VAE slots + kl_weight * KL(q(z|x) || N(0, I)). Returns (loss, mse, kl, count).

  Each image at its own size (the pixel buckets); only the first `max_slots` slots of each
  bucket are used (the packer fills slots in order): conv backward passes are slow on CPU and a
  few images per pack are plenty for a toy VAE."""
  from unimedvl_jax.model.unimedvl import _pixels_to_unit, vae_bucket_keys
  keys = vae_bucket_keys(batch)
  if not keys:
    raise ValueError("the 'vae' objective needs pixel batches (data.latent_cache must be '')")
  sums = jnp.zeros((3,), jnp.float32)
  for i, key in enumerate(keys):
    n = min(batch[key].shape[1], max_slots)
    px = batch[key][:, :n]
    B = px.shape[0]
    used = (batch[key + '_image'][:, :n] >= 0).astype(jnp.float32).reshape(B * n)
    x = _pixels_to_unit(px.reshape((B * n,) + px.shape[2:]))
    mean, logvar = model.vae.encode_moments(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.fold_in(rng, i), mean.shape,
                                                        jnp.float32)
    rec = model.vae.decoder(z).astype(jnp.float32)
    per_img = jnp.mean(jnp.square(rec - x), axis=(1, 2, 3))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    sums = sums + jnp.stack([jnp.sum(per_img * used), jnp.sum(kl * used), jnp.sum(used)])
  count = jnp.maximum(sums[2], 1.0)
  mse, kl = sums[0] / count, sums[1] / count
  return mse + kl_weight * kl, mse, kl, count


def make_train_step(graphdef, cfg, stage_train, objective: str = 'lm',
                    schedule: optax.Schedule | None = None) -> Callable:
  """Returns train_step(state, batch) for one curriculum stage's settings (stage_train is the
  merged train config: freeze, optimizer, loss weights, ema decay, grad_accum, timestep shift).
  The learning rate is `schedule` at the global step, by default the whole run's
  (`lr_schedule(cfg)`: every stage of cfg, so stages with the same static settings share one
  step); stage_train's own lr fields are not read here.
  objective: 'lm' (UniMedVL's CE + flow MSE) or 'vae' (autoencoder reconstruction)."""
  tc = stage_train
  lora = bool(tc.get('lora', False))
  freeze = stage_freeze(tc)
  schedule = lr_schedule(cfg) if schedule is None else schedule
  tx = make_optimizer(tc, schedule)
  accum = int(tc.grad_accum)

  def loss_fn(trainable, frozen, template, buffers, mb, rng, ce_den, mse_den):
    params = join_params(template, trainable, frozen)
    model = nnx.merge(graphdef, params, buffers)
    if objective == 'vae':
      loss, mse, _, _ = vae_objective(model, mb, rng)   # loss = mse + kl_weight * KL; no CE
      return loss, LossOutput(loss, jnp.zeros(()), mse, jnp.zeros(()), jnp.zeros(()))
    out = model(mb, rng, ce_weight=tc.ce_weight, mse_weight=tc.mse_weight,
                timestep_shift=tc.timestep_shift, ce_denominator=ce_den, mse_denominator=mse_den)
    return out.loss, out

  def train_step(state, batch):
    params, buffers = state['params'], state['buffers']
    step = state['meta']['step']
    opt_state = at_step(state['opt_state'], step)
    key = jax.random.fold_in(jax.random.wrap_key_data(state['meta']['rng']), step)
    trainable, frozen = split_trainable(params, freeze)
    frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
    # global token counts of the whole step (all devices, all micro-batches)
    ce_den = jnp.sum(batch['loss_mask'])
    mse_den = jnp.sum(batch['latent_noised'] * batch['latent_mask'])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    mbs = _microbatches(batch, accum) if accum > 1 else None

    def one(carry, xs):
      g_acc, sums = carry
      mb, i = xs
      mb = {k: sharding.shard(v, ('batch',) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
      (loss, out), g = grad_fn(trainable, frozen, params, buffers, mb, jax.random.fold_in(key, i),
                               ce_den, mse_den)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      sums = jax.tree.map(jnp.add, sums, (loss, out.ce, out.mse))
      return (g_acc, sums), None

    if accum == 1:
      # no loop: XLA:CPU runs convolutions inside a while body ~10x slower (single-threaded)
      (loss, out), grads = grad_fn(trainable, frozen, params, buffers, batch,
                                   jax.random.fold_in(key, 0), ce_den, mse_den)
      ce, mse = out.ce, out.mse
    else:
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      z = jnp.zeros((), jnp.float32)
      (grads, (loss, ce, mse)), _ = jax.lax.scan(one, (zeros, (z, z, z)),
                                                 (mbs, jnp.arange(accum)))
    with jax.named_scope('optimizer'):   # (the profile breakdown of benchmarks/)
      grad_norm = optax.global_norm(grads)
      d = tc.ema_decay
      if lora:   # the optimizer state holds the adapters alone; the base is carried unchanged
        sub = optimizer_params(params, True)
        updates, new_opt = tx.update(join_params(sub, grads), opt_state, sub)
        new_sub = optax.apply_updates(sub, updates)
        new_tr, _ = split_trainable(new_sub, ())
        new_params = join_params(params, new_tr, split_trainable(params, freeze)[1])
        ema_tr, ema_fr = split_trainable(state['ema'], freeze)
        ema_tr = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_tr, new_tr)
        new_ema = join_params(state['ema'], ema_tr, ema_fr)
      else:
        full_grads = join_params(params, grads,
                                 jax.tree.map(jnp.zeros_like, frozen))
        updates, new_opt = tx.update(full_grads, opt_state, params)
        # the frozen leaves as they were (weight decay gives them an update, dropped here)
        new_tr, _ = split_trainable(optax.apply_updates(params, updates), freeze)
        new_params = join_params(params, new_tr, split_trainable(params, freeze)[1])
        new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state['ema'], new_params)

      # reject the step if anything is non-finite, including an update that overflowed the params
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(new_params))
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      new_state = {
          'params': keep(new_params, params),
          'buffers': buffers,
          'opt_state': keep(new_opt, state['opt_state']),
          'ema': keep(new_ema, state['ema']),
          'meta': {'step': step + 1, 'rng': state['meta']['rng'],
                   'nonfinite': state['meta']['nonfinite'] + (~ok).astype(jnp.int32)},
      }
    metrics = {'loss': loss, 'ce': ce, 'mse': mse, 'grad_norm': grad_norm, 'ok': ok,
               'ce_tokens': ce_den, 'mse_tokens': mse_den,
               'lr': jnp.asarray(schedule(step), jnp.float32)}
    return new_state, metrics

  return train_step


def switch_optimizer(tc, state: dict, lora: bool, shardings=None) -> dict:
  """The state with a fresh optimizer state (of the stage's train config `tc`) for `lora`
  (adapters alone, or every parameter): what a stage boundary that turns train.lora on or off
  does. Params and EMA are kept; the schedule's count is the state's step."""
  tx = make_optimizer(tc, optax.constant_schedule(0.0))   # init does not read the schedule
  init = jax.jit(lambda p, step: at_step(tx.init(optimizer_params(p, lora)), step),
                 out_shardings=None if shardings is None else shardings['opt_state'])
  return {**state, 'opt_state': init(state['params'], state['meta']['step'])}


def jit_train_step(train_step, abstract, mesh, batch_spec_shapes, rules=None):
  """jax.jit with explicit in/out shardings and the state donated; the mesh (and the sharding
  `rules`, default config.mesh_defaults()) are jax's mesh context while the step is traced.
  Raises ConfigError when the batch does not divide over the mesh's batch axes."""
  for shape, _ in batch_spec_shapes.values():
    sharding.check_batch(shape[0], mesh, rules)
  st_sh = state_shardings(abstract, mesh, rules)
  b_sh = {k: sharding.batch_sharding(mesh, len(shape), rules)
          for k, (shape, _) in batch_spec_shapes.items()}
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def wrapped(state, batch):
    with sharding.use_abstract_mesh(mesh, rules):
      return train_step(state, batch)

  return jax.jit(wrapped, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, rep),
                 donate_argnums=(0,)), st_sh, b_sh
