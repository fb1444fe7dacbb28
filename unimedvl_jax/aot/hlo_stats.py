"""Statistics of optimized HLO text: matmul / convolution / Mosaic-kernel FLOPs and collective
counts, each weighted by the trip counts of the while loops around it (`analyze_hlo`)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

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
