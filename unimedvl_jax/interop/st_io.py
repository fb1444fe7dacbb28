"""Streaming safetensors I/O: read one tensor at a time, write one tensor at a time.

Reading uses `safetensors.safe_open` (memory-mapped; `get_tensor` materialises one tensor).
Writing uses our own streaming writer of the safetensors format (8-byte little-endian header
length, JSON header with `__metadata__` and per-tensor dtype/shape/data_offsets, then the raw
little-endian bytes, contiguous, in header order), so an export never holds the whole file in
memory: peak host memory = the source arrays + ONE converted tensor. Files written here load with
`safetensors.torch.load_file` and `safe_open` (tested).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    np.dtype(np.float64): 'F64', np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
    np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.int64): 'I64', np.dtype(np.int32): 'I32',
    np.dtype(np.int16): 'I16', np.dtype(np.int8): 'I8', np.dtype(np.uint8): 'U8',
    np.dtype(np.bool_): 'BOOL',
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def np_dtype(name_or_dtype) -> np.dtype:
  """'float32' / 'bfloat16' / numpy or jax dtype -> numpy dtype (bfloat16 via ml_dtypes)."""
  if isinstance(name_or_dtype, str) and name_or_dtype == 'bfloat16':
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name_or_dtype)


def st_dtype(dtype) -> str:
  dt = np.dtype(dtype)
  if dt not in _ST_DTYPES:
    raise TypeError(f'dtype {dt} cannot be written to safetensors')
  return _ST_DTYPES[dt]


def np_dtype_of_st(name: str) -> np.dtype:
  if name not in _NP_DTYPES:
    raise TypeError(f'safetensors dtype {name} is not supported')
  return _NP_DTYPES[name]


# ------------------------------------------------------------------------------------- reading

class TensorSource:
  """A read-only mapping key -> tensor that can report shapes/dtypes without reading data."""

  def keys(self) -> list[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple:
    raise NotImplementedError

  def dtype(self, key: str) -> np.dtype:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def shapes(self) -> dict[str, tuple]:
    return {k: self.shape(k) for k in self.keys()}

  def close(self):
    pass

  def __contains__(self, key):
    return key in set(self.keys())


class DictSource(TensorSource):
  """In-memory state dict (numpy arrays or torch tensors)."""

  def __init__(self, sd: Mapping, name: str = 'state dict'):
    self.sd = sd
    self.name = name

  def keys(self):
    return list(self.sd.keys())

  def _np(self, key):
    v = self.sd[key]
    if hasattr(v, 'detach'):   # torch.Tensor
      import torch
      v = v.detach().cpu()
      if v.dtype == torch.bfloat16:
        return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return v.numpy()
    return np.asarray(v)

  def shape(self, key):
    return tuple(int(d) for d in self.sd[key].shape)

  def dtype(self, key):
    v = self.sd[key]
    if hasattr(v, 'detach'):
      return self._np(key).dtype
    return np.asarray(v).dtype

  def get(self, key):
    return self._np(key)


class SafetensorsSource(TensorSource):
  """One or several .safetensors files (a HF `*.safetensors.index.json` shards a model)."""

  def __init__(self, paths: str | Iterable[str]):
    from safetensors import safe_open
    self.paths = [paths] if isinstance(paths, str) else list(paths)
    self.name = ', '.join(self.paths)
    self._files = []
    self._where: dict[str, object] = {}
    self._meta: dict[str, tuple] = {}
    for p in self.paths:
      f = safe_open(p, framework='numpy')
      self._files.append(f)
      for k in f.keys():
        if k in self._where:
          raise ValueError(f'{p}: key {k!r} also appears in another shard')
        self._where[k] = f
        sl = f.get_slice(k)
        self._meta[k] = (tuple(int(d) for d in sl.get_shape()), np_dtype_of_st(sl.get_dtype()))

  @classmethod
  def from_index(cls, index_path: str):
    with open(index_path) as fh:
      wm = json.load(fh)['weight_map']
    d = os.path.dirname(index_path)
    return cls([os.path.join(d, f) for f in sorted(set(wm.values()))])

  def keys(self):
    return list(self._where.keys())

  def shape(self, key):
    return self._meta[key][0]

  def dtype(self, key):
    return self._meta[key][1]

  def get(self, key):
    return self._where[key].get_tensor(key)

  def metadata(self) -> dict:
    out = {}
    for f in self._files:
      out.update(f.metadata() or {})
    return out

  def close(self):
    for f in self._files:
      if hasattr(f, '__exit__'):
        try:
          f.__exit__(None, None, None)
        except Exception:   # noqa: BLE001 - closing best-effort
          pass
    self._files = []


# ------------------------------------------------------------------------------------- writing

class StreamingWriter:
  """Writes a safetensors file tensor by tensor, in the order of `specs` (key -> (shape, dtype)).

      with StreamingWriter(path, specs, metadata={'format': 'pt'}) as w:
        for key in specs: w.write(key, array)

  The header is written first (all shapes/dtypes known up front); each `write` checks the key
  order, shape and dtype, then appends the bytes. Closing verifies every tensor was written.
  """

  def __init__(self, path: str, specs: Mapping[str, tuple], metadata: Mapping[str, str] | None = None):
    self.path = path
    self.order = list(specs.keys())
    self.specs = {k: (tuple(int(d) for d in s), np.dtype(dt)) for k, (s, dt) in specs.items()}
    header: dict = {}
    if metadata:
      header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for k in self.order:
      shape, dt = self.specs[k]
      n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
      header[k] = {'dtype': st_dtype(dt), 'shape': list(shape), 'data_offsets': [off, off + n]}
      off += n
    self.total = off
    hb = json.dumps(header, separators=(',', ':')).encode('utf-8')
    hb += b' ' * ((-len(hb)) % 8)    # 8-byte alignment of the data section
    self._fh = open(path + '.partial', 'wb')
    self._fh.write(struct.pack('<Q', len(hb)))
    self._fh.write(hb)
    self._next = 0

  def write(self, key: str, array) -> None:
    if self._next >= len(self.order) or self.order[self._next] != key:
      want = self.order[self._next] if self._next < len(self.order) else '(none left)'
      raise ValueError(f'{self.path}: tensors must be written in header order; got {key!r}, '
                       f'expected {want!r}')
    shape, dt = self.specs[key]
    a = np.asarray(array)
    if tuple(a.shape) != shape or a.dtype != dt:
      raise ValueError(f'{self.path}: {key} is {a.dtype}{list(a.shape)}, header says {dt}{list(shape)}')
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == '>':
      a = a.astype(a.dtype.newbyteorder('<'))
    self._fh.write(a.reshape(-1).view(np.uint8).data)
    self._next += 1

  def close(self) -> None:
    if self._fh is None:
      return
    self._fh.close()
    self._fh = None
    if self._next != len(self.order):
      os.remove(self.path + '.partial')
      raise ValueError(f'{self.path}: only {self._next} of {len(self.order)} tensors were written '
                       f'(next: {self.order[self._next]!r})')
    os.replace(self.path + '.partial', self.path)

  def abort(self) -> None:
    if self._fh is not None:
      self._fh.close()
      self._fh = None
      if os.path.exists(self.path + '.partial'):
        os.remove(self.path + '.partial')

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.abort()
    else:
      self.close()
