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

Image paths must stay inside the data root (after resolving `..` and symlinks) unless
`allow_outside_root` is set (config `data.allow_outside_root`). A UTF-8 byte order mark at the
start of a file is skipped; a file without any sample is an error (`DataError` naming it).

A bad line raises `SampleError(reason, file, line, detail)` with `reason` one of
`SAMPLE_ERROR_REASONS` (documented in `SAMPLE_ERROR_DOCS`); the image reasons come from
`data/images.py` unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np

# Why a sample is skipped: reason -> what it means. Every per-sample failure is counted under one
# of these (the training pipeline and `python -m unimedvl_jax.data check` report them by name).
SAMPLE_ERROR_DOCS = {
    'malformed_json': 'the line is not one JSON object',
    'missing_fields': 'a required field is missing, or a field has the wrong type or value (e.g. '
                      'a "height" that is not a finite integer, a "window" that is neither a '
                      'preset name nor [center, width])',
    'invalid_text': 'a text or path is not valid Unicode (e.g. a lone UTF-16 surrogate escape '
                    'such as \\ud800), or the tokenizer cannot encode it',
    'path_outside_root': 'an image path leaves the data root (../, an absolute path elsewhere, '
                         'a symlink pointing out); allowed with config.data.allow_outside_root',
    'missing_file': 'an image file does not exist (or is a directory)',
    'not_a_regular_file': 'an image path is a FIFO, socket or device, not a regular file',
    'image_too_large': 'the image header declares more pixels than the configured cap '
                       '(images.source_pixel_cap): refused before decoding',
    'undecodable_image': 'an image file cannot be decoded (corrupt, truncated, unknown format)',
    'unsupported_dicom': 'a DICOM file without pixel data or with a transfer syntax that cannot '
                         'be decoded here',
    'too_long': 'the sample exceeds a pack budget (data.max_sample_tokens, seq_len, '
                'max_latent_tokens, max_vit_patches, max_vae_images, a latent/ViT grid)',
    'vae_size': 'a VAE image whose (resized) size has no slot in data.vae_buckets (training '
                'from pixels; a latent cache takes any size)',
    'processing_error': 'any other exception while processing the sample (a bug or an input '
                        'case not foreseen); the example gives the exception type and text',
}
SAMPLE_ERROR_REASONS = tuple(SAMPLE_ERROR_DOCS)


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
  window: Any = None             # CT window: a preset name or (center, width)
  modality: str | None = None    # a hint for the reader
  max_pixels: int | None = None  # refuse files whose header declares more pixels (None: no cap)

  def load_kwargs(self) -> dict:
    return dict(frame=self.frame, slice_index=self.slice_index, window=self.window,
                modality_hint=self.modality, max_pixels=self.max_pixels)


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
  if (isinstance(v, bool) or not isinstance(v, (int, float))
      or (isinstance(v, float) and not math.isfinite(v)) or int(v) != v):
    raise SampleError('missing_fields', raw.file, raw.line,
                      f'{key} must be a finite integer, got {v!r}'[:300])
  return int(v)


def _check_window(w, key, raw):
  """None, a preset name of images.WINDOW_PRESETS, or [center, width] (finite, width > 0)."""
  if w is None:
    return None
  from unimedvl_jax.data.images import WINDOW_PRESETS
  if isinstance(w, str):
    if w not in WINDOW_PRESETS:
      raise SampleError('missing_fields', raw.file, raw.line,
                        f'{key} {w!r} is not a window preset; choose from '
                        f'{sorted(WINDOW_PRESETS)} or give [center, width]'[:300])
    return w
  ok = (isinstance(w, (list, tuple)) and len(w) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in w) and w[1] > 0)
  if not ok:
    raise SampleError('missing_fields', raw.file, raw.line,
                      f'{key} must be a preset name or [center, width] with finite numbers and '
                      f'width > 0, got {w!r}'[:300])
  return (float(w[0]), float(w[1]))


def _unicode_problem(s: str) -> str | None:
  try:
    s.encode('utf-8')
    return None
  except UnicodeEncodeError as e:
    return f'{e.reason} {s[e.start:e.end]!r} at character {e.start}'


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
  return os.path.realpath(root)


def _outside_root(path: str, root: str) -> str | None:
  """The resolved path if it is not inside the (resolved) root, else None."""
  real, top = os.path.realpath(path), _real_root(root)
  if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
    return None
  return real


def _image_refs(rec: dict, key: str, root: str, raw: RawLine, allow_outside_root: bool,
                max_pixels: int | None) -> tuple[ImageRef, ...]:
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
    try:
      os.fsencode(d['path'])
      if '\0' in d['path']:
        raise ValueError('a NUL character')
    except (UnicodeEncodeError, ValueError) as e:
      raise SampleError('invalid_text', raw.file, raw.line,
                        f'{key}[{i}].path {d["path"]!r} is not a valid file name ({e})'[:300]
                        ) from None
    p = os.path.expanduser(d['path'])
    if not os.path.isabs(p):
      p = os.path.join(root, p)
    p = os.path.normpath(p)
    if not allow_outside_root:
      real = _outside_root(p, root)
      if real is not None:
        raise SampleError('path_outside_root', raw.file, raw.line,
                          f'{key}[{i}].path {d["path"]!r} resolves to {real}, outside the data '
                          f'root {_real_root(root)} (set config.data.allow_outside_root=True to '
                          'allow it)')
    sl = d.get('slice_index', d.get('slice'))
    modality = d.get('modality')
    if isinstance(modality, str) and _unicode_problem(modality):
      modality = None
    out.append(ImageRef(
        path=p,
        height=_opt_int(d.get('height'), f'{key}[{i}].height', raw),
        width=_opt_int(d.get('width'), f'{key}[{i}].width', raw),
        frame=_opt_int(d.get('frame'), f'{key}[{i}].frame', raw),
        slice_index=_opt_int(sl, f'{key}[{i}].slice_index', raw),
        window=_check_window(d.get('window'), f'{key}[{i}].window', raw),
        modality=modality if isinstance(modality, str) else None,
        max_pixels=max_pixels))
  return tuple(out)


def parse_record(raw: RawLine, root: str, group: str = '', *, allow_outside_root: bool = False,
                 max_image_pixels: int | None = None) -> Sample:
  """Parses and validates one JSONL line. Raises SampleError (reasons 'malformed_json',
  'missing_fields', 'invalid_text', 'path_outside_root').

  allow_outside_root: accept image paths outside `root` (config data.allow_outside_root).
  max_image_pixels: the pixel cap the image readers apply to these images (None: no cap).
  """
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
                      f'"message" must be a non-empty list of turns; keys present: {sorted(rec)}'
                      [:300])
  turns = []
  for i, t in enumerate(msg):
    if (not isinstance(t, dict) or t.get('from') not in ('human', 'gpt')
        or not isinstance(t.get('value'), str)):
      raise SampleError('missing_fields', raw.file, raw.line,
                        f'message[{i}] must be {{"from": "human"|"gpt", "value": str}}, got '
                        f'{t!r}'[:300])
    why = _unicode_problem(t['value'])
    if why:
      raise SampleError('invalid_text', raw.file, raw.line,
                        f'message[{i}].value is not valid Unicode: {why}')
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
      input_img=_image_refs(rec, 'input_img', root, raw, allow_outside_root, max_image_pixels),
      output_img=_image_refs(rec, 'output_img', root, raw, allow_outside_root, max_image_pixels),
      message=tuple(turns), meta=meta, group=group)


_CHUNK = 1 << 24
_BOM = b'\xef\xbb\xbf'


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
  with open(path, 'rb') as f:
    if f.read(len(_BOM)) == _BOM:   # a UTF-8 byte order mark opens the first line: skip it
      s[0] += len(_BOM)
      l[0] -= len(_BOM)
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
      raise DataError(f'JSONL file(s) not found (or not regular files): {missing}')
    file_ids, starts, lens, nums = [], [], [], []
    for fi, p in enumerate(self.paths):
      s, l, n = _index_lines(p)
      if s.size == 0:
        raise DataError(f'JSONL file {p} holds no sample (it is empty or only blank lines)')
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


def iter_records(path: str, root: str | None = None, group: str = '', *,
                 allow_outside_root: bool = False) -> Iterator[Sample | SampleError]:
  """Every non-blank line of `path` as a Sample, or the SampleError explaining why not.

  `root` defaults to the directory of `path`.
  """
  root = os.path.dirname(os.path.abspath(path)) if root is None else root
  src = JsonlSource([path])
  for i in range(len(src)):
    raw = src[i]
    try:
      yield parse_record(raw, root, group, allow_outside_root=allow_outside_root)
    except SampleError as e:
      yield e
