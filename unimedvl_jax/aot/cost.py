"""Per-chip FLOPs / bytes of a step whose layer stacks run as a scan, from XLA's cost_analysis.

XLA's cost_analysis counts a while body ONCE, so a scanned stack of L layers is counted as one
layer. `scaled_cost` therefore takes cost_analysis of UNROLLED variants of the step (the layers a
python loop, model.scan_layers=False) with 1 layer in every stack, and with 2 layers in one stack
at a time, and scales linearly:

    total = c(1, 1, ...) + sum over stacks s of (L_s - 1) * (c(.., 2 at s, ..) - c(1, 1, ...))

which is exact when the unrolled layers of a stack compile to the same operations (every layer
adds the same matmuls, elementwise work, optimizer and EMA update); tests/scale/test_scale_aot.py
checks it against cost_analysis of the fully unrolled step. Remat recomputation is included
(the compiled program's hardware FLOPs).

The variants also unroll the VAE's chunked mid-block attention (model.unroll_loops). Loops that
remain (the 'blocked' XLA attention's data-dependent loop, when a plan selects it) are still
counted once by cost_analysis: the 1-layer variant's while loops (hlo_stats) are reported as
`loops_counted_once`, except loops that carry no floating-point values (the
RNG's threefry rounds: integer hashing), so a non-empty list says the estimate is low.
"""

from __future__ import annotations

from typing import Any, Callable

from unimedvl_jax.aot.hlo_stats import analyze_hlo
from unimedvl_jax.profiling import COST_KEYS, cost_analysis  # noqa: F401  (re-exported)

# cost_analysis keys scaled, and their names in the result
def scaled_cost(variant_cost: Callable[[dict[str, int]], tuple[dict[str, float], str] | None],
                layers: dict[str, int]) -> dict[str, Any] | None:
  """Scaled cost_analysis of a step with layer stacks `layers` ({stack: L}, e.g. {'llm': 28,
  'vit': 26}); see the module docstring.

  variant_cost({stack: n}) -> (`cost_analysis` of the UNROLLED step with n layers per stack,
  its HLO text), or None when it could not be compiled (e.g. out of memory: then the result is
  None). Stacks with L == 1 need no 2-layer variant.
  Returns {'flops', 'bytes_accessed', 'transcendentals'} of the full step, `per_layer`
  ({stack: the same keys for one more layer}), `variants` (the cost of each variant, keyed
  'stack=n,...') and `loops_counted_once` ([{'trips', 'op_name'}]).
  """
  base = {s: 1 for s in layers}
  key = lambda v: ','.join(f'{s}={n}' for s, n in v.items())
  got = variant_cost(base)
  if got is None:
    return None
  c1, text = got
  out: dict[str, Any] = dict(c1)
  out['per_layer'] = {}
  out['variants'] = {key(base): c1}
  for s, n in layers.items():
    if n <= 1:
      continue
    v = {**base, s: 2}
    got = variant_cost(v)
    if got is None:
      return None
    c2 = got[0]
    out['variants'][key(v)] = c2
    out['per_layer'][s] = {k: c2[k] - c1[k] for k in c1}
    for k in c1:
      out[k] += (n - 1) * (c2[k] - c1[k])
  out['loops_counted_once'] = loops_counted_once(text)
  return out


def loops_counted_once(hlo_text: str) -> list[dict[str, Any]]:
  """The while loops of `hlo_text` ([{'trips', 'op_name'}]) whose bodies cost_analysis counts
  once, leaving out loops that carry no floating-point values (the RNG's threefry rounds)."""
  return [{'trips': l['trips'], 'op_name': l['op_name']}
          for l in analyze_hlo(hlo_text)['while_loops'] if l['float']]
