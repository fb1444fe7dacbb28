"""Text generation over a context (SPEC 7): feed `<|im_start|>`, then decode one token at a time
(greedy, or temperature + top-p sampling) until `<|im_end|>` per sequence or max_new_tokens.

The whole loop is ONE jitted `jax.lax.while_loop` (one compilation per batch size, capacity and
max_new_tokens): each iteration runs the decoder on a one-token block that is written into the
cache, so after generation the context holds the generated text item
(`<|im_start|>` ids `<|im_end|>`, a causal split at consecutive positions: the layout of
`data.plans.item_tokens('text', ...)`) exactly as if it had been prefilled with `add_text`, and a
prompt plus its answer is laid out as training's `plans.tokenize` of the two
(tests/infer/test_prompt_contract.py) -- "think" mode relies on this. A row that reaches
`max_new_tokens` content tokens gets `<|im_end|>` forced so its text item is closed.
Rows are independent: each has its own length, position, stop state and sampling key.

Speed (benchmarks/bench_decode.py): pass a prepared model (`context.prepare`, once per loaded
checkpoint) so that no call splits the module; when every row decodes greedily the loop takes
the argmax only (no sort, softmax or random draw: `sample_tokens` is not traced at all).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.infer.context import (Block, Context, Specials, backend_jit, check_capacity,
                                        forward_block, merge, prepare)
from unimedvl_jax.model.attention import MODE_CAUSAL


@dataclasses.dataclass(frozen=True)
class TextSettings:
  """Decoding settings. temperature 0 = greedy; top_p 1 = no nucleus truncation."""
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0

  def describe(self) -> dict:
    d = dataclasses.asdict(self)
    d['decoding'] = 'greedy' if self.temperature <= 0 else 'temperature+top_p sampling'
    return d


@dataclasses.dataclass
class TextResult:
  ctx: Context                   # the context with the generated text items appended
  tokens: list[list[int]]        # generated ids per row, without <|im_end|> (empty if inactive)
  finished: list[bool]           # True where the model emitted <|im_end|> itself
  logits: np.ndarray | None      # [B, max_new_tokens + 2, V] logits after each fed token (opt.)


def sample_tokens(logits, keys, temperature, top_p):
  """logits [B, V] float32; keys [B] typed keys; temperature, top_p [B] -> ids [B] int32.

  temperature <= 0 -> argmax. Otherwise softmax(logits / temperature) restricted to the smallest
  set of most likely tokens whose probability reaches top_p (the first token always kept).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temp = jnp.maximum(temperature, 1e-6)[:, None]
  scaled = logits / temp
  order = jnp.argsort(-scaled, axis=-1)
  srt = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  srt = jnp.where(before < top_p[:, None], srt, -jnp.inf)
  choice = jax.vmap(jax.random.categorical)(keys, srt)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def token_block(cur, valid, first):
  """A one-token text block per row: `cur` [B] ids; valid [B] bool; `first` (scalar bool):
  the token opens a new text split (<|im_start|>), else it continues the row's last split."""
  B = cur.shape[0]
  v = valid.astype(jnp.int32)
  z1 = jnp.zeros((B, 1), jnp.int32)
  return Block(
      und_ids=cur[:, None].astype(jnp.int32), und_seq=z1, gen_seq=jnp.zeros((B, 0), jnp.int32),
      vit_patches=jnp.zeros((B, 0, 1), jnp.float32), vit_seg=jnp.zeros((B, 0), jnp.int32),
      vit_pos=jnp.zeros((B, 0), jnp.int32), vit_dest=jnp.zeros((B, 0), jnp.int32),
      lat_x=jnp.zeros((B, 0, 1), jnp.float32), lat_t=jnp.zeros((B, 0), jnp.float32),
      lat_pos=jnp.zeros((B, 0), jnp.int32),
      valid=v[:, None], split_off=jnp.where(first, z1, z1 - 1),
      mode=jnp.full((B, 1), MODE_CAUSAL, jnp.int32), pos_off=z1,
      n_valid=v, pos_adv=v, split_adv=v * first.astype(jnp.int32))


@backend_jit(static_argnums=(0, 9, 10, 11))
def _decode_jit(graphdef, state, ctx, seeds, temperature, top_p, active, im_start, im_end,
                max_new: int, with_logits: bool, greedy: bool):
  model = merge(graphdef, state)
  B = ctx.batch_size
  V = model.lm_head.kernel.shape[-1]
  n_steps = max_new + 2
  drop = max_new + 1
  keys = None if greedy else jax.vmap(jax.random.key)(seeds)

  def cond(s):
    return jnp.any(~s['done']) & (s['step'] < n_steps)

  def body(s):
    valid = ~s['done']
    cur = s['cur']
    blk = token_block(cur, valid, s['step'] == 0)
    ctx2, h_u, _ = forward_block(model, s['ctx'], blk, write=True)
    logits = model.logits(h_u[:, 0])
    if greedy:
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s['step']))(keys)
      nxt = sample_tokens(logits, step_keys, temperature, top_p)
    nxt = jnp.where(s['count'] >= max_new, im_end, nxt)
    fed_end = cur == im_end
    emit = valid & ~fed_end
    idx = jnp.where(emit, s['count'], drop)
    out = s['out'].at[jnp.arange(B), idx].set(nxt, mode='drop')
    new = dict(ctx=ctx2, out=out, count=s['count'] + emit.astype(jnp.int32),
               done=s['done'] | (valid & fed_end), cur=jnp.where(emit, nxt, cur),
               step=s['step'] + 1)
    if with_logits:
      new['logits'] = jax.lax.dynamic_update_slice(
          s['logits'], jnp.where(valid[:, None], logits, 0.0)[:, None], (0, s['step'], 0))
    return new

  s0 = dict(ctx=ctx, out=jnp.full((B, max_new + 1), im_end, jnp.int32),
            count=jnp.zeros((B,), jnp.int32), done=~active,
            cur=jnp.full((B,), im_start, jnp.int32), step=jnp.zeros((), jnp.int32))
  if with_logits:
    s0['logits'] = jnp.zeros((B, n_steps, V), jnp.float32)
  s = jax.lax.while_loop(cond, body, s0)
  return s['ctx'], s['out'], s['count'], s.get('logits')


def _row_values(x, B, dtype, name):
  a = np.asarray(x, dtype)
  if a.ndim == 0:
    a = np.full((B,), a, dtype)
  if a.shape != (B,):
    raise ValueError(f'{name}: expected a scalar or {B} values, got shape {a.shape}')
  return a


def decode_args(ctx: Context, specials: Specials, settings: TextSettings, *,
                seeds: Sequence[int] | int = 0, active: Sequence[bool] | None = None,
                temperature=None, top_p=None):
  """The host-side arguments of the jitted decode loop: (seeds, temperature, top_p, active,
  im_start, im_end) device arrays, plus (max_new, greedy) for its static arguments."""
  B = ctx.batch_size
  max_new = int(settings.max_new_tokens)
  if max_new < 0:
    raise ValueError(f'max_new_tokens must be >= 0, got {max_new}')
  act = np.ones((B,), bool) if active is None else _row_values(active, B, bool, 'active')
  if np.isscalar(seeds):
    seeds = [int(seeds) + b for b in range(B)]
  seeds = _row_values(seeds, B, np.int64, 'seeds')
  temp = _row_values(settings.temperature if temperature is None else temperature, B, np.float32,
                     'temperature')
  tp = _row_values(settings.top_p if top_p is None else top_p, B, np.float32, 'top_p')
  greedy = bool(np.all(temp[act] <= 0)) if act.any() else True
  args = (jnp.asarray((seeds % (1 << 31)).astype(np.uint32)), jnp.asarray(temp), jnp.asarray(tp),
          jnp.asarray(act), jnp.int32(specials.im_start), jnp.int32(specials.im_end))
  return args, act, max_new, greedy


def generate_text(model, ctx: Context, specials: Specials, settings: TextSettings = TextSettings(),
                  *, seeds: Sequence[int] | int = 0, active: Sequence[bool] | None = None,
                  temperature=None, top_p=None, return_logits: bool = False) -> TextResult:
  """Generates one text item per active row of `ctx` (see module doc).

  model: an nnx module or a `context.prepare`d one (faster: no split per call).
  seeds: one per row (or one for all rows; row b then uses seed + b) -- only used when sampling.
  temperature / top_p: per-row overrides of the settings (scalars or one value per row).
  """
  B = ctx.batch_size
  args, act, max_new, greedy = decode_args(ctx, specials, settings, seeds=seeds, active=active,
                                           temperature=temperature, top_p=top_p)
  check_capacity(ctx, np.where(act, max_new + 2, 0))
  p = prepare(model)
  with p.scope():
    ctx2, out, count, logits = _decode_jit(p.static, p.state, ctx, *args, max_new,
                                           bool(return_logits), greedy)
  out, count = np.asarray(out), np.asarray(count)
  tokens, finished = [], []
  for b in range(B):
    ids = [int(i) for i in out[b, :count[b]]]
    done = bool(ids) and ids[-1] == specials.im_end
    if done:
      ids = ids[:-1]
    # finished by the model (not forced): it emitted <|im_end|> within the budget
    tokens.append(ids)
    finished.append(bool(act[b]) and done and len(ids) < max_new)
  return TextResult(ctx2, tokens, finished, None if logits is None else np.asarray(logits))
