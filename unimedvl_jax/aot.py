"""AOT planning without hardware: compile the REAL training step for a TPU pod slice on this CPU.

    python -m unimedvl_jax.inspect --config configs/unimedvl_7b.py --topology v5p:4x4x4 \
        --config.model.attention_impl=pallas [--config.mesh.tensor=4 ...]

`plan(cfg, topology)` uses the libtpu wheel (`pip install 'jax[tpu]==0.10.2'`, which pins
`libtpu==0.0.42.1`) and `jax.experimental.topologies.get_topology_desc` to get abstract TPU
devices, builds the config's mesh over them (`sharding.make_mesh`, topology-aware device order),
and AOT-compiles exactly what `train.loop` runs: `step.make_train_step` + `step.jit_train_step`
on the abstract training state (`step.abstract_state`: fp32 masters, AdamW moments, EMA, frozen
tables) and an abstract packed batch of `batch.batch_spec(cfg)` (full pack: both experts, ViT,
VAE encode, CE + flow loss, grad-norm clip, EMA), with the config's attention implementation and
remat policy. The XLA:TPU compiler then does buffer assignment for the real chip, so the memory
numbers are the ones a pod would see (an out-of-memory compile is reported, not raised).

Environment. libtpu reads TPU_SKIP_MDS_QUERY=1, TPU_ACCELERATOR_TYPE, TPU_WORKER_ID=0 and
TPU_WORKER_HOSTNAMES=localhost when it loads; JAX_PLATFORMS=cpu keeps the CPU backend the default
(no TPU is attached). `prepare_env` sets all of them (setdefault) and must run before libtpu is
loaded; `unimedvl_jax.inspect` calls it before it imports jax when --topology is given.
ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set too, so several planning processes can run at once.

Attention dispatch. `model/attention.py` and the kernels pick the Pallas backend (and interpret
mode) from `jax.default_backend()`, which is 'cpu' in this process. While lowering, `plan`
answers 'tpu' to that question (a scoped patch of `jax.default_backend`), so
`attention_impl='pallas'|'auto'` lowers the Mosaic TPU flash-attention kernels, not interpret
mode. `attention_impl='xla'` lowers the reference attention (a dense [T, T] mask: it does not fit
at 20k tokens; that is reported as such).

What the returned dict holds (all memory numbers are per chip):
  fits            peak_memory_in_bytes <= the chip's usable HBM (or False when XLA:TPU refused
                  the program for lack of memory; then `oom` holds the compiler's numbers)
  fits_conservative  the same for arguments + outputs - aliased + temporaries + code (XLA's
                  temp_size is the whole temporary pool, larger than the live peak)
  memory          XLA's memory_analysis: argument / output / temp / alias / peak bytes; plus
                  `state_bytes` (sharded train state, computed from the shardings)
  hbm             the chip's HBM per generation (v4 32 GiB, v5e 16, v5p 95, v6e 32 GiB). The
                  runtime reserves a little of it (program binary, DMA/semaphore scratch; the
                  compiler's own limit is printed in its OOM message, e.g. 95.74G on v5p, 15.75G
                  on v5e); `fits` uses the table minus `reserved_gib` (0.5 GiB) to stay honest.
  flops           `analytic`: profiling.model_flops_per_step (global, the MFU numerator).
                  `compiled_per_chip`: FLOPs of the partitioned program of one chip, counted
                  from the optimized HLO: every dot/convolution (2 * output elements * contracted
                  size) and every Mosaic kernel's CostEstimate, each multiplied by the trip
                  counts of the while loops around it (scanned layers, CE chunks, micro-batches).
                  XLA's own cost_analysis counts a while body ONCE (scanned layers would be
                  counted once); it is reported raw as `xla_cost_analysis_raw` for reference.
                  `tests/scale/test_scale_aot.py` checks the HLO count against cost_analysis of
                  an unrolled (scan_layers=False) compile. Remat recomputation is included in the
                  compiled count (hardware FLOPs), not in the analytic one (model FLOPs).
  step_time       `compute_bound_s` = compiled_per_chip / chip peak (bf16 peak: v4 275, v5e 197,
                  v5p 459, v6e 918 TFLOP/s): a LOWER bound on the step time (no communication,
                  100% MXU use), and `mfu_upper_bound` = analytic / (chips * peak * that time) =
                  analytic / (chips * compiled_per_chip). `at_mfu` gives step times at 40% / 50%
                  MFU, the range large-model JAX trainers report on TPU.
  collectives     counts of all-gather / reduce-scatter / all-reduce / all-to-all /
                  collective-permute in the optimized HLO: `static` (instructions in the
                  program) and `per_step` (weighted by loop trip counts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any

from unimedvl_jax.batch import latent_cache_path, vae_downsample

# ------------------------------------------------------------------------------ chips

GIB = 1 << 30
TPU_CHIPS: dict[str, dict[str, Any]] = {
    # hbm_gib per chip, bf16 dense peak TFLOP/s per chip, Cloud accelerator-type prefix,
    # TensorCores per chip as counted in the accelerator-type suffix, torus dims
    'v4': dict(hbm_gib=32, peak_tflops=275, accel='v4', cores_in_name=2, dims=3),
    'v5e': dict(hbm_gib=16, peak_tflops=197, accel='v5litepod', cores_in_name=1, dims=2),
    'v5p': dict(hbm_gib=95, peak_tflops=459, accel='v5p', cores_in_name=2, dims=3),
    'v6e': dict(hbm_gib=32, peak_tflops=918, accel='v6e', cores_in_name=1, dims=2),
}
RESERVED_GIB = 0.5
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e', 'v6lite': 'v6e', 'v5': 'v5p'}
# standard slice shapes by chip count
_SHAPES_3D = {1: '1x1x1', 2: '1x2x1', 4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4',
              64: '4x4x4', 128: '4x4x8', 256: '4x8x8', 512: '8x8x8', 1024: '8x8x16',
              2048: '8x16x16', 4096: '16x16x16'}
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  generation: str          # v4 | v5e | v5p | v6e
  name: str                # get_topology_desc name, e.g. 'v5p:4x4x4'
  accelerator_type: str    # Cloud name, e.g. 'v5p-128'
  chips: int


def parse_topology(topology: str) -> TopologySpec:
  """'v5p:4x4x4' | 'v5p-128' | 'v5e:16x16' | 'v5e-256' | 'v5litepod-256' | 'v6e-256' | 'v4-64'.

  Cloud names count TensorCores for v4/v5p (2 per chip: v5p-128 = 64 chips = 4x4x4) and chips
  for v5e/v6e (v5e-256 = 16x16)."""
  t = topology.strip().lower()
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', t)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU_CHIPS:
      raise ValueError(f'topology {topology!r}: unknown TPU generation {m.group(1)!r}; '
                       f'known: {sorted(TPU_CHIPS)}')
    dims = [int(x) for x in m.group(2).split('x')]
    chips = math.prod(dims)
    info = TPU_CHIPS[gen]
    return TopologySpec(gen, f'{gen}:{m.group(2)}',
                        f'{info["accel"]}-{chips * info["cores_in_name"]}', chips)
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', t)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU_CHIPS:
      raise ValueError(f'topology {topology!r}: unknown TPU generation {m.group(1)!r}')
    info = TPU_CHIPS[gen]
    n = int(m.group(2))
    if n % info['cores_in_name']:
      raise ValueError(f'topology {topology!r}: {gen} names count {info["cores_in_name"]} '
                       f'cores per chip, {n} is not a multiple')
    chips = n // info['cores_in_name']
    shapes = _SHAPES_3D if info['dims'] == 3 else _SHAPES_2D
    if chips not in shapes:
      raise ValueError(f'topology {topology!r}: no standard {gen} slice of {chips} chips; '
                       f'give the shape, e.g. {gen}:{next(iter(shapes.values()))}')
    return TopologySpec(gen, f'{gen}:{shapes[chips]}', f'{info["accel"]}-{n}', chips)
  raise ValueError(f'topology {topology!r}: expected GEN:AxB[xC] (e.g. v5p:4x4x4) or a Cloud '
                   f'accelerator type (e.g. v5p-128, v5e-256)')


def prepare_env(topology: str | None = None) -> None:
  """Environment for libtpu on a machine without TPUs; call before jax loads libtpu."""
  env = os.environ
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.setdefault('TPU_SKIP_MDS_QUERY', '1')
  env.setdefault('TPU_WORKER_ID', '0')
  env.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  env.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if topology:
    env.setdefault('TPU_ACCELERATOR_TYPE', parse_topology(topology).accelerator_type)
  try:   # jax imported but no backend initialised yet: keep CPU the default backend
    import jax
    from jax._src import xla_bridge
    if not xla_bridge._backends and not jax.config.jax_platforms:  # noqa: SLF001
      jax.config.update('jax_platforms', 'cpu')
  except Exception:  # noqa: BLE001 - best effort; the env var covers a fresh process
    pass


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(spec: TopologySpec):
  from jax.experimental import topologies
  return topologies.get_topology_desc(spec.name, 'tpu').devices


@contextlib.contextmanager
def _target_backend(platform: str):
  """Makes code that asks `jax.default_backend()` while tracing see the AOT target platform."""
  import jax
  saved = jax.default_backend
  jax.default_backend = lambda: platform
  try:
    yield
  finally:
    jax.default_backend = saved


# ------------------------------------------------------------------------------ HLO analysis

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_SHAPE = re.compile(r'^\(?([a-z]+\d*)\[([\d,]*)\]')


def _split_type(s: str) -> tuple[str, str]:
  """'(f32[2], s32[]) while(...)...' -> (type, rest)."""
  s = s.lstrip()
  if s.startswith('('):
    depth = 0
    for i, ch in enumerate(s):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return s[:i + 1], s[i + 1:].lstrip()
  i = s.find(' ')
  return s[:i], s[i + 1:].lstrip()


def _dims(shape_text: str) -> list[int] | None:
  m = _SHAPE.match(shape_text.strip())
  if not m:
    return None
  return [int(x) for x in m.group(2).split(',') if x]


def _split_top(args: str) -> list[str]:
  out, depth, cur = [], 0, ''
  for ch in args:
    if ch in '({[':
      depth += 1
    elif ch in ')}]':
      depth -= 1
    if ch == ',' and depth == 0:
      out.append(cur.strip())
      cur = ''
    else:
      cur += ch
  if cur.strip():
    out.append(cur.strip())
  return out


def _call_args(rest: str) -> tuple[str, str]:
  """'op(args), attrs' -> (args, attrs) with balanced parentheses."""
  i = rest.find('(')
  depth = 0
  for j in range(i, len(rest)):
    depth += rest[j] == '('
    depth -= rest[j] == ')'
    if depth == 0:
      return rest[i + 1:j], rest[j + 1:]
  return rest[i + 1:], ''


@dataclasses.dataclass
class _Instr:
  name: str
  op: str
  out: str           # result type text
  operands: list     # operand names (or inline 'type %name' texts)
  attrs: str
  root: bool = False


def _operand_dims(operand: str, shapes: dict[str, str]) -> list[int] | None:
  d = _dims(operand)                       # printed inline: 'f32[4,8]{1,0} %a'
  if d is not None:
    return d
  name = operand.split()[-1].lstrip('%') if operand.split() else ''
  return _dims(shapes[name]) if name in shapes else None


def _window(attrs: str, n: int) -> list[dict[str, int]]:
  m = re.search(r'window=\{([^}]*)\}', attrs)
  dims = [dict(size=1, stride=1, lo=0, hi=0, lhs=1, rhs=1) for _ in range(n)]
  if not m:
    return dims
  for part in m.group(1).split():
    key, _, val = part.partition('=')
    vals = val.split('x')
    for i, v in enumerate(vals[:n]):
      if key == 'size':
        dims[i]['size'] = int(v)
      elif key == 'stride':
        dims[i]['stride'] = int(v)
      elif key == 'pad':
        lo, hi = v.split('_')
        dims[i]['lo'], dims[i]['hi'] = int(lo), int(hi)
      elif key == 'lhs_dilate':
        dims[i]['lhs'] = int(v)
      elif key == 'rhs_dilate':
        dims[i]['rhs'] = int(v)
  return dims


def _valid_positions(inp: int, ker: int, out: int, w: dict[str, int]) -> int:
  """Valid (output, kernel) position pairs of one spatial dim (XLA HloCostAnalysis rule)."""
  import numpy as np
  if (inp == out and ker == out and inp == w['lhs'] and w['rhs'] == 1
      and max(1, inp - 1) == w['stride'] and w['lo'] == 0 and w['hi'] == 0):
    return inp
  if (inp == 1 and ker == out and w['rhs'] == 1 and w['lhs'] == 1 and w['stride'] == 1
      and w['lo'] == out - 1 and w['hi'] == out - 1):
    return out
  o = np.arange(out, dtype=np.int64) * w['stride'] - w['lo']
  total = 0
  for k in range(ker):
    u = o + k * w['rhs']
    ok = (u % w['lhs'] == 0)
    li = u // w['lhs']
    total += int(np.sum(ok & (li >= 0) & (li < inp)))
  return total


def _conv_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  out = _dims(ins.out)
  if out is None or len(ins.operands) < 2:
    return 0.0
  lhs = _operand_dims(ins.operands[0], shapes)
  rhs = _operand_dims(ins.operands[1], shapes)
  m = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', ins.attrs)
  if lhs is None or rhs is None or not m:
    return 0.0
  ll, rl, ol = m.groups()
  spatial = sorted({c for c in ll if c.isdigit()})
  w = _window(ins.attrs, len(spatial))
  fg = re.search(r'feature_group_count=(\d+)', ins.attrs)
  bg = re.search(r'batch_group_count=(\d+)', ins.attrs)
  fg = int(fg.group(1)) if fg else 1
  bg = int(bg.group(1)) if bg else 1
  fma = (lhs[ll.index('f')] // fg) * out[ol.index('f')] * (lhs[ll.index('b')] // bg)
  for i, c in enumerate(spatial):
    fma *= _valid_positions(lhs[ll.index(c)], rhs[rl.index(c)], out[ol.index(c)], w[i])
  return 2.0 * fma


def _instr_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  if ins.op == 'dot':
    out = _dims(ins.out)
    lhs = _operand_dims(ins.operands[0], shapes) if ins.operands else None
    m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', ins.attrs)
    if out is None or lhs is None:
      return 0.0
    contract = [int(x) for x in m.group(1).split(',') if x] if m else []
    return 2.0 * math.prod(out) * math.prod(lhs[c] for c in contract)
  if ins.op == 'convolution':
    return _conv_flops(ins, shapes)
  if ins.op == 'custom-call':
    m = re.search(r'cost_estimate\\?"\s*:\s*\{\s*\\?"flops\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
    return float(m.group(1)) if m else 0.0
  return 0.0


def _parse_hlo(text: str):
  comps: dict[str, list[_Instr]] = {}
  shapes: dict[str, str] = {}
  entry = None
  cur = None
  for line in text.splitlines():
    if not line.strip() or line.startswith('HloModule'):
      continue
    if not line.startswith(' '):
      m = _HEADER.match(line)
      if m:
        cur = m.group(2)
        comps[cur] = []
        if m.group(1):
          entry = cur
      elif line.strip() == '}':
        cur = None
      continue
    if cur is None:
      continue
    s = line.strip()
    is_root = s.startswith('ROOT ')
    if is_root:
      s = s[5:]
    if ' = ' not in s:
      continue
    lhs, rhs = s.split(' = ', 1)
    name = lhs.strip().lstrip('%')
    out_type, rest = _split_type(rhs)
    mo = re.match(r'([\w\-]+)\(', rest)
    if not mo:
      continue
    args, attrs = _call_args(rest)
    shapes[name] = out_type
    comps[cur].append(_Instr(name, mo.group(1), out_type, _split_top(args), attrs, is_root))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, shapes, entry


def _trip_count(ins: _Instr, comps, by_name) -> int | None:
  """XLA's known_trip_count, else the jax scan pattern: cond = (counter < N), counter from 0."""
  m = re.search(r'known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
  if m:
    return int(m.group(1))
  mc = re.search(r'condition=%?([\w.\-]+)', ins.attrs)
  if not mc or mc.group(1) not in comps:
    return None
  cond = comps[mc.group(1)]
  consts = {i.name: i for i in cond if i.op == 'constant'}
  gtes = {i.name: i for i in cond if i.op == 'get-tuple-element'}
  root = cond[-1] if cond else None
  for i in cond:          # the ROOT is printed last in XLA's text; be tolerant anyway
    if i.op == 'compare':
      root = i
  if root is None or root.op != 'compare':
    return None
  d = re.search(r'direction=(\w+)', root.attrs)
  names = [o.split()[-1].lstrip('%') for o in root.operands]
  if len(names) != 2 or not d:
    return None
  a, b = names
  direction = d.group(1)
  if a in consts and b in gtes:
    a, b = b, a
    direction = {'GT': 'LT', 'GE': 'LE', 'LT': 'GT', 'LE': 'GE'}.get(direction, direction)
  if a not in gtes or b not in consts:
    return None
  mv = re.search(r'constant\((-?\d+)\)', f'constant({consts[b].operands[0]})'
                 if consts[b].operands else '')
  if not mv:
    return None
  limit = int(mv.group(1))
  idx = re.search(r'index=(\d+)', gtes[a].attrs)
  start = 0
  init = by_name.get(ins.operands[0].split()[-1].lstrip('%')) if ins.operands else None
  if init is not None and init.op == 'tuple' and idx:
    el = by_name.get(init.operands[int(idx.group(1))].split()[-1].lstrip('%'))
    if el is not None and el.op == 'constant' and el.operands:
      try:
        start = int(el.operands[0])
      except ValueError:
        start = 0
  step = _counter_step(ins, comps, by_name, int(idx.group(1)) if idx else None)
  if step is None or step <= 0:
    return None
  if direction == 'LT':
    return max(0, -(-(limit - start) // step))
  if direction == 'LE':
    return max(0, (limit - start) // step + 1)
  return None


def _counter_step(ins: _Instr, comps, by_name, idx: int | None) -> int | None:
  """The constant the loop body adds to tuple element `idx` (the counter) per iteration."""
  mb = re.search(r'body=%?([\w.\-]+)', ins.attrs)
  if idx is None or not mb or mb.group(1) not in comps:
    return None
  body = comps[mb.group(1)]
  roots = [i for i in body if i.root] or body[-1:]
  if not roots or roots[0].op != 'tuple' or idx >= len(roots[0].operands):
    return None
  name = lambda o: o.split()[-1].lstrip('%')
  upd = by_name.get(name(roots[0].operands[idx]))
  while upd is not None and upd.op in ('copy', 'bitcast') and upd.operands:
    upd = by_name.get(name(upd.operands[0]))
  if upd is None or upd.op != 'add' or len(upd.operands) != 2:
    return None
  for o in upd.operands:
    c = by_name.get(name(o))
    if c is not None and c.op == 'constant' and c.operands:
      try:
        return int(c.operands[0])
      except ValueError:
        return None
  return None


def analyze_hlo(text: str, *, breakdown: bool = False) -> dict[str, Any]:
  """Optimized HLO text -> matmul FLOPs and collective counts, weighted by loop trip counts.

  Every computation's multiplicity is the sum over its call sites of the caller's multiplicity
  times the trip count for `while` bodies/conditions (XLA's `known_trip_count`, else the
  `counter < N` pattern of the condition; 1 and counted in `unknown_trip_counts` otherwise) and
  1 for fusions, calls, conditionals and async wrappers. FLOPs follow XLA's HloCostAnalysis for
  dot and convolution (2 per multiply-add, only valid window positions), and each Mosaic
  kernel's CostEstimate for TPU custom calls.
  """
  comps, shapes, entry = _parse_hlo(text)
  by_name = {i.name: i for instrs in comps.values() for i in instrs}
  edges: dict[str, list[tuple[str, float]]] = {c: [] for c in comps}
  unknown = 0
  trips = []
  for c, instrs in comps.items():
    for ins in instrs:
      if ins.op == 'while':
        n = _trip_count(ins, comps, by_name)
        if n is None:
          unknown += 1
          n = 1
        trips.append(n)
        for key in ('body', 'condition'):
          mm = re.search(rf'{key}=%?([\w.\-]+)', ins.attrs)
          if mm and mm.group(1) in comps:
            edges[c].append((mm.group(1), float(n)))
        continue
      for mm in re.finditer(r'(?:calls|to_apply|called_computations|branch_computations|'
                            r'true_computation|false_computation)=\{?([%\w.\-, ]+)\}?',
                            ins.attrs):
        for name in mm.group(1).split(','):
          name = name.strip().lstrip('%')
          if name in comps:
            edges[c].append((name, 1.0))

  order: list[str] = []
  seen: set[str] = set()
  stack = [(entry, False)]
  while stack:                 # iterative post-order DFS (callees before callers)
    c, done = stack.pop()
    if done:
      order.append(c)
      continue
    if c in seen:
      continue
    seen.add(c)
    stack.append((c, True))
    for d, _ in edges.get(c, ()):
      if d not in seen:
        stack.append((d, False))
  mult: dict[str, float] = {c: 0.0 for c in comps}
  mult[entry] = 1.0
  for c in reversed(order):    # callers before callees
    for d, n in edges.get(c, ()):
      mult[d] += mult[c] * n

  flops = 0.0
  flops_custom = 0.0
  by_op: dict[str, float] | None = {} if breakdown else None
  coll_by_op: dict[str, float] = {}
  static = {k: 0 for k in COLLECTIVES}
  per_step = {k: 0.0 for k in COLLECTIVES}
  for c, instrs in comps.items():
    w = mult.get(c, 0.0)
    for ins in instrs:
      op = ins.op
      base = op[:-6] if op.endswith('-start') else op
      if base in static and not op.endswith('-done'):
        static[base] += 1
        per_step[base] += w
      if w:
        f = _instr_flops(ins, shapes)
        if op == 'custom-call':
          flops_custom += w * f
        flops += w * f
        if f and by_op is not None:
          m = re.search(r'op_name="([^"]*)"', ins.attrs)
          key = _op_key(m.group(1) if m else f'<{op}>')
          by_op[key] = by_op.get(key, 0.0) + w * f
        if base in static and by_op is not None and not op.endswith('-done'):
          m = re.search(r'op_name="([^"]*)"', ins.attrs)
          key = f'{base} @ {_op_key(m.group(1)) if m else "?"}'
          coll_by_op[key] = coll_by_op.get(key, 0.0) + w
  out = {'flops': flops, 'flops_custom_calls': flops_custom,
          'collectives': {'static': static, 'per_step': {k: int(v) for k, v in per_step.items()}},
          'while_trip_counts': sorted(trips), 'unknown_trip_counts': unknown,
          'computations': len(comps)}
  if by_op is not None:
    out['flops_by_op'] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    out['collectives_by_op'] = dict(sorted(coll_by_op.items(), key=lambda kv: -kv[1]))
  return out


def _op_key(op_name: str) -> str:
  """'jit(wrapped)/while/body/closed_call/jvp()/dot_general' -> 'while/jvp()/dot_general'."""
  parts = [p for p in op_name.split('/') if p not in ('jit(wrapped)', 'body', 'closed_call')]
  return '/'.join(parts[-4:])


# ------------------------------------------------------------------------------ the plan

def _is_oom(msg: str) -> bool:
  m = msg.lower()
  return ('resource_exhausted' in m or 'out of memory' in m or 'exceeds' in m
          or 'ran out of memory' in m)


def _oom_numbers(msg: str) -> dict[str, Any]:
  """Parses XLA:TPU's 'Used 120.5G of 95.74G hbm. Exceeded hbm capacity by 24.8G.'"""
  out: dict[str, Any] = {}
  unit = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
  m = re.search(r'Used\s+([\d.]+)([KMGT])\s+of\s+([\d.]+)([KMGT])\s+(\w+)', msg)
  if m:
    out['used_bytes'] = int(float(m.group(1)) * unit[m.group(2)])
    out['capacity_bytes'] = int(float(m.group(3)) * unit[m.group(4)])
    out['memory_space'] = m.group(5)
  m = re.search(r'Exceeded\s+\w+\s+capacity\s+by\s+([\d.]+)([KMGT])', msg)
  if m:
    out['exceeded_by_bytes'] = int(float(m.group(1)) * unit[m.group(2)])
  # 'the total memory required for HLO temporaries (24.35G) exceeds available HBM (15.75G)'
  m = re.search(r'required for ([\w ]+?)\s*\(([\d.]+)([KMGT])\)\s*exceeds available\s+(\w+)\s*'
                r'\(([\d.]+)([KMGT])\)', msg)
  if m:
    out['required_for'] = m.group(1)
    out['used_bytes'] = int(float(m.group(2)) * unit[m.group(3)])
    out['capacity_bytes'] = int(float(m.group(5)) * unit[m.group(6)])
    out['memory_space'] = m.group(4)
  first = [l for l in msg.splitlines() if l.strip()]
  out['message'] = ' '.join(first[:3])[:600]
  return out


def compile_or_oom(lowered):
  """(compiled, None), or (None, numbers) when XLA refuses the program for lack of memory
  (RESOURCE_EXHAUSTED / 'Ran out of memory' / '... exceeds ...'); other errors propagate."""
  try:
    return lowered.compile(), None
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError (jaxlib) and friends
    msg = str(e)
    if not _is_oom(msg):
      raise
    return None, _oom_numbers(msg)


def conservative_bytes(mem: dict) -> int:
  """arguments + outputs - aliased (donated) + temporaries + generated code."""
  return int(mem.get('argument_size_in_bytes', 0) + mem.get('output_size_in_bytes', 0)
             - mem.get('alias_size_in_bytes', 0) + mem.get('temp_size_in_bytes', 0)
             + mem.get('generated_code_size_in_bytes', 0))


def _first_lm_stage(cfg):
  for name in cfg.stages:
    if cfg.curriculum[name].get('kind', 'lm') == 'lm':
      return name
  return None


def state_bytes_per_chip(abstract, shardings) -> int:
  """Bytes of the sharded training state held by one chip (the largest shard per leaf)."""
  import jax
  import numpy as np
  leaves = jax.tree.leaves(abstract)
  shs = jax.tree.leaves(shardings)
  if len(leaves) != len(shs):
    raise ValueError(f'state has {len(leaves)} leaves but {len(shs)} shardings')
  total = 0
  for x, s in zip(leaves, shs):
    total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
  return int(total)


def attention_impl_resolved(cfg) -> str:
  from unimedvl_jax.model import attention as attn_lib
  return attn_lib.resolve_impl(cfg.model.attention_impl)


def plan(cfg, topology: str, *, stage: str | None = None, reserved_gib: float = RESERVED_GIB,
         adjust_batch: bool = True, hlo_path: str | None = None) -> dict[str, Any]:
  """AOT-compiles the training step of `cfg` for a TPU `topology`; see the module docstring.

  stage: the curriculum stage whose train settings (freeze, loss weights) are used; default the
  first 'lm' stage (or the plain `train` settings without a curriculum).
  adjust_batch: when data.batch_size is not a multiple of the batch-sharding axes
  (data * fsdp), round it up to the next multiple (reported as `batch.adjusted_from`).
  hlo_path: also write the optimized HLO text there.
  """
  spec = parse_topology(topology)
  prepare_env(topology)
  import jax
  from unimedvl_jax import batch as batch_lib
  from unimedvl_jax import profiling, sharding
  from unimedvl_jax.config import stage_train_config, validate
  from unimedvl_jax.train import step as step_lib

  if not libtpu_available():
    raise RuntimeError("AOT planning needs libtpu: pip install 'jax[tpu]==0.10.2' "
                       '(pins libtpu==0.0.42.1)')
  cfg = validate(cfg.copy_and_resolve_references())
  t0 = time.perf_counter()
  devices = topology_devices(spec)
  chip = TPU_CHIPS[spec.generation]
  per_chip = max(1, len(devices) // spec.chips)       # devices per chip (v4 may list cores)
  hbm = chip['hbm_gib'] * GIB / per_chip
  peak = chip['peak_tflops'] * 1e12 / per_chip
  mesh = sharding.make_mesh(cfg.mesh, devices)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  B0 = int(cfg.data.batch_size)
  if B0 % shards:
    if not adjust_batch:
      raise ValueError(f'config.data.batch_size={B0} is not a multiple of data*fsdp={shards}')
    cfg.data.batch_size = -(-B0 // shards) * shards
  stage = stage if stage is not None else _first_lm_stage(cfg)
  tc = stage_train_config(cfg, stage)

  graphdef, abstract = step_lib.abstract_state(cfg)
  fn = step_lib.make_train_step(graphdef, cfg, tc, objective='lm')
  bspec = batch_lib.batch_spec(cfg)
  jitted, st_sh, b_sh = step_lib.jit_train_step(fn, abstract, mesh, bspec)
  abatch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in bspec.items()}
  flops_model = profiling.model_flops_per_step(cfg, frozen=tuple(tc.freeze))
  counts = profiling.param_counts(cfg.model)

  out: dict[str, Any] = {
      'topology': spec.name, 'accelerator_type': spec.accelerator_type,
      'generation': spec.generation, 'chips': spec.chips, 'devices': len(devices),
      'device_kind': devices[0].device_kind,
      'mesh': dict(mesh.shape),
      'model': {'params_total': counts['total'], 'vae_params': counts['vae'],
                'attention_impl': cfg.model.attention_impl, 'remat': cfg.model.remat,
                'scan_layers': bool(cfg.model.scan_layers), 'dtype': cfg.model.dtype,
                'freeze': list(tc.freeze), 'stage': stage},
      'batch': {'batch_size': int(cfg.data.batch_size), 'packs_per_chip':
                int(cfg.data.batch_size) / shards, 'seq_len': int(cfg.data.seq_len),
                'max_latent_tokens': int(cfg.data.max_latent_tokens),
                'max_vit_patches': int(cfg.data.max_vit_patches),
                'max_vae_images': int(cfg.data.max_vae_images),
                'vae_buckets': [list(b) for b in batch_lib.Geometry.from_config(cfg).vae_buckets],
                'max_label_tokens': int(batch_lib.Geometry.from_config(cfg).labels),
                'latent_cache': bool(latent_cache_path(cfg.data)),
                'grad_accum': int(tc.grad_accum),
                'tokens_per_step': int(cfg.data.batch_size) * int(cfg.data.seq_len)},
      'hbm': {'per_chip_gib': chip['hbm_gib'], 'per_device_bytes': int(hbm),
              'reserved_gib': reserved_gib,
              'usable_bytes': int(hbm - reserved_gib * GIB / per_chip)},
      'peak_tflops_per_chip': chip['peak_tflops'],
  }
  if int(cfg.data.batch_size) != B0:
    out['batch']['adjusted_from'] = B0
  out['memory'] = {'state_bytes': state_bytes_per_chip(abstract, st_sh)}

  out['notes'] = []
  with _target_backend('tpu'):
    lowered = jitted.lower(abstract, abatch)
  t1 = time.perf_counter()
  out['lower_seconds'] = round(t1 - t0, 1)
  compiled, oom = compile_or_oom(lowered)
  if compiled is None:
    out['compile_seconds'] = round(time.perf_counter() - t1, 1)
    out['fits'] = False
    out['oom'] = oom
    out['flops'] = {'analytic': flops_model['train']}
    return out
  out['compile_seconds'] = round(time.perf_counter() - t1, 1)
  mem = profiling.compiled_memory(compiled)
  out['memory'].update(mem)
  peak_bytes = mem.get('peak_memory_in_bytes')
  if not peak_bytes:   # older runtimes: arguments + outputs + temporaries - aliased
    peak_bytes = (mem.get('argument_size_in_bytes', 0) + mem.get('output_size_in_bytes', 0)
                  + mem.get('temp_size_in_bytes', 0) - mem.get('alias_size_in_bytes', 0))
    out['memory']['peak_estimated'] = True
  out['memory']['peak_gib'] = round(peak_bytes / GIB, 2)
  out['fits'] = bool(peak_bytes <= out['hbm']['usable_bytes'])
  # a conservative total: every argument, non-aliased output, the whole temp pool and the code
  cons = conservative_bytes(mem)
  out['memory']['conservative_bytes'] = cons
  out['fits_conservative'] = bool(cons <= out['hbm']['usable_bytes'])

  text = compiled.as_text()
  if hlo_path:
    os.makedirs(os.path.dirname(hlo_path) or '.', exist_ok=True)
    with open(hlo_path, 'w') as f:
      f.write(text)
  out['flops'] = {'analytic': flops_model['train'],
                  'analytic_breakdown': {k: v for k, v in flops_model.items()
                                         if k.startswith('fwd_')},
                  'xla_cost_analysis_raw': profiling.compiled_cost(compiled)['flops']}
  update_from_hlo(out, text)
  return out


def update_from_hlo(out: dict[str, Any], text: str) -> dict[str, Any]:
  """Fills out['flops'] (compiled), out['step_time'] and out['collectives'] from optimized HLO."""
  hlo = analyze_hlo(text)
  n_dev = int(out['devices'])
  per_dev = max(1, n_dev // int(out['chips']))
  peak = TPU_CHIPS[out['generation']]['peak_tflops'] * 1e12 / per_dev
  per_chip_flops = hlo['flops']
  fl = out.setdefault('flops', {})
  analytic = fl['analytic']
  fl.update({
      'compiled_per_chip': per_chip_flops,
      'compiled_total': per_chip_flops * n_dev,
      'compiled_custom_calls_per_chip': hlo['flops_custom_calls'],
      'compiled_over_analytic': per_chip_flops * n_dev / analytic if analytic else None,
      'while_trip_counts': hlo['while_trip_counts'],
      'unknown_trip_counts': hlo['unknown_trip_counts'],
      'method': 'optimized-HLO dot/convolution (XLA HloCostAnalysis rule) + Mosaic '
                'CostEstimate FLOPs, x while-loop trip counts',
  })
  t_compute = per_chip_flops / peak if per_chip_flops else None
  out['step_time'] = {
      'compute_bound_s': t_compute,
      'mfu_upper_bound': analytic / (n_dev * per_chip_flops) if per_chip_flops else None,
      'at_mfu': {f'{p:.2f}': analytic / (n_dev * peak * p) for p in (0.4, 0.5)},
      'tokens_per_s_per_chip_at_bound': (out['batch']['tokens_per_step'] / n_dev / t_compute
                                         if t_compute else None),
  }
  out['collectives'] = hlo['collectives']
  return out


# ------------------------------------------------------------------------- inference plans

def _parse_mesh(mesh: str | dict | None, chips_or_devices: int) -> dict[str, int]:
  """'data=1,tensor=8' (axes not named are 1; one may be -1) -> {'data', 'fsdp', 'tensor'}."""
  if mesh is None:
    return {'data': 1, 'fsdp': 1, 'tensor': -1}
  if isinstance(mesh, str):
    out = {}
    for part in mesh.split(','):
      k, _, v = part.partition('=')
      if k.strip() not in ('data', 'fsdp', 'tensor') or not v.strip().lstrip('-').isdigit():
        raise ValueError(f'mesh {mesh!r}: expected e.g. data=1,tensor=8 (axes data, fsdp, '
                         f'tensor)')
      out[k.strip()] = int(v)
    mesh = out
  return {a: int(mesh.get(a, 1)) for a in ('data', 'fsdp', 'tensor')}


def _with_shardings(tree, shardings):
  """Abstract arrays (a pytree of ShapeDtypeStruct / arrays, nnx Variables kept) with the given
  NamedShardings attached, for `.lower`."""
  import jax
  from flax import nnx

  def one(x, s):
    if isinstance(x, nnx.Variable):
      v = x.get_value()
      return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def plan_generation(cfg, topology: str, *, image_size: int = 1024, batch: int = 1,
                    prompt_tokens: int = 128, mesh: str | dict | None = None,
                    param_dtype: str | None = None, reserved_gib: float = RESERVED_GIB,
                    hlo_path: str | None = None) -> dict[str, Any]:
  """AOT-compiles ONE guided text-to-image flow step for a TPU `topology` (libtpu, no TPUs) and
  reports its per-chip memory: what every step of `infer.image.generate_latents` runs (the
  prepared model, the full and "cfg_text" contexts batched into one model call, the noise block
  of image_size^2 / 16^2 latent tokens per request). The sampler's fori_loop only carries the
  latents between such steps, so its peak is this step's peak.

  The weights are the prepared model's (per-layer decoder modules, infer/context.py) in
  `param_dtype` (default the config's: fp32 masters, as a checkpoint loads) sharded by
  sharding.py's rules on the ('data', 'fsdp', 'tensor') mesh (`mesh`, default all chips on
  'tensor'); the contexts' rows over the batch axes, their kv heads over 'tensor' (dropped when
  it does not divide the kv heads). Requests: `batch` prompts of `prompt_tokens` text tokens.
  """
  spec = parse_topology(topology)
  prepare_env(topology)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from ml_collections import ConfigDict
  from unimedvl_jax import profiling, sharding
  from unimedvl_jax.config import validate
  from unimedvl_jax.infer import context as C
  from unimedvl_jax.infer import image as I
  from unimedvl_jax.model.unimedvl import UniMedVL

  if not libtpu_available():
    raise RuntimeError("AOT planning needs libtpu: pip install 'jax[tpu]==0.10.2' "
                       '(pins libtpu==0.0.42.1)')
  cfg = cfg.copy_and_resolve_references()
  if param_dtype:
    cfg.model.param_dtype = param_dtype
  cfg = validate(cfg)
  t0 = time.perf_counter()
  devices = topology_devices(spec)
  chip = TPU_CHIPS[spec.generation]
  per_chip = max(1, len(devices) // spec.chips)
  hbm = chip['hbm_gib'] * GIB / per_chip
  mesh_axes = _parse_mesh(mesh, len(devices))
  mesh_obj = sharding.make_mesh(ConfigDict(mesh_axes), devices)
  px = vae_downsample(cfg.model) * int(cfg.model.latent_patch_size)
  if image_size % px:
    raise ValueError(f'image_size {image_size} is not a multiple of {px} pixels')
  g = image_size // px
  if g > int(cfg.model.max_latent_size):
    raise ValueError(f'a {image_size}px image needs a {g}x{g} latent grid, over '
                     f'model.max_latent_size ({cfg.model.max_latent_size})')

  abstract = nnx.eval_shape(lambda: UniMedVL(cfg.model, rngs=nnx.Rngs(0)))
  p = C.prepare(abstract)                                 # abstract per-layer modules
  st_sh = sharding.state_shardings(p.state, mesh_obj)
  state = _with_shardings(p.state, st_sh)
  sp = C.Specials(3, 4, 5, 6)
  cap = C.bucket(prompt_tokens + 2, 64)
  ctx0 = jax.eval_shape(lambda: C.new_context(p, batch, cap))
  ctx = _with_shardings(ctx0, C.context_shardings(ctx0, mesh_obj))
  settings = I.TEXT_TO_IMAGE                               # s_text 4: full + cfg_text contexts
  bld = C.make_builder(p, batch, sp)
  for r in range(batch):
    bld.noise_image(r, np.zeros((g * g, bld.latent_dim), np.float32), (g, g))
  blk0 = bld.build()
  rows = lambda a: jax.sharding.NamedSharding(mesh_obj, sharding.logical_to_spec(
      ('batch',) + (None,) * (a.ndim - 1), a.shape, mesh_obj))
  blk = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows(a)), blk0)
  x = jax.ShapeDtypeStruct(blk0.lat_x.shape, jnp.float32, sharding=rows(blk0.lat_x))
  t = jax.ShapeDtypeStruct((), jnp.float32)
  counts = profiling.param_counts(cfg.model)
  out: dict[str, Any] = {
      'kind': 'text_to_image_flow_step',
      'topology': spec.name, 'accelerator_type': spec.accelerator_type,
      'generation': spec.generation, 'chips': spec.chips, 'devices': len(devices),
      'device_kind': devices[0].device_kind, 'mesh': dict(mesh_obj.shape),
      'model': {'params_total': counts['total'], 'param_dtype': cfg.model.param_dtype,
                'dtype': cfg.model.dtype, 'decoder_layers': 'per-layer (prepared)'},
      'request': {'batch': batch, 'image_size': image_size, 'latent_tokens': g * g,
                  'prompt_tokens': prompt_tokens, 'context_capacity': cap,
                  'contexts': 2, 'cfg': 'batched (one model call per step)',
                  'rows_per_model_call': 2 * batch},
      'hbm': {'per_chip_gib': chip['hbm_gib'], 'per_device_bytes': int(hbm),
              'reserved_gib': reserved_gib,
              'usable_bytes': int(hbm - reserved_gib * GIB / per_chip)},
      'memory': {'weights_bytes': state_bytes_per_chip(state, st_sh),
                 'contexts_bytes': 2 * state_bytes_per_chip(ctx, C.context_shardings(ctx0,
                                                                                     mesh_obj))},
  }
  # keep_unused: every weight is an argument (the ViT / VAE weights the step does not read stay
  # resident during generation), so XLA's argument and peak bytes are the process's per chip
  step = I._step_velocity_jit
  jitted = jax.jit(step.fun, static_argnums=step.static_argnums, keep_unused=True)
  with sharding.use_mesh(mesh_obj), _target_backend('tpu'):
    lowered = jitted.lower(p.static, state, (ctx, ctx), blk, x, t, settings, True)
  t1 = time.perf_counter()
  out['lower_seconds'] = round(t1 - t0, 1)
  compiled, oom = compile_or_oom(lowered)
  out['compile_seconds'] = round(time.perf_counter() - t1, 1)
  if compiled is None:
    out['fits'] = False
    out['oom'] = oom
    return out
  mem = profiling.compiled_memory(compiled)
  out['memory'].update(mem)
  peak = mem.get('peak_memory_in_bytes') or (
      mem.get('argument_size_in_bytes', 0) + mem.get('output_size_in_bytes', 0)
      + mem.get('temp_size_in_bytes', 0) - mem.get('alias_size_in_bytes', 0))
  out['memory']['peak_gib'] = round(peak / GIB, 2)
  out['memory']['conservative_bytes'] = conservative_bytes(mem)
  out['fits'] = bool(peak <= out['hbm']['usable_bytes'])
  out['fits_conservative'] = bool(conservative_bytes(mem) <= out['hbm']['usable_bytes'])
  text = compiled.as_text()
  if hlo_path:
    os.makedirs(os.path.dirname(hlo_path) or '.', exist_ok=True)
    with open(hlo_path, 'w') as f:
      f.write(text)
  hlo = analyze_hlo(text)
  out['flops_per_chip'] = hlo['flops']
  out['collectives'] = hlo['collectives']
  return out


def gpu_offline_compile_check() -> dict[str, Any]:
  """Whether this jax can describe / compile for CUDA GPUs without one (an AOT topology for
  platform 'cuda' needs the jax CUDA plugin). Returns {'available': bool, 'reason': str}."""
  import importlib.util
  import jax
  plugins = [m for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
                         'jax_plugins.xla_cuda13')
             if _find_spec(m, importlib.util)]
  try:
    from jax.experimental import topologies
    topologies.get_topology_desc('8xH100', 'cuda')
  except Exception as e:  # noqa: BLE001 - report why
    return {'available': False, 'cuda_plugins_found': plugins, 'jax': jax.__version__,
            'reason': f'{type(e).__name__}: {str(e)[:400]}'}
  return {'available': True, 'cuda_plugins_found': plugins, 'jax': jax.__version__,
          'reason': 'get_topology_desc(platform="cuda") works'}


def _find_spec(name, util):
  try:
    return util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False
