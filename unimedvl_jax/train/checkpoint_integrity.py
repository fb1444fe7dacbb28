"""Is a checkpoint step intact? Recorded checksums of its files, and finiteness of arrays.

`write_checksums` records the sha256 and size of every file of a completed step in
`<step>/unimedvl_checksums.json`; `verify_checksums` checks the files of the items to restore
against it (CheckpointCorruptError naming the files missing or changed). `nonfinite_leaves`
names the floating-point leaves of a tree holding NaN or inf (a state that is never saved, a
restored step that is refused).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import jax
import jax.numpy as jnp

from unimedvl_jax.train.checkpoint_format import CheckpointCorruptError, flat_keys, to_tree

CHECKSUMS = 'unimedvl_checksums.json'


def _sha256(path: str, chunk: int = 1 << 23) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while True:
      b = f.read(chunk)
      if not b:
        return h.hexdigest()
      h.update(b)


def _step_files(step_dir: str) -> list[str]:
  """Relative ('/'-separated) paths of the files of a step directory, the checksum file aside."""
  out = []
  for r, _, files in os.walk(step_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(r, f), step_dir).replace(os.sep, '/')
      if rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def _hash_files(step_dir: str, rels: list[str]) -> list[str]:
  paths = [os.path.join(step_dir, *r.split('/')) for r in rels]
  if len(paths) <= 1:
    return [_sha256(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as ex:
    return list(ex.map(_sha256, paths))     # hashlib releases the GIL on large buffers


def write_checksums(step_dir: str) -> dict:
  """Records sha256 + size of every file of a completed step in `step_dir/CHECKSUMS`."""
  rels = _step_files(step_dir)
  digests = _hash_files(step_dir, rels)
  rec = {'version': 1, 'algorithm': 'sha256',
         'files': {r: {'size': os.path.getsize(os.path.join(step_dir, *r.split('/'))),
                       'sha256': d} for r, d in zip(rels, digests)}}
  path = os.path.join(step_dir, CHECKSUMS)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(rec, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return rec


def verify_checksums(step_dir: str, items) -> bool:
  """Checks the files of `items` against the recorded checksums. False if none are recorded;
  raises CheckpointCorruptError naming the files that are missing or changed."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(f'{path} is unreadable ({type(e).__name__}: {e})') from None
  items = set(items)
  want = {r: v for r, v in files.items() if r.split('/')[0] in items}
  problems, to_hash = [], []
  for r, v in sorted(want.items()):
    p = os.path.join(step_dir, *r.split('/'))
    try:
      size = os.path.getsize(p)
    except OSError:
      problems.append(f'{r} is missing')
      continue
    if size != v['size']:
      problems.append(f'{r} has {size} bytes, {v["size"]} were written')
    else:
      to_hash.append(r)
  for r, d in zip(to_hash, _hash_files(step_dir, to_hash)):
    if d != want[r]['sha256']:
      problems.append(f'{r} changed since it was written (sha256 mismatch)')
  if problems:
    raise CheckpointCorruptError(f'{len(problems)} file(s) fail their recorded checksum: '
                                 + '; '.join(problems[:5]) + (' ...' if len(problems) > 5 else ''))
  return True


def nonfinite_leaves(tree) -> list[str]:
  """'/'-joined paths of the floating-point leaves of `tree` holding a NaN or an infinity (one
  device reduction per leaf, one transfer of booleans)."""
  checks = {}
  for keys, leaf in flat_keys(to_tree(tree)).items():
    dt = getattr(leaf, 'dtype', None)
    if dt is None or not jnp.issubdtype(dt, jnp.inexact):
      continue
    checks['/'.join(keys)] = jnp.all(jnp.isfinite(leaf))
  got = jax.device_get(checks)
  return sorted(k for k, ok in got.items() if not bool(ok))
