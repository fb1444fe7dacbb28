"""Text decoding: logits with the KV cache equal a full recompute (the model's packed forward on
the whole sequence with the reference attention) at every generated position (float32, 1e-4);
per-sequence stopping at <|im_end|>; max tokens; sampling determinism; batch == singles."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tests.helpers.infer_ref import SPECIALS, reference_forward, tiny_model
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer import text as T


@pytest.fixture(scope='module')
def model():
  return tiny_model()[1]


def _patch(model):
  return int(round((model.vit.embeddings.patch_embedding.kernel.shape[0] // 3) ** 0.5))


def _prompt(model):
  """Two ragged conversations: text + ViT image + text, and text only."""
  img = np.random.RandomState(0).uniform(-1, 1, (16, 24, 3)).astype(np.float32)
  ctx = C.new_context(model, 2, 64)
  ctx = C.add_text(model, ctx, [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26]], SPECIALS)
  ctx = C.add_image(model, ctx, SPECIALS, vit=[img, None])
  ctx = C.add_text(model, ctx, [[13, 14], None], SPECIALS)
  p, g = C.vit_patches(img, _patch(model))
  items = [[('text', [10, 11, 12]), ('vit', p, g), ('text', [13, 14])],
           [('text', [20, 21, 22, 23, 24, 25, 26])]]
  return ctx, items


def _check_against_reference(model, res, items, max_new, end=SPECIALS.im_end):
  for b in range(2):
    fed = [SPECIALS.im_start] + res.tokens[b] + [end]
    ref = reference_forward(model, items[b] + [('raw', fed)])
    n = len(fed)
    got = res.logits[b, :n]
    np.testing.assert_allclose(got, ref['logits'][-n:], atol=1e-4, rtol=1e-4)
    assert not res.logits[b, n:].any()          # nothing recorded after the row stopped
    # the cache holds the generated text item like a prefilled one
  assert list(res.ctx.lengths()) == [int(l) + len(t) + 2 for l, t in
                                     zip(res.ctx_before_lengths, res.tokens)]


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_cached_logits_equal_full_recompute(model, temperature):
  ctx, items = _prompt(model)
  s = T.TextSettings(max_new_tokens=6, temperature=temperature, top_p=0.9)
  res = T.generate_text(model, ctx, SPECIALS, s, seeds=[3, 4], return_logits=True)
  res.ctx_before_lengths = ctx.lengths()
  _check_against_reference(model, res, items, 6)
  if temperature == 0.0:
    for b in range(2):   # greedy: each token is the argmax of the previous position's logits
      assert res.tokens[b] == [int(i) for i in np.argmax(res.logits[b, :len(res.tokens[b])], -1)]


def test_greedy_tokens_equal_full_recompute_greedy(model):
  """Greedy decoding through the KV cache (a prepared model, the Runner's path) vs greedy
  decoding WITHOUT a cache: every step runs the whole conversation (prompt items, then
  <|im_start|> and the tokens so far) through the reference forward and takes the argmax of the
  last position. Same tokens, and every step's logits within fp32 tolerance."""
  ctx, items = _prompt(model)
  n_new = 6
  res = T.generate_text(C.prepare(model), ctx, SPECIALS, T.TextSettings(max_new_tokens=n_new),
                        return_logits=True)
  for b in range(2):
    fed, toks = [SPECIALS.im_start], []
    for step in range(n_new):
      last = reference_forward(model, items[b] + [('raw', fed)])['logits'][-1]
      np.testing.assert_allclose(res.logits[b, step], last, atol=1e-4, rtol=1e-4)
      nxt = int(np.argmax(last))
      if nxt == SPECIALS.im_end:
        break
      toks.append(nxt)
      fed.append(nxt)
    assert res.tokens[b] == toks, (b, res.tokens[b], toks)
  # the greedy loop holds no sampling ops (no sort, no random bits); the sampling loop does
  p = C.prepare(model)
  hlo = {}
  for temp in (0.0, 1.0):
    args, _, max_new, greedy = T.decode_args(ctx, SPECIALS, T.TextSettings(max_new_tokens=2,
                                                                         temperature=temp))
    hlo[temp] = T._decode_jit.plain.lower(p.static, p.state, ctx, *args, max_new, False,
                                          greedy).as_text()
  for op in ('stablehlo.sort', 'threefry2x32'):
    assert op not in hlo[0.0] and op in hlo[1.0], op


def test_decode_loop_reads_the_cache_in_place(model):
  """The compiled decode loop (XLA:CPU, the options the library uses) neither copies nor
  transposes a layer's KV cache buffer per token: no copy / transpose of a cache-shaped array
  outside the entry computation (which copies the caller's context once per call)."""
  import re
  ctx, _ = _prompt(model)
  p = C.prepare(model)
  args, _, max_new, greedy = T.decode_args(ctx, SPECIALS, T.TextSettings(max_new_tokens=3))
  text = T._decode_jit.cpu.lower(p.static, p.state, ctx, *args, max_new, False,
                                 greedy).compile().as_text()
  B, H, Cap, D = ctx.k[0].shape
  shape = rf'f32\[({B},{H},{Cap},{D}|{B},{H},{D},{Cap})\]'
  body = text[:text.index('\nENTRY')]
  bad = [l.strip()[:160] for l in body.splitlines()
         if re.search(shape + r'\S* (copy|transpose)\(', l)]
  assert not bad, bad
  # the same loop compiled with XLA:CPU's default copy insertion does copy them (the check bites)
  plain = T._decode_jit.plain.lower(p.static, p.state, ctx, *args, max_new, False,
                                    greedy).compile().as_text()
  body = plain[:plain.index('\nENTRY')]
  assert any(re.search(shape + r'\S* copy\(', l) for l in body.splitlines())


def test_per_sequence_stop_and_max_tokens(model):
  """Rows stop independently at the end token. The end id is chosen as a token that greedy
  decoding of row 0 produces at step j (and row 1 never does), so row 0 stops after j tokens
  while row 1 runs to max_new_tokens, where the end token is forced."""
  import dataclasses
  ctx, items = _prompt(model)
  free = T.generate_text(model, ctx, SPECIALS, T.TextSettings(max_new_tokens=6),
                         return_logits=True)
  t0, t1 = free.tokens
  cands = [j for j in range(1, 6) if t0[j] not in t0[:j] and t0[j] not in t1]
  if not cands:
    pytest.skip(f'random model produced no usable stop token: {t0} {t1}')
  j = cands[0]
  sp = dataclasses.replace(SPECIALS, im_end=t0[j])
  res = T.generate_text(model, ctx, sp, T.TextSettings(max_new_tokens=6), return_logits=True)
  assert res.tokens[0] == t0[:j] and res.finished[0]
  assert res.tokens[1] == t1 and not res.finished[1]
  res.ctx_before_lengths = ctx.lengths()
  _check_against_reference(model, res, items, 6, end=t0[j])
  # inactive rows are untouched
  res2 = T.generate_text(model, ctx, SPECIALS, T.TextSettings(max_new_tokens=6),
                         active=[False, True], return_logits=True)
  assert res2.tokens[0] == [] and res2.ctx.lengths()[0] == ctx.lengths()[0]
  assert res2.tokens[1] == t1


def test_batch_equals_single_and_seeded_sampling(model):
  ctx, _ = _prompt(model)
  s = T.TextSettings(max_new_tokens=6, temperature=0.8, top_p=0.95)
  both = T.generate_text(model, ctx, SPECIALS, s, seeds=[7, 8], return_logits=True)
  again = T.generate_text(model, ctx, SPECIALS, s, seeds=[7, 8], return_logits=True)
  assert both.tokens == again.tokens
  for b, seed in enumerate([7, 8]):
    one = T.generate_text(model, C.take_rows(ctx, [b]), SPECIALS, s, seeds=[seed],
                          return_logits=True)
    assert one.tokens[0] == both.tokens[b]


def test_sample_tokens_rules():
  logits = jnp.asarray(np.random.RandomState(0).normal(size=(3, 50)).astype(np.float32))
  keys = jax.vmap(jax.random.key)(jnp.arange(3, dtype=jnp.uint32))
  greedy = np.argmax(np.asarray(logits), -1)
  sample = jax.jit(T.sample_tokens)
  out = sample(logits, keys, jnp.zeros(3), jnp.ones(3))
  np.testing.assert_array_equal(np.asarray(out), greedy)
  # a tiny top_p keeps only the most likely token, whatever the temperature
  out = sample(logits, keys, jnp.full(3, 2.0), jnp.full(3, 1e-6))
  np.testing.assert_array_equal(np.asarray(out), greedy)
  # sampling covers more than the argmax at a high temperature (20 draws in one call)
  many = jax.jit(T.sample_tokens)(jnp.repeat(logits[:1], 20, 0),
                                  jax.vmap(jax.random.key)(jnp.arange(20, dtype=jnp.uint32)),
                                  jnp.full(20, 5.0), jnp.ones(20))
  assert len(set(np.asarray(many).tolist())) > 3
