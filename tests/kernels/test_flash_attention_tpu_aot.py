"""TPU proof without TPU hardware: AOT-compile the Mosaic flash-attention kernels for a TPU topology.

With libtpu installed (the `aot` extra / requirements-aot.txt: `libtpu==0.0.42.1`, the version
jax[tpu]==0.10.2 pins),
`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices on a CPU-only machine,
and `jit(...).lower(...).compile()` runs the real Mosaic + XLA:TPU compilers. This checks that the
'tpu' backend lowers and compiles (forward and backward, GQA and the ViT head dim 72), and reads
the compiled cost and memory analyses: the kernels' CostEstimate is what XLA counts, and nothing
of size T x T is allocated.

Runs in a subprocess (libtpu is loaded once per process; JAX_PLATFORMS=cpu keeps the CPU backend
the default). Skipped when libtpu is not importable. For a local libtpu outside the venv, point
UNIMEDVL_LIBTPU_PATH at the directory that contains the `libtpu` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.libtpu import require_libtpu

TOPOLOGY = 'v5e:2x2'

_SCRIPT = textwrap.dedent('''
    import json, math, sys
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from unimedvl_jax.kernels.flash_attention import flash_attention
    from unimedvl_jax.kernels.splash import splash_attention

    topo = topologies.get_topology_desc(sys.argv[1], "tpu")
    dev = topo.devices[0]
    results = {"device_kind": dev.device_kind, "platform": dev.platform}

    def compile_case(name, B, T, Hq, Hkv, D, block, density, dtype=jnp.bfloat16, impl="flash",
                     layout="bthd", kinds=("fwd", "fwd_bwd")):
      sh = SingleDeviceSharding(dev)
      S = lambda s, d: jax.ShapeDtypeStruct(s, d, sharding=sh)
      shp = (lambda H: (B, T, H, D)) if layout == "bthd" else (lambda H: (B, H, T, D))
      args = (S(shp(Hq), dtype), S(shp(Hkv), dtype), S(shp(Hkv), dtype),
              S((B, T), jnp.int32), S((B, T), jnp.int32), S((B, T), jnp.int32))
      if impl == "flash":
        fa = lambda q, k, v, a, b, c: flash_attention(q, k, v, a, b, c, backend="tpu",
            interpret=False, block_q=block, block_k=block, density=density, layout=layout)
      else:
        fa = lambda q, k, v, a, b, c: splash_attention(q, k, v, a, b, c, block=block,
            interpret=False, layout=layout)
      loss = lambda *a: jnp.sum(fa(*a).astype(jnp.float32))
      fns = {"fwd": fa, "fwd_bwd": jax.grad(loss, argnums=(0, 1, 2))}
      out = {}
      for kind in kinds:
        fn = fns[kind]
        lowered = jax.jit(fn).lower(*args)
        hlo = lowered.as_text()
        compiled = lowered.compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
        out[kind] = {
            "mosaic_calls": hlo.count("tpu_custom_call"),
            "flops": float(cost.get("flops", -1)),
            "transcendentals": float(cost.get("transcendentals", -1)),
            "bytes_accessed": float(cost.get("bytes accessed", -1)),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
        }
      nb = math.ceil(density * (T // block) ** 2) * B        # computed blocks per head
      pair_flops = nb * block * block * D * Hq
      out["expected_flops"] = {"fwd": 4 * pair_flops, "dq": 6 * pair_flops, "dkv": 8 * pair_flops}
      out["shape"] = dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, block=block, density=density)
      results[name] = out

    compile_case("decoder_gqa7", B=1, T=8192, Hq=28, Hkv=4, D=128, block=512, density=0.25)
    compile_case("decoder_gqa7_head_major", B=1, T=8192, Hq=28, Hkv=4, D=128, block=512,
                 density=0.25, layout="bhtd", kinds=("fwd_bwd",))
    compile_case("splash_gqa7", B=1, T=8192, Hq=28, Hkv=4, D=128, block=512, density=0.25,
                 impl="splash", kinds=("fwd_bwd",))
    compile_case("vit_d72", B=1, T=2048, Hq=4, Hkv=4, D=72, block=256, density=0.5)
    print("AOT_RESULTS " + json.dumps(results))
''')


@pytest.mark.slow
def test_tpu_aot_compile_forward_backward():
  libtpu = require_libtpu()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', TPU_SKIP_MDS_QUERY='1', TPU_WORKER_ID='0',
             TPU_WORKER_HOSTNAMES='localhost', TPU_ACCELERATOR_TYPE='v5litepod-4',
             ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (libtpu, root, env.get('PYTHONPATH', '')) if p)
  proc = subprocess.run([sys.executable, '-c', _SCRIPT, TOPOLOGY], env=env,
                        capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('AOT_RESULTS ')]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-8000:]
  res = json.loads(lines[-1][len('AOT_RESULTS '):])
  print(json.dumps(res, indent=1))
  assert res['platform'] == 'tpu', res
  for name in ('decoder_gqa7', 'vit_d72'):
    case = res[name]
    s, exp = case['shape'], case['expected_flops']
    fwd, both = case['fwd'], case['fwd_bwd']
    assert fwd['mosaic_calls'] == 1 and both['mosaic_calls'] == 3, case   # fwd; fwd, dq, dkv
    # XLA:TPU counts the Pallas CostEstimate of each kernel (only computed blocks), plus the
    # small XLA ops around them (classification, delta): within 2% above the kernel estimate.
    assert exp['fwd'] <= fwd['flops'] <= 1.02 * exp['fwd'], (name, fwd, exp)
    total = exp['fwd'] + exp['dq'] + exp['dkv']
    assert total <= both['flops'] <= 1.02 * total, (name, both, exp)
    assert fwd['transcendentals'] > 0
    # No T x T buffer: temporaries stay far below one f32 [T, T] logits matrix per head.
    dense = 4 * s['T'] * s['T']
    assert fwd['temp_bytes'] < dense // 2, (name, fwd, dense)
    assert both['temp_bytes'] < dense // 2, (name, both, dense)
  # Head-major inputs: same kernels and FLOPs, fewer bytes moved (no K/V/Q layout copies).
  hm, tm = res['decoder_gqa7_head_major']['fwd_bwd'], res['decoder_gqa7']['fwd_bwd']
  assert hm['mosaic_calls'] == 3 and hm['flops'] == tm['flops'], (hm, tm)
  assert hm['bytes_accessed'] < tm['bytes_accessed'], (hm, tm)
  # Splash: three Mosaic kernels (no CostEstimate: XLA counts ~0 FLOPs for them); its dense
  # per-pack mask ([T/bq, T/bk] tiles of bq x bk, plus the transposed copy for dk/dv) is a
  # temporary of at least 2 T^2 bytes, which our kernel never allocates.
  sp = res['splash_gqa7']
  T = sp['shape']['T']
  assert sp['fwd_bwd']['mosaic_calls'] == 3, sp
  assert sp['fwd_bwd']['temp_bytes'] >= 2 * T * T, sp
  assert sp['fwd_bwd']['flops'] < 0.01 * res['decoder_gqa7']['fwd_bwd']['flops'], sp
