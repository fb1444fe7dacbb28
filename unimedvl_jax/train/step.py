"""The pure, jitted training step: AdamW + clip + EMA, frozen modules, non-finite rejection.

State (a dict of pytrees, the unit of checkpointing):
  params     nnx.State of every nnx.Param (fp32 masters)
  buffers    nnx.State of the frozen sin-cos tables (never updated)
  opt_state  optax state over params (frozen leaves keep zero moments); with train.lora over
             the LoRA adapters alone (`optimizer_params`)
  ema        EMA of params (decay from the stage config; frozen leaves stay equal)
  meta       {'step': int32, 'rng': uint32[2] base key data, 'nonfinite': int32}

`train_step(state, batch, lr) -> (state, metrics)` is a pure function of its inputs: the step's
randomness is fold_in(base key, step), so a resumed run reproduces the uninterrupted one exactly.
Frozen modules get no gradient computed (we differentiate w.r.t. the trainable subset only).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimedvl_jax import sharding
from unimedvl_jax.model.embeddings import Buffer
from unimedvl_jax.model.lora import is_adapter_path
from unimedvl_jax.model.unimedvl import LossOutput, UniMedVL

# which top-level / decoder paths each freezable name covers
_FREEZE_MATCH: dict[str, Callable[[tuple], bool]] = {
    'vae': lambda p: p[0] == 'vae',
    'vit': lambda p: p[0] == 'vit',
    'connector': lambda p: p[0] == 'connector',
    'adapters': lambda p: p[0] in ('vae2llm', 'llm2vae', 'time_embedder'),
    'llm': lambda p: p[0] in ('embed_tokens', 'lm_head', 'decoder'),
    'und': lambda p: (p[0] in ('embed_tokens', 'lm_head') or p[:2] == ('decoder', 'norm')
                      or p[:3] == ('decoder', 'layers', 'und')),
    'gen': lambda p: p[:2] == ('decoder', 'norm_moe_gen') or p[:3] == ('decoder', 'layers', 'gen'),
    # LoRA (model/lora.py): the adapters, and everything but the adapters
    'lora': is_adapter_path,
    'base': lambda p: not is_adapter_path(p),
}


def stage_freeze(tc) -> tuple:
  """What a stage's step freezes: with train.lora everything but the LoRA adapters, else
  train.freeze and the adapters (a model without adapters is unaffected by the latter)."""
  if tc.get('lora', False):
    return ('base',)
  return tuple(tc.freeze) + ('lora',)


def first_stage_lora(cfg) -> bool:
  """train.lora of the first curriculum stage (of `train` without a curriculum)."""
  from unimedvl_jax.config import stage_train_config
  return bool(stage_train_config(cfg, cfg.stages[0] if cfg.stages else None).get('lora', False))


def optimizer_params(params: nnx.State, lora: bool) -> nnx.State:
  """The parameters the optimizer state is kept for: all, or (train.lora) the adapters."""
  if not lora:
    return params
  return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if is_adapter_path(p)])


def is_frozen(path: tuple, freeze) -> bool:
  path = tuple(str(x) for x in path)
  return any(_FREEZE_MATCH[f](path) for f in freeze)


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


def make_optimizer(tc) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps, weight decay) after a global-norm clip; the lr is applied in the step."""
  parts = []
  if tc.grad_clip and tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=tc.eps))
  if tc.weight_decay:
    parts.append(optax.add_decayed_weights(tc.weight_decay))
  return optax.chain(*parts)


def lr_schedule(tc, total_steps: int) -> Callable[[int], float]:
  """Linear warmup to tc.lr, then constant or cosine to tc.min_lr (host-side, per stage)."""
  def f(step: int) -> float:
    if tc.warmup_steps and step < tc.warmup_steps:
      return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == 'cosine':
      span = max(1, total_steps - tc.warmup_steps)
      frac = min(1.0, (step - tc.warmup_steps) / span)
      return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + np.cos(np.pi * frac))
    return tc.lr
  return f


def init_state(cfg, seed: int | None = None, lora: bool | None = None,
               model: UniMedVL | None = None) -> tuple[Any, dict]:
  """(graphdef, state) of a freshly initialised model (or of `model`, e.g. a random_model in
  tests). lora: optimizer state for the adapters alone (default: the first stage's train.lora)."""
  seed = cfg.seed if seed is None else seed
  lora = first_stage_lora(cfg) if lora is None else lora
  if model is None:
    model = UniMedVL(cfg.model, rngs=nnx.Rngs(seed))
  graphdef, params, buffers = nnx.split(model, nnx.Param, Buffer)
  tx = make_optimizer(cfg.train)
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


def make_train_step(graphdef, cfg, stage_train, objective: str = 'lm') -> Callable:
  """Returns train_step(state, batch, lr) for one curriculum stage's settings (stage_train is the
  merged train config: freeze, loss weights, ema decay, grad_accum, timestep shift).
  objective: 'lm' (UniMedVL's CE + flow MSE) or 'vae' (autoencoder reconstruction)."""
  tc = stage_train
  lora = bool(tc.get('lora', False))
  freeze = stage_freeze(tc)
  tx = make_optimizer(tc)
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

  def train_step(state, batch, lr):
    params, buffers = state['params'], state['buffers']
    step = state['meta']['step']
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
        updates, new_opt = tx.update(join_params(sub, grads), state['opt_state'], sub)
        new_sub = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), sub, updates)
        new_tr, _ = split_trainable(new_sub, ())
        new_params = join_params(params, new_tr, split_trainable(params, freeze)[1])
        ema_tr, ema_fr = split_trainable(state['ema'], freeze)
        ema_tr = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_tr, new_tr)
        new_ema = join_params(state['ema'], ema_tr, ema_fr)
      else:
        full_grads = join_params(params, grads,
                                 jax.tree.map(jnp.zeros_like, frozen))
        updates, new_opt = tx.update(full_grads, state['opt_state'], params)
        upd_flat = [(p, (jax.tree.map(jnp.zeros_like, v) if is_frozen(p, freeze) else v))
                    for p, v in nnx.to_flat_state(updates)]
        updates = nnx.from_flat_state(upd_flat)
        new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
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
               'ce_tokens': ce_den, 'mse_tokens': mse_den, 'lr': lr}
    return new_state, metrics

  return train_step


def switch_optimizer(tc, state: dict, lora: bool, shardings=None) -> dict:
  """The state with a fresh optimizer state (of the stage's train config `tc`) for `lora`
  (adapters alone, or every parameter): what a stage boundary that turns train.lora on or off
  does. Params and EMA are kept."""
  tx = make_optimizer(tc)
  init = jax.jit(lambda p: tx.init(optimizer_params(p, lora)),
                 out_shardings=None if shardings is None else shardings['opt_state'])
  return {**state, 'opt_state': init(state['params'])}


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

  def wrapped(state, batch, lr):
    with sharding.use_abstract_mesh(mesh, rules):
      return train_step(state, batch, lr)

  return jax.jit(wrapped, in_shardings=(st_sh, b_sh, rep), out_shardings=(st_sh, rep),
                 donate_argnums=(0,)), st_sh, b_sh
