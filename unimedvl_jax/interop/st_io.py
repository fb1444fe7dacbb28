"""Streaming safetensors I/O: read one tensor at a time, write one tensor at a time.

Reading parses and checks the header itself (`read_header`: a malformed file is one line naming
it) and memory-maps the file; a tensor is a read-only view of the map (nothing is copied until
the caller converts it). Sharded checkpoints are read through their `*.safetensors.index.json`.
Writing uses our own streaming writer of the safetensors format (8-byte little-endian header
length, JSON header with `__metadata__` and per-tensor dtype/shape/data_offsets, then the raw
little-endian bytes, contiguous, in header order), so an export never holds the whole file in
memory: peak host memory = the source arrays + ONE converted tensor. Files written here load with
`safetensors.torch.load_file` and `safe_open` (tested). `plan_shards` splits a file into
`model-0000k-of-0000n.safetensors` shards of at most a given size (transformers' rule).
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


def read_json_file(path: str, error=ValueError):
  """The parsed JSON of `path`; unreadable or malformed -> `error` with one line naming it."""
  try:
    with open(path, 'rb') as fh:
      return json.loads(fh.read().decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f'{path}: malformed JSON ({e})') from None
  except OSError as e:
    raise error(f'{path}: cannot be read ({e.strerror or e})') from None

class CheckpointFormatError(ValueError):
  """A checkpoint file cannot be read as what it claims to be (message: one line naming it)."""


MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors' own limit


def read_header(path: str) -> tuple[dict, dict, int]:
  """Parses and checks a safetensors header without reading any tensor data.

  Returns (entries key -> (shape, numpy dtype, (begin, end) absolute byte offsets), metadata,
  file size). Every malformation is a CheckpointFormatError naming the file: too short, a header
  length past the end, a header that is not a JSON object, an unknown dtype, a shape / offset pair
  that disagree, or data outside the file."""
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as fh:
      head = fh.read(8)
      if len(head) < 8:
        raise CheckpointFormatError(f'{path}: not a safetensors file ({size} bytes, no header)')
      (n,) = struct.unpack('<Q', head)
      if n > size - 8 or n > MAX_HEADER_BYTES:
        raise CheckpointFormatError(f'{path}: malformed safetensors header (header length {n} '
                                    f'does not fit a {size}-byte file)')
      raw = fh.read(n)
  except OSError as e:
    raise CheckpointFormatError(f'{path}: cannot be read ({e.strerror or e})') from None
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFormatError(f'{path}: malformed safetensors header (not JSON: {e})') from None
  if not isinstance(header, dict):
    raise CheckpointFormatError(f'{path}: malformed safetensors header (not a JSON object)')
  meta = header.pop('__metadata__', None) or {}
  if not isinstance(meta, dict):
    raise CheckpointFormatError(f'{path}: malformed safetensors header (__metadata__ is not an object)')
  data_start = 8 + n
  entries = {}
  for k, v in header.items():
    bad = lambda why: CheckpointFormatError(f'{path}: malformed safetensors header: tensor {k!r} {why}')
    if not isinstance(v, dict) or not {'dtype', 'shape', 'data_offsets'} <= set(v):
      raise bad('lacks dtype / shape / data_offsets')
    if v['dtype'] not in _NP_DTYPES:
      raise bad(f'has dtype {v["dtype"]!r}, not one of {sorted(_NP_DTYPES)}')
    shape, offs = v['shape'], v['data_offsets']
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offs, list) or len(offs) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offs)):
      raise bad(f'has shape {shape!r} / data_offsets {offs!r}')
    dt = _NP_DTYPES[v['dtype']]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if offs[1] - offs[0] != nbytes:
      raise bad(f'has shape {shape} ({nbytes} bytes) but data_offsets {offs}')
    if data_start + offs[1] > size:
      raise bad(f'has data up to byte {data_start + offs[1]} of a {size}-byte file (truncated?)')
    entries[k] = (tuple(shape), dt, (data_start + offs[0], data_start + offs[1]))
  return entries, {str(a): str(b) for a, b in meta.items()}, size


def count_nonfinite(a: np.ndarray, chunk: int = 1 << 24) -> int:
  """Number of NaN / inf values of a float array, in chunks (bounded temporary memory)."""
  if a.dtype.kind != 'f' and a.dtype != np.dtype(ml_dtypes.bfloat16):
    return 0
  flat = a.reshape(-1)
  return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + chunk])))
             for i in range(0, flat.size, chunk))


class TensorSource:
  """A read-only mapping key -> tensor that can report shapes/dtypes without reading data."""

  name = 'tensors'

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

  def metadata(self) -> dict:
    return {}

  def release(self, key: str) -> None:
    """Called once a tensor was consumed (a memory-mapped source drops its pages)."""

  def close(self):
    pass

  def __contains__(self, key):
    return key in set(self.keys())


class DictSource(TensorSource):
  """In-memory state dict (numpy arrays or torch tensors)."""

  def __init__(self, sd: Mapping, name: str = 'state dict', metadata: Mapping | None = None):
    self.sd = sd
    self.name = name
    self._metadata = dict(metadata or {})

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

  def metadata(self):
    return dict(self._metadata)


class SafetensorsSource(TensorSource):
  """One or several .safetensors files, memory-mapped (a HF `*.safetensors.index.json` shards a
  model: `from_index`).

  The headers are parsed and checked by `read_header` (a malformed file is a one-line
  CheckpointFormatError naming it); `get` returns a read-only view of the mapped file, so reading
  a tensor allocates nothing (its pages are page cache, dropped when the file is closed)."""

  def __init__(self, paths: str | Iterable[str], name: str | None = None):
    import mmap
    self.paths = [paths] if isinstance(paths, str) else list(paths)
    self.name = name or ', '.join(self.paths)
    self._where: dict[str, int] = {}
    self._meta: dict[str, tuple] = {}
    self._file_meta: list[dict] = []
    self._maps: list = []
    self.file_of: dict[str, str] = {}
    for i, p in enumerate(self.paths):
      entries, meta, size = read_header(p)
      self._file_meta.append(meta)
      for k, e in entries.items():
        if k in self._where:
          raise CheckpointFormatError(f'{p}: tensor {k!r} also appears in {self.file_of[k]}')
        self._where[k] = i
        self._meta[k] = e
        self.file_of[k] = p
      if size > 0:
        with open(p, 'rb') as fh:
          self._maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
      else:
        self._maps.append(None)

  @classmethod
  def from_index(cls, index_path: str):
    """Reads a sharded checkpoint through its index (`weight_map`: key -> shard file name).

    Refused with a one-line error: malformed JSON, no weight_map, an entry that is not a plain
    file inside the index's folder (absolute paths, `..`, links leading out), a missing shard,
    a key the index places in a shard that does not hold it, or a shard tensor the index omits."""
    idx = read_json_file(index_path, CheckpointFormatError)
    wm = idx.get('weight_map') if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm:
      raise CheckpointFormatError(f'{index_path}: no "weight_map" object (not a safetensors index)')
    root = os.path.realpath(os.path.dirname(os.path.abspath(index_path)))
    files: dict[str, str] = {}
    for key, fname in wm.items():
      if not isinstance(fname, str) or not fname:
        raise CheckpointFormatError(f'{index_path}: weight_map[{key!r}] is {fname!r}, not a file name')
      if fname not in files:
        full = os.path.realpath(os.path.join(root, fname))
        if os.path.isabs(fname) or os.path.commonpath([root, full]) != root:
          raise CheckpointFormatError(f'{index_path}: weight_map[{key!r}] = {fname!r} points outside '
                                      f'the checkpoint folder {root}; refused')
        if not os.path.isfile(full):
          raise CheckpointFormatError(f'{index_path}: shard {fname!r} (for {key!r}) does not exist')
        files[fname] = full
    order = sorted(files)
    src = cls([files[f] for f in order], name=index_path)
    for key, fname in wm.items():
      if src.file_of.get(key) != files[fname]:
        where = src.file_of.get(key)
        raise CheckpointFormatError(
            f'{index_path}: weight_map places {key!r} in {fname!r}, but '
            + (f'it is in {os.path.basename(where)!r}' if where else 'no shard holds it'))
    extra = sorted(set(src.keys()) - set(wm))
    if extra:
      raise CheckpointFormatError(f'{index_path}: {len(extra)} shard tensors are not in the '
                                  f'weight_map (e.g. {extra[0]!r} in {src.file_of[extra[0]]})')
    return src

  def keys(self):
    return list(self._where.keys())

  def shape(self, key):
    return self._meta[key][0]

  def dtype(self, key):
    return self._meta[key][1]

  def get(self, key):
    shape, dt, (a, b) = self._meta[key]
    mm = self._maps[self._where[key]]
    if a == b:
      return np.zeros(shape, dt)
    # safetensors is little-endian, like every platform JAX runs on
    return np.frombuffer(mm, dtype=dt, count=(b - a) // dt.itemsize, offset=a).reshape(shape)

  def release(self, key: str) -> None:
    """Drops the mapped pages of a tensor that was consumed (they are clean file pages: the
    kernel would reclaim them anyway, this keeps the resident set at about one tensor)."""
    import mmap
    _, _, (a, b) = self._meta[key]
    mm = self._maps[self._where[key]]
    page = mmap.PAGESIZE
    lo, hi = -(-a // page) * page, (b // page) * page
    if mm is not None and hi > lo and hasattr(mm, 'madvise'):
      try:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
      except (OSError, ValueError):
        pass

  def metadata(self) -> dict:
    out = {}
    for m in self._file_meta:
      out.update(m)
    return out

  def close(self):
    for mm in self._maps:
      if mm is not None:
        try:
          mm.close()
        except BufferError:   # a caller still holds a view: the map closes when it is collected
          pass
    self._maps = []


class PrefixStrippedSource(TensorSource):
  """`src` with a key prefix (e.g. 'module.' from DataParallel / DeepSpeed saves) removed."""

  def __init__(self, src: TensorSource, prefix: str):
    self.src, self.prefix = src, prefix
    self.name = src.name
    self._map = {}
    for k in src.keys():
      new = k[len(prefix):] if k.startswith(prefix) else k
      if new in self._map:
        raise CheckpointFormatError(f'{src.name}: both {k!r} and {self._map[new]!r} name {new!r}')
      self._map[new] = k

  def keys(self):
    return list(self._map)

  def shape(self, key):
    return self.src.shape(self._map[key])

  def dtype(self, key):
    return self.src.dtype(self._map[key])

  def get(self, key):
    return self.src.get(self._map[key])

  def metadata(self):
    return self.src.metadata()

  def release(self, key):
    self.src.release(self._map[key])

  def close(self):
    self.src.close()


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


# ------------------------------------------------------------------------------------ shards

_UNITS = {'': 1, 'B': 1, 'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'TB': 10 ** 12,
          'KIB': 2 ** 10, 'MIB': 2 ** 20, 'GIB': 2 ** 30, 'TIB': 2 ** 40}


def parse_size(text) -> int:
  """'5GB' -> 5 * 10**9, '5GiB' -> 5 * 2**30, '500MB', '123' (bytes): transformers' convention
  for `max_shard_size`."""
  import re
  if isinstance(text, int):
    n = text
  else:
    m = re.fullmatch(r'\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*', str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
      raise ValueError(f'shard size {text!r}: expected a number with an optional unit '
                       '(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB')
    n = int(float(m.group(1)) * _UNITS[unit])
  if n <= 0:
    raise ValueError(f'shard size {text!r} must be positive')
  return n


def shard_name(k: int, n: int, stem: str = 'model') -> str:
  return f'{stem}-{k:05d}-of-{n:05d}.safetensors'


def plan_shards(specs: Mapping[str, tuple], max_bytes: int, stem: str = 'model') -> list[tuple]:
  """Splits tensors (key -> (shape, dtype), in writing order) into shards of at most `max_bytes`
  of tensor data, exactly as huggingface_hub's `split_state_dict_into_shards_factory` (which
  transformers' `save_pretrained` uses): keys in order fill the current shard until the next one
  would tip it over; a tensor larger than `max_bytes` gets a shard of its own, placed when it is
  met. Returns [(file name, [keys])]; one shard is still named model-00001-of-00001."""
  shards, cur, size = [], [], 0
  for k, (shape, dt) in specs.items():
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    if n > max_bytes:
      shards.append([k])
      continue
    if size + n > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(k)
    size += n
  if cur:
    shards.append(cur)
  shards = [g for g in shards if g]
  return [(shard_name(i + 1, len(shards), stem), g) for i, g in enumerate(shards)]


def write_file_atomic(path: str, text: str) -> None:
  """Writes a small text file via a temporary name (no half-written JSON on interruption)."""
  tmp = path + '.partial'
  with open(tmp, 'w') as fh:
    fh.write(text)
    if not text.endswith('\n'):
      fh.write('\n')
  os.replace(tmp, path)
