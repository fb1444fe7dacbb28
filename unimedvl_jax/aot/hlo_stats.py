"""Collective counts of optimized HLO text, weighted by the trip counts of the while loops around
them (`analyze_hlo`), and those trip counts.

FLOPs and bytes are NOT counted here: they come from XLA's cost_analysis of unrolled 1- and
2-layer variants of the step, scaled to the full depth (aot/cost.py). What cost_analysis cannot
give is kept: the collectives by kind (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute) in the program (`static`) and per step (`per_step`, each weighted by the
multiplicity of its computation: the trip counts of the scanned layers, micro-batches, chunked
loops around it), and the trip counts of the while loops (cost.py reports those left in a
variant, which cost_analysis counts once).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

# ------------------------------------------------------------------------------ HLO analysis

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

# a computation's first line: '[ENTRY ]%name (params) -> type {' (compiled), 'name {' (lowered)
_FLOAT = re.compile(r'\b(?:f\d+|bf16|f8\w*)\[')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$')


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


def _parse_hlo(text: str):
  comps: dict[str, list[_Instr]] = {}
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
    comps[cur].append(_Instr(name, mo.group(1), out_type, _split_top(args), attrs, is_root))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


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
  """Optimized HLO text -> collective counts weighted by loop trip counts, and the trip counts.

  Every computation's multiplicity is the sum over its call sites of the caller's multiplicity
  times the trip count for `while` bodies/conditions (XLA's `known_trip_count`, else the
  `counter < N` pattern of the condition; 1 and counted in `unknown_trip_counts` otherwise) and
  1 for fusions, calls, conditionals and async wrappers. `while_loops`: each loop's trip count,
  jax op name and whether its carry holds floating-point values (`float`). breakdown: also
  `collectives_by_op` (per-step counts by kind and op name).
  """
  comps, entry = _parse_hlo(text)
  by_name = {i.name: i for instrs in comps.values() for i in instrs}
  edges: dict[str, list[tuple[str, float]]] = {c: [] for c in comps}
  unknown = 0
  trips = []
  loops = []
  for c, instrs in comps.items():
    for ins in instrs:
      if ins.op == 'while':
        n = _trip_count(ins, comps, by_name)
        if n is None:
          unknown += 1
          n = 1
        trips.append(n)
        m = re.search(r'op_name="([^"]*)"', ins.attrs)
        loops.append({'trips': n, 'op_name': m.group(1) if m else '',
                      'float': bool(_FLOAT.search(ins.out))})
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

  coll_by_op: dict[str, float] = {}
  static = {k: 0 for k in COLLECTIVES}
  per_step = {k: 0.0 for k in COLLECTIVES}
  for c, instrs in comps.items():
    w = mult.get(c, 0.0)
    for ins in instrs:
      op = ins.op
      base = op[:-6] if op.endswith('-start') else op
      if base not in static or op.endswith('-done'):
        continue
      static[base] += 1
      per_step[base] += w
      if breakdown and w:
        m = re.search(r'op_name="([^"]*)"', ins.attrs)
        key = f'{base} @ {_op_key(m.group(1)) if m else "?"}'
        coll_by_op[key] = coll_by_op.get(key, 0.0) + w
  out = {'collectives': {'static': static, 'per_step': {k: int(v) for k, v in per_step.items()}},
         'while_trip_counts': sorted(trips), 'while_loops': loops,
         'unknown_trip_counts': unknown, 'computations': len(comps)}
  if breakdown:
    out['collectives_by_op'] = dict(sorted(coll_by_op.items(), key=lambda kv: -kv[1]))
  return out


def _op_key(op_name: str) -> str:
  """'jit(wrapped)/while/body/closed_call/jvp()/dot_general' -> 'while/jvp()/dot_general'."""
  parts = [p for p in op_name.split('/') if p not in ('jit(wrapped)', 'body', 'closed_call')]
  return '/'.join(parts[-4:])
