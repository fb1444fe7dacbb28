"""UniMed-5M style JSONL: one sample per line (SPEC section 6), read with file:line locations.

    {"main_task_type": "image_generation", "sub_task_type": "segmentation", "dataset": "...",
     "input_img":  [{"path": "rel/path.png", "height": 512, "width": 512}],
     "output_img": [{"path": "rel/mask.png", "height": 512, "width": 512}],
     "message": [{"from": "human", "value": "<image>\\nPlease segment the lesion."},
                 {"from": "gpt", "value": "Here is the segmentation."}],
     "meta": {...}}                       # optional, passed through untouched

Required: `message`, a non-empty list of {"from": "human"|"gpt", "value": str}. Optional:
`input_img` / `output_img` (lists of {"path": str, ...}; extra image keys `height`, `width`,
`frame`, `slice_index` (or `slice`), `window`, `modality` are passed to the image reader),
`main_task_type`, `sub_task_type`, `dataset`, `meta`. Relative image paths are resolved against a
data root.

`JsonlSource` indexes the line offsets of one or more files (a few bytes per line, so multi-million
line files are fine) and reads lines by random access; it pickles without open file handles, so
grain worker processes can use it.

A bad line raises `SampleError(reason, file, line, detail)` with `reason` one of
`SAMPLE_ERROR_REASONS`; the image reasons come from `data/images.py` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

# Reasons a sample is skipped. The first five are the ones a line or its images can cause; the
# packer adds 'too_long'.
SAMPLE_ERROR_REASONS = ('malformed_json', 'missing_fields', 'missing_file', 'undecodable_image',
                        'unsupported_dicom', 'too_long')


class SampleError(Exception):
  """One sample cannot be used. `reason` in SAMPLE_ERROR_REASONS; `file`:`line` locate it."""

  def __init__(self, reason: str, file: str, line: int, detail: str = ''):
    self.reason, self.file, self.line, self.detail = reason, str(file), int(line), str(detail)
    super().__init__(f'{self.file}:{self.line}: {reason}: {detail}')

  @property
  def loc(self) -> str:
    return f'{self.file}:{self.line}'

  def __reduce__(self):  # picklable across grain worker processes
    return (SampleError, (self.reason, self.file, self.line, self.detail))


class DataError(RuntimeError):
  """The data pipeline cannot continue (too many bad samples, unusable configuration, ...)."""


@dataclasses.dataclass(frozen=True)
class RawLine:
  file: str
  line: int          # 1-based line number in `file`
  text: str

  @property
  def loc(self) -> str:
    return f'{self.file}:{self.line}'


@dataclasses.dataclass(frozen=True)
class ImageRef:
  path: str                      # absolute (resolved against the data root)
  height: int | None = None
  width: int | None = None
  frame: int | None = None       # multi-frame files (DICOM cine, TIFF stacks)
  slice_index: int | None = None  # volumes (NIfTI)
  window: Any = None             # CT window, passed to the reader as is
  modality: str | None = None    # a hint for the reader

  def load_kwargs(self) -> dict:
    return dict(frame=self.frame, slice_index=self.slice_index, window=self.window,
                modality_hint=self.modality)


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str          # 'human' | 'gpt'
  text: str


@dataclasses.dataclass(frozen=True)
class Sample:
  """One validated JSONL record."""
  file: str
  line: int
  main_task_type: str
  sub_task_type: str
  dataset: str
  input_img: tuple[ImageRef, ...]
  output_img: tuple[ImageRef, ...]
  message: tuple[Turn, ...]
  meta: dict
  group: str = ''

  @property
  def loc(self) -> str:
    return f'{self.file}:{self.line}'


def _opt_int(v, key, raw):
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
    raise SampleError('missing_fields', raw.file, raw.line, f'{key} must be an integer, got {v!r}')
  return int(v)


def _image_refs(rec: dict, key: str, root: str, raw: RawLine) -> tuple[ImageRef, ...]:
  v = rec.get(key)
  if v is None:
    return ()
  if isinstance(v, (str, dict)):
    v = [v]
  if not isinstance(v, list):
    raise SampleError('missing_fields', raw.file, raw.line,
                      f'{key!r} must be a list of {{"path": ...}} objects, got {type(v).__name__}')
  out = []
  for i, d in enumerate(v):
    if isinstance(d, str):
      d = {'path': d}
    if not isinstance(d, dict) or not isinstance(d.get('path'), str) or not d['path']:
      raise SampleError('missing_fields', raw.file, raw.line,
                        f'{key}[{i}] needs a non-empty string "path", got {d!r}'[:300])
    p = os.path.expanduser(d['path'])
    if not os.path.isabs(p):
      p = os.path.join(root, p)
    sl = d.get('slice_index', d.get('slice'))
    out.append(ImageRef(
        path=os.path.normpath(p),
        height=_opt_int(d.get('height'), f'{key}[{i}].height', raw),
        width=_opt_int(d.get('width'), f'{key}[{i}].width', raw),
        frame=_opt_int(d.get('frame'), f'{key}[{i}].frame', raw),
        slice_index=_opt_int(sl, f'{key}[{i}].slice_index', raw),
        window=d.get('window'),
        modality=d.get('modality') if isinstance(d.get('modality'), str) else None))
  return tuple(out)


def parse_record(raw: RawLine, root: str, group: str = '') -> Sample:
  """Parses and validates one JSONL line. Raises SampleError('malformed_json'|'missing_fields')."""
  try:
    rec = json.loads(raw.text)
  except (ValueError, RecursionError) as e:
    raise SampleError('malformed_json', raw.file, raw.line, str(e)) from None
  if not isinstance(rec, dict):
    raise SampleError('malformed_json', raw.file, raw.line,
                      f'a line must hold one JSON object, got {type(rec).__name__}')
  msg = rec.get('message')
  if not isinstance(msg, list) or not msg:
    raise SampleError('missing_fields', raw.file, raw.line,
                      f'"message" must be a non-empty list of turns; keys present: {sorted(rec)}')
  turns = []
  for i, t in enumerate(msg):
    if (not isinstance(t, dict) or t.get('from') not in ('human', 'gpt')
        or not isinstance(t.get('value'), str)):
      raise SampleError('missing_fields', raw.file, raw.line,
                        f'message[{i}] must be {{"from": "human"|"gpt", "value": str}}, got '
                        f'{t!r}'[:300])
    turns.append(Turn(t['from'], t['value']))
  for key in ('main_task_type', 'sub_task_type', 'dataset'):
    if rec.get(key) is not None and not isinstance(rec[key], str):
      raise SampleError('missing_fields', raw.file, raw.line,
                        f'{key!r} must be a string, got {rec[key]!r}'[:300])
  meta = rec.get('meta') or {}
  if not isinstance(meta, dict):
    raise SampleError('missing_fields', raw.file, raw.line, f'"meta" must be an object, got {meta!r}')
  return Sample(
      file=raw.file, line=raw.line,
      main_task_type=rec.get('main_task_type') or '',
      sub_task_type=rec.get('sub_task_type') or '',
      dataset=rec.get('dataset') or '',
      input_img=_image_refs(rec, 'input_img', root, raw),
      output_img=_image_refs(rec, 'output_img', root, raw),
      message=tuple(turns), meta=meta, group=group)


_CHUNK = 1 << 24


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(start offsets, lengths, 1-based line numbers) of the non-blank lines of `path`."""
  starts, lens, nums = [], [], []
  with open(path, 'rb') as f:
    base, line_no, carry_start = 0, 1, 0
    while True:
      chunk = f.read(_CHUNK)
      if not chunk:
        break
      nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base
      if nl.size:
        s = np.concatenate([[carry_start], nl[:-1] + 1])
        starts.append(s)
        lens.append(nl - s)
        nums.append(np.arange(line_no, line_no + nl.size))
        line_no += nl.size
        carry_start = int(nl[-1]) + 1
      base += len(chunk)
    if base > carry_start:   # last line without a trailing newline
      starts.append(np.array([carry_start]))
      lens.append(np.array([base - carry_start]))
      nums.append(np.array([line_no]))
  if not starts:
    z = np.zeros(0, np.int64)
    return z, z, z
  s, l, n = (np.concatenate(a).astype(np.int64) for a in (starts, lens, nums))
  keep = l > 0
  # drop lines that are only '\r' (CRLF files' blank lines)
  if keep.any():
    with open(path, 'rb') as f:
      for i in np.flatnonzero(keep & (l <= 2)):
        f.seek(int(s[i]))
        if not f.read(int(l[i])).strip():
          keep[i] = False
  return s[keep], l[keep], n[keep]


class JsonlSource(Sequence):
  """Random access to the non-blank lines of JSONL files: `src[i] -> RawLine`."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.path.abspath(p) for p in paths]
    missing = [p for p in self.paths if not os.path.isfile(p)]
    if missing:
      raise DataError(f'JSONL file(s) not found: {missing}')
    file_ids, starts, lens, nums = [], [], [], []
    for fi, p in enumerate(self.paths):
      s, l, n = _index_lines(p)
      file_ids.append(np.full(s.shape, fi, np.int32))
      starts.append(s)
      lens.append(l)
      nums.append(n)
    self._file = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
    self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self._len = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    self._num = np.concatenate(nums) if nums else np.zeros(0, np.int64)
    self._fds: dict[int, int] = {}
    self._pid = os.getpid()

  def __len__(self) -> int:
    return int(self._start.shape[0])

  def _fd(self, fi: int) -> int:
    if self._pid != os.getpid():   # forked: do not share descriptors' offsets (pread anyway)
      self._fds, self._pid = {}, os.getpid()
    fd = self._fds.get(fi)
    if fd is None:
      fd = self._fds[fi] = os.open(self.paths[fi], os.O_RDONLY)
    return fd

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    fi = int(self._file[i])
    data = os.pread(self._fd(fi), int(self._len[i]), int(self._start[i]))
    return RawLine(self.paths[fi], int(self._num[i]), data.decode('utf-8', errors='replace'))

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_fds'] = {}
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._pid = os.getpid()

  def __del__(self, _close=os.close, _getpid=os.getpid):
    if getattr(self, '_pid', None) != _getpid():
      return
    for fd in getattr(self, '_fds', {}).values():
      try:
        _close(fd)
      except OSError:
        pass

  def __repr__(self):
    return f'JsonlSource({len(self)} lines in {len(self.paths)} file(s))'


def iter_records(path: str, root: str | None = None, group: str = ''
                 ) -> Iterator[Sample | SampleError]:
  """Every non-blank line of `path` as a Sample, or the SampleError explaining why not.

  `root` defaults to the directory of `path`.
  """
  root = os.path.dirname(os.path.abspath(path)) if root is None else root
  src = JsonlSource([path])
  for i in range(len(src)):
    raw = src[i]
    try:
      yield parse_record(raw, root, group)
    except SampleError as e:
      yield e
