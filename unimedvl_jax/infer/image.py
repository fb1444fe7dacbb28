"""The rectified-flow image sampler with three-context classifier-free guidance (SPEC 7).

Per request (row): noise tokens x ~ N(0, I) of shape [gh*gw, 64] (drawn from the request's own
seed, so a request's image does not depend on the batch it is in) sit between
`<|vision_start|>` / `<|vision_end|>` at the context's current position, in a "noise" split that
is never written into the cache: its queries see the cache and the block itself bidirectionally.

Euler on `ts = linspace(1, 0, N)` shifted by s (`ts <- s*ts / (1 + (s-1)*ts)`), N-1 model calls,
`x <- x - v * (ts[i] - ts[i+1])` (velocity points from data to noise; t = 1 is noise).

Guidance (inside `interval` = (lo, hi], i.e. lo < t <= hi, like BAGEL; outside it the plain
velocity v of the full context is used, which is what scales of 1 give):

    v' = v_txt + s_text * (v - v_txt)                     (v_txt: the "cfg_text" context)
    renorm "text_channel": v' <- v' * clamp(|v|_tok / |v'|_tok, renorm_min, 1)   (per token)
    if s_img > 1: v' = v_img + s_img * (v' - v_img)       (v_img: the "cfg_img" context)
    renorm "global": v' <- v' * clamp(|v| / |v'|, renorm_min, 1)   (norm over all tokens and
                     channels of ONE image -- per request; padding tokens excluded)
    renorm "channel": the same per token (norm over the 64 channels)
    ("text_channel" does no renorm after the image step.)

Norm ratios use |v| / (|v'| + 1e-8) as in the reference implementation. The text step runs when
s_text > 1 (with s_text == 1 it is the identity); the image step when s_img > 1. The contexts
needed are stacked along the batch axis and run as ONE batched model call per step
(`cfg_batched=False`: one call per context, for comparison); outside the interval only the full
context is run (`lax.cond`). The whole loop is one jitted `fori_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.infer.context import (Context, ContextError, Specials, backend_jit,
                                        concat_contexts, forward_block, make_builder, merge,
                                        prepare)
from unimedvl_jax.model.layers import take_rows

RENORM_TYPES = ('global', 'channel', 'text_channel')
RENORM_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class FlowSettings:
  """Sampler settings. Defaults: BAGEL / UniMedVL text-to-image (SPEC 7)."""
  num_steps: int = 50            # N timesteps -> N - 1 model calls
  shift: float = 3.0
  s_text: float = 4.0
  s_img: float = 1.0
  interval: tuple[float, float] = (0.4, 1.0)
  renorm: str = 'global'
  renorm_min: float = 0.0

  def __post_init__(self):
    if self.renorm not in RENORM_TYPES:
      raise ValueError(f'renorm must be one of {RENORM_TYPES}, got {self.renorm!r}')
    if self.num_steps < 2:
      raise ValueError(f'num_steps must be >= 2 (N timesteps, N-1 model calls), got {self.num_steps}')
    if self.shift <= 0:
      raise ValueError(f'shift must be > 0, got {self.shift}')
    object.__setattr__(self, 'interval', tuple(float(x) for x in self.interval))

  def describe(self) -> dict:
    d = dataclasses.asdict(self)
    d['interval'] = list(self.interval)
    d['interval_rule'] = 'lo < t <= hi'
    d['sampler'] = 'Euler, N-1 model calls on shifted linspace(1, 0, N)'
    return d


TEXT_TO_IMAGE = FlowSettings()
EDITING = FlowSettings(s_text=4.0, s_img=2.0, interval=(0.0, 1.0), renorm='text_channel')


def eval_flow_settings(cfg, num_steps: int | None = None) -> tuple[FlowSettings, FlowSettings]:
  """(text-to-image, editing) sampler settings of a config's `eval` section (config.eval_defaults:
  overrides of TEXT_TO_IMAGE / EDITING at eval.image_steps steps; a config without the section,
  e.g. an older checkpoint's, gets the defaults at 20 steps). num_steps, when given, replaces
  every step count. Raises ConfigError naming a field that is not a valid sampler setting."""
  from unimedvl_jax.config import ConfigError, eval_defaults
  ev = cfg.get('eval') or eval_defaults()
  fields = {f.name for f in dataclasses.fields(FlowSettings)}
  out = []
  for name, base in (('text_to_image', TEXT_TO_IMAGE), ('editing', EDITING)):
    over = dict(ev.get(name) or {})
    bad = sorted(set(over) - fields)
    if bad:
      raise ConfigError(f'eval.{name}.{bad[0]}: not a sampler setting (FlowSettings fields: '
                        f'{sorted(fields)})')
    over.setdefault('num_steps', int(ev.get('image_steps', 20)))
    if num_steps:
      over['num_steps'] = int(num_steps)
    if 'interval' in over:
      over['interval'] = tuple(over['interval'])
    try:
      out.append(dataclasses.replace(base, **over))
    except (ValueError, TypeError) as e:
      raise ConfigError(f'eval.{name}: {e}') from None
  return out[0], out[1]


def timesteps(num_steps: int, shift: float):
  """(t [N-1], dt [N-1]) float32: shifted linspace(1, 0, N) without its last point, and the
  decrements ts[i] - ts[i+1]."""
  ts = np.linspace(1.0, 0.0, num_steps, dtype=np.float32)
  ts = (shift * ts / (1.0 + (shift - 1.0) * ts)).astype(np.float32)
  return ts[:-1], (ts[:-1] - ts[1:]).astype(np.float32)


def _norm(x, mask, per_token: bool):
  """L2 norm: per token over channels ([B, n, 1]) or over the valid tokens of each row ([B,1,1])."""
  sq = jnp.square(x)
  if per_token:
    return jnp.sqrt(jnp.sum(sq, axis=-1, keepdims=True))
  return jnp.sqrt(jnp.sum(sq * mask[..., None], axis=(1, 2), keepdims=True))


def cfg_combine(v, v_txt, v_img, mask, *, s_text: float, s_img: float, renorm: str,
                renorm_min: float):
  """The guided velocity of SPEC 7 (see module doc). v, v_txt, v_img [B, n, C] float32 (v_txt /
  v_img may be None when their step is not used); mask [B, n] 1.0 for real tokens."""
  use_text = s_text > 1.0
  use_img = s_img > 1.0
  if renorm not in RENORM_TYPES:
    raise ValueError(f'renorm must be one of {RENORM_TYPES}, got {renorm!r}')
  if not use_text and not use_img:
    return v
  mask = mask.astype(v.dtype)
  vp = v_txt + s_text * (v - v_txt) if use_text else v
  if renorm == 'text_channel':
    if use_text:
      scale = jnp.clip(_norm(v, mask, True) / (_norm(vp, mask, True) + RENORM_EPS), renorm_min, 1.0)
      vp = vp * scale
    if use_img:
      vp = v_img + s_img * (vp - v_img)
    return vp
  if use_img:
    vp = v_img + s_img * (vp - v_img)
  per_tok = renorm == 'channel'
  scale = jnp.clip(_norm(v, mask, per_tok) / (_norm(vp, mask, per_tok) + RENORM_EPS),
                   renorm_min, 1.0)
  return vp * scale


def _tile_block(blk, k):
  return jax.tree.map(lambda a: jnp.concatenate([a] * k, axis=0), blk)


def _velocity(model, c, b, x, t):
  b = dataclasses.replace(b, lat_x=x, lat_t=jnp.full(b.lat_t.shape, t, jnp.float32))
  _, _, h_g = forward_block(model, c, b, write=False)
  return model.velocity(h_g)


def _guided(model, ctxs, blk, x, t, settings: FlowSettings, batched: bool, big=None):
  """The guided velocity [B, n, 64] of one flow step over the contexts (full, [cfg_text],
  [cfg_img]) in one batched model call (`big`: their rows stacked, concat_contexts) or one call
  per context."""
  B = x.shape[0]
  k = len(ctxs)
  if batched and k > 1:
    big = concat_contexts(ctxs) if big is None else big
    vs = _velocity(model, big, _tile_block(blk, k), jnp.concatenate([x] * k, axis=0), t)
    vs = [vs[i * B:(i + 1) * B] for i in range(k)]
  else:
    vs = [_velocity(model, c, blk, x, t) for c in ctxs]
  v = vs[0]
  v_txt = vs[1] if settings.s_text > 1.0 else None
  v_img = vs[-1] if settings.s_img > 1.0 else None
  if k == 1:
    return v
  gen_valid = take_rows(blk.valid, blk.gen_seq).astype(jnp.float32)
  return cfg_combine(v, v_txt, v_img, gen_valid, s_text=settings.s_text, s_img=settings.s_img,
                     renorm=settings.renorm, renorm_min=settings.renorm_min)


@backend_jit(static_argnums=(0, 5, 6))
def _flow_jit(graphdef, state, ctxs, blk, sched, settings: FlowSettings, batched: bool):
  model = merge(graphdef, state)
  ts, dts = sched
  k = len(ctxs)
  lo, hi = settings.interval
  big = concat_contexts(ctxs) if batched and k > 1 else None    # once, outside the loop

  def plain(x, t):
    return _velocity(model, ctxs[0], blk, x, t)

  def guided(x, t):
    return _guided(model, ctxs, blk, x, t, settings, batched, big)

  def step(i, x):
    t = ts[i]
    if k > 1:
      inside = (t > lo) & (t <= hi)
      v = jax.lax.cond(inside, guided, plain, x, t)
    else:
      v = plain(x, t)
    return x - v * dts[i]

  return jax.lax.fori_loop(0, ts.shape[0], step, blk.lat_x)


@backend_jit(static_argnums=(0, 6, 7))
def _step_velocity_jit(graphdef, state, ctxs, blk, x, t, settings: FlowSettings, batched: bool):
  return _guided(merge(graphdef, state), ctxs, blk, x, t, settings, batched)


def initial_noise(seed: int, n_tokens: int, dim: int = 64) -> np.ndarray:
  """The request's starting noise x ~ N(0, I) [n_tokens, dim] from its own seed."""
  return np.asarray(jax.random.normal(jax.random.key(int(seed) % (1 << 31)), (n_tokens, dim),
                                      jnp.float32))


def _flow_inputs(model, ctx, specials, grids, cfg_text_ctx, cfg_img_ctx, settings, seeds, noise):
  """(contexts (full, [cfg_text], [cfg_img]), the noise block or None when no row draws)."""
  if not getattr(model, 'has_vae', False):
    raise ContextError('image generation needs the model\'s VAE adapters (model.vae.enabled)')
  B = ctx.batch_size
  grids = list(grids)
  if len(grids) != B:
    raise ContextError(f'{len(grids)} image grids for a context of {B} rows')
  if isinstance(seeds, (int, np.integer)):
    seeds = [int(seeds) + b for b in range(B)]
  if len(seeds) != B:
    raise ContextError(f'{len(seeds)} seeds for a context of {B} rows')
  if noise is None:
    noise = [None] * B
  noise = list(noise)
  if len(noise) != B:
    raise ContextError(f'{len(noise)} initial noises for a context of {B} rows')
  ctxs = [ctx]
  if settings.s_text > 1.0:
    if cfg_text_ctx is None:
      raise ContextError('s_text > 1 needs cfg_text_ctx (the context before the last text prompt)')
    ctxs.append(cfg_text_ctx)
  if settings.s_img > 1.0:
    if cfg_img_ctx is None:
      raise ContextError('s_img > 1 needs cfg_img_ctx (the text-only context, without images)')
    ctxs.append(cfg_img_ctx)
  for c in ctxs[1:]:
    if c.batch_size != B:
      raise ContextError(f'CFG context has {c.batch_size} rows, the main context {B}')
  bld = make_builder(model, B, specials)
  D = bld.latent_dim
  for r, g in enumerate(grids):
    if g is None:
      continue
    gh, gw = int(g[0]), int(g[1])
    if gh < 1 or gw < 1:
      raise ContextError(f'row {r}: latent grid {g} must be positive')
    x0 = initial_noise(seeds[r], gh * gw, D) if noise[r] is None else np.asarray(noise[r],
                                                                                  np.float32)
    if x0.shape != (gh * gw, D):
      raise ContextError(f'row {r}: initial noise has shape {x0.shape}, expected {(gh * gw, D)}')
    bld.noise_image(r, x0, (gh, gw), t=1.0)
  return tuple(ctxs), (None if bld.empty() else bld.build())


def generate_latents(model, ctx: Context, specials: Specials, grids: Sequence, *,
                     cfg_text_ctx: Context | None = None, cfg_img_ctx: Context | None = None,
                     settings: FlowSettings = TEXT_TO_IMAGE, seeds: Sequence[int] | int = 0,
                     noise: Sequence | None = None, cfg_batched: bool = True
                     ) -> list[np.ndarray | None]:
  """Samples one image per row in latent-token space.

  grids: per row (gh, gw) latent-token grid (16 px per token), or None to skip the row.
  cfg_text_ctx / cfg_img_ctx: contexts with the same rows (needed when s_text > 1 / s_img > 1).
  seeds: one per row (an int s means s + row). noise: optional per row initial noise
  [gh*gw, 64] (None entries: drawn from the row's seed, `initial_noise`).
  cfg_batched: the guidance contexts run as ONE batched model call per step (default), else one
  call per context (same velocities; benchmarks/bench_cfg.py times both).
  Returns per row tokens [gh*gw, 64] float32.
  """
  ctxs, blk = _flow_inputs(model, ctx, specials, grids, cfg_text_ctx, cfg_img_ctx, settings,
                           seeds, noise)
  if blk is None:
    return [None] * ctx.batch_size
  ts, dts = timesteps(settings.num_steps, settings.shift)
  p = prepare(model)
  with p.scope():
    x = _flow_jit(p.static, p.state, ctxs, blk, (jnp.asarray(ts), jnp.asarray(dts)), settings,
                  bool(cfg_batched))
  x = np.asarray(x)
  out = []
  for r, g in enumerate(grids):
    out.append(None if g is None else x[r, :int(g[0]) * int(g[1])].copy())
  return out


def step_velocity(model, ctx: Context, specials: Specials, grids: Sequence, x, t: float, *,
                  cfg_text_ctx: Context | None = None, cfg_img_ctx: Context | None = None,
                  settings: FlowSettings = TEXT_TO_IMAGE, cfg_batched: bool = True):
  """The guided velocity of ONE flow step at time t (inside the guidance interval) for latent
  tokens x: per row [gh*gw, 64] (None for rows without an image). Returns per row [gh*gw, 64].
  (What each sampler step computes; for tests and benchmarks.)"""
  B = ctx.batch_size
  xs = list(x)
  ctxs, blk = _flow_inputs(model, ctx, specials, grids, cfg_text_ctx, cfg_img_ctx, settings,
                           0, xs)
  if blk is None:
    return [None] * B
  p = prepare(model)
  with p.scope():
    v = np.asarray(_step_velocity_jit(p.static, p.state, ctxs, blk, blk.lat_x, jnp.float32(t),
                                      settings, bool(cfg_batched)))
  return [None if g is None else v[r, :int(g[0]) * int(g[1])].copy()
          for r, g in enumerate(grids)]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _decode_jit(graphdef, state, tokens, gh: int, gw: int):
  from unimedvl_jax.model.vae import unpatchify
  model = merge(graphdef, state)
  z = unpatchify(tokens, gh, gw, model.latent_patch, model.latent_channels)
  img = model.vae.decode(z)
  return jnp.round((jnp.clip(img, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def decode_latents(model, tokens: np.ndarray, grid) -> np.ndarray:
  """Latent tokens [gh*gw, 64] -> uint8 image [gh*16, gw*16, 3] (VAE decode, clip to [-1, 1])."""
  gh, gw = int(grid[0]), int(grid[1])
  p = prepare(model)
  with p.scope():
    img = _decode_jit(p.static, p.state, jnp.asarray(tokens, jnp.float32)[None], gh, gw)
  return np.asarray(img[0])


def generate_images(model, ctx: Context, specials: Specials, sizes: Sequence, **kw
                    ) -> list[np.ndarray | None]:
  """`generate_latents` + VAE decode. sizes: per row (H, W) in pixels (multiples of 16) or None.
  Returns uint8 [H, W, 3] per row."""
  px = 8 * model.latent_patch
  grids = []
  for r, s in enumerate(sizes):
    if s is None:
      grids.append(None)
      continue
    H, W = int(s[0]), int(s[1])
    if H % px or W % px or H <= 0 or W <= 0:
      raise ContextError(f'row {r}: image size {H}x{W} must be positive multiples of {px} px')
    grids.append((H // px, W // px))
  lat = generate_latents(model, ctx, specials, grids, **kw)
  return [None if t is None else decode_latents(model, t, g) for t, g in zip(lat, grids)]
