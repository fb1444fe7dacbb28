"""The latent cache: the frozen VAE's posterior moments of every VAE image of a dataset, stored once
in a zarr array through tensorstore, so that training never runs the VAE encoder.

    python -m unimedvl_jax.data cache-latents --config C --data DIR [--checkpoint WORKDIR]
                                              [--out DIR/latent_cache] [--split train]

Layout of a cache directory:
  moments.zarr   float32 [rows, 2, D] (zarr via tensorstore): per latent token, the posterior's
                 (mean, logvar) in token layout (`AutoEncoder.encode_token_moments`, unscaled)
  index.json     {'version', 'vae_fingerprint', 'rule', 'entries': {key: {row, h, w, src}}}
                 key = image path relative to the data root + '|' + its reader options;
                 h, w = the size the image was encoded at (the VAE resize rule); row = its first
                 token row; src = (bytes, mtime_ns) of the file when it was encoded.

Training with `data.latent_cache` reads the moments of each VAE image instead of its pixels and
the step samples z = mean + exp(logvar / 2) * noise exactly as it does after encoding pixels, so
the training semantics are unchanged (the same latents for the same noise). A cache is only valid
for the VAE that wrote it (`vae_fingerprint`, checked at the start of training) and for the
files as they were (`src`, checked per image): a stale or missing entry is a LatentCacheError
naming the image, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Iterable

import numpy as np

from unimedvl_jax.data.jsonl import DataError

VERSION = 1
INDEX = 'index.json'
ARRAY = 'moments.zarr'
_CHUNK_ROWS = 4096
_READ_CACHE_BYTES = 512 << 20     # decoded chunks kept per process (128 chunks of a 128-wide cache)


class LatentCacheError(DataError):
  """The latent cache cannot serve an image (missing, stale, other VAE): rebuild it."""


def image_key(root: str, ref) -> str:
  """The cache key of an ImageRef: path relative to the data root + its reader options."""
  rel = os.path.relpath(os.path.abspath(ref.path), os.path.abspath(root))
  # what selects the pixels (frame / slice / window / modality); not the decoder's pixel cap
  opts = {k: v for k, v in sorted(ref.load_kwargs().items())
          if v is not None and k != 'max_pixels'}
  return rel + '|' + json.dumps(opts, sort_keys=True, default=str)


def _src_stamp(path: str) -> list[int]:
  st = os.stat(path)
  return [int(st.st_size), int(st.st_mtime_ns)]


def vae_fingerprint(vae_state) -> str:
  """sha256 over the VAE's parameters (path-sorted names, shapes, dtypes and bytes)."""
  from flax import nnx
  h = hashlib.sha256()
  flat = sorted(((tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(vae_state)),
                key=lambda kv: kv[0])
  for path, v in flat:
    a = np.asarray(v[...] if hasattr(v, 'get_value') or hasattr(v, 'value') else v)
    h.update('/'.join(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def rule_of(cfg) -> dict:
  from unimedvl_jax.batch import Geometry
  g = Geometry.from_config(cfg)
  return {'vae_max_size': int(g.vae_max_size), 'vae_min_size': int(g.vae_min_size),
          'latent_px': int(g.latent_px), 'latent_patch': int(cfg.model.latent_patch_size),
          'z_channels': int(cfg.model.vae.z_channels), 'latent_dim': int(g.latent_dim)}


def _open_array(path: str, *, create: bool = False, dim: int = 0):
  import tensorstore as ts
  spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': path}}
  if create:
    return ts.open(spec, create=True, delete_existing=True, dtype=ts.float32, shape=[0, 2, dim],
                   chunk_layout=ts.ChunkLayout(chunk_shape=[_CHUNK_ROWS, 2, dim])).result()
  # Reads keep decoded chunks in memory: a lookup reads a few rows of one 4096-row chunk, and
  # without a cache every lookup re-read and decoded the whole chunk from disk (2.4 ms each,
  # about half the data pipeline's time on the main job's editing stages). One bounded pool per
  # process serves every reader (the groups of a stage read the same array); cached chunks are
  # revalidated against the files once, when a reader opens the array, so a reader made after a
  # rebuild never sees the old array's chunks. Each image's staleness against its source file
  # is checked in `lookup`.
  spec['recheck_cached_data'] = 'open'
  return ts.open(spec, open=True, read=True, context=_read_context()).result()


_READ_CONTEXTS: dict[int, Any] = {}     # pid -> tensorstore Context (a forked child makes its own)


def _read_context():
  import tensorstore as ts
  pid = os.getpid()
  if pid not in _READ_CONTEXTS:
    _READ_CONTEXTS[pid] = ts.Context({'cache_pool': {'total_bytes_limit': _READ_CACHE_BYTES}})
  return _READ_CONTEXTS[pid]


class LatentCache:
  """Read side (one per process; picklable: the tensorstore handle is reopened lazily)."""

  def __init__(self, directory: str, root: str, cfg=None):
    self.directory, self.root = os.path.abspath(directory), os.path.abspath(root)
    path = os.path.join(self.directory, INDEX)
    if not os.path.exists(path):
      raise LatentCacheError(f'latent cache {self.directory}: no {INDEX} (write it with '
                             '`python -m unimedvl_jax.data cache-latents`)')
    try:
      with open(path) as f:
        self.index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise LatentCacheError(f'latent cache {path}: unreadable ({e})') from None
    if self.index.get('version') != VERSION:
      raise LatentCacheError(f'latent cache {path}: version {self.index.get("version")}, '
                             f'this code reads {VERSION}')
    if cfg is not None:
      want, have = rule_of(cfg), self.index.get('rule', {})
      diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
      if diff:
        raise LatentCacheError(f'latent cache {self.directory} was written for other image '
                               f'rules / latent shapes (cache, config): {diff}; rebuild it')
    self._arr = None

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_arr'] = None
    return d

  @property
  def fingerprint(self) -> str:
    return self.index['vae_fingerprint']

  def check_vae(self, fingerprint: str) -> None:
    if fingerprint != self.fingerprint:
      raise LatentCacheError(
          f'latent cache {self.directory} was written by another VAE (fingerprint '
          f'{self.fingerprint[:12]}..., the model has {fingerprint[:12]}...); rebuild it')

  def lookup(self, ref, sample=None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[int, int]]:
    """((mean, logvar) float32 [k, D], (h, w)) of an ImageRef. Raises LatentCacheError."""
    key = image_key(self.root, ref)
    e = self.index['entries'].get(key)
    where = f' (sample {sample.loc})' if sample is not None and hasattr(sample, 'loc') else ''
    if e is None:
      raise LatentCacheError(f'latent cache {self.directory} has no entry for image '
                             f'{ref.path}{where}; rebuild it over this data')
    try:
      stamp = _src_stamp(ref.path)
    except OSError as err:
      raise LatentCacheError(f'image {ref.path}{where}: {err}') from None
    if stamp != list(e['src']):
      raise LatentCacheError(f'latent cache entry of image {ref.path}{where} is stale (file '
                             f'size/mtime {stamp} != {e["src"]} when cached); rebuild the cache')
    if self._arr is None:
      self._arr = _open_array(os.path.join(self.directory, ARRAY))
    k = (e['h'] // self.index['rule']['latent_px']) * (e['w'] // self.index['rule']['latent_px'])
    rows = np.asarray(self._arr[e['row']:e['row'] + k].read().result(), np.float32)
    return (rows[:, 0], rows[:, 1]), (int(e['h']), int(e['w']))


def iter_vae_images(cfg, root: str, splits: Iterable[str] = ('train',)) -> Iterable[Any]:
  """Every distinct VAE ImageRef of the configured groups' samples (plan order, no repeats)."""
  from unimedvl_jax.data import pipeline
  from unimedvl_jax.data.jsonl import SampleError, iter_records
  from unimedvl_jax.data.plans import plan_sample
  seen = set()
  for split in splits:
    groups, _ = pipeline.resolve_groups(cfg, None, split, root)
    for g in groups:
      for f in g['files']:
        for rec in iter_records(f, root, g['name']):
          if isinstance(rec, SampleError):
            continue          # bad lines are the pipeline's to count; nothing to cache
          try:
            items = plan_sample(rec)
          except SampleError:
            continue
          for it in items:
            if it.kind == 'vae':
              key = image_key(root, it.image)
              if key not in seen:
                seen.add(key)
                yield it.image


def build(cfg, model, root: str, out: str, *, splits=('train',), batch: int = 32,
          log=print) -> dict:
  """Encodes every VAE image of the data (each at its own size) with `model.vae` and writes the
  cache to `out`. Unreadable images are skipped and counted (the pipeline reports them when it
  meets them). Returns a summary dict."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from unimedvl_jax.batch import Geometry
  from unimedvl_jax.data import images as imlib

  g = Geometry.from_config(cfg)
  D = g.latent_dim
  p = int(cfg.model.latent_patch_size)
  os.makedirs(out, exist_ok=True)
  arr = _open_array(os.path.join(out, ARRAY), create=True, dim=D)
  vae_g, vae_s = nnx.split(model.vae)

  @jax.jit
  def encode(state, x):
    mean, logvar = nnx.merge(vae_g, state).encode_token_moments(x, p)
    return jnp.stack([mean, logvar], axis=2)          # [n, k, 2, D]

  entries: dict[str, dict] = {}
  pending: dict[tuple[int, int], list] = {}
  rows = {'n': 0}
  skipped: dict[str, int] = {}
  t0 = time.perf_counter()

  def flush(size):
    refs = pending.pop(size)
    x = np.stack([imlib.to_unit_range(px) for _, _, px in refs])
    mom = np.asarray(encode(vae_s, jnp.asarray(x)), np.float32)      # [n, k, 2, D]
    n, k = mom.shape[:2]
    start = rows['n']
    nonlocal_arr = arr_box['a'].resize(exclusive_max=[start + n * k, 2, D],
                                       resize_metadata_only=True).result()
    arr_box['a'] = nonlocal_arr
    nonlocal_arr[start:start + n * k] = mom.reshape(n * k, 2, D)
    for i, (key, stamp, _) in enumerate(refs):
      entries[key] = {'row': start + i * k, 'h': size[0], 'w': size[1], 'src': stamp}
    rows['n'] = start + n * k

  arr_box = {'a': arr}
  n_img = 0
  for ref in iter_vae_images(cfg, root, splits):
    try:
      img = imlib.load_image(ref.path, **ref.load_kwargs())
      stamp = _src_stamp(ref.path)
    except (imlib.ImageError, OSError, ValueError) as e:
      skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
      continue
    h2, w2 = imlib.target_size(img.shape[0], img.shape[1], **g.vae_rule)
    pending.setdefault((h2, w2), []).append((image_key(root, ref), stamp,
                                              imlib.resize(img, (h2, w2))))
    n_img += 1
    if len(pending[(h2, w2)]) >= batch:
      flush((h2, w2))
  for size in list(pending):
    flush(size)
  index = {'version': VERSION, 'vae_fingerprint': vae_fingerprint(vae_s), 'rule': rule_of(cfg),
           'splits': list(splits), 'entries': entries}
  tmp = os.path.join(out, INDEX + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(index, f)
  os.replace(tmp, os.path.join(out, INDEX))      # the index last: a half-written cache has none
  summary = {'directory': os.path.abspath(out), 'images': n_img, 'token_rows': rows['n'],
             'skipped': skipped, 'seconds': round(time.perf_counter() - t0, 1)}
  log(f'latent cache: {n_img} images, {rows["n"]} token rows -> {out} '
      f'({summary["seconds"]} s; skipped {skipped or "none"})')
  return summary
