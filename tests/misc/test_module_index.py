"""MODULES.md lists every module of the package (the package's __init__ files without a docstring
excepted), and nothing that is gone."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package_modules() -> set[str]:
  out = set()
  for d, _, files in os.walk(os.path.join(ROOT, 'unimedvl_jax')):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(d, f)
      if f == '__init__.py':
        with open(path) as fh:
          if not ast.get_docstring(ast.parse(fh.read())):
            continue
      out.add(os.path.relpath(path, ROOT))
  return out


def _listed() -> set[str]:
  out, section = set(), None
  with open(os.path.join(ROOT, 'MODULES.md')) as fh:
    for line in fh:
      m = re.match(r'^## `([^`]+)/`', line)
      if m:
        section = m.group(1)
        continue
      m = re.match(r'^- `([^`]+\.py)`: \S', line)
      if m and section:
        out.add(f'{section}/{m.group(1)}')
  return out


def test_every_module_is_listed_once():
  have, listed = _package_modules(), _listed()
  assert have, 'found no package modules'
  assert sorted(have - listed) == [], 'modules missing from MODULES.md'
  assert sorted(listed - have) == [], 'MODULES.md lists modules that do not exist'
