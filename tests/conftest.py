"""Shared test fixtures (all test directories).

synthetic_dir   a small embedded dataset (48 synthetic subjects, 64 px, real sample files
                included), generated once per test session into a temporary directory.
tokenizer       the SentencePiece tokenizer of that dataset.

And the `flaky_retry` marker's hook (below): marked tests get one second attempt.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# One persistent XLA compilation cache for every process of the test run (both xdist workers and
# the training subprocesses the tests start inherit it). Many tests compile a program another
# test (or the same test's resumed run) already compiled: a cache hit loads that same executable,
# so no number changes; only the compile time goes. Set before any test module imports jax; an
# outer JAX_COMPILATION_CACHE_DIR wins.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'unimedvl_jax_test_xla_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

SYNTHETIC_KW = dict(seed=0, size=64, n_subjects=48, include_real=True)


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
  from unimedvl_jax.data import synthetic
  out = tmp_path_factory.mktemp('synthetic') / 'ds'
  synthetic.generate(str(out), **SYNTHETIC_KW)
  return out


@pytest.fixture(scope='session')
def synthetic_manifest(synthetic_dir):
  import json
  return json.loads((synthetic_dir / 'manifest.json').read_text())


@pytest.fixture(scope='session')
def tokenizer(synthetic_dir):
  from unimedvl_jax.data.tokenizer import load_tokenizer
  return load_tokenizer('sentencepiece', str(synthetic_dir / 'tokenizer.model'))


# ------------------------------------------------------------------------ flaky_retry (no plugin)
# A test marked @pytest.mark.flaky_retry(reason=...) (registered in setup.cfg) runs a second time
# when its first attempt fails; only the second attempt is reported, with the first attempt's
# failure attached (a 'flaky_retry' report section) and a line in the terminal summary. Unmarked
# tests never re-run. A failed fixture of a wider scope than the test stays failed (pytest caches
# it): the retry repeats the test with its function-scoped fixtures.

_RETRIED: list[tuple[str, str]] = []   # (node id, outcome of the second attempt)


def pytest_runtest_protocol(item, nextitem):
  if item.get_closest_marker('flaky_retry') is None:
    return None                                   # the default protocol
  from _pytest.runner import runtestprotocol
  item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
  reports = runtestprotocol(item, nextitem=nextitem, log=False)
  failed = [r for r in reports if r.failed]
  if failed:
    first = f'first attempt failed ({failed[0].when}):\n{failed[0].longreprtext[-4000:]}'
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for r in reports:
      r.sections.append(('flaky_retry', first))
  for r in reports:
    item.ihook.pytest_runtest_logreport(report=r)
  item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
  return True


def pytest_runtest_logreport(report):
  """Notes the retried tests (also in the xdist controller: reports carry their sections)."""
  retried = any(name == 'flaky_retry' for name, _ in report.sections)
  if retried and (report.when == 'call' or (report.when == 'setup' and not report.passed)):
    _RETRIED.append((report.nodeid, report.outcome))


def pytest_terminal_summary(terminalreporter):
  if _RETRIED:
    terminalreporter.write_sep('=', f'flaky_retry: {len(_RETRIED)} test(s) ran a second attempt')
    for nodeid, outcome in _RETRIED:
      terminalreporter.write_line(f'{nodeid}: second attempt {outcome}')


# ------------------------------------------------------------------ slow files first (xdist)
# `--dist loadfile` hands whole files to the two workers in collection order, which is
# alphabetical: the long subprocess / training files of tests/scale and tests/train came last, and
# one worker ran them alone while the other idled. Files holding a @pytest.mark.slow test are
# collected first (order otherwise kept), so the short files fill in at the end.
def pytest_collection_modifyitems(session, config, items):
  slow_files = {item.path for item in items if item.get_closest_marker('slow') is not None}
  items.sort(key=lambda item: item.path not in slow_files)    # stable: False (slow) first
