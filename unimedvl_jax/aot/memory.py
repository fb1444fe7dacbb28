"""Per-chip memory of a compiled program: compile-or-OOM (with the numbers XLA:TPU prints when
it refuses a program), the conservative total, and the bytes of a sharded state per chip."""

from __future__ import annotations

import math
import re
from typing import Any

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
