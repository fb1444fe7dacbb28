"""Pallas packed flash attention vs `reference_attention` (model/attention.py), CPU interpret mode.

Both kernel variants run here: 'generic' (the GPU/Triton code) and 'tpu' (the Mosaic code, whose
compilation for real TPUs is checked in test_flash_attention_tpu_aot.py). Each case compiles
forward + backward once (one jit of a VJP). Tolerances:
  float32: max |kernel - reference| <= 2e-5 * max(1, max |reference|), outputs and dq/dk/dv
           (observed ~1e-6: only summation order differs);
  bfloat16 inputs: 2e-2 relative (outputs) and 4e-2 relative (gradients), against the f32
           reference evaluated on the same bf16 inputs; the kernel rounds p and dS to bf16
           before the second matmuls, as flash kernels do.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import attention_packs as packs
from unimedvl_jax.kernels.block_mask import FULL, SKIP, block_sparsity, classify_blocks
from unimedvl_jax.kernels.flash_attention import flash_attention
from unimedvl_jax.model.attention import attention, attention_mask, reference_attention


def _qkv(rng, B, T, Hq, Hkv, D, dtype):
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  return mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)


_fwd_bwd = packs.fwd_bwd


_reference = _fwd_bwd(reference_attention)


_rel_err = packs.rel_err


def _skipped_key_positions(meta, T, bq, bk):
  """Positions of key blocks that every query block skips (never read by the kernels)."""
  mult = max(bq, bk)
  Tp = -(-T // mult) * mult
  padded = [np.pad(x, ((0, 0), (0, Tp - T))) for x in meta]
  cls = np.asarray(classify_blocks(*padded, bq, bk))              # [B, nq, nk]
  dead = np.all(cls == SKIP, axis=1)                              # [B, nk]
  pos = np.repeat(dead, bk, axis=1)[:, :T]
  return pos


CASES = {
    # name: (B, T, Hq, Hkv, D, block_q, block_k, dtype, layout)
    'gqa4_d64_T200': (2, 200, 4, 1, 64, 32, 32, jnp.float32, 'bthd'),
    'mha_d128_T300_bq64_bk32': (1, 300, 2, 2, 128, 64, 32, jnp.float32, 'bhtd'),
    'gqa2_d64_bf16': (1, 256, 4, 2, 64, 32, 64, jnp.bfloat16, 'bthd'),
    # the 7B model's grouping (28 / 4 heads: G = 7, not a power of two), head dim 128
    'gqa7_d128_T192': (1, 192, 14, 2, 128, 32, 32, jnp.float32, 'bthd'),
    'gqa7_d128_T192_head_major': (1, 192, 14, 2, 128, 32, 32, jnp.float32, 'bhtd'),
}


def _to_layout(layout, *xs):
  """[B, T, H, D] test arrays -> the layout under test (and back: the same transpose)."""
  if layout == 'bthd':
    return xs
  return tuple(x.transpose(0, 2, 1, 3) for x in xs)


@pytest.mark.parametrize('backend', ['generic', 'tpu'])
@pytest.mark.parametrize('case', list(CASES))
def test_packed_forward_and_grads(case, backend):
  """Forward and dq/dk/dv equal the reference; in every layout each program of the forward and
  dq kernels handles all query heads of a KV group (G = Hq / Hkv, including G = 7)."""
  B, T, Hq, Hkv, D, bq, bk, dtype, layout = CASES[case]
  rng, meta = packs.batch_with_all_modes(zlib.crc32(case.encode()), B, T, pad_frac=0.3)
  q, k, v, ct = _qkv(rng, B, T, Hq, Hkv, D, dtype)

  # Poison K/V in key blocks that every query block skips: the kernels must never read them.
  dead = _skipped_key_positions(meta, T, bq, bk)
  assert dead.any(), 'test pack should contain a skipped key block'
  poison = jnp.asarray(dead)[:, :, None, None]
  k_p, v_p = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)

  attn = functools.partial(flash_attention, block_q=bq, block_k=bk, backend=backend,
                           interpret=True, layout=layout)
  out, (dq, dk, dv) = _fwd_bwd(attn)(*_to_layout(layout, q, k_p, v_p), *meta,
                                     *_to_layout(layout, ct))
  out, dq, dk, dv = _to_layout(layout, out, dq, dk, dv)
  ref, (rdq, rdk, rdv) = _reference(q, k, v, *meta, ct)   # dead keys are never allowed
  assert out.dtype == q.dtype and out.shape == q.shape
  dead_np = np.asarray(dead)
  assert np.all(np.asarray(dk, np.float32)[dead_np] == 0.0)   # never-visible keys: zero grads
  assert np.all(np.asarray(dv, np.float32)[dead_np] == 0.0)
  tol_o, tol_g = (2e-5, 2e-5) if dtype == jnp.float32 else (2e-2, 4e-2)
  errs = {n: _rel_err(a, b) for n, a, b in
          (('out', out, ref), ('dq', dq, rdq), ('dk', dk, rdk), ('dv', dv, rdv))}
  assert errs['out'] <= tol_o, errs
  assert max(errs['dq'], errs['dk'], errs['dv']) <= tol_g, errs
  # Rows with no allowed key (padding) are exactly zero.
  pad_rows = np.asarray(meta[0] == 0)
  assert np.all(np.asarray(out, np.float32)[pad_rows] == 0.0)


@pytest.mark.parametrize('backend', ['generic', 'tpu'])
def test_vit_bidirectional_per_image(backend):
  """ViT attention: segment = image id, split 0, mode full; head dim 72 (SigLIP), MHA."""
  B, T, H, D = 2, 180, 3, 72
  rng = np.random.default_rng(7)
  meta = packs.vit_batch(rng, B, T, max_image=70)
  q, k, v, ct = _qkv(rng, B, T, H, H, D, jnp.float32)
  attn = functools.partial(flash_attention, block_q=32, block_k=32, backend=backend,
                           interpret=True)
  out, grads = _fwd_bwd(attn)(q, k, v, *meta, ct)
  ref, rgrads = _reference(q, k, v, *meta, ct)
  assert _rel_err(out, ref) <= 2e-5
  for g, rg in zip(grads, rgrads):
    assert _rel_err(g, rg) <= 2e-5


def test_dispatcher_pallas_impl():
  """model.attention.attention(impl='pallas') reaches the kernel (default blocks, interpret)."""
  rng = np.random.default_rng(3)
  B, T, Hq, Hkv, D = 1, 96, 2, 1, 64
  meta = packs.random_batch(rng, B, T)
  q, k, v, _ = _qkv(rng, B, T, Hq, Hkv, D, jnp.float32)
  out = jax.jit(functools.partial(attention, impl='pallas'))(q, k, v, *meta)
  assert _rel_err(out, reference_attention(q, k, v, *meta)) <= 2e-5


def _pallas_calls(jaxpr):
  """Every pallas_call equation in a (closed) jaxpr, recursively through sub-jaxprs."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == 'pallas_call':
      out.append(e)
      continue
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          out += _pallas_calls(sub)
  return out


@pytest.mark.parametrize('backend', ['generic', 'tpu'])
def test_one_program_per_kv_group(backend):
  """The forward, dq and dk/dv kernels all run one program per (pack, KV head, block): the grid's
  head axis is Hkv (2), not Hq (14), so each program serves the 7 query heads of its group."""
  B, T, Hq, Hkv, D, blk = 1, 128, 14, 2, 64, 32
  q = jnp.zeros((B, T, Hq, D))
  k = v = jnp.zeros((B, T, Hkv, D))
  m = jnp.ones((B, T), jnp.int32)

  def loss(q, k, v):
    return flash_attention(q, k, v, m, m, m, block_q=blk, block_k=blk, backend=backend,
                           interpret=True).sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  grids = {e.params['name']: tuple(e.params['grid_mapping'].grid) for e in _pallas_calls(jaxpr)}
  assert len(grids) == 3, grids
  for name, grid in grids.items():
    assert grid[:2] == (B, Hkv), (name, grid)


# ------------------------------------------------------------------------ block classification

@pytest.mark.parametrize('bq,bk', [(16, 16), (32, 16), (16, 64)])
def test_block_classification_exact(bq, bk):
  """SKIP blocks have no allowed entry, FULL blocks only allowed entries (any metadata)."""
  rng = np.random.default_rng(bq * 100 + bk)
  kinds = {'packs': packs.random_batch(rng, 4, 512), 'vit': packs.vit_batch(rng, 4, 512),
           'unsorted': packs.unsorted_batch(rng, 4, 512)}
  meta = [np.concatenate([m[i] for m in kinds.values()]) for i in range(3)]   # one compile
  cls = np.asarray(classify_blocks(*meta, bq, bk))
  mask = np.asarray(attention_mask(*(jnp.asarray(x) for x in meta)))
  B, T, _ = mask.shape
  blocks = mask.reshape(B, T // bq, bq, T // bk, bk)
  any_allowed, all_allowed = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
  for n, name in enumerate(kinds):
    sl = slice(4 * n, 4 * n + 4)
    c, a_any, a_all = cls[sl], any_allowed[sl], all_allowed[sl]
    assert not np.any(a_any & (c == SKIP)), name
    assert np.all(a_all[c == FULL]), name
    if name != 'unsorted':
      # Tightness (performance, not correctness): on pack layouts no PARTIAL block is in fact
      # empty or full (observed exactly 0 for these seeds).
      partial = c == 1
      loose = int(np.sum(partial & (~a_any | a_all)))
      assert loose == 0, (name, loose, int(partial.sum()))
      assert np.mean(c == SKIP) > 0.5, name


def test_block_sparsity_fractions():
  rng = np.random.default_rng(11)
  meta = packs.realistic_batch(rng, 1, 16384, max_sample=4096)
  frac = {k: float(v) for k, v in block_sparsity(*meta, 128, 128).items()}
  assert abs(frac['skip'] + frac['partial'] + frac['full'] - 1.0) < 1e-6
  assert abs(frac['computed'] - frac['partial'] - frac['full']) < 1e-6
  assert frac['skip'] > 0.7, frac     # several samples per pack: mostly other samples' blocks
  # T not a multiple of the block: padded like the kernel (padding blocks are skipped).
  frac2 = {k: float(v) for k, v in block_sparsity(*(x[:, :16000] for x in meta), 128, 128).items()}
  assert abs(frac2['computed'] - frac['computed']) < 0.02, (frac, frac2)


def test_cost_estimate_counts_computed_blocks():
  """The pallas_calls' CostEstimate scales with the computed-block density."""
  B, T, Hq, Hkv, D, bq, bk = 1, 256, 4, 2, 64, 64, 64
  q = jnp.zeros((B, T, Hq, D))
  k = v = jnp.zeros((B, T, Hkv, D))
  m = jnp.zeros((B, T), jnp.int32)

  def flops(density):
    f = functools.partial(flash_attention, block_q=bq, block_k=bk, backend='generic',
                          interpret=True, density=density)
    jaxpr = jax.make_jaxpr(f)(q, k, v, m, m, m)
    ests = [e.params['cost_estimate'] for e in jaxpr.eqns if e.primitive.name == 'pallas_call']
    inner = [e for e in jaxpr.eqns if 'jaxpr' in e.params or 'call_jaxpr' in e.params]
    for e in inner:   # the custom_vjp call wraps the pallas_call
      sub = e.params.get('call_jaxpr', e.params.get('jaxpr'))
      sub = getattr(sub, 'jaxpr', sub)
      ests += [x.params['cost_estimate'] for x in sub.eqns if x.primitive.name == 'pallas_call']
    assert len(ests) == 1
    return ests[0].flops

  nblocks = (T // bq) * (T // bk)
  assert flops(1.0) == 4 * nblocks * bq * bk * D * Hq * B
  assert flops(0.25) == 4 * (nblocks // 4) * bq * bk * D * Hq * B


# ----------------------------------------------------------------------------- shard_map

_SHARD_MAP_SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import functools
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P, AxisType
    from tests.helpers import attention_packs as packs
    from unimedvl_jax.kernels.flash_attention import flash_attention
    from unimedvl_jax.model.attention import reference_attention
    assert jax.device_count() == 4
    mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    B, T, Hq, Hkv, D = 2, 160, 4, 2, 64
    meta = packs.random_batch(rng, B, T)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v, ct = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D), mk(B, T, Hq, D)
    hs, ms = P("data", None, "heads", None), P("data", None)

    def sharded(backend, interpret, check_vma, block):
      attn = functools.partial(flash_attention, block_q=block, block_k=block, backend=backend,
                               interpret=interpret)
      return jax.shard_map(attn, mesh=mesh, in_specs=(hs, hs, hs, ms, ms, ms), out_specs=hs,
                           check_vma=check_vma)

    def fwd_bwd(fn):
      def f(q, k, v, ct, seg, split, mode):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, split, mode), q, k, v)
        return out, vjp(ct)
      return jax.jit(f)

    # 1) Numbers, in interpret mode. jax 0.10's Pallas HLO interpreter cannot lower under
    #    check_vma=True (dynamic_slice of a varying operand by invariant grid indices), so the
    #    numeric run uses check_vma=False.
    out, grads = fwd_bwd(sharded("generic", True, False, 32))(q, k, v, ct, *meta)
    ref, rgrads = fwd_bwd(reference_attention)(q, k, v, ct, *meta)
    errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out,) + grads, (ref,) + rgrads)]
    print("ERRS", errs)
    assert max(errs) < 1e-4, errs
    assert out.sharding.is_equivalent_to(jax.NamedSharding(mesh, hs), 4), out.sharding

    # 2) Real-backend lowering with check_vma=True (the default): export forward + backward for
    #    CUDA (Triton kernels) and TPU (Mosaic kernels) from this CPU-only process.
    S = jax.ShapeDtypeStruct
    args = (S(q.shape, q.dtype), S(k.shape, k.dtype), S(v.shape, v.dtype), S(ct.shape, ct.dtype),
            *(S(x.shape, jnp.int32) for x in meta))
    unchecked = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
                 jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    for backend, platform, target, block in (("generic", "cuda", "xla.gpu.triton", 32),
                                             ("tpu", "tpu", "tpu_custom_call", 128)):
      exp = jax.export.export(fwd_bwd(sharded(backend, False, True, block)),
                              platforms=[platform], disabled_checks=unchecked)(*args)
      n = exp.mlir_module().count(target)
      print(platform, "kernels", n)
      assert n == 3, (platform, n)   # forward, dq, dk/dv

    # 3) The dispatcher on the project's mesh axes (data=2 x tensor=2): every kernel backend runs
    #    under sharding.shard_map_attention, with head-major inputs (head_axis=1) as well.
    from unimedvl_jax import sharding
    from unimedvl_jax.model.attention import attention
    pmesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    t = lambda x: x.transpose(0, 2, 1, 3)
    with sharding.use_mesh(pmesh):
      for impl, layout in (("pallas", "bhtd"), ("splash", "bhtd"), ("cudnn", "bthd")):
        args = (q, k, v) if layout == "bthd" else (t(q), t(k), t(v))
        got = jax.jit(lambda q, k, v, *m: attention(q, k, v, *m, impl=impl, layout=layout))(
            *args, *meta)
        got = got if layout == "bthd" else t(got)
        err = float(jnp.max(jnp.abs(got - ref)))
        print("DISPATCH", impl, layout, err)
        assert err < 1e-4, (impl, layout, err)
    print("SHARD_MAP_OK")
''')


def test_shard_map_batch_and_heads_sharded():
  """Under jax.shard_map on a (data=2, heads=2) mesh of fake CPU devices: fwd + grads match the
  reference (interpret mode), and the CUDA / TPU lowerings succeed with check_vma=True."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  env['JAX_PLATFORMS'] = 'cpu'
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, '-c', _SHARD_MAP_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, cwd=root)
  assert proc.returncode == 0 and 'SHARD_MAP_OK' in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-6000:])


# ------------------------------------------------------------------ accelerator lowerings

@pytest.mark.parametrize('layout', ['bthd', 'bhtd'])
def test_lowers_for_cuda_and_tpu_with_gqa7(layout):
  """From this CPU process, export forward + backward for CUDA (the generic kernels through the
  Triton lowering of jax 0.10) and for TPU (Mosaic), with the 7B grouping (G = 7, head dim 128):
  three kernel custom calls each (forward, dq, dk/dv). Splash (TPU) lowers as well."""
  from unimedvl_jax.kernels.splash import splash_attention
  B, T, Hq, Hkv, D = 1, 256, 7, 1, 128
  S = jax.ShapeDtypeStruct
  shape = lambda H: (B, T, H, D) if layout == 'bthd' else (B, H, T, D)
  args = (S(shape(Hq), jnp.bfloat16), S(shape(Hkv), jnp.bfloat16), S(shape(Hkv), jnp.bfloat16),
          *(S((B, T), jnp.int32),) * 3)
  unchecked = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton'),
               jax.export.DisabledSafetyCheck.custom_call('tpu_custom_call')]
  fns = {
      ('cuda', 'xla.gpu.triton'): functools.partial(flash_attention, backend='generic',
                                                    interpret=False, block_q=64, block_k=64),
      ('tpu', 'tpu_custom_call'): functools.partial(flash_attention, backend='tpu',
                                                    interpret=False, block_q=128, block_k=128),
      ('tpu', 'tpu_custom_call', 'splash'): functools.partial(splash_attention, block=128,
                                                              interpret=False),
  }
  for (platform, target, *_), attn in fns.items():
    attn = functools.partial(attn, layout=layout)
    loss = lambda q, k, v, a, b, c: jnp.sum(attn(q, k, v, a, b, c).astype(jnp.float32))
    exp = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
                            disabled_checks=unchecked)(*args)
    n = exp.mlir_module().count(target)
    assert n == 3, (platform, target, n)
