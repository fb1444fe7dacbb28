"""libtpu for the AOT tests, which is NOT a test requirement (`pip install -e .[aot]` or
`pip install -r requirements-aot.txt`; scripts/setup_env.sh installs it into .libtpu/, outside
the venv, so no plain `python` of the venv tries to initialise a TPU).

`libtpu_path()`: the directory to put on a subprocess's PYTHONPATH ('' when the running python
imports libtpu itself, UNIMEDVL_LIBTPU_PATH when it names a directory holding the `libtpu`
package), or None. `require_libtpu()`: that path, or skips the calling test with the reason.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

SKIP_REASON = ("libtpu is not importable (it is for AOT planning only: pip install -e '.[aot]' "
               "or -r requirements-aot.txt, which pin libtpu==0.0.42.1, the version "
               "jax[tpu]==0.10.2 pins; or set UNIMEDVL_LIBTPU_PATH to a directory holding the "
               "libtpu package): cannot AOT-compile for a TPU topology")


def libtpu_path() -> str | None:
  extra = os.environ.get('UNIMEDVL_LIBTPU_PATH')
  if extra and os.path.isdir(os.path.join(extra, 'libtpu')):
    return extra
  return '' if importlib.util.find_spec('libtpu') is not None else None


def require_libtpu() -> str:
  path = libtpu_path()
  if path is None:
    pytest.skip(SKIP_REASON)
  return path
